"""Image–caption records from folders, webdataset .tar shards and parquet files, local or behind any fsspec URL.

    for rec in iter_records(["/data/cc12m", "s3://bucket/shards/*.tar", "memory://x/part-0.parquet"]):
        rec.key, rec.source, rec.image (encoded bytes or a PIL image), rec.caption, rec.error

Formats (a source is a folder, one file or a glob; a folder may mix them, found recursively):
  * images (.jpg .jpeg .png .webp) with a same-stem .txt caption;
  * .tar shards as img2dataset writes them: members grouped by basename (`000000001.jpg` + `.txt` and/or `.json`
    with a "caption" field); a `.parquet` next to a same-stem `.tar` is img2dataset's metadata and is skipped;
  * .parquet files with an image column (raw bytes, or a {"bytes": ...} struct as HF `datasets` writes it) and a
    caption column; names are configurable, else the first of DEFAULT_IMAGE_COLUMNS / DEFAULT_CAPTION_COLUMNS.

Keys are `<label>/<path of the file relative to the source root>[/<member or row>]`: stable from run to run and
unique by construction (the label is the source folder's name, made unique among the sources given). They are
the same whether a folder or a glob over it is passed, so a resumed precompute recognises its own work.

Bad input never raises: an unreadable shard, a missing or empty caption, an image without a caption (or the
reverse) is yielded as a record with `error` set, so the caller reports it. `select(unit)` lets a caller (one rank
of several) own units by name and skip the others' bytes: a unit is a whole .tar or .parquet file, one image of a
folder, or a whole unreadable source. Ownership depends on the unit's name alone, never on what came before, so a
transient read error on one rank cannot shift any other record to another rank (no duplicates, no gaps).
"""
from __future__ import annotations

import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes")
DEFAULT_CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
_PARQUET_BATCH = 256  # rows per read; a row group is read whole anyway


@dataclass
class Record:
    """One sample, or one piece of bad input (error set; image/caption may be None)."""

    key: str
    source: str  # URL of the file it came from
    image: Any = None  # encoded bytes, or a PIL image
    caption: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # usable, but altered or odd: reported, and stored anyway

    @property
    def ok(self) -> bool:
        return self.error is None


class _Owner:
    """`take(unit)`: does the caller own this unit (file, image or source, by its stable name)?"""

    def __init__(self, select: Callable[[str], bool] | None):
        self.select = select

    def take(self, unit: str) -> bool:
        return self.select is None or self.select(unit)


def owned_by(rank: int, world: int) -> Callable[[str], bool]:
    """A `select` for rank `rank` of `world`: a stable hash of the unit's name, the same in every process."""
    import hashlib

    def select(unit: str) -> bool:
        return int.from_bytes(hashlib.blake2b(unit.encode(), digest_size=8).digest(), "little") % world == rank

    return select


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _glob_root(path: str) -> str:
    """The folder above a glob's first wildcard: `/d/shards/*.tar` and `/d/shards/00*.tar` → `/d/shards`."""
    head = path[:min(path.find(c) for c in "*?[" if c in path)]
    return head.rstrip("/") if head.endswith("/") else posixpath.dirname(head)


def source_root(url: str) -> tuple[Any, str, str]:
    """(filesystem, path, root): keys are relative to root, the folder itself or the folder of a file or glob."""
    fs, path = _fs(url)
    if any(c in path for c in "*?["):
        return fs, path, _glob_root(path) or "/"
    if fs.isdir(path):
        return fs, path, path.rstrip("/") or "/"
    return fs, path, posixpath.dirname(path.rstrip("/")) or "/"


def source_files(fs, path: str) -> list[str]:
    """Sorted files of a source: a glob's matches, a folder's files (recursive), or the one file."""
    if any(c in path for c in "*?["):
        return sorted(p for p in fs.glob(path) if fs.isfile(p))
    if fs.isdir(path):
        return sorted(fs.find(path))
    return [path] if fs.exists(path) else []


def source_labels(sources: list[str]) -> list[str]:
    """Key prefix per source: its root folder's name; repeats get `-1`, `-2`, ... in the order given."""
    labels, seen = [], {}
    for url in sources:
        try:
            name = posixpath.basename(source_root(url)[2].rstrip("/")) or "source"
        except Exception:  # unreachable: it is reported when iterated; any stable label will do
            name = "source"
        k = seen.get(name, 0)
        seen[name] = k + 1
        labels.append(name if k == 0 else f"{name}-{k}")
    return labels


def _stem(path: str) -> str:
    return posixpath.splitext(path)[0]


