"""Latent runs decode sample grids through a real diffusers AutoencoderKL (a tiny random one, built offline)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from engine.encoders.vae import LatentDecoder  # noqa: E402


def test_decoder_undoes_the_scaling_factor_and_returns_images(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")  # the layout of a full pipeline repository: <repo>/vae/
    decoder = LatentDecoder(str(tmp_path), torch.device("cpu"))
    latents = torch.randn(2, 4, 8, 8)
    images = decoder(latents)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    with torch.no_grad():
        expected = vae.decode(latents / 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected)
