"""The precomputed set's manifest: read, validate, write atomically, and verify shard checksums.

Layout of a precomputed set (format "tessera-precomputed/1"):

    <root>/manifest.json                        written last, atomically: the set is complete when it exists
    <root>/report.jsonl                         one line per bad input or note: {"key", "source", "reason", "stored"}
    <root>/<res>/shard_r{rank:03d}_{index:05d}/ an HF `datasets` Dataset (save_to_disk, Arrow)

Every shard has the columns key (string), caption (string), latent (float16 (C, res/f, res/f), already times the
VAE's scaling factor), caption_emb (float16 (n_tokens, D): the real tokens only) and caption_len (int32 n_tokens).

A shard's checksum is a sha256 over its files: each file's sha256 with its path relative to the shard folder,
sorted by path. The manifest also keeps the per-file hashes ("files"), so a mismatch names the file that changed.
Paths may be local or fsspec URLs.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path

FORMAT = "tessera-precomputed/1"
MANIFEST = "manifest.json"
REPORT = "report.jsonl"
_REQUIRED = ("format", "vae", "text_encoder", "resolutions", "caption_emb_dtype", "sources", "bad_inputs", "created")
_REQUIRED_VAE = ("name", "scaling_factor", "latent_channels", "downsample")
_REQUIRED_TEXT = ("name", "dim", "max_length")
_REQUIRED_RES = ("count", "latent_shape", "latent_dtype", "shards")
_CHUNK = 1 << 20


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(str(url))


def file_checksums(folder) -> dict[str, str]:
    """{path relative to folder: sha256 hex} of every file under `folder` (recursive), sorted by path."""
    fs, root = _fs(folder)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{folder}: no such shard folder")
    out = {}
    for path in sorted(fs.find(root)):
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        out[posixpath.relpath(path, root.rstrip("/"))] = h.hexdigest()
    return out


def combine_checksums(files: dict[str, str]) -> str:
    """sha256 over (relative path, file sha256) pairs in path order: the shard's checksum."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()


def shard_checksum(folder) -> str:
    """sha256 hex over the shard folder's files (see module docstring)."""
    return combine_checksums(file_checksums(folder))


def _require(d: dict, keys, where: str, path) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{path}: manifest field {where or '<root>'} must be an object")
    for k in keys:
        if k not in d:
            raise ValueError(f"{path}: manifest field {where + '.' if where else ''}{k} is missing")


def read_manifest(path) -> dict:
    """Load and validate a manifest; `path` is the set's root folder or its manifest.json (local or fsspec URL).

    Raises FileNotFoundError when absent (an unfinished precompute has none) and ValueError naming the file and
    field when the format or a required field is wrong.
    """
    path = str(path)
    if not path.endswith(".json"):
        path = path.rstrip("/") + "/" + MANIFEST
    fs, p = _fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"{path}: no manifest (precompute not run, or not finished)")
    with fs.open(p, "r") as f:
        try:
            m = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    _require(m, _REQUIRED, "", path)
    if m["format"] != FORMAT:
        raise ValueError(f"{path}: manifest field format is {m['format']!r}, expected {FORMAT!r}")
    _require(m["vae"], _REQUIRED_VAE, "vae", path)
    _require(m["text_encoder"], _REQUIRED_TEXT, "text_encoder", path)
    for res, entry in m["resolutions"].items():
        _require(entry, _REQUIRED_RES, f"resolutions.{res}", path)
        for i, shard in enumerate(entry["shards"]):
            _require(shard, ("path", "count", "sha256"), f"resolutions.{res}.shards[{i}]", path)
    return m


def verify_checksums(root, manifest: dict, resolutions=None) -> None:
    """Recompute every shard's checksum (of `resolutions`, default all) and compare with the manifest.

    Raises ValueError naming the shard folder (and the file, where the manifest has per-file hashes) and the
    manifest field on the first mismatch, a missing folder or a missing/extra file. Reads every byte: costs I/O.
    """
    root = str(root).rstrip("/")
    wanted = None if resolutions is None else {str(r) for r in resolutions}
    for res, entry in manifest["resolutions"].items():
        if wanted is not None and res not in wanted:
            continue
        for i, shard in enumerate(entry["shards"]):
            _verify_shard(f"{root}/{shard['path']}", shard, f"resolutions.{res}.shards[{i}]")


def _verify_shard(folder: str, shard: dict, field: str) -> None:
    try:
        got = file_checksums(folder)
    except FileNotFoundError:
        raise ValueError(f"{folder}: shard folder missing (manifest field {field}.path)") from None
    expected = shard.get("files")
    if expected is not None:
        for rel in sorted(set(expected) | set(got)):
            if rel not in got:
                raise ValueError(f"{folder}/{rel}: file missing (manifest field {field}.files)")
            if rel not in expected:
                raise ValueError(f"{folder}/{rel}: file not in the manifest (manifest field {field}.files)")
            if got[rel] != expected[rel]:
                raise ValueError(f"{folder}/{rel}: sha256 mismatch, the file was modified "
                                 f"(manifest field {field}.sha256)")
    actual = combine_checksums(got)
    if actual != shard["sha256"]:
        raise ValueError(f"{folder}: sha256 mismatch (manifest field {field}.sha256 is {shard['sha256']}, "
                         f"the files hash to {actual})")


def write_json_atomic(path, obj) -> Path:
    """Write JSON to a local path through a temporary file + os.replace: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
