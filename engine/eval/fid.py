"""Fréchet distance (FID) between two image sets, from streamed feature statistics, in plain torch (no scipy).

    FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

with the trace of the matrix square root taken from the eigenvalues of the symmetric PSD matrix
S_1^(1/2) S_2 S_1^(1/2) (it has the same eigenvalues as S_1 S_2); everything in float64.

Feature extractors (an FID number is only comparable with another computed with the SAME extractor, input
convention and image resolution; `extractor.name` spells all of it out and eval.json records it):

* `InceptionTorchScript(path)`: the TorchScript Inception-v3 `inception-2015-12-05.pt` used by StyleGAN2-ADA,
  StyleGAN3 and clean-fid (a port of the TF-slim graph of the original TTUR FID code). Its convention, which is
  the default here: `model(x, return_features=True)` with x float32 (N, 3, H, W) RGB in [0, 255]; the module
  resizes to 299×299 (bilinear) itself and returns (N, 2048) pool3 features. Other TorchScript feature nets work
  with `input_range` ("0-255" | "0-1" | "-1-1"), `call_kwargs` ({} for a plain forward) and `resize` (resize to
  that side with bicubic antialiasing before the call, as clean-fid does) set to match.
* `HFVisionFeatures(id_or_path)`: any transformers vision model: CLIP / SigLIP vision towers (also from a full
  CLIPModel / SiglipModel checkpoint), DINOv2, or anything AutoModel loads. Features are `pooler_output` (CLIP:
  post-layernorm CLS token; DINOv2: layernormed CLS), else the mean of `last_hidden_state` over tokens. Inputs go
  through the checkpoint's own image processor when it ships one; otherwise images are resized (bicubic,
  antialiased) to the config's image_size and normalised with CLIP's mean/std for CLIP, 0.5/0.5 for SigLIP and the
  ImageNet mean/std for everything else.

`FeatureStats` accumulates count, mean and scatter matrix batch by batch (Chan et al.'s parallel update, float64),
so any number of images fits in memory; stats save to / load from .npz (`mu`, `sigma`, as pytorch-fid writes them).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- statistics


class FeatureStats:
    """Streaming mean and covariance of (N, D) features, in float64: `update(feats)` any number of times."""

    def __init__(self, extractor: str = ""):
        self.extractor = extractor
        self.n: int | None = 0  # None: loaded from a file that has no count (pytorch-fid's)
        self.mean: torch.Tensor | None = None  # (D,)
        self.m2: torch.Tensor | None = None  # (D, D) sum of outer products of deviations from the mean

    def update(self, feats) -> "FeatureStats":
        x = torch.as_tensor(feats).detach().to("cpu", torch.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
        if self.mean is not None and x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature width changed from {self.mean.shape[0]} to {x.shape[1]}")
        if self.n is None:
            raise ValueError("stats loaded without an image count cannot be updated")
        nb = x.shape[0]
        if nb == 0:
            return self
        mb = x.mean(0)
        xc = x - mb
        m2b = xc.T @ xc
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return self
        n = self.n + nb
        delta = mb - self.mean
        self.m2 = self.m2 + m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n
        return self

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased covariance (D, D), as numpy.cov and pytorch-fid compute it."""
        if self.n is None:  # loaded from a file without a count: m2 holds the covariance itself
            return self.m2
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 feature vectors, have {self.n}")
        return self.m2 / (self.n - 1)

    @classmethod
    def of(cls, feats, extractor: str = "") -> "FeatureStats":
        return cls(extractor).update(feats)

    def save(self, path) -> Path:
        """.npz with mu, sigma (pytorch-fid's names), n and the extractor name."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self.n is None else {"n": np.int64(self.n)}
        np.savez(path, mu=self.mean.numpy(), sigma=self.cov.numpy(), extractor=np.array(self.extractor), **extra)
        return path

    @classmethod
    def load(cls, path) -> "FeatureStats":
        """Stats from an .npz with mu and sigma (ours or pytorch-fid's; theirs carry no count or extractor name)."""
        with np.load(path) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"{path}: an FID statistics file needs arrays 'mu' and 'sigma', has {list(z)}")
            s = cls(str(z["extractor"]) if "extractor" in z else "")
            s.mean = torch.from_numpy(z["mu"]).double()
            s.n = int(z["n"]) if "n" in z else None
            s.m2 = torch.from_numpy(z["sigma"]).double() * (s.n - 1 if s.n else 1)
        return s


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition (negative eigenvalues from
    round-off are clamped to 0)."""
    a = (a + a.T) / 2
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    r1 = sqrtm_psd(s1)
    eig = torch.linalg.eigvalsh((r1 @ s2 @ r1 + (r1 @ s2 @ r1).T) / 2)
    tr_covmean = eig.clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID of two FeatureStats; refuses stats from different named extractors."""
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise ValueError(f"FID needs features from one extractor, got {a.extractor!r} and {b.extractor!r}")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


# ---------------------------------------------------------------- images in