def _caption_from(data: bytes, ext: str) -> tuple[str | None, str | None, list[str]]:
    """(caption, error, notes) from a .txt or .json payload."""
    text, notes = decode_caption(data)
    if ext == ".json":
        try:
            value = json.loads(text).get("caption")
        except (ValueError, AttributeError) as e:
            return None, f"caption json unreadable: {e}", notes
        if value is None:
            return None, "missing caption (json has no 'caption' field)", notes
        text = str(value)
    text = text.strip()
    return (text, None, notes) if text else (None, "empty caption", notes)


def decode_caption(data: bytes) -> tuple[str, list[str]]:
    """UTF-8 text and notes: invalid bytes are stored as U+FFFD (the rest of the caption is worth keeping) and the
    record says so, with the offset of the first bad byte, so that it is reported rather than silently altered."""
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as e:
        return data.decode("utf-8", errors="replace"), [
            f"caption is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}): stored with U+FFFD"]


def iter_records(sources: list[str], image_column: str | None = None, caption_column: str | None = None,
                 select: Callable[[str], bool] | None = None) -> Iterator[Record]:
    """Every record of every source, in a fixed order; with `select`, only those of the units it owns."""
    owner = _Owner(select)
    for url, label in zip(sources, source_labels(sources)):
        yield from _iter_source(url, label, image_column, caption_column, owner)


def _iter_source(url, label, image_column, caption_column, owner) -> Iterator[Record]:
    try:
        fs, path, root = source_root(url)
        files = source_files(fs, path)
    except Exception as e:  # a bad URL or an unreachable store: one bad record for the whole source
        if owner.take(url):
            yield Record(url, url, error=f"source unreadable: {type(e).__name__}: {e}")
        return
    if not files:
        if owner.take(url):
            yield Record(url, url, error="source not found or empty")  # keyed by the URL: no file to name
        return
    tars = {_stem(f) for f in files if f.endswith(".tar")}
    images = [f for f in files if f.lower().endswith(IMAGE_EXTS)]
    texts = {f for f in files if f.endswith(".txt")}

    def key_of(path: str) -> str:
        return f"{label}/{posixpath.relpath(path, root)}"

    yield from _iter_folder(fs, images, texts, key_of, owner)
    for f in files:  # a shard file belongs to one owner, who alone opens it (and reports it if it is unreadable)
        if f.endswith(".tar") and owner.take(key_of(f)):
            yield from _iter_tar(fs, f, _stem(key_of(f)))
        elif f.endswith(".parquet") and _stem(f) not in tars and owner.take(key_of(f)):
            yield from _iter_parquet(fs, f, _stem(key_of(f)), image_column, caption_column)


def _iter_folder(fs, images, texts, key_of, owner) -> Iterator[Record]:
    """Images with same-stem .txt captions; a caption file with no image is reported too."""
    used = set()
    for img in images:
        txt = _stem(img) + ".txt"
        used.add(txt)
        if not owner.take(key_of(img)):
            continue
        src = fs.unstrip_protocol(img)
        if txt not in texts:
            yield Record(key_of(img), src, error="missing caption (no .txt next to the image)")
            continue
        try:
            caption, err, notes = _caption_from(fs.cat_file(txt), ".txt")
            data = fs.cat_file(img)
        except Exception as e:
            yield Record(key_of(img), src, error=f"unreadable file: {type(e).__name__}: {e}")
            continue
        yield Record(key_of(img), src, data, caption, err, notes)
    for txt in sorted(texts - used):
        if owner.take(key_of(txt)):
            yield Record(key_of(txt), fs.unstrip_protocol(txt), error="caption without an image")


def _tar_group(key: str, src: str, members: dict[str, bytes], duplicate: bool) -> Record:
    """One webdataset sample (extension → payload) as a Record."""
    if duplicate:
        return Record(key, src, error="duplicate key in shard (its members are not adjacent)")
    img_exts = [e for e in members if e in IMAGE_EXTS]
    if not img_exts:
        return Record(key, src, error=f"missing image (members: {', '.join(sorted(members)) or 'none'})")
    if len(img_exts) > 1:
        return Record(key, src, error=f"several images for one key: {', '.join(sorted(img_exts))}")
    image = members[img_exts[0]]
    for ext in (".txt", ".json"):
        if ext in members:
            caption, err, notes = _caption_from(members[ext], ext)
            return Record(key, src, image, caption, err, notes)
    return Record(key, src, image, error="missing caption (no .txt or .json member)")


