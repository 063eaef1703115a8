"""Precompute throughput (`pytest bench --benchmark-only`): images/sec of engine/precompute.py.

CPU: a generated set of small JPEGs through the whole CLI path (read, PIL decode, resize/crop at two resolutions,
tiny random VAE, the default MiniLM text encoder, Arrow shards, manifest). The number in extra_info
`images_per_sec_loop` excludes model loading; `images_per_sec` is the whole call. Neither says anything about real
sizes: there the VAE dominates, which the GPU benchmark measures with a randomly initialised VAE of the SDXL
VAE's exact architecture (throughput does not depend on the weights), bf16, at 256 and 512 px.
"""
import io
import json
from itertools import count

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("datasets")

N_IMAGES = 48
RES = (64, 128)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)


def write_jpegs(folder, n: int, size=(160, 120)) -> None:
    """n textured JPEGs (W×H = size) with .txt captions."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        arr = (np.mgrid[0:h, 0:w].sum(0)[..., None] * (i + 1) + rng.integers(0, 40, (h, w, 3))) % 256
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        (folder / f"{i:04d}.jpg").write_bytes(buf.getvalue())
        (folder / f"{i:04d}.txt").write_text(f"a textured test picture number {i} with some words in its caption")


def save_tiny_vae(folder) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16, 16),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=8, sample_size=64).save_pretrained(folder)


def test_precompute_images_per_sec_cpu(benchmark, tmp_path):
    from engine import precompute

    write_jpegs(tmp_path / "imgs", N_IMAGES)
    save_tiny_vae(tmp_path / "vae")
    outs = count()

    def fresh_out():  # every round starts from an empty folder, else resume would skip everything
        return (tmp_path / f"out{next(outs)}",), {}

    def once(out):
        precompute.main(["--source", str(tmp_path / "imgs"), "--out", str(out), "--vae", str(tmp_path / "vae"),
                         "--resolutions", *map(str, RES), "--batch-size", "16", "--shard-size", "1000",
                         "--max-caption-len", "32", "--num-workers", "2"])
        return out

    out = benchmark.pedantic(once, setup=fresh_out, rounds=2, warmup_rounds=1, iterations=1)
    done = json.loads((out / ".work" / "done_r000.json").read_text())
    assert done["stored"] == N_IMAGES
    benchmark.extra_info.update({
        "device": "cpu", "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "images": N_IMAGES, "source_image_px": "160x120 JPEG", "resolutions": list(RES),
        "vae": "random AutoencoderKL, 4 levels of 16 channels (tiny)", "text_encoder": "all-MiniLM-L6-v2, fp32",
        "images_per_sec": N_IMAGES / benchmark.stats.stats.median,
        "images_per_sec_loop": N_IMAGES / done["seconds"],
        "note": "tiny VAE: measures the pipeline around the VAE (decode, text encoder, shard writing), not the "
                "real-size cost; see test_sdxl_vae_encode_images_per_sec_gpu for that",
    })


@pytest.mark.gpu
@pytest.mark.parametrize("res, batch", [(256, 64), (512, 32)])
def test_sdxl_vae_encode_images_per_sec_gpu(benchmark, res, batch):
    """The dominant precompute cost at real size: SDXL-VAE encode, bf16, channels_last, as precompute runs it."""
    from diffusers import AutoencoderKL

    from engine.encoders.vae import encode_latents, vae_info

    device = torch.device("cuda")
    vae = AutoencoderKL(**SDXL_VAE).to(device, torch.bfloat16).eval().requires_grad_(False)
    vae = vae.to(memory_format=torch.channels_last)
    info = vae_info(vae, "random SDXL-architecture VAE")
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1

    def once():
        encode_latents(vae, x, info)  # ends with .cpu(): synchronises
    benchmark.pedantic(once, rounds=5, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "dtype": "bf16",
        "resolution": res, "batch": batch, "images_per_sec": batch / benchmark.stats.stats.median,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        "note": "VAE encode only (posterior mean, scaled, fp16 to host); decode runs in other threads meanwhile",
    })
