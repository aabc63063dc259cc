"""Atomic, complete checkpoints for exact resume.

Layout of one checkpoint, a directory under ``run_dir/checkpoints``::

    step_000001234/
      state.pt          everything global (model, optimizer, scheduler, scaler, method state
                        such as banks or pseudo labels, the position: epoch and the sampler's
                        step_in_epoch), written by rank 0
      rng_rank{r}.pt    each rank's RNG states (python, numpy, torch CPU, torch CUDA)
      meta.json         format version, step, world size, the position (epoch, step in it),
                        the keys of state.pt (written last)

Resume reads ``meta.json`` first (:func:`check_checkpoint`): a checkpoint of another format version,
or one without the files or keys the trainer needs, is refused in one line before any work starts,
rather than failing deep inside ``load_state_dict``.

All ranks write into ``step_….tmp``; after a barrier rank 0 fsyncs and renames it, so a directory
without the ``.tmp`` suffix is always complete. A crash leaves at most a ``.tmp`` that resume ignores.
Files load with ``torch.load(weights_only=True)``: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.atomic import fsync_dir
from shards.errors import UserError
from trainer import dist

_STEP_DIR = re.compile(r"^step_(\d{9})$")

FORMAT_VERSION = 3
"""Version of the checkpoint layout, written to ``meta.json``. Bump it when ``state.pt`` changes in a
way an older or newer trainer cannot load. Version 1 is the layout from before versions were
recorded (no ``meta.json``); version 2 kept the sampler's position twice (the engine's ``epoch`` /
``step_in_epoch`` and a copy in the method state), version 3 keeps the engine's only."""
RESUMABLE_VERSIONS = (2, FORMAT_VERSION)
"""What resume accepts: a version-2 checkpoint holds all that version 3 does (its second copy of the
position is not read)."""
META = "meta.json"

_FIX = "pass train.resume=never to start over, or another run_dir"
_RESUMES = "formats " + " and ".join(map(str, RESUMABLE_VERSIONS))


class CheckpointError(UserError):
    """A checkpoint this trainer cannot resume: the message names its path and what to do."""


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()  # the legacy tuple (key name, keys, pos, has_gauss, cached)
    assert isinstance(np_state, tuple)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": np_state[0], "keys": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def list_checkpoints(ckpt_root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(ckpt_root: str | os.PathLike[str], step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Collective: every rank calls it with the same ``step``; rank 0's ``state`` is written.

    ``keep`` complete checkpoints are retained (oldest removed after the new one is committed);
    ``keep <= 0`` keeps all.
    """
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    _save_file(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        _save_file(state, tmp / "state.pt")
    dist.barrier()
    if rank == 0:
        _write_meta(tmp, step, state)
        fsync_dir(tmp)
        if final.exists():  # same step saved twice (e.g. a resumed run re-saving): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _write_meta(folder: Path, step: int, state: dict[str, Any]) -> None:
    position: dict[str, int] = {k: int(state[k]) for k in ("epoch", "step_in_epoch") if k in state}  # cheap to read
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "step": step, "world_size": dist.get_world_size(),
                            **position, "keys": sorted(map(str, state))}
    with open(folder / META, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def check_checkpoint(path: str | os.PathLike[str], required_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Refuse a checkpoint this trainer cannot resume; returns its ``meta.json``.

    Reads only ``meta.json`` (cheap: every rank calls it before any work): the format version must
    be one of :data:`RESUMABLE_VERSIONS`, ``state.pt`` and the RNG file of every saved rank must be
    there, and ``state.pt`` must hold ``required_keys``. Raises :class:`CheckpointError` (path and
    fix) otherwise.
    """
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: a checkpoint of format 1 (no {META}: written before checkpoint formats "
                              f"were versioned); this trainer resumes {_RESUMES} only; {_FIX}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        version, world, keys = meta["format_version"], int(meta["world_size"]), list(meta["keys"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{meta_file}: unreadable checkpoint metadata ({type(exc).__name__}: {exc}); "
                              f"{_FIX}") from None
    if version not in RESUMABLE_VERSIONS:
        raise CheckpointError(f"{path}: a checkpoint of format {version!r} (written by another version of the "
                              f"trainer); this trainer resumes {_RESUMES} only; {_FIX}")
    absent = [f for f in ("state.pt", *(f"rng_rank{r}.pt" for r in range(world))) if not (path / f).is_file()]
    if absent:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(absent)}; {_FIX}")
    lacking = [k for k in required_keys if k not in keys]
    if lacking:
        raise CheckpointError(f"{path}: the checkpoint's state.pt lacks {', '.join(lacking)}; {_FIX}")
    return meta


def resolve_resume(resume: str, ckpt_root: str | os.PathLike[str]) -> Path | None:
    """``auto`` → newest complete checkpoint or None; ``never`` → None; else a checkpoint directory."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise CheckpointError(f"train.resume={resume!r}: not a checkpoint directory (no state.pt there); pass "
                              f"train.resume=auto, train.resume=never or a checkpoint directory such as "
                              f"{Path(ckpt_root) / step_dir_name(0)}")
    return path


def load_checkpoint(path: str | os.PathLike[str], restore_rng: bool = True,
                    required_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load ``state.pt`` (on CPU) and, if present for this rank, restore this rank's RNG states.

    A damaged ``state.pt``, or one without ``required_keys``, is a :class:`CheckpointError`: every
    rank reads the same file, so every rank raises the same error.
    """
    path = Path(path)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path / 'state.pt'}: cannot load the checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); {_FIX}") from None
    lacking = [k for k in required_keys if not isinstance(state, dict) or k not in state]
    if lacking:
        raise CheckpointError(f"{path / 'state.pt'}: the checkpoint lacks {', '.join(lacking)}; {_FIX}")
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state
