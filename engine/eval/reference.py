"""FID against a reference set with any feature extractor given (TorchScript Inception, transformers vision models):
the reference images (a folder, the synthetic set, or saved statistics) and the FID entries of eval.json."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.config import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def folder_images(folder: Path, size: tuple[int, int], limit: int | None, batch: int, skipped: list):
    """uint8 (b, H, W, 3) batches of the folder's images (sorted, recursive), decoded and cropped exactly as training
    data is (EXIF orientation, transparency over white, short side resized, centre crop); unreadable files are
    appended to `skipped` and left out."""
    from engine.data.preprocess import decode_image, resize_center_crop

    if size[0] != size[1]:
        raise ValueError(f"reference images are cropped square; got size {size}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    buf, used = [], 0
    for f in files:
        if limit is not None and used >= limit:
            break
        try:
            buf.append(np.asarray(resize_center_crop(decode_image(f.read_bytes(), size[0]), size[0])))
        except Exception as e:  # undecodable, truncated, zero-byte: reported, never fatal
            skipped.append(f"{f}: {type(e).__name__}: {e}")
            continue
        used += 1
        if len(buf) == batch:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def synthetic_batches(ds, n: int, batch: int):
    for i in range(0, n, batch):
        yield ds.images(range(i, min(n, i + batch)))


def build_extractors(args, device) -> dict:
    from engine.eval.fid import HFVisionFeatures, InceptionTorchScript

    ex = {}
    if args.inception:
        ex["inception"] = InceptionTorchScript(args.inception, input_range=args.inception_input,
                                               resize=args.inception_resize, device=device)
    if args.features:
        ex["features"] = HFVisionFeatures(args.features, device=device)
    return ex


def check_reference(reference: str | None, extractors: dict, synthetic: bool, cfg, num: int, data_seed: int):
    """Fail before generating anything when the FID reference cannot work; the SyntheticShapes set of a
    'synthetic' reference (its first --num-images samples are the prompts' own images when prompts are synthetic)."""
    if not extractors:
        return None
    if reference is None:
        raise ConfigError("FID needs --reference <folder of images | stats.npz> for runs not trained on synthetic data")
    if reference == "synthetic":
        if not synthetic:
            raise ConfigError(f"--reference synthetic: the run trained on data.source={cfg.data.source}")
        from engine.data.synthetic import SyntheticShapes
        return SyntheticShapes(num, cfg.data.image_size, data_seed, cfg.data.backgrounds)
    if reference.endswith(".npz"):
        if not Path(reference).is_file():
            raise ConfigError(f"--reference {reference}: no such file")
        if len(extractors) != 1:
            raise ConfigError("--reference <stats.npz> holds one extractor's statistics: give exactly one extractor")
    elif not Path(reference).is_dir():
        raise ConfigError(f"--reference {reference}: not 'synthetic', a folder of images or an .npz file")
    return None


def reference_stats(reference: str, extractors: dict, ds, args, image_hw, skipped: list) -> dict:
    """FeatureStats of the reference for every extractor, in one pass over its images."""
    from engine.eval.fid import FeatureStats

    if reference.endswith(".npz"):
        (key, e), = extractors.items()
        ref = FeatureStats.load(reference)
        if ref.extractor and ref.extractor != e.name:
            raise ConfigError(f"--reference {reference} was computed with {ref.extractor!r}, not {e.name!r}")
        ref.extractor = ref.extractor or e.name  # pytorch-fid files carry no name: the user vouches for it
        return {key: ref}
    if reference == "synthetic":
        if image_hw != (ds.image_size, ds.image_size):
            raise ConfigError(f"generated images are {image_hw}, the synthetic reference {ds.image_size}px")
        batches = synthetic_batches(ds, args.num_reference or args.num_images, args.batch_size)
    else:
        batches = folder_images(Path(reference), image_hw, args.num_reference, args.batch_size, skipped)
    stats = {k: FeatureStats(e.name) for k, e in extractors.items()}
    for images in batches:
        for k, e in extractors.items():
            stats[k].update(e(images))
    return stats


def fid_metrics(extractors: dict, gen: dict, reference: str, ds, args, image_hw, out: Path) -> dict:
    """{extractor key: FID entry with everything that makes it comparable}; reference stats saved as .npz."""
    from engine.eval.fid import fid_from_stats, warn_if_few

    skipped: list[str] = []
    refs = reference_stats(reference, extractors, ds, args, image_hw, skipped)
    if skipped:
        (out / "reference_skipped.txt").write_text("\n".join(skipped) + "\n")
    entries = {}
    for k, e in extractors.items():
        ref, g = refs[k], gen[k]
        if ref.n is not None and ref.n < 2:
            raise ConfigError(f"--reference {reference}: {ref.n} usable images; FID needs at least 2")
        if not reference.endswith(".npz"):
            ref.save(out / f"reference_{k}.npz")
        dim = int(g.mean.shape[0])
        entry = {"value": fid_from_stats(g, ref), "extractor": e.name, "num_generated": g.n,
                 "num_reference": ref.n, "reference": reference, "feature_dim": dim}
        if skipped:
            entry["reference_skipped"] = len(skipped)
        note = warn_if_few(min(g.n, ref.n or g.n), dim)
        if note:
            entry["note"] = note
        entries[k] = entry
    return entries
