"""Encoded image → RGB → short side resized to each resolution → center crop → float (3, res, res) in [-1, 1].

Two decoders share one batch interface, `decoder(items) -> list[Decoded | str]`: a Decoded is a dict
{res: Tensor (3, res, res)} that also knows the image's size (for the report's notes on tiny or extreme images); a
str is the reason an item could not be used (undecodable, truncated, zero bytes, ...): bad images are reported by
the caller, never raised.
  * PILDecoder (default): Pillow in a thread pool (Pillow releases the GIL while decoding and resizing).
  * DaliDecoder (`--decoder dali`): NVIDIA DALI, on the GPU ("mixed") where there is one, else its CPU pipeline;
    needs the package nvidia-dali-cuda120.
PIL is imported on first use, so importing this module needs torch and numpy only.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

RESAMPLE = "BICUBIC"  # Pillow's bicubic resize antialiases when shrinking (its support scales with the factor)


# Notes on usable but doubtful images (report.jsonl; stored anyway unless --min-side says otherwise).
UPSCALE_NOTE = 2.0  # the short side is upscaled more than this to the largest resolution
ASPECT_NOTE = 4.0  # long side / short side at least this: the center crop keeps a quarter of the image or less


class BadImage(ValueError):
    """An item that cannot become a training image; the message is the reason written to the report."""


class Decoded(dict):
    """{res: float32 (3, res, res) in [-1, 1]} of one image, with `size` = (W, H) of the image as stored (EXIF
    orientation applied, before any reduced decoding or resizing)."""

    def __init__(self, images: dict, size: tuple[int, int]):
        super().__init__(images)
        self.size = size


def size_notes(size: tuple[int, int], resolution: int) -> list[str]:
    """Why an image of `size` (W, H) is a doubtful sample at `resolution`: far upscaled, extreme aspect ratio."""
    (w, h), short = size, min(size)
    notes = []
    if short * UPSCALE_NOTE < resolution:
        notes.append(f"upscaled: short side {short} px, {resolution / short:.1f}x to {resolution} px")
    if max(size) >= ASPECT_NOTE * short:
        notes.append(f"extreme aspect ratio {w}x{h}: the center crop keeps {100 * short / max(size):.1f}% of it")
    return notes


def oriented_size(img) -> tuple[int, int]:
    """(W, H) of a PIL image as displayed: EXIF orientations 5-8 swap its stored sides."""
    w, h = img.size
    return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def decode_image(data, min_size: int | None = None):
    """decode_with_size without the size."""
    return decode_with_size(data, min_size)[0]


def decode_with_size(data, min_size: int | None = None):
    """Encoded bytes (or a PIL image) → (fully loaded RGB PIL image, its (W, H) as stored, before any reduction);
    raises BadImage with the reason.

    min_size: the largest resolution needed. JPEGs are then decoded at the smallest power-of-two reduction whose
    sides stay >= min_size (Pillow's `draft`, done in the DCT domain): several times faster on large photos, and
    the image is resized down afterwards anyway.
    """
    from PIL import Image, ImageOps

    if isinstance(data, Image.Image):
        img = data
        size = oriented_size(img)
    else:
        if data is None or len(data) == 0:
            raise BadImage("zero-byte image")
        try:
            img = Image.open(io.BytesIO(data))
            size = oriented_size(img)  # before draft() decodes a reduced version
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            img.load()  # decodes everything now: a truncated file fails here, not later in a worker
        except Exception as e:
            raise BadImage(f"undecodable image: {type(e).__name__}: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)  # phone photos are stored sideways with an orientation tag
        return _to_rgb(img), size
    except Exception as e:
        raise BadImage(f"image conversion failed: {type(e).__name__}: {e}") from None


def _to_rgb(img):
    """RGB; transparency is composited over white (not black, which is what a bare convert gives)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: convert("RGB") would clip, not rescale
        arr = np.asarray(img, dtype=np.float64)
        full = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0  # the format's range, not the
        img = Image.fromarray((arr.clip(0, full) * (255.0 / full)).round().astype(np.uint8))  # image's own maximum
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_center_crop(img, res: int):
    """RGB PIL image → res×res: short side resized to res (bicubic), then the centered res×res window."""
    from PIL import Image

    w, h = img.size
    scale = res / min(w, h)
    nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), getattr(Image.Resampling, RESAMPLE))
    left, top = (nw - res) // 2, (nh - res) // 2
    return img.crop((left, top, left + res, top + res))


