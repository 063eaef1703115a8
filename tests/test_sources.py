"""engine/data/sources.py: folders, img2dataset-style tars and parquet files, local, file:// and memory:// URLs,
with bad input (missing captions, unreadable shards) yielded as records, never raised.

The writers here (`write_folder`, `write_tar`, `write_parquet`, `write_all_formats`) also build the inputs of
tests/test_precompute.py."""
import io
import json
import tarfile

import numpy as np
import pytest

from engine.data.sources import Record, iter_records, owned_by, source_labels

N = 12  # good images per format
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def image_bytes(i: int, ext: str = "png", size=(48, 40)) -> bytes:
    """A distinct picture per i (smooth gradients plus a coloured block), encoded as `ext`; size is (W, H)."""
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * (3 + i) + yy * 5) % 256, (yy * (7 + i)) % 256, np.full((h, w), 37 * i % 256)], -1)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    arr[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
    arr = arr + rng.integers(0, 24, arr.shape)  # some texture, so files are not a few hundred bytes
    buf = io.BytesIO()
    quality = {} if ext == "png" else {"quality": 95}
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format=FORMATS[ext], **quality)
    return buf.getvalue()


def caption(i: int) -> str:
    return f"a picture of thing number {i} in colour {['red', 'green', 'blue'][i % 3]}"


