"""Atomic distributed checkpoints with torch.distributed.checkpoint (DCP).

One checkpoint is a folder ``<dir>/step_00001000/`` holding the DCP shards and ``.metadata``
for the entries ``model``, ``ema`` and ``optim`` (each optional except ``model``) and
``extra`` (one pickled dict, identical on every rank), plus ``rng_rank{r}.pt`` with each
rank's RNG states. Model and optimizer state go through ``get_/set_model_state_dict`` and
``get_/set_optimizer_state_dict``, so FSDP2-sharded modules are saved shard-per-rank and
plain modules work the same way.

Atomicity: every rank writes into ``step_XXXXXXXX.tmp/``; after a barrier rank 0 renames it
to ``step_XXXXXXXX/``. A folder with the final name is therefore complete, and
``latest()`` only ever returns such folders (with DCP's ``.metadata``). Leftover ``.tmp``
folders from a crash are removed by the next save. Durability: every file is on disk before the
rename that publishes it (DCP fsyncs its shards and metadata, we fsync the RNG files and the
folder's entries), so a power loss cannot leave a published checkpoint with empty files.

All public functions are collective when torch.distributed is initialised with more than one rank: call them on
every rank. Without a process group, or in a group of one, DCP runs without collectives (``_no_collectives``).
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Checkpointer", "load_model_weights", "is_complete"]

_STEP_RE = re.compile(r"step_(\d{8})")
_METADATA = ".metadata"


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _no_collectives() -> bool:
    """True where one process holds everything, so DCP should not talk to a process group.

    Not only a saving: in a one-process gloo group DCP's object collectives still run, in gloo's worker thread, and
    their first large copy starts an OpenMP team of that thread's own. libgomp then manages more threads than the
    machine has CPUs, and from then on its threads sleep between parallel regions instead of spinning: every later
    training step on a 2-core machine took 1.4-1.7x as long (docs/results/cpu_models.md: the checkpoint that slowed
    every run)."""
    return not _dist_on() or dist.get_world_size() == 1


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def is_complete(path: str | os.PathLike) -> bool:
    """True for a finished checkpoint folder: final name ``step_XXXXXXXX`` and DCP's ``.metadata``."""
    path = Path(path)
    return _STEP_RE.fullmatch(path.name) is not None and (path / _METADATA).is_file()


