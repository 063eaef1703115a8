"""CLIP score (Hessel et al. 2021, as torchmetrics computes it): mean over image-caption pairs of
100 · max(cos(image embedding, text embedding), 0), with any transformers CLIP-style model (CLIPModel, also
SigLIP or anything with get_image_features / get_text_features) by hub id or local folder.

Images go through the checkpoint's image processor when it ships one (transformers uses the PIL processor when
torchvision is absent), else a bicubic resize to the vision config's image_size and CLIP's mean/std. Captions are
tokenized with the checkpoint's tokenizer and truncated to the text tower's max_position_embeddings (77 for CLIP).
"""
from __future__ import annotations

import torch

from engine.eval.fid import _quiet_transformers, as_uint8_nchw, fallback_norm, fallback_preprocess, load_image_processor


def _embedding(out) -> torch.Tensor:
    """transformers 5 returns a model output with the projected embedding as pooler_output; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPScorer:
    """`scores(images, captions)` -> (N,) per-pair CLIP scores; `__call__` -> their mean (float).

    Args:
        name_or_path: hub id or folder with the model, its tokenizer and (optionally) its image processor.
        device, batch_size: where and how many pairs per forward pass.
    """

    def __init__(self, name_or_path: str, device="cpu", batch_size: int = 64):
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        _quiet_transformers()
        self.name = name_or_path
        self.device, self.batch_size = torch.device(device), batch_size
        config = AutoConfig.from_pretrained(name_or_path)
        self.model = transformers.AutoModel.from_pretrained(name_or_path).to(self.device).eval()
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "get_text_features"):
            raise ValueError(f"--clip {name_or_path}: {type(self.model).__name__} is not a CLIP-style image-text "
                             "model (it has no get_image_features / get_text_features)")
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.processor = load_image_processor(name_or_path)
        vcfg, tcfg = config.vision_config, config.text_config
        self.size = int(vcfg.image_size)
        self.max_length = int(getattr(tcfg, "max_position_embeddings", 77) or 77)
        self.mean, self.std = fallback_norm(config.model_type)
        self.padding = "max_length" if config.model_type.startswith("siglip") else True  # SigLIP trained padded

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        if self.processor is None:
            return fallback_preprocess(x, self.size, self.mean, self.std)
        return self.processor(images=list(x.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def embed(self, images, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image (N, E), text (N, E)) embeddings, float32 on the CPU."""
        x = as_uint8_nchw(images)
        if len(captions) != len(x):
            raise ValueError(f"{len(captions)} captions for {len(x)} images")
        dtype = next(self.model.parameters()).dtype
        img, txt = [], []
        for i in range(0, len(x), self.batch_size):
            px = self._pixels(x[i:i + self.batch_size]).to(self.device, dtype)
            img.append(_embedding(self.model.get_image_features(pixel_values=px)).float().cpu())
            tok = self.tokenizer(list(captions[i:i + self.batch_size]), padding=self.padding, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            kw = {"attention_mask": tok["attention_mask"]} if "attention_mask" in tok else {}
            txt.append(_embedding(self.model.get_text_features(input_ids=tok["input_ids"], **kw)).float().cpu())
        img, txt = torch.cat(img), torch.cat(txt)
        return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)

    def scores(self, images, captions: list[str]) -> torch.Tensor:
        """(N,) 100 · max(cos(image_i, caption_i), 0)."""
        img, txt = self.embed(images, captions)
        return 100 * (img * txt).sum(-1).clamp_min(0)

    def __call__(self, images, captions: list[str]) -> float:
        return float(self.scores(images, captions).mean())
