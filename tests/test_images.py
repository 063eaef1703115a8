"""engine.outputs.images: uint8 conversion, grid arithmetic, atomic PNG writes, captioned sheets, loss curves."""
import numpy as np
import pytest
import torch
from PIL import Image

from engine.outputs.images import PAD, make_grid, plot_loss_curve, save_grid_with_captions, save_png, to_uint8


def test_to_uint8_maps_range_clamps_and_transposes():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0, 0.5]).view(1, 1, 2, 3)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 2, 3, 1)
    assert u[0, :, :, 0].tolist() == [[0, 128, 255], [255, 0, 191]]
    rgb = torch.rand(2, 3, 5, 7) * 2 - 1
    assert to_uint8(rgb).shape == (2, 5, 7, 3)
    assert np.array_equal(to_uint8(rgb)[1, 4, 6], to_uint8(rgb[1:, :, 4:, 6:])[0, 0, 0])


def test_to_uint8_latents_use_first_three_channels_rescaled():
    lat = torch.randn(2, 4, 8, 8) * 5
    u = to_uint8(lat)
    assert u.shape == (2, 8, 8, 3)
    assert all(u[b].min() == 0 and u[b].max() == 255 for b in range(2))  # per-image min-max
    lat2 = lat.clone()
    lat2[:, 3] = 100  # the fourth channel is ignored
    assert np.array_equal(to_uint8(lat2), u)
    with pytest.raises(ValueError, match="channels"):
        to_uint8(torch.zeros(1, 2, 4, 4))


def test_make_grid_size_arithmetic_and_placement():
    imgs = torch.stack([torch.full((3, 4, 5), v) for v in torch.linspace(-1, 1, 5)])  # 5 tiles of 4×5
    g = make_grid(imgs, nrow=3)
    assert g.dtype == np.uint8 and g.shape == (2 * (4 + PAD) + PAD, 3 * (5 + PAD) + PAD, 3)
    tiles = to_uint8(imgs)
    for k in range(5):
        y, x = PAD + (k // 3) * (4 + PAD), PAD + (k % 3) * (5 + PAD)
        assert np.array_equal(g[y:y + 4, x:x + 5], tiles[k])
    assert (g[:PAD] == 0).all() and (g[:, :PAD] == 0).all()
    assert (g[PAD + 4 + PAD:, PAD + 2 * (5 + PAD):] == 0).all()  # the 6th slot stays empty
    assert make_grid(imgs[:2], nrow=8).shape == (4 + 2 * PAD, 2 * (5 + PAD) + PAD, 3)
    assert make_grid(torch.zeros(3, 1, 4, 4), nrow=3).shape[-1] == 3  # grey repeated to RGB


def test_save_png_roundtrip_atomic_and_creates_folders(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    path = save_png(tmp_path / "a" / "b" / "x.png", arr)
    assert path.exists() and np.array_equal(np.asarray(Image.open(path)), arr)
    save_png(path, arr[..., 0])  # overwrite with greyscale
    assert np.array_equal(np.asarray(Image.open(path)), arr[..., 0])
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary files left
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "f.png", arr.astype(np.float32))


def test_grid_with_captions_upscales_tiles_and_draws_text(tmp_path):
    imgs = torch.rand(5, 3, 32, 32) * 2 - 1
    caps = ["a red circle", "two blue squares left of a yellow triangle", "x", "three green squares", "a"]
    path = save_grid_with_captions(tmp_path / "s.png", imgs, caps, nrow=3)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    k = 128 // 32
    assert sheet.shape[1] == 3 * (32 * k + PAD) + PAD
    tile = sheet[PAD:PAD + 32 * k, PAD:PAD + 32 * k]
    assert np.array_equal(tile, np.repeat(np.repeat(to_uint8(imgs[:1])[0], k, 0), k, 1))  # nearest upscale
    text_band = sheet[PAD + 32 * k:PAD + 32 * k + 12, PAD:PAD + 32 * k]
    assert (text_band < 100).all(-1).sum() > 20  # dark caption pixels on the white band
    with pytest.raises(ValueError, match="captions"):
        save_grid_with_captions(tmp_path / "t.png", imgs, caps[:2])


def test_loss_curve_png(tmp_path):
    steps = np.arange(300)
    losses = np.exp(-steps / 100) + 0.05 * np.random.default_rng(0).random(300)
    path = plot_loss_curve(steps, losses, tmp_path / "plots" / "loss.png", title="run")
    img = Image.open(path)
    img.verify()
    assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200
    losses[5] = np.nan  # non-finite and negative values still plot (linear y)
    plot_loss_curve(steps, losses - 0.5, tmp_path / "neg.png")
    assert Image.open(tmp_path / "neg.png").size == img.size
    with pytest.raises(ValueError, match="steps and losses"):
        plot_loss_curve(steps, losses[:-1], tmp_path / "bad.png")