def _iter_tar(fs, path: str, prefix: str) -> Iterator[Record]:
    """Read a tar; consecutive members sharing a basename form one sample (the webdataset convention).

    Python's tarfile stops silently at the first damaged member header and reports the rest of the shard as absent;
    here it reads on (ignore_zeros: the damaged blocks are skipped up to the next valid header), and every skipped
    byte range that is not zero padding becomes one bad record, keyed `<shard>@<offset>`, naming the sample before
    it. The samples the damage touched come out incomplete (missing image or caption) and are reported as such;
    those after it are read. A shard that cannot be read, or is cut short, yields the samples completed before the
    damage and then one bad record keyed by the shard; the sample in progress at the damage is covered by it.
    """
    src = fs.unstrip_protocol(path)
    group, duplicate, members, seen = None, False, {}, set()
    end = 0  # where the previous member's data ends: the next header is expected there
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*", ignore_zeros=True) as tar:
            for m in tar:
                if m.offset > end and not _is_zero(tar.fileobj, end, m.offset):
                    yield _damage(prefix, src, group, end, m.offset)
                end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not m.isfile():
                    continue
                base, ext = posixpath.splitext(m.name)
                if base != group:  # a new sample begins: the previous one is complete
                    if group is not None:
                        yield _tar_group(f"{prefix}/{group}", src, members, duplicate)
                    group, duplicate, members = base, base in seen, {}
                    seen.add(base)
                members[ext.lower()] = tar.extractfile(m).read()
            size = tar.fileobj.seek(0, os.SEEK_END)
            if not seen and end == 0 and not _is_zero(tar.fileobj, 0, size):  # no valid header in the whole file
                raise tarfile.ReadError("not a tar archive (no valid member header)")
            # A whole tar ends with zero blocks (the end-of-archive marker, then padding); a tar cut exactly between
            # members has none, and bytes that are not zero after the last member are a damaged header or garbage.
            if size - end < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("no end-of-archive marker (file cut short)")
            if not _is_zero(tar.fileobj, end, size):
                yield _damage(prefix, src, group, end, size)
    except Exception as e:
        done = max(len(seen) - 1, 0)
        yield Record(prefix, src, error=f"unreadable tar shard after {done} samples: {type(e).__name__}: {e}")
        return
    if group is not None:
        yield _tar_group(f"{prefix}/{group}", src, members, duplicate)


def _damage(prefix: str, src: str, group: str | None, start: int, stop: int) -> Record:
    """The bad record of a damaged byte range of a shard, keyed by the shard and the range's offset."""
    after = f"after sample {prefix}/{group}" if group is not None else "at the start"
    return Record(f"{prefix}@{start}", src, error=f"damaged tar member header(s): bytes {start}-{stop} skipped "
                                                  f"({after}); every readable member after them was read")


def _is_zero(f, start: int, stop: int, chunk: int = 1 << 20) -> bool:
    """Are bytes [start, stop) of the seekable file f all zero (padding, not lost data)?"""
    f.seek(start)
    while start < stop:
        data = f.read(min(chunk, stop - start))
        if not data:
            return True  # the file ends earlier: nothing more is lost here
        if data.count(0) != len(data):
            return False
        start += len(data)
    return True


def _pick(names: list[str], wanted: str | None, defaults: tuple[str, ...], what: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise KeyError(f"no {what} column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    for name in defaults:
        if name in names:
            return name
    raise KeyError(f"no {what} column among {', '.join(defaults)} (columns: {', '.join(names)}); "
                   f"name it with --{what}-column")


def _image_bytes(value) -> Any:
    """Raw bytes from a bytes cell or an HF-style {"bytes": ..., "path": ...} struct; None when absent."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value


def _iter_parquet(fs, path: str, prefix: str, image_column, caption_column) -> Iterator[Record]:
    """Rows of a parquet file; key `<file stem>/<row index>`."""
    import pyarrow.parquet as pq

    src = fs.unstrip_protocol(path)
    row = 0
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            img_col = _pick(names, image_column, DEFAULT_IMAGE_COLUMNS, "image")
            cap_col = _pick(names, caption_column, DEFAULT_CAPTION_COLUMNS, "caption")
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[img_col, cap_col]):
                images, captions = batch.column(0).to_pylist(), batch.column(1).to_pylist()
                for image, caption in zip(images, captions):
                    key, row = f"{prefix}/{row}", row + 1
                    yield _parquet_record(key, src, _image_bytes(image), caption)
    except Exception as e:
        yield Record(prefix, src, error=f"unreadable parquet after {row} rows: {type(e).__name__}: {e}")


def _parquet_record(key: str, src: str, image, caption) -> Record:
    if image is None:
        return Record(key, src, error="missing image bytes")
    if caption is None:
        return Record(key, src, image, error="missing caption")
    notes = []
    if isinstance(caption, bytes):  # a binary caption column: decode it, as a .txt member, not as repr(b'...')
        caption, notes = decode_caption(caption)
    caption = str(caption).strip()
    return Record(key, src, image, caption or None, None if caption else "empty caption", notes)