def to_tensor(img) -> torch.Tensor:
    """RGB PIL image (H, W) → float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


def preprocess(data, resolutions: list[int]) -> Decoded:
    """One item → {res: float32 (3, res, res) in [-1, 1]} and its size; decoded once for all resolutions. Raises
    BadImage."""
    img, size = decode_with_size(data, min_size=max(resolutions))
    return Decoded({r: to_tensor(resize_center_crop(img, r)) for r in resolutions}, size)


class PILDecoder:
    """Batch decode with Pillow in `num_threads` threads: items → [Decoded {res: (3, res, res)} or reason str]."""

    def __init__(self, resolutions: list[int], num_threads: int = 4):
        self.resolutions = sorted(resolutions)
        self.pool = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="decode")

    def _one(self, data):
        try:
            return preprocess(data, self.resolutions)
        except BadImage as e:
            return str(e)

    def __call__(self, items: list) -> list:
        return list(self.pool.map(self._one, items))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


DALI_PACKAGE = "nvidia-dali-cuda120"


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--decoder dali needs NVIDIA DALI: pip install {DALI_PACKAGE} "
                          f"(or install the variant for your CUDA version); or use --decoder pil") from e
    return nvidia.dali


class DaliDecoder:
    """Batch decode, resize and crop with NVIDIA DALI; same interface as PILDecoder.

    DALI fails a whole batch on one bad image, so items are screened first (zero bytes; a header Pillow cannot
    identify) and, if the pipeline still fails, the batch is redone item by item through Pillow, which names the
    bad ones. The resize is DALI's antialiased cubic, close to but not bit-identical with Pillow's.
    """

    def __init__(self, resolutions: list[int], batch_size: int, num_threads: int = 4, device_id: int | None = None):
        _import_dali()
        self.resolutions = sorted(resolutions)
        self.fallback = PILDecoder(resolutions, num_threads)
        self.gpu = device_id is not None
        self._args = (batch_size, num_threads, device_id)
        self.pipe = self._build(*self._args)

    def _build(self, batch_size, num_threads, device_id):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id)  # None: CPU only
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            img = fn.decoders.image(encoded, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
            outs = []
            for r in self.resolutions:
                x = fn.resize(img, resize_shorter=r, interp_type=types.INTERP_CUBIC, antialias=True)
                outs.append(fn.crop_mirror_normalize(  # centered r×r, (x - 127.5) / 127.5, HWC → CHW
                    x, crop=(r, r), crop_pos_x=0.5, crop_pos_y=0.5, mean=[127.5] * 3, std=[127.5] * 3,
                    dtype=types.FLOAT, output_layout="CHW"))
            return tuple(outs)

        p = pipe()
        p.build()
        return p

    def _screen(self, data) -> str | None:
        from PIL import Image

        if not isinstance(data, (bytes, bytearray, memoryview)):
            return "pil"  # already a PIL image: nothing for DALI to decode
        if len(data) == 0:
            return "zero-byte image"
        try:
            header = Image.open(io.BytesIO(data))  # header only
        except Exception as e:
            return f"undecodable image: {type(e).__name__}: {e}"
        if header.mode in ("RGBA", "LA", "PA") or "transparency" in header.info:
            return "pil"  # DALI drops alpha (black background); Pillow composites over white, as training expects
        return None

    def __call__(self, items: list) -> list:
        from PIL import Image

        screened = [self._screen(d) for d in items]
        good = [i for i, s in enumerate(screened) if s is None]
        out = [None if s is None else s for s in screened]
        for i, s in enumerate(screened):
            if s == "pil":
                out[i] = self.fallback._one(items[i])
        if good:
            try:
                self.pipe.feed_input("encoded", [np.frombuffer(items[i], dtype=np.uint8) for i in good])
                tensors = self.pipe.run()
                arrays = [t.as_cpu().as_array() if self.gpu else t.as_array() for t in tensors]  # (n, 3, r, r)
                for k, i in enumerate(good):
                    size = oriented_size(Image.open(io.BytesIO(items[i])))  # header only
                    out[i] = Decoded({r: torch.from_numpy(a[k]) for r, a in zip(self.resolutions, arrays)}, size)
            except Exception:  # one bad image spoils the batch: let Pillow name it, and decode the rest
                self.pipe = self._build(*self._args)  # a pipeline that raised is not trusted to run again
                for i in good:
                    out[i] = self.fallback._one(items[i])
        return out

    def close(self) -> None:
        self.fallback.close()


def make_decoder(name: str, resolutions: list[int], batch_size: int, num_threads: int,
                 device: torch.device | None = None):
    """`pil` or `dali` decoder for these resolutions; DALI decodes on `device` when it is a GPU."""
    if name == "pil":
        return PILDecoder(resolutions, num_threads)
    if name == "dali":
        device_id = (device.index or 0) if device is not None and device.type == "cuda" else None
        return DaliDecoder(resolutions, batch_size, num_threads, device_id)
    raise ValueError(f"--decoder must be pil or dali, got {name!r}")