def as_uint8_nchw(images) -> torch.Tensor:
    """uint8 (B, 3, H, W) from float (B, 3, H, W) in [-1, 1], uint8 (B, 3, H, W) tensors, or uint8 (B, H, W, 3)
    arrays (grey images are repeated to 3 channels)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            images = torch.from_numpy(images)
        else:
            arr = images[..., None] if images.ndim == 3 else images  # (B, H, W) grey
            if arr.ndim != 4:
                raise ValueError(f"uint8 arrays must be (B, H, W, C), got shape {arr.shape}")
            x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a (B, C, H, W) tensor or a uint8 (B, H, W, C) array")
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def _resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


def _file_tag(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{path.name}@sha256:{h.hexdigest()[:12]}"


# ---------------------------------------------------------------- extractors


_RANGES = {"0-255": (0.0, 255.0), "0-1": (0.0, 1.0), "-1-1": (-1.0, 1.0)}


class InceptionTorchScript:
    """Features from a TorchScript file (default: the conventions of inception-2015-12-05.pt, see module doc).

    Args:
        path: the .pt file (torch.jit.load).
        input_range: "0-255" (default), "0-1" or "-1-1": the float range the module expects.
        call_kwargs: keyword arguments of every call (default {"return_features": True}).
        resize: None (the module resizes itself) or a side to resize to before the call.
        device, batch_size.
    """

    def __init__(self, path, input_range: str = "0-255", call_kwargs: dict | None = None,
                 resize: int | None = None, device="cpu", batch_size: int = 64):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--inception: no TorchScript file at {path}")
        if input_range not in _RANGES:
            raise ValueError(f"input_range must be one of {list(_RANGES)}, got {input_range!r}")
        self.device = torch.device(device)
        self.model = torch.jit.load(str(path), map_location=self.device).eval()
        self.input_range, self.resize, self.batch_size = input_range, resize, batch_size
        self.call_kwargs = {"return_features": True} if call_kwargs is None else dict(call_kwargs)
        kw = json.dumps(self.call_kwargs, sort_keys=True)
        self.name = (f"torchscript:{_file_tag(path)} input=float[{input_range}] RGB NCHW "
                     f"resize={resize or 'inside-module'} kwargs={kw}")

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        x = as_uint8_nchw(images)
        out = []
        for i in range(0, len(x), self.batch_size):
            b = x[i:i + self.batch_size].to(self.device).float()
            if self.resize:
                b = _resize(b, self.resize).clamp(0, 255)
            lo, hi = _RANGES[self.input_range]
            b = b / 255.0 * (hi - lo) + lo
            f = self.model(b, **self.call_kwargs)
            f = f[0] if isinstance(f, (tuple, list)) else f
            out.append(f.reshape(f.shape[0], -1).float().cpu())  # (b, D); (b, D, 1, 1) pooled maps too
        return torch.cat(out) if out else torch.zeros(0, 0)


_VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel"}
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_image_processor(path: str):
    """The checkpoint's image processor (transformers picks the PIL one when torchvision is absent), or None."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError):
        return None


def fallback_preprocess(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size): bicubic antialiased resize, [0, 1], (x - mean) / std."""
    x = _resize(x.float(), size).clamp(0, 255) / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def fallback_norm(model_type: str) -> tuple[tuple, tuple]:
    if model_type.startswith("clip"):
        return _CLIP_MEAN, _CLIP_STD
    if model_type.startswith("siglip"):
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return _IMAGENET_MEAN, _IMAGENET_STD


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # a vision tower from a full CLIP checkpoint lists unused keys


class HFVisionFeatures:
    """Pooled features of a transformers vision model (hub id or local folder); see the module doc."""

    def __init__(self, name_or_path: str, device="cpu", batch_size: int = 64):
        import transformers
        from transformers import AutoConfig

        _quiet_transformers()
        self.device, self.batch_size = torch.device(device), batch_size
        config = AutoConfig.from_pretrained(name_or_path)
        cls_name = _VISION_TOWERS.get(config.model_type, "AutoModel")
        self.model = getattr(transformers, cls_name).from_pretrained(name_or_path).to(self.device).eval()
        self.processor = load_image_processor(name_or_path)
        vcfg = getattr(config, "vision_config", None) or config
        self.size = int(getattr(vcfg, "image_size", 224) or 224)
        self.mean, self.std = fallback_norm(config.model_type)
        prep = (type(self.processor).__name__ if self.processor is not None else
                f"resize{self.size}-bicubic+normalize(mean={list(self.mean)},std={list(self.std)})")
        self.name = f"hf:{name_or_path} class={type(self.model).__name__} out=pooled preprocess={prep}"

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        if self.processor is None:
            return fallback_preprocess(x, self.size, self.mean, self.std)
        arr = list(x.permute(0, 2, 3, 1).numpy())  # uint8 (H, W, 3) each
        return self.processor(images=arr, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        x = as_uint8_nchw(images)
        out = []
        for i in range(0, len(x), self.batch_size):
            px = self._pixels(x[i:i + self.batch_size]).to(self.device, next(self.model.parameters()).dtype)
            o = self.model(pixel_values=px)
            f = getattr(o, "pooler_output", None)
            if f is None:
                h = o.last_hidden_state
                f = h.mean(1) if h.ndim == 3 else h.flatten(2).mean(-1)  # tokens (B, T, D) or maps (B, C, h, w)
            out.append(f.reshape(f.shape[0], -1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


def build_extractor(inception: str | None = None, features: str | None = None, device="cpu", **kwargs):
    """One extractor from the CLI's --inception path / --features id (exactly one of them)."""
    if bool(inception) == bool(features):
        raise ValueError("give exactly one of --inception <file.pt> and --features <hub id or path>")
    if inception:
        return InceptionTorchScript(inception, device=device, **kwargs)
    return HFVisionFeatures(features, device=device, **kwargs)


def compute_stats(extractor, batches) -> FeatureStats:
    """FeatureStats of every image batch in the iterable `batches`."""
    stats = FeatureStats(extractor.name)
    for images in batches:
        stats.update(extractor(images))
    return stats


def warn_if_few(n: int, dim: int) -> str | None:
    """A note when the covariance is rank-deficient (fewer images than feature dimensions + 1)."""
    if n <= dim:
        return (f"{n} images for {dim}-dimensional features: the covariance is rank-deficient and FID is biased "
                f"upwards; compare only with FIDs from the same number of images")
    return None

