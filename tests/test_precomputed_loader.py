"""Training from a precomputed set: padding restored at load, config checked against the manifest, deterministic
order for any world size and from any resumed step, and a short real training run through torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")  # the precomputed format is HF datasets (extra `data`)

from engine.config import load_config
from engine.data.precomputed import PrecomputedSet, StepBatches, check_matches_config
from engine.data.sampler import global_batch_indices

ROOT = Path(__file__).resolve().parents[1]
D, C, SIDE, RES = 384, 4, 16, 128


def write_set(root: Path, n: int = 40, shards: int = 2, seed: int = 0) -> dict:
    """A precomputed set in the documented layout, with random latents and caption embeddings of varying length."""
    from datasets import Array2D, Array3D, Dataset, Features, Value

    from engine.data.manifest import shard_checksum

    rng = np.random.default_rng(seed)
    feats = Features({"key": Value("string"), "caption": Value("string"),
                      "latent": Array3D(shape=(C, SIDE, SIDE), dtype="float16"),
                      "caption_emb": Array2D(shape=(None, D), dtype="float16"), "caption_len": Value("int32")})
    entries, rows = [], []
    for s in range(shards):
        lens = rng.integers(1, 12, size=n // shards)
        part = {"key": [f"s{s}/{i}" for i in range(len(lens))], "caption": [f"caption {s}-{i}" for i in range(len(lens))],
                "latent": [rng.standard_normal((C, SIDE, SIDE)).astype(np.float16) for _ in lens],
                "caption_emb": [rng.standard_normal((int(k), D)).astype(np.float16) for k in lens],
                "caption_len": [int(k) for k in lens]}
        rows += [dict(zip(part, vals)) for vals in zip(*part.values())]
        folder = f"{RES}/shard_r000_{s:05d}"
        Dataset.from_dict(part, features=feats).save_to_disk(str(root / folder))
        entries.append({"path": folder, "count": len(lens), "sha256": shard_checksum(root / folder)})
    manifest = {"format": "tessera-precomputed/1",
                "vae": {"name": "tiny", "scaling_factor": 0.13, "latent_channels": C, "downsample": 8},
                "text_encoder": {"name": "all-MiniLM-L6-v2", "dim": D, "max_length": 12},
                "resolutions": {str(RES): {"count": n, "latent_shape": [C, SIDE, SIDE], "latent_dtype": "float16",
                                           "shards": entries}},
                "caption_emb_dtype": "float16", "sources": ["test"], "bad_inputs": 0, "created": "now"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return {"rows": rows, "manifest": manifest}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("precomputed")
    return root, write_set(root)


def test_items_restore_padding_and_match_what_was_stored(dataset):
    root, written = dataset
    ds = PrecomputedSet(root, RES, caption_len=16)
    assert len(ds) == 40
    for i in (0, 7, 39):
        latent, emb, mask = ds[i]
        row = written["rows"][i]
        assert latent.dtype == torch.float16 and latent.shape == (C, SIDE, SIDE)
        assert torch.equal(latent, torch.from_numpy(row["latent"]))
        n = row["caption_len"]
        assert mask.tolist() == [True] * n + [False] * (16 - n)
        assert torch.equal(emb[:n], torch.from_numpy(row["caption_emb"][:n]))
        assert torch.all(emb[n:] == 0)


def test_mismatched_config_names_the_manifest_field(dataset):
    root, _ = dataset
    ds = PrecomputedSet(root, RES, caption_len=12)
    with pytest.raises(ValueError, match=r"manifest.json: latent_shape=\[4, 16, 16\] but the config wants"):
        check_matches_config(ds, C, 32, D)
    with pytest.raises(ValueError, match=r"text_encoder.dim=384 but data.caption_channels=1024"):
        check_matches_config(ds, C, SIDE, 1024)
    with pytest.raises(ValueError, match="no resolution 512"):
        PrecomputedSet(root, 512, caption_len=12)


def test_corrupt_shard_is_named(tmp_path):
    from engine.data.train_data import build_precomputed

    write_set(tmp_path, n=8, shards=1)
    arrow = next((tmp_path / f"{RES}/shard_r000_00000").glob("*.arrow"))
    blob = bytearray(arrow.read_bytes())
    blob[-10] ^= 0xFF
    arrow.write_bytes(bytes(blob))
    cfg = load_config(ROOT / "configs/tiny_32px.yaml", [
        "data.source=precomputed", f"data.path={tmp_path}", f"data.resolution={RES}", "data.channels=4",
        f"data.image_size={SIDE}"])
    with pytest.raises(ValueError, match="shard_r000_00000"):
        build_precomputed(cfg, torch.device("cpu"), 0, 1)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_world_size_sees_the_global_stream(world):
    n, gb, mb, steps = 40, 16, 4, 5
    by_position = {}  # (step, position in the global batch) -> sample index
    for rank in range(world):
        for step, lo, indices in StepBatches(n, 3, gb, mb, rank, world, 0, steps):
            assert len(indices) == mb
            for j, i in enumerate(indices):
                by_position[(step, lo + j)] = i
    assert len(by_position) == steps * gb
    for step in range(steps):
        assert [by_position[(step, p)] for p in range(gb)] == global_batch_indices(step, gb, n, 3).tolist()


def test_resumed_loader_continues_the_same_order():
    full = list(StepBatches(40, 0, 8, 4, 1, 2, 0, 6))
    resumed = list(StepBatches(40, 0, 8, 4, 1, 2, 3, 6))
    assert resumed == full[-len(resumed):] and len(resumed) == 3


@pytest.mark.slow
def test_training_runs_from_a_precomputed_set(dataset, tmp_path):
    root, _ = dataset
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "engine" / "train.py"), "--config", str(ROOT / "configs" / "tiny_32px.yaml"),
           f"run.out_dir={tmp_path}", "run.name=pre", "data.source=precomputed", f"data.path={root}",
           f"data.resolution={RES}", "data.channels=4", f"data.image_size={SIDE}", "data.caption_len=12",
           "data.num_workers=1", "train.steps=6", "train.log_every=2", "train.ckpt_every=6", "train.global_batch=8",
           "train.micro_batch=4", "train.progress_bar=false", "sample.steps=2", "sample.per_prompt=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert (tmp_path / "pre" / "samples" / "step_00000006.png").is_file()


def test_unloadable_text_encoder_only_disables_sample_grids(tmp_path, capsys):
    from engine.data.train_data import build_train_data

    write_set(tmp_path, n=8, shards=1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["text_encoder"]["name"] = "no-such-org/no-such-encoder"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(ROOT / "configs/tiny_32px.yaml", [
        "data.source=precomputed", f"data.path={tmp_path}", f"data.resolution={RES}", "data.channels=4",
        f"data.image_size={SIDE}", "data.text_encoder=no-such-org/no-such-encoder", "data.verify_checksums=false"])
    data, encoder = build_train_data(cfg, torch.device("cpu"), tmp_path / "cache")
    assert encoder is None and "no sample grids" in capsys.readouterr().out
    assert data.ds.table.num_rows == 8


def test_settings_the_set_cannot_honour_are_refused(dataset):
    from engine.data.train_data import build_precomputed

    root, _ = dataset
    base = ["data.source=precomputed", f"data.path={root}", f"data.resolution={RES}", "data.channels=4",
            f"data.image_size={SIDE}", "data.verify_checksums=false"]
    for extra, message in [(["data.caption_len=8"], "text_encoder.max_length=12 but data.caption_len=8"),
                           (["data.caption_len=16", "data.attend_to_padding=true"], "attend_to_padding"),
                           (["data.caption_len=16", "data.path=s3://bucket/set"], "local")]:
        cfg = load_config(ROOT / "configs/tiny_32px.yaml", base + extra)
        with pytest.raises(ValueError, match=message):
            build_precomputed(cfg, torch.device("cpu"), 0, 1)
