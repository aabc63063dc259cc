"""Atomic, complete checkpoints for exact resume (DESIGN §3.7).

Layout of one checkpoint, a directory under ``run_dir/checkpoints``::

    step_000001234/
      state.pt          everything global (model, optimizer, scheduler, scaler, method state
                        such as banks or pseudo labels, sampler, step/epoch), written by rank 0
      rng_rank{r}.pt    each rank's RNG states (python, numpy, torch CPU, torch CUDA)

All ranks write into ``step_….tmp``; after a barrier rank 0 fsyncs and renames it, so a directory
without the ``.tmp`` suffix is always complete. A crash leaves at most a ``.tmp`` that resume ignores.
Files load with ``torch.load(weights_only=True)``: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.records import fsync_dir
from trainer import dist

_STEP_DIR = re.compile(r"^step_(\d{9})$")


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
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


def resolve_resume(resume: str, ckpt_root: str | os.PathLike[str]) -> Path | None:
    """``auto`` → newest complete checkpoint or None; ``never`` → None; else a checkpoint directory."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"train.resume={resume!r}: expected 'auto', 'never' or a checkpoint directory "
                                f"holding state.pt")
    return path


def load_checkpoint(path: str | os.PathLike[str], restore_rng: bool = True) -> dict[str, Any]:
    """Load ``state.pt`` (on CPU) and, if present for this rank, restore this rank's RNG states."""
    path = Path(path)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"{path / 'state.pt'}: cannot load checkpoint ({exc})") from exc
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state