class Checkpointer:
    """Saves ``step_XXXXXXXX`` checkpoints under ``directory`` and keeps the newest ``keep_last``.

    Args:
        directory: folder holding the checkpoints; must be shared by all ranks.
        keep_last: number of complete checkpoints kept after each save; None keeps all.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int | None = 3):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in this folder, oldest first (reads the local file system)."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if is_complete(p)]
        return sorted(found, key=lambda p: int(_STEP_RE.fullmatch(p.name).group(1)))

    def latest(self) -> Path | None:
        """Newest complete checkpoint or None. Rank 0 decides and broadcasts, so all ranks agree."""
        found = self.checkpoints()[-1:] if _rank() == 0 else None
        if _dist_on():
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        return found[0] if found else None

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        ema: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        extra: dict[str, Any] | None = None,
        aux: dict[str, tuple[nn.Module, torch.optim.Optimizer]] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically, prune old ones, return its final path.

        ``extra`` must be picklable, hold CPU/Python values and be identical on all ranks
        (DCP stores one copy): step counters, LR-schedule and meter state, data position.
        ``aux``: further networks trained beside the model, each with its optimizer (a method's
        discriminator), stored as entries ``<name>`` and ``<name>_optim``.
        """
        import torch.distributed.checkpoint as dcp

        final = self.directory / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("step_*.tmp"):  # from a save that crashed
                shutil.rmtree(stale)
            tmp.mkdir()
        _barrier()
        with _quiet_single_process():
            dcp.save(_state(model, ema, optimizer, extra, aux), checkpoint_id=str(tmp), no_dist=_no_collectives())
        _save_durably(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            _fsync_dir(tmp)  # the folder's entries (each file, DCP's renamed .metadata) before it is published
            if final.exists():  # the same step saved again: the new one wins
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self._prune()
        _barrier()  # nobody sees a half-renamed folder or races the pruning
        return final

    def load(
        self,
        path: str | os.PathLike,
        *,
        model: nn.Module,
        ema: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        aux: dict[str, tuple[nn.Module, torch.optim.Optimizer]] | None = None,
    ) -> dict[str, Any]:
        """Restore model, EMA, optimizer, ``aux`` (as in ``save``) and this rank's RNG in place; return the
        ``extra`` dict. An ``aux`` entry the checkpoint lacks raises ValueError naming it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = _check_loadable(path)
        meta = _read_metadata(path)
        state = _state(model, ema, optimizer, None, aux)
        for name in ("model", "ema", *(aux or {})):
            if name in state:
                _check_keys(path, meta, name, state[name], skip=())
        if optimizer is not None and not any(k.startswith("optim.") for k in meta):
            raise ValueError(f"checkpoint {path} holds no optimizer state")
        for name in ("optim", *(f"{a}_optim" for a in aux or {})):
            if name in state:
                _drop_unsaved_optimizer_state(meta, name, state[name])
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=_no_collectives())
        set_model_state_dict(model, state["model"])
        if ema is not None:
            set_model_state_dict(ema, state["ema"])
        # not strict: the parameters _drop_unsaved_optimizer_state left out have no state; every other key was read
        partial = StateDictOptions(strict=False)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"], options=partial)
        for name, (module, opt) in (aux or {}).items():
            set_model_state_dict(module, state[name])
            set_optimizer_state_dict(module, opt, state[f"{name}_optim"], options=partial)
        _restore_rng(path / f"rng_rank{_rank()}.pt")
        return pickle.loads(state["extra"])

    def resume(self, **modules: Any) -> dict[str, Any] | None:
        """``load(latest(), ...)`` if a checkpoint exists; returns its extra dict or None."""
        path = self.latest()
        return None if path is None else self.load(path, **modules)

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for old in self.checkpoints()[: -self.keep_last]:
            try:
                shutil.rmtree(old)
            except OSError as err:  # a failed cleanup must not kill a healthy run
                warnings.warn(f"could not delete old checkpoint {old}: {err}")


def load_model_weights(
    path: str | os.PathLike,
    model: nn.Module,
    ema: nn.Module | None = None,
    skip: tuple[str, ...] = ("pos_embed",),
    from_ema: bool = False,
    prefix: str = "",
    resize_patches: bool = False,
) -> None:
    """Initialise ``model`` (and ``ema`` from the checkpoint's EMA) with weights only.
    With ``from_ema``, ``model`` (and ``ema``) get the checkpoint's EMA weights (for sampling, or a network that
    starts from another's EMA). With ``prefix`` (e.g. ``"inner."``) the checkpoint fills the submodule of that name:
    checkpoint key ``k`` goes to ``prefix + k``, and every parameter outside the prefix keeps its value.

    For starting a new training phase from an earlier phase's checkpoint: the optimizer,
    RNG and extra state are not touched. Parameters whose name contains any string in
    ``skip`` keep their current values (e.g. ``pos_embed`` at a new resolution). Any other
    missing, unexpected or wrongly shaped key raises ValueError naming the keys: the load is strict, under a prefix
    too (a wrong file is an error, never a partly random model). With ``resize_patches`` the patch embedding and
    output layer may be saved for patches k times narrower than the model's; they are grown (engine/training/
    patch_resize.py) and every other shape must still match.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    path = _check_loadable(path)
    meta = _read_metadata(path)
    source = "ema" if from_ema else "model"
    targets = [(source, model)] + ([] if ema is None else [("ema", ema)])  # (checkpoint entry, module)
    states = []
    for entry, module in targets:
        full = get_model_state_dict(module)
        sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix) and not _skipped(k, skip)}
        if prefix and not any(k.startswith(prefix) for k in full):
            raise ValueError(f"the model has no parameters under the prefix '{prefix}'")
        grown = _saved_patch_tensors(meta, entry, sd) if resize_patches else {}
        try:
            _check_keys(path, meta, entry, sd, skip)
        except ValueError as e:
            if resize_patches or not _patches_could_grow(meta, entry, sd):
                raise
            raise ValueError(f"{e}; the model's patches are an integer multiple of the checkpoint's on the same grid "
                             "of tokens: train.init_resize_patches=true grows them") from None
        states.append((sd, grown))
    with _quiet_single_process():
        for (entry, _), (sd, _) in zip(targets, states):  # one load per module: the EMA may fill both
            dcp.load({entry: sd}, checkpoint_id=str(path), no_dist=_no_collectives())
    for (_, module), (sd, grown) in zip(targets, states):
        _grow_patch_tensors(sd, grown)
        named = {prefix + k: v for k, v in sd.items()}
        set_model_state_dict(module, named, options=StateDictOptions(strict=False))


