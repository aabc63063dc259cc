"""Make sure every dataset a run names is packed; synthesize + pack the synthetic ones on demand.

This is what makes ``exp=pat_smoke`` and the demo self-contained: a missing synthetic dataset is
generated (``shards.synth``) and packed (``shards.pack``) into the cache once, by one process, under
a lock file, and every later run reuses it. A missing real dataset is a one-line error telling
the user how to pack it (:func:`check_datasets`, which the launcher calls before anything is written).

:func:`ensure_datasets` runs once per run, before any method is built: in the launcher before it
submits, and in ``trainer.train.run`` on every rank (a collective); the methods only open the packs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from shards.atomic import atomic_write_bytes
from shards.errors import UserError
from shards.layouts import LAYOUTS
from shards.records import MANIFEST
from trainer import dist
from trainer.config import DataConfig, SynthSourceConfig

# Pack parser for each synthetic layout (CUHK03-NP is packed as its detected subset, as PAT uses).
_PACK_NAME = {"market1501": "market1501", "dukemtmc": "dukemtmc", "msmt17": "msmt17", "cuhk03np": "cuhk03np_detected"}


class DatasetNotPackedError(UserError):
    """A real dataset the run names has no pack under ``data.root``: the message says how to pack it."""


def dataset_dir(cfg: DataConfig, name: str) -> Path:
    return Path(cfg.root) / name


def _spec_file(cache: Path, name: str) -> Path:
    return cache / "specs" / f"{name}.json"


def _spec_json(spec: SynthSourceConfig) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}, sort_keys=True)


def _is_current(cfg: DataConfig, name: str) -> bool:
    """A synthetic pack is reused only if it was made from the same settings (else it is remade)."""
    if not (dataset_dir(cfg, name) / MANIFEST).is_file():
        return False
    if name not in cfg.synthetic:
        return True
    f = _spec_file(Path(cfg.cache_dir), name)
    return f.is_file() and f.read_text() == _spec_json(cfg.synthetic[name])


def _make_synthetic(name: str, spec: SynthSourceConfig, out: Path, cache: Path) -> None:
    from shards.pack import pack
    from shards.synth.config import SynthConfig
    from shards.synth.write import synthesize

    raw = cache / "raw" / name
    if raw.exists():  # a previous attempt died half-way: start clean (synthesis is deterministic)
        shutil.rmtree(raw)
    synthesize(SynthConfig(out=str(raw), **{k: v for k, v in asdict(spec).items()}))
    pack(_PACK_NAME[spec.layout], raw, out, overwrite=True)
    shutil.rmtree(raw)
    _spec_file(cache, name).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(_spec_file(cache, name), _spec_json(spec).encode())


def check_datasets(cfg: DataConfig) -> list[str]:
    """Refuse a run whose real datasets are not packed (one line: dataset, folder, pack command);
    return the synthetic ones that :func:`ensure_datasets` would make. Reads only: writes nothing."""
    sources, targets = cfg.resolved()
    names = list(dict.fromkeys(sources + targets))
    missing = [n for n in names if not _is_current(cfg, n)]
    unknown = [n for n in missing if n not in cfg.synthetic]
    if unknown:
        n = unknown[0]
        layout = n if n in LAYOUTS else "<layout>"  # a real dataset is packed under its layout's name
        also = f" (also missing: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
        raise DatasetNotPackedError(
            f"data.root={cfg.root}: no packed dataset {n!r} ({dataset_dir(cfg, n) / MANIFEST} missing){also}; "
            f"pack it with `python -m shards.pack --dataset {layout} --root <dataset folder> "
            f"--out {dataset_dir(cfg, n)}`, or point data.root at the folder that holds the packs")
    return missing


def ensure_datasets(cfg: DataConfig) -> list[Path]:
    """Collective: return the pack folders of sources + targets, creating synthetic ones if missing.

    The first rank of every node makes what is missing; every rank leaves through one barrier, so
    the packs are there on return."""
    sources, targets = cfg.resolved()
    names = list(dict.fromkeys(sources + targets))
    missing = check_datasets(cfg)
    if missing and _local_main():
        cache = Path(cfg.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        Path(cfg.root).mkdir(parents=True, exist_ok=True)
        with open(cache / ".prepare.lock", "w") as lock:  # one writer per filesystem, even across jobs
            fcntl.flock(lock, fcntl.LOCK_EX)
            for n in missing:
                if not _is_current(cfg, n):
                    _make_synthetic(n, cfg.synthetic[n], dataset_dir(cfg, n), cache)
    dist.barrier()
    return [dataset_dir(cfg, n) for n in names]


def _local_main() -> bool:
    # Each node may have its own cache: the first rank of every node prepares (the lock serializes
    # nodes that share a filesystem).
    return int(os.environ.get("LOCAL_RANK", "0")) == 0
