"""Decoding corner cases shared by precompute and the evaluation reference set."""
import io

import numpy as np
from PIL import Image

from engine.data.preprocess import decode_image
from engine.eval.reference import folder_images


def test_16_bit_grey_keeps_its_brightness():
    img = Image.fromarray(np.full((8, 8), 4096, dtype=np.uint16))  # 1/16 of full scale, mode I;16
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    rgb = np.asarray(decode_image(buf.getvalue()))
    assert abs(int(rgb[0, 0, 0]) - 16) <= 1  # not stretched to white by the image's own maximum


def test_reference_folder_is_decoded_like_training_data(tmp_path):
    Image.new("RGBA", (48, 32), (10, 200, 30, 0)).save(tmp_path / "clear.png")  # transparent → white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    half = np.zeros((32, 48, 3), dtype=np.uint8)
    half[:, :24] = 255  # left half white as stored
    Image.fromarray(half).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    skipped = []
    (batch,) = list(folder_images(tmp_path, (16, 16), None, 8, skipped))
    assert not skipped and batch.shape == (2, 16, 16, 3)
    clear, rot = batch[0], batch[1]
    assert clear.min() >= 250
    stored = np.asarray(decode_image((tmp_path / "rot.jpg").read_bytes()))
    assert stored.shape[:2] == (48, 32)  # EXIF orientation applied: portrait after rotation
    assert rot[0].mean() > 200 and rot[-1].mean() < 50  # the white half ends up on top