def write_folder(root, start: int = 0, n: int = N) -> dict[str, str]:
    """n images (jpg/png/webp in turn, a third of them in a subfolder) with .txt captions; {relative path: caption}."""
    out = {}
    for i in range(start, start + n):
        ext = list(FORMATS)[i % 3]
        rel = f"{'sub/' if i % 3 == 2 else ''}{i:03d}.{ext}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(image_bytes(i, ext))
        (root / rel).with_suffix(".txt").write_text(caption(i) + "\n")
        out[rel] = caption(i)
    return out


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A tar whose members are `<basename><ext>`, in the order given (img2dataset writes each sample's together)."""
    with tarfile.open(path, "w") as tar:
        for base, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(base + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def tar_samples(start: int, n: int) -> list[tuple[str, dict[str, bytes]]]:
    """img2dataset-style samples: jpg + txt + json for even i, png + json (caption in json only) for odd i."""
    out = []
    for i in range(start, start + n):
        meta = json.dumps({"caption": caption(i), "url": f"http://x/{i}", "key": f"{i:09d}"}).encode()
        members = {".jpg": image_bytes(i, "jpg"), ".txt": caption(i).encode(), ".json": meta} if i % 2 == 0 else \
            {".png": image_bytes(i, "png"), ".json": meta}
        out.append((f"{i:09d}", members))
    return out


def write_parquet(path, rows: list[tuple[bytes | None, str | None]], image_col="image", caption_col="caption",
                  struct=False) -> None:
    """Parquet with an image column (raw bytes, or HF-style {"bytes", "path"} structs) and a caption column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": b, "path": None} if struct and b is not None else b for b, _ in rows]
    table = pa.table({image_col: images, caption_col: [c for _, c in rows], "extra": list(range(len(rows)))})
    pq.write_table(table, path, row_group_size=5)


def write_all_formats(root, with_bad: bool = True) -> dict:
    """The three formats side by side under `root` (folder `imgs`, folder `shards` of tars, `pq/data.parquet`),
    N good samples each, plus one of every kind of bad input. Returns {"sources", "good": {key: caption},
    "bad": {key: reason fragment}}."""
    good, bad = {}, {}
    imgs = root / "imgs"
    imgs.mkdir()
    good.update({f"imgs/{k}": c for k, c in write_folder(imgs, 0, N).items()})
    shards = root / "shards"
    shards.mkdir()
    samples = tar_samples(100, N)
    write_tar(shards / "00000.tar", samples[:8])
    write_tar(shards / "00001.tar", samples[8:])
    good.update({f"shards/0000{0 if j < 8 else 1}/{b}": caption(100 + j) for j, (b, _) in enumerate(samples)})
    (root / "pq").mkdir()
    write_parquet(root / "pq" / "data.parquet", [(image_bytes(200 + j, "jpg"), caption(200 + j)) for j in range(N)])
    good.update({f"pq/data/{j}": caption(200 + j) for j in range(N)})
    if with_bad:
        for name, data in [("zero.jpg", b""), ("truncated.png", image_bytes(1, "png")[:1500]),
                           ("noise.webp", np.random.default_rng(0).bytes(500))]:
            (imgs / name).write_bytes(data)
            (imgs / name).with_suffix(".txt").write_text(f"bad {name}")
        (imgs / "nocap.png").write_bytes(image_bytes(50, "png"))
        (shards / "broken.tar").write_bytes(np.random.default_rng(1).bytes(2000))
        bad.update({"imgs/zero.jpg": "zero-byte", "imgs/truncated.png": "undecodable",
                    "imgs/noise.webp": "undecodable", "imgs/nocap.png": "missing caption",
                    "shards/broken": "unreadable tar"})
    return {"sources": [str(imgs), str(shards), str(root / "pq" / "data.parquet")], "good": good, "bad": bad}


def collect(sources, **kw) -> tuple[dict[str, Record], dict[str, Record]]:
    good, bad = {}, {}
    for r in iter_records(sources, **kw):
        target = good if r.ok else bad
        assert r.key not in target, f"duplicate key {r.key}"
        target[r.key] = r
    return good, bad


def test_folder_with_captions_and_bad_records(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    expected = write_folder(root)
    (root / "nocap.jpg").write_bytes(image_bytes(99, "jpg"))
    (root / "orphan.txt").write_text("a caption with no image")
    (root / "empty.png").write_bytes(image_bytes(98, "png"))
    (root / "empty.txt").write_text("  \n")
    (root / "notes.csv").write_text("ignored")
    good, bad = collect([str(root)])
    assert set(good) == {f"imgs/{k}" for k in expected}
    for rel, cap in expected.items():
        rec = good[f"imgs/{rel}"]
        assert rec.caption == cap and rec.image == (root / rel).read_bytes()
        assert rec.source.endswith(rel) and rec.source.startswith("file://")
    assert {k: r.error.split(" (")[0] for k, r in bad.items()} == {
        "imgs/nocap.jpg": "missing caption", "imgs/orphan.txt": "caption without an image",
        "imgs/empty.png": "empty caption"}


def test_tar_shards_as_img2dataset_writes_them(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = tar_samples(0, 6)
    samples.insert(2, ("000000090", {".txt": b"caption without image"}))
    samples.insert(3, ("000000091", {".jpg": image_bytes(91, "jpg")}))
    samples.insert(4, ("000000092", {".jpg": image_bytes(92, "jpg"), ".json": b'{"url": "no caption"}'}))
    write_tar(shards / "00000.tar", samples)
    (shards / "00000.parquet").write_bytes(b"img2dataset metadata, not an image source")
    (shards / "00000_stats.json").write_text("{}")
    good, bad = collect([str(shards)])
    assert sorted(good) == [f"shards/00000/{i:09d}" for i in range(6)]
    for i in range(6):
        rec = good[f"shards/00000/{i:09d}"]
        assert rec.caption == caption(i) and rec.image == image_bytes(i, "jpg" if i % 2 == 0 else "png")
    assert {k: r.error.split(" (")[0] for k, r in bad.items()} == {
        "shards/00000/000000090": "missing image", "shards/00000/000000091": "missing caption",
        "shards/00000/000000092": "missing caption"}
    # one tar file or a glob give the same keys as the folder
    assert set(collect([str(shards / "00000.tar")])[0]) == set(good)
    assert set(collect([str(shards / "*.tar")])[0]) == set(good)


def test_unreadable_and_truncated_tars_are_reported_not_raised(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a_noise.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    (shards / "b_empty.tar").write_bytes(b"")
    write_tar(shards / "c_cut.tar", tar_samples(0, 6))
    data = (shards / "c_cut.tar").read_bytes()
    (shards / "c_cut.tar").write_bytes(data[:len(data) // 2])
    write_tar(shards / "d_fine.tar", tar_samples(10, 2))
    good, bad = collect([str(shards)])
    assert set(bad) == {"shards/a_noise", "shards/b_empty", "shards/c_cut"}
    assert all("unreadable tar shard" in r.error for r in bad.values())
    cut = sorted(k for k in good if k.startswith("shards/c_cut/"))
    assert 0 < len(cut) < 6 and cut == [f"shards/c_cut/{i:09d}" for i in range(len(cut))]  # the intact prefix
    assert {k for k in good if k.startswith("shards/d_fine/")} == {"shards/d_fine/000000010", "shards/d_fine/000000011"}


@pytest.mark.parametrize("damaged", [0, 5, 23])  # the first member (an image), a middle image, the last (a caption)
def test_a_damaged_member_header_loses_only_its_member_and_is_reported(tmp_path, damaged):
    """tarfile stops silently at an invalid header, which lost every later sample unreported. Now the damaged range
    is reported by shard key and offset, and every sample is stored or reported: stored + reported == samples."""
    samples = tar_samples(0, 12)  # 24 members: even samples jpg+txt+json, odd png+json
    write_tar(tmp_path / "s.tar", samples)
    data = bytearray((tmp_path / "s.tar").read_bytes())
    with tarfile.open(tmp_path / "s.tar") as tar:
        header = tar.getmembers()[damaged].offset
    data[header + 148:header + 156] = b"garbage!"  # the header's checksum field: tarfile finds an invalid header
    (tmp_path / "s.tar").write_bytes(bytes(data))
    good, bad = collect([str(tmp_path / "s.tar")])
    label = source_labels([str(tmp_path / "s.tar")])[0]
    keys = {f"{label}/s/{base}" for base, _ in samples}
    damage = [k for k in bad if "@" in k]
    assert damage == [f"{label}/s@{header}"] and "damaged tar member header" in bad[damage[0]].error
    reported = set(bad) - set(damage)
    assert set(good) | reported == keys and not set(good) & reported  # stored + reported == samples, once each
    assert len(reported) == 1  # only the sample whose member was lost is incomplete


def test_invalid_utf8_captions_are_kept_with_a_note(tmp_path):
    """A caption with bytes that are not UTF-8 was silently altered; it is still stored (with U+FFFD) but noted."""
    bad_text = b"a red \xff circle"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(image_bytes(0))
    (tmp_path / "imgs" / "a.txt").write_bytes(bad_text)
    write_tar(tmp_path / "s.tar", [("k", {".jpg": image_bytes(1, "jpg"), ".txt": bad_text})])
    write_parquet(tmp_path / "p.parquet", [(image_bytes(2), bad_text)])
    good, bad = collect([str(tmp_path / "imgs"), str(tmp_path / "s.tar"), str(tmp_path / "p.parquet")])
    assert not bad and len(good) == 3
    for rec in good.values():
        assert rec.caption == "a red \ufffd circle", rec
        assert rec.notes == ["caption is not valid UTF-8 (byte 0xff at offset 6): stored with U+FFFD"], rec


def test_parquet_bytes_structs_and_custom_columns(tmp_path):
    rows = [(image_bytes(i, "jpg"), caption(i)) for i in range(7)] + [(None, "no image"), (image_bytes(8), None)]
    write_parquet(tmp_path / "plain.parquet", rows, image_col="jpg", caption_col="text")
    write_parquet(tmp_path / "hf.parquet", rows, struct=True)
    write_parquet(tmp_path / "custom.parquet", rows, image_col="pixels", caption_col="alt")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    good, bad = collect([str(tmp_path)])
    for stem in ("plain", "hf"):
        assert all(good[f"{tmp_path.name}/{stem}/{i}"].image == rows[i][0] for i in range(7))
        assert good[f"{tmp_path.name}/{stem}/3"].caption == caption(3)
        assert bad[f"{tmp_path.name}/{stem}/7"].error == "missing image bytes"
        assert bad[f"{tmp_path.name}/{stem}/8"].error == "missing caption"
    assert "no image column among" in bad[f"{tmp_path.name}/custom"].error  # defaults do not match: reported
    assert "unreadable parquet" in bad[f"{tmp_path.name}/broken"].error
    good, bad = collect([str(tmp_path / "custom.parquet")], image_column="pixels", caption_column="alt")
    assert len(good) == 7 and set(bad) == {f"{tmp_path.name}/custom/7", f"{tmp_path.name}/custom/8"}


def test_fsspec_urls_give_the_same_records(tmp_path):
    import fsspec

    data = write_all_formats(tmp_path, with_bad=False)
    local = collect(data["sources"])[0]
    assert set(local) == set(data["good"]) and all(local[k].caption == c for k, c in data["good"].items())
    as_file_urls = collect([f"file://{s}" for s in data["sources"]])[0]
    mem = fsspec.filesystem("memory")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            mem.pipe(f"/t_sources/{path.relative_to(tmp_path).as_posix()}", path.read_bytes())
    try:
        urls = ["memory://t_sources/imgs", "memory://t_sources/shards/*.tar", "memory://t_sources/pq/data.parquet"]
        remote = collect(urls)[0]
    finally:
        mem.rm("/t_sources", recursive=True)
    for other in (as_file_urls, remote):
        assert set(other) == set(local)
        assert all(other[k].image == local[k].image and other[k].caption == local[k].caption for k in local)
    assert remote["imgs/000.jpg"].source == "memory:///t_sources/imgs/000.jpg"


def test_select_partitions_every_record_bad_ones_included(tmp_path):
    data = write_all_formats(tmp_path)
    everything = [r.key for r in iter_records(data["sources"])]
    assert len(everything) == len(set(everything)) == len(data["good"]) + len(data["bad"])
    parts = [[r.key for r in iter_records(data["sources"], select=owned_by(k, 3))] for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(everything)
    for part in parts:  # each rank keeps the global order
        assert part == [key for key in everything if key in set(part)]


def test_a_read_error_on_one_rank_moves_no_record_to_another(tmp_path, monkeypatch):
    """Ownership is by unit name: rank 0 failing to read its first shard changes nothing for rank 1, and the
    union over ranks still has every other record exactly once."""
    import engine.data.sources as sources

    data = write_all_formats(tmp_path)
    clean = {k: [r.key for r in iter_records(data["sources"], select=owned_by(k, 2))] for k in range(2)}
    real_open = sources.tarfile.open
    failed = []

    def flaky_open(*args, **kwargs):  # the first tar rank 0 opens fails, as a dropped connection would
        if not failed:
            failed.append(True)
            raise ConnectionError("transient")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(sources.tarfile, "open", flaky_open)
    rank0 = [r for r in iter_records(data["sources"], select=owned_by(0, 2))]
    monkeypatch.setattr(sources.tarfile, "open", real_open)
    rank1 = [r.key for r in iter_records(data["sources"], select=owned_by(1, 2))]
    assert failed
    errors = [r for r in rank0 if r.error and "transient" in r.error]
    assert len(errors) == 1  # the unreadable shard, reported once, by its owner
    lost = set(clean[0]) - {r.key for r in rank0}
    assert lost and all(key.startswith(errors[0].key + "/") for key in lost)  # only that shard's samples are missing
    # every other record (good or reported) is still read exactly once, by the same rank as without the error
    assert {r.key for r in rank0 if r not in errors} | set(rank1) == (set(clean[0]) | set(clean[1])) - lost
    assert not set(r.key for r in rank0) & set(rank1)


def test_same_named_sources_get_distinct_labels(tmp_path):
    for d in ("a/imgs", "b/imgs"):
        (tmp_path / d).mkdir(parents=True)
        write_folder(tmp_path / d, 0, 2)
    sources = [str(tmp_path / "a/imgs"), str(tmp_path / "b/imgs"), str(tmp_path / "a/imgs/*.png")]
    assert source_labels(sources) == ["imgs", "imgs-1", "imgs-2"]
    good, _ = collect(sources[:2])
    assert sorted(good) == ["imgs-1/000.jpg", "imgs-1/001.png", "imgs/000.jpg", "imgs/001.png"]


def test_missing_source_is_one_bad_record():
    (rec,) = list(iter_records(["/nonexistent/folder/xyz"]))
    assert not rec.ok and rec.key == "/nonexistent/folder/xyz" and "not found" in rec.error


@pytest.mark.parametrize("bad", ["{not json", '{"caption": "   "}'])
def test_bad_json_captions(tmp_path, bad):
    write_tar(tmp_path / "s.tar", [("k", {".jpg": image_bytes(0, "jpg"), ".json": bad.encode()})])
    (rec,) = list(iter_records([str(tmp_path / "s.tar")]))
    assert not rec.ok and ("json unreadable" in rec.error or "empty caption" in rec.error)
