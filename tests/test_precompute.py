"""engine/precompute.py end to end (tiny random VAE, the offline MiniLM), engine/data/preprocess.py and
engine/data/manifest.py: stored latents and caption embeddings equal a direct encoding, bad input is reported by key,
a killed run resumes without duplicates or gaps, two torchrun ranks make one set, and checksums catch edits."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("datasets")

from engine import precompute  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.data import precompute as precompute_lib  # noqa: E402
from engine.data.manifest import FORMAT, read_manifest, shard_checksum, verify_checksums  # noqa: E402
from engine.data.preprocess import (BadImage, PILDecoder, decode_image, make_decoder, preprocess,  # noqa: E402
                                    resize_center_crop, to_tensor)
from engine.data.sources import iter_records  # noqa: E402
from engine.encoders.text_encoder import TextEncoder  # noqa: E402
from test_sources import N, image_bytes, tar_samples, write_all_formats, write_folder, write_tar  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RES = (32, 64)
TEXT_LEN = 16
SCALE = 0.5  # not SD's 0.18215, so a missing multiplication cannot pass by accident


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning workers make
    them ~10x slower; restored afterwards for the other test modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_tiny_vae(folder: Path) -> None:
    """Random AutoencoderKL with 4 levels (downsample 8: 32 px → 4×4 latents), 8 channels, scaling factor 0.5."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=SCALE)
    vae.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae") / "tiny_vae"
    save_tiny_vae(folder)
    return folder


def run(sources, out, vae, *extra) -> dict:
    argv = [a for s in sources for a in ("--source", str(s))] + [
        "--out", str(out), "--vae", str(vae), "--resolutions", *map(str, RES), "--batch-size", "8",
        "--shard-size", "20", "--max-caption-len", str(TEXT_LEN), "--num-workers", "2", *extra]
    return precompute.main(argv)


def load_rows(out: Path, manifest: dict, res: int) -> dict[str, dict]:
    """{key: row} over every shard of one resolution (numpy arrays)."""
    import datasets

    rows = {}
    for shard in manifest["resolutions"][str(res)]["shards"]:
        ds = datasets.load_from_disk(str(out / shard["path"]))
        assert ds.features["latent"].dtype == "float16" and ds.features["caption_emb"].dtype == "float16"
        assert ds.features["caption_emb"].shape[0] is None and ds.features["caption_len"].dtype == "int32"
        assert len(ds) == shard["count"]
        for row in ds.with_format("numpy"):
            assert row["key"] not in rows, f"duplicate key {row['key']}"
            rows[str(row["key"])] = row
    return rows


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_vae):
    """All three formats with bad inputs, plus a fourth source behind a memory:// URL; one precompute."""
    import fsspec

    root = tmp_path_factory.mktemp("pc_data")
    data = write_all_formats(root)
    remote = root / "remote_imgs"
    remote.mkdir()
    good = dict(data["good"], **{f"remote_imgs/{k}": c for k, c in write_folder(remote, 300, N).items()})
    mem = fsspec.filesystem("memory")
    for path in (p for p in remote.rglob("*") if p.is_file()):
        mem.pipe(f"/pc_test/remote_imgs/{path.relative_to(remote).as_posix()}", path.read_bytes())
    shutil.rmtree(remote)  # only the memory:// copy exists now
    out = root.parent / "pc_out"
    try:
        manifest = run([*data["sources"], "memory://pc_test/remote_imgs"], out, tiny_vae)
        records = {r.key: r for r in iter_records([*data["sources"], "memory://pc_test/remote_imgs"]) if r.ok}
    finally:
        mem.rm("/pc_test", recursive=True)
    return {"out": out, "manifest": manifest, "good": good, "bad": data["bad"], "records": records,
            "sources": data["sources"]}


