"""DALI decoding on its CPU pipeline (where nvidia-dali is installed): same crops as Pillow within resize differences,
and a bad image in a batch is reported by position while the others still decode."""
import io

import numpy as np
import torch
import pytest

pytest.importorskip("nvidia.dali")

from engine.data.preprocess import make_decoder  # noqa: E402


def encoded(fmt: str, w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth content: resize filters then differ only slightly, so the comparison can be tight
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx / w * 255), (yy / h * 255), np.full((h, w), rng.integers(0, 255))], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, quality=95) if fmt == "JPEG" else Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def count_calls(monkeypatch, obj, name):
    calls = []
    real = getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_dali_cpu_pipeline_matches_pillow_and_reports_bad_images(monkeypatch):
    items = [encoded("JPEG", 64, 48, 0), encoded("PNG", 40, 72, 1), b"not an image at all", b"",
             encoded("JPEG", 96, 96, 2)]
    dali = make_decoder("dali", [32], batch_size=8, num_threads=2)
    pil = make_decoder("pil", [32], batch_size=8, num_threads=2)
    runs = count_calls(monkeypatch, dali.pipe, "run")
    got, ref = dali(items), pil(items)
    assert len(runs) == 1  # the three good images went through DALI, not the Pillow fallback
    diffs = [float((got[i][32] - ref[i][32]).abs().mean()) for i in (0, 1, 4)]
    assert all(got[i][32].shape == (3, 32, 32) for i in (0, 1, 4))
    assert max(diffs) < 0.03  # [-1, 1] scale: under 1% of the range
    assert max(diffs) > 0  # DALI's own resize, not Pillow's pixels
    assert isinstance(got[2], str) and isinstance(got[3], str) and "zero-byte" in got[3]
    dali.close()
    pil.close()


def test_an_image_dali_cannot_decode_is_reported_and_its_batch_still_decodes(monkeypatch):
    """A truncated JPEG passes the header screen, so DALI itself fails on the batch: the pipeline is rebuilt, Pillow
    names the bad image, and its neighbours still decode."""
    whole = encoded("JPEG", 96, 96, 5)
    items = [encoded("JPEG", 64, 48, 0), whole[: len(whole) // 2], encoded("PNG", 40, 72, 1)]
    dali = make_decoder("dali", [32], batch_size=8, num_threads=2)
    builds = count_calls(monkeypatch, dali, "_build")
    got = dali(items)
    assert len(builds) == 1  # the pipeline that raised was replaced
    assert isinstance(got[1], str) and "truncated" in got[1].lower(), got[1]
    assert got[0][32].shape == (3, 32, 32) and got[2][32].shape == (3, 32, 32)
    assert isinstance(dali([items[0]])[0], dict)  # the rebuilt pipeline decodes again
    dali.close()


def test_transparent_images_go_through_pillow_so_both_decoders_agree():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (40, 40), (10, 200, 30, 0)).save(buf, format="PNG")  # fully transparent
    dali = make_decoder("dali", [32], batch_size=4, num_threads=1)
    out = dali([buf.getvalue()])[0][32]
    assert torch.allclose(out, torch.ones_like(out))  # composited over white, as Pillow does
    dali.close()