def _state(model, ema, optimizer, extra, aux=None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    for name, (module, opt) in (aux or {}).items():
        state[name] = get_model_state_dict(module)
        state[f"{name}_optim"] = get_optimizer_state_dict(module, opt)
    # bytes is a DCP leaf: a dict would be flattened and need its keys known at load time
    state["extra"] = pickle.dumps(extra or {})
    return state


def _drop_unsaved_optimizer_state(meta: dict, prefix: str, sd: dict) -> None:
    """A parameter that had no gradient before the save has no optimizer state in the checkpoint, while a fresh
    optimizer's state dict holds state for every parameter (torch fills it with a zero-gradient step). Drop those
    entries, so the load neither asks for keys that were never written nor invents state: the parameter resumes with
    none, as it was saved."""
    head = f"{prefix}.state."
    saved = {k[len(head):].rsplit(".", 1)[0] for k in meta if k.startswith(head)}  # <fqn>.<field>: the fqns
    for fqn in [f for f in sd.get("state", {}) if f not in saved]:
        del sd["state"][fqn]


def _saved_shape(meta: dict, entry: str, key: str) -> tuple[int, ...] | None:
    """The shape ``key`` of ``entry`` was saved with; None where the checkpoint holds no tensor of that name."""
    saved = meta.get(f"{entry}.{key}")
    return tuple(saved.size) if saved is not None and hasattr(saved, "size") else None


def _saved_patch_tensors(meta: dict, entry: str, sd: dict) -> dict[str, torch.Tensor]:
    """For the patch tensors saved at another shape, swap ``sd``'s entry for a buffer of the saved shape (so that the
    strict check and the load read them as saved); return the model's own tensors they will be grown into."""
    from engine.training.patch_resize import is_patch_key

    model_tensors = {}
    for key in [k for k in sd if is_patch_key(k)]:
        saved = _saved_shape(meta, entry, key)
        if saved is not None and saved != tuple(sd[key].shape):
            model_tensors[key] = sd[key]
            sd[key] = torch.empty(saved, dtype=sd[key].dtype)
    return model_tensors


def _patches_could_grow(meta: dict, entry: str, sd: dict) -> bool:
    """Whether the saved patch embedding differs from the model's by an integer growth of the patch."""
    from engine.training.patch_resize import growth_factor, is_embed_key

    for key in [k for k in sd if is_embed_key(k)]:
        saved = _saved_shape(meta, entry, key)
        if saved is None:
            continue
        try:
            growth_factor(saved, tuple(sd[key].shape))
            return True
        except ValueError:  # not an integer growth
            pass
    return False


def _grow_patch_tensors(sd: dict, model_tensors: dict[str, torch.Tensor]) -> None:
    """Replace the loaded narrow patch tensors in ``sd`` by their grown forms, placed as the model's own."""
    from engine.training.patch_resize import grow, growth_factor, is_embed_key

    if not model_tensors:
        return
    embed = next((k for k in model_tensors if is_embed_key(k)), None)
    if embed is None:
        raise ValueError(f"patch tensors {sorted(model_tensors)} differ in shape but the patch embedding does not")
    saved_shape, target_shape = tuple(sd[embed].shape), tuple(model_tensors[embed].shape)
    k, p = growth_factor(saved_shape, target_shape), saved_shape[-1]
    for key, target in model_tensors.items():
        value = grow(key, sd[key], p, k)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{key}: grown to {tuple(value.shape)}, the model has {tuple(target.shape)}")
        if hasattr(target, "device_mesh"):  # an FSDP2 shard: place the full tensor as the model's is placed
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
        else:
            value = value.to(dtype=target.dtype, device=target.device)
        sd[key] = value


def _skipped(key: str, skip: tuple[str, ...]) -> bool:
    return any(s in key for s in skip)


def _check_loadable(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.name.endswith(".tmp") or not (path / _METADATA).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (unfinished save: .tmp or no {_METADATA})")
    return path


def _read_metadata(path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata().state_dict_metadata


def _check_keys(path: Path, meta: dict, prefix: str, sd: dict, skip: tuple[str, ...]) -> None:
    """Compare a module's state-dict keys and global shapes with the checkpoint's ``prefix.*``."""
    saved = {k[len(prefix) + 1 :]: m for k, m in meta.items() if k.startswith(prefix + ".")}
    if not saved:
        raise ValueError(f"checkpoint {path} holds no '{prefix}' state")
    missing = sorted(k for k in sd if k not in saved)
    unexpected = sorted(k for k in saved if k not in sd and not _skipped(k, skip))
    wrong = sorted(
        f"{k} (checkpoint {tuple(saved[k].size)}, model {tuple(v.shape)})"
        for k, v in sd.items()
        if k in saved and hasattr(saved[k], "size") and tuple(saved[k].size) != tuple(v.shape)
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint {path} does not match '{prefix}': missing {missing}, "
            f"unexpected {unexpected}, wrong shape {wrong}"
        )


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's current device only
    try:
        import numpy as np
    except ImportError:
        return state
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state["numpy"] = (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss)
    return state


def _restore_rng(file: Path) -> None:
    if not file.is_file():  # e.g. resumed with a different world size
        warnings.warn(f"{file} not found: RNG state of this rank not restored")
        return
    state = torch.load(file, weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, key, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _save_durably(obj: Any, path: Path) -> None:
    """torch.save, then fsync: the bytes are on disk, not in the page cache, when this returns."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable: a power loss must not undo them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _quiet_single_process(warnings.catch_warnings):
    """Silences DCP's 'assuming the intent is to save in a single process' warning: with ``no_dist`` we asked for it."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message=".*single process.*")
        return self