def test_manifest_records_counts_shapes_and_encoders(full_run):
    m, out = full_run["manifest"], full_run["out"]
    assert read_manifest(out) == m == read_manifest(out / "manifest.json")
    assert m["format"] == FORMAT and m["caption_emb_dtype"] == "float16" and m["latent_sampling"] == "mean"
    assert m["vae"] == {"name": m["vae"]["name"], "scaling_factor": SCALE, "shift_factor": None,
                        "latent_channels": 4, "downsample": 8}
    assert m["text_encoder"] == {"name": "all-MiniLM-L6-v2", "dim": 384, "max_length": TEXT_LEN}
    n = len(full_run["good"])
    assert n == 4 * N
    for res in RES:
        entry = m["resolutions"][str(res)]
        assert entry["count"] == n == sum(s["count"] for s in entry["shards"])
        assert entry["latent_shape"] == [4, res // 8, res // 8] and entry["latent_dtype"] == "float16"
        assert [s["path"] for s in entry["shards"]] == [f"{res}/shard_r000_{i:05d}" for i in range(3)]
        assert [s["count"] for s in entry["shards"]] == [20, 20, 8]
        assert set(load_rows(out, m, res)) == set(full_run["good"])  # every good one, once
    assert not [p for p in (out / "32").iterdir() if not p.name.startswith("shard_")]  # no leftovers
    verify_checksums(out, m)


def test_bad_inputs_are_reported_by_key_and_counted(full_run):
    lines = (full_run["out"] / "report.jsonl").read_text().splitlines()
    report = {b["key"]: b for b in map(json.loads, lines)}
    assert len(report) == len(lines) == full_run["manifest"]["bad_inputs"] == len(full_run["bad"]) == 5
    for key, fragment in full_run["bad"].items():
        assert fragment in report[key]["reason"], report[key]
        assert report[key]["source"].startswith("file://")
    assert "truncated" in report["imgs/truncated.png"]["reason"]


def test_latents_equal_the_vae_encoding_of_the_preprocessed_image(full_run, tiny_vae):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    keys = ["imgs/000.jpg", "imgs/sub/002.webp", "shards/00000/000000101", "shards/00001/000000110",
            "pq/data/5", "remote_imgs/301.png"]
    for res in RES:
        rows = load_rows(full_run["out"], full_run["manifest"], res)
        pixels = torch.stack([preprocess(full_run["records"][k].image, list(RES))[res] for k in keys])
        with torch.no_grad():
            ref = vae.encode(pixels).latent_dist.mean * SCALE  # (B, 4, res/8, res/8)
        got = torch.from_numpy(np.stack([rows[k]["latent"] for k in keys]))
        assert got.shape == ref.shape == (len(keys), 4, res // 8, res // 8)
        torch.testing.assert_close(got.float(), ref, atol=2e-3, rtol=1e-3)  # fp16 storage
        assert [str(rows[k]["caption"]) for k in keys] == [full_run["good"][k] for k in keys]


def test_caption_embeddings_are_the_text_encoder_output_for_real_tokens(full_run):
    rows = load_rows(full_run["out"], full_run["manifest"], 64)
    keys = sorted(rows)
    emb, mask = TextEncoder(max_length=TEXT_LEN).encode([full_run["good"][k] for k in keys])
    for b, k in enumerate(keys):
        n = int(mask[b].sum())
        assert int(rows[k]["caption_len"]) == n == rows[k]["caption_emb"].shape[0] and 3 < n <= TEXT_LEN
        torch.testing.assert_close(torch.from_numpy(rows[k]["caption_emb"]).float(), emb[b, :n], atol=2e-3, rtol=1e-3)
    rows32 = load_rows(full_run["out"], full_run["manifest"], 32)
    assert all(np.array_equal(rows32[k]["caption_emb"], rows[k]["caption_emb"]) for k in keys)


def test_checksums_catch_a_modified_file_and_name_it(full_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(full_run["out"], out)
    m = read_manifest(out)
    arrow = out / "64" / "shard_r000_00001" / "data-00000-of-00001.arrow"
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    verify_checksums(out, m, resolutions=[32])  # only the 64 px set is touched
    with pytest.raises(ValueError, match=r"64/shard_r000_00001/data-00000-of-00001\.arrow: sha256 mismatch.*"
                                         r"resolutions\.64\.shards\[1\]\.sha256"):
        verify_checksums(out, m)
    del m["resolutions"]["64"]["shards"][1]["files"]  # without per-file hashes the folder is named
    with pytest.raises(ValueError, match=r"64/shard_r000_00001: sha256 mismatch \(manifest field "
                                         r"resolutions\.64\.shards\[1\]\.sha256"):
        verify_checksums(out, m)
    shutil.rmtree(out / "32" / "shard_r000_00002")
    with pytest.raises(ValueError, match=r"32/shard_r000_00002: shard folder missing .*shards\[2\]\.path"):
        verify_checksums(out, m, resolutions=[32])
    assert shard_checksum(full_run["out"] / "32" / "shard_r000_00000") == m["resolutions"]["32"]["shards"][0]["sha256"]


def test_manifest_validation_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_manifest(tmp_path)
    good = {"format": FORMAT, "vae": {"name": "v", "scaling_factor": 1, "latent_channels": 4, "downsample": 8},
            "text_encoder": {"name": "t", "dim": 8, "max_length": 4}, "caption_emb_dtype": "float16",
            "resolutions": {"256": {"count": 0, "latent_shape": [4, 32, 32], "latent_dtype": "float16", "shards": []}},
            "sources": [], "bad_inputs": 0, "created": "now"}
    for change, field in [({"format": "other/1"}, "format"), ({"vae": {"name": "v"}}, "vae.scaling_factor"),
                          ({"resolutions": {"256": {"count": 0}}}, "resolutions.256.latent_shape")]:
        (tmp_path / "manifest.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=rf"manifest\.json: manifest field {field}"):
            read_manifest(tmp_path)


def test_killed_midway_then_rerun_finishes_without_duplicates_or_gaps(tiny_vae, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    expected = {f"src/{k}" for k in write_folder(src, 0, 12)}
    write_tar(src / "t.tar", tar_samples(50, 12))
    expected |= {f"src/t/{i:09d}" for i in range(50, 62)}
    out = tmp_path / "out"
    real_write, calls = precompute_lib.write_shard_set, []

    def crash_after_first_shard(*args):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(real_write(*args))
        return calls[-1]

    monkeypatch.setattr(precompute_lib, "write_shard_set", crash_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        run([src], out, tiny_vae)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists() and len(calls[0]["keys"]) == 20
    first_sha = shard_checksum(out / "64" / "shard_r000_00000")
    # what a kill between the renames and the commit leaves behind: an uncommitted shard and a temporary folder
    shutil.copytree(out / "32" / "shard_r000_00000", out / "32" / "shard_r000_00001")
    (out / "64" / ".tmp_shard_r000_00001").mkdir()
    written = []  # rows each later run writes: resuming must encode only the 4 images the kill left undone

    def record_write(out_, name, rows, features):
        written.append(len(rows))
        return real_write(out_, name, rows, features)

    monkeypatch.setattr(precompute_lib, "write_shard_set", record_write)
    m = run([src], out, tiny_vae)
    assert written == [4], written
    assert m["resolutions"]["64"]["count"] == 24 and m["bad_inputs"] == 0
    for res in RES:
        assert set(load_rows(out, m, res)) == expected  # load_rows fails on a duplicate
        assert sorted(p.name for p in (out / str(res)).iterdir()) == ["shard_r000_00000", "shard_r000_00001"]
    assert shard_checksum(out / "64" / "shard_r000_00000") == first_sha  # committed work was kept, not redone
    assert m["resolutions"]["64"]["shards"][1]["count"] == 4
    verify_checksums(out, m)
    again = run([src], out, tiny_vae)  # a finished set run again: nothing to do, same shards
    assert again["resolutions"] == m["resolutions"] and written == [4]


def test_tiny_extreme_and_mis_encoded_samples_are_stored_with_notes_or_skipped_by_min_side(tiny_vae, tmp_path):
    """A 1x1 image, a 3x2000 one and a caption that is not UTF-8 were stored without a word. They are stored and
    noted in report.jsonl ("stored": true), and still are after a rerun (the notes live in the shard markers);
    --min-side skips the small ones and reports them as bad."""
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for name, size in [("dot", (1, 1)), ("sliver", (3, 2000)), ("fine", (48, 40)), ("mojibake", (48, 40))]:
        Image.new("RGB", size, (200, 30, 30)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_bytes(b"a red thing" if name != "mojibake" else b"a r\xe9d thing")
    expected = {
        "src/dot.png": ["upscaled: short side 1 px, 64.0x to 64 px"],
        "src/sliver.png": ["upscaled: short side 3 px, 21.3x to 64 px",
                           "extreme aspect ratio 3x2000: the center crop keeps 0.1% of it"],
        "src/mojibake.png": ["caption is not valid UTF-8 (byte 0xe9 at offset 3): stored with U+FFFD"]}

    def report(out):
        lines = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
        return {(r["key"], r["stored"]): sorted(x["reason"] for x in lines if (x["key"], x["stored"]) ==
                                                (r["key"], r["stored"])) for r in lines}

    for _ in range(2):  # the second run finds everything committed and rebuilds the report from the markers
        m = run([src], tmp_path / "out", tiny_vae)
        assert (m["resolutions"]["64"]["count"], m["bad_inputs"], m["notes"]) == (4, 0, 4)
        assert report(tmp_path / "out") == {(k, True): sorted(v) for k, v in expected.items()}
    m = run([src], tmp_path / "min_side", tiny_vae, "--min-side", "4")
    assert (m["resolutions"]["64"]["count"], m["bad_inputs"], m["notes"]) == (2, 2, 1)
    got = report(tmp_path / "min_side")
    assert got[("src/dot.png", False)] == ["image 1x1: short side under --min-side 4"]
    assert got[("src/sliver.png", False)] == ["image 3x2000: short side under --min-side 4"]


def test_other_settings_on_an_existing_folder_are_refused(full_run, tiny_vae):
    with pytest.raises(ValueError, match="other settings.*latent_shapes"):
        precompute.main(["--source", full_run["sources"][0], "--out", str(full_run["out"]), "--vae", str(tiny_vae),
                         "--resolutions", "32", "--max-caption-len", str(TEXT_LEN)])


def test_missing_source_and_bad_resolution_fail_before_any_work(tiny_vae, tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        precompute.main(["--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--vae", str(tiny_vae)])
    (tmp_path / "i").mkdir()
    write_folder(tmp_path / "i", 0, 1)
    with pytest.raises(ValueError, match="multiples of the VAE's downsampling factor 8"):
        precompute.main(["--source", str(tmp_path / "i"), "--out", str(tmp_path / "o"), "--vae", str(tiny_vae),
                         "--resolutions", "36"])
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_write_their_shards_and_one_manifest(full_run, tiny_vae, tmp_path):
    """Same sources as the single-process run (minus memory://): same keys, same latents, per-rank shards."""
    out = tmp_path / "out2"
    sources = full_run["sources"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "engine" / "precompute.py"), *[a for s in sources for a in ("--source", s)], "--out", str(out),
           "--vae", str(tiny_vae), "--resolutions", *map(str, RES), "--batch-size", "4", "--shard-size", "10",
           "--max-caption-len", str(TEXT_LEN), "--num-workers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = read_manifest(out)
    expected = {k for k in full_run["good"] if not k.startswith("remote_imgs/")}
    paths = [s["path"] for s in m["resolutions"]["32"]["shards"]]
    assert {p.split("/")[1][:len("shard_r000")] for p in paths} == {"shard_r000", "shard_r001"}
    assert m["bad_inputs"] == 5 and m["resolutions"]["32"]["count"] == len(expected) == 3 * N
    single = load_rows(full_run["out"], full_run["manifest"], 64)
    rows = load_rows(out, m, 64)
    assert set(rows) == expected
    for k in expected:  # the posterior mean does not depend on which rank or batch encoded it
        np.testing.assert_allclose(rows[k]["latent"], single[k]["latent"], atol=2e-3, rtol=1e-3)
    report = [json.loads(line)["key"] for line in (out / "report.jsonl").read_text().splitlines()]
    assert sorted(report) == sorted(full_run["bad"])
    verify_checksums(out, m)


# ----------------------------------------------------------------------------------------------- preprocessing


def test_decode_reports_zero_byte_truncated_and_garbage():
    with pytest.raises(BadImage, match="zero-byte"):
        decode_image(b"")
    for data in (image_bytes(3, "png")[:1500], image_bytes(3, "jpg")[:600], b"\x89PNG\r\n\x1a\n" + bytes(100),
                 np.random.default_rng(0).bytes(400)):
        with pytest.raises(BadImage, match="undecodable image"):
            decode_image(data)
    out = PILDecoder(list(RES), num_threads=2)([image_bytes(1, "webp"), b"", image_bytes(2, "jpg")])
    assert isinstance(out[1], str) and "zero-byte" in out[1]
    assert out[0][32].shape == (3, 32, 32) and out[2][64].shape == (3, 64, 64)


def test_modes_become_rgb_with_transparency_over_white():
    from PIL import Image

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid-grey: clipping would give 255
    assert decode_image(grey16).getpixel((0, 0)) == (128, 128, 128)
    assert decode_image(Image.new("L", (4, 4), 7)).getpixel((1, 1)) == (7, 7, 7)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] * 256)
    assert decode_image(pal).mode == "RGB" and decode_image(pal).getpixel((0, 0)) == (10, 20, 30)


def test_resize_short_side_then_center_crop():
    from PIL import Image

    arr = np.zeros((40, 80, 3), dtype=np.uint8)  # wide: H 40, W 80; left/centre/right thirds differ
    arr[:, :20], arr[:, 20:60], arr[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = resize_center_crop(Image.fromarray(arr), 32)  # 40×80 → 32×64 → centre 32×32 = columns 16..48
    assert out.size == (32, 32)
    got = np.asarray(out)
    assert (got[:, 2:-2] == (0, 255, 0)).all()  # only the green middle survives (edges: bicubic ringing)
    tall = resize_center_crop(Image.fromarray(arr.transpose(1, 0, 2)), 16)
    assert tall.size == (16, 16) and (np.asarray(tall)[2:-2] == (0, 255, 0)).all()
    small = resize_center_crop(Image.new("RGB", (10, 12), (9, 9, 9)), 32)  # upscaled, never left small
    assert small.size == (32, 32)
    x = to_tensor(Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8)))
    assert x.shape == (3, 1, 1) and x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)


def test_dali_decoder_missing_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes the import fail even where DALI is installed
    monkeypatch.setitem(sys.modules, "nvidia", None)
    with pytest.raises(ImportError, match="nvidia-dali-cuda120"):
        make_decoder("dali", [32], 4, 1)
    with pytest.raises(ValueError, match="pil or dali"):
        make_decoder("opencv", [32], 4, 1)


def test_heavy_deps_not_imported_at_module_import():
    code = ("import sys, engine.data.sources, engine.data.preprocess, engine.data.manifest, engine.data.precompute, engine.precompute; "
            "bad = {'PIL', 'fsspec', 'datasets', 'diffusers', 'transformers', 'pyarrow'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
