"""The checks of a run directory that need no model code: the run exists, its ``config.yaml`` reads as a
config, the target is one of its own and packed. ``python -m trainer.visualize`` runs them before it
imports torch, so these mistakes are reported at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from shards.errors import UserError
from trainer.config import Config, ConfigError, validate


def read_config(run_dir: Path) -> Config:
    """The run's resolved config (``RUN_DIR/config.yaml``), checked like a composed one."""
    from omegaconf import OmegaConf

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory; pass the run_dir of a trainer.train run")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path}: missing; RUN_DIR must be a trainer.train run directory (it writes config.yaml "
                        "before training)")
    try:
        node = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
        cfg = OmegaConf.to_object(node)
        assert isinstance(cfg, Config)
        validate(cfg)
    except ConfigError as exc:
        raise UserError(f"{path}: {exc}") from None
    except Exception as exc:  # OmegaConf's parse and schema errors span lines: keep the first
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable run config ({first}); pass the run_dir of a trainer.train "
                        "run") from None
    return cfg


def target_name(cfg: Config, name: str | None) -> str:
    """``name`` (default: the run's first target), checked against the run's targets and packs."""
    _, targets = cfg.data.resolved()
    name = name or (targets[0] if targets else None)
    if name is None or name not in targets:
        raise UserError(f"--target {name}: not a target of this run; expected one of {targets} (data.targets)")
    manifest = Path(cfg.data.root) / name / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"data.root={cfg.data.root}: no packed dataset {name!r} ({manifest.absolute()} missing); "
                        "run from the folder the run was trained in, or pass --data-root FOLDER of the packs")
    return name


def check_run(run_dir: str | Path, target: str | None, data_root: str | None) -> tuple[Config, str]:
    """The run's config (``data_root`` replacing its ``data.root``) and the target's name."""
    cfg = read_config(Path(run_dir))
    if data_root:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data_root)))
    return cfg, target_name(cfg, target)
