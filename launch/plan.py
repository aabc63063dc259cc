"""A launch checked end to end before anything is written or queued (:func:`plan`): the config
composed with the run directory pinned, the container mounts, and what the run needs from this
machine. A dry run prints a :class:`LaunchPlan`; :func:`launch.slurm.submit` submits one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.executor import container_setup
from launch.resources import Resources
from trainer.config import Config, ConfigError, compose


@dataclass(frozen=True)
class LaunchPlan:
    """What one submission will do, every part of it checked."""

    cluster: str
    res: Resources
    cfg: Config
    overrides: list[str]
    """What every rank composes in the job: the user's overrides with ``run_dir`` pinned, absolute."""
    folder: Path
    """submitit's folder (``%j`` = the job id)."""
    job_name: str
    container: dict[str, Any]
    """SlurmExecutor arguments of the container wrapping (:func:`launch.executor.container_setup`)."""


def check_run(cfg: Config) -> None:
    """What the run needs from this machine before anything is written or queued: a resumable run
    dir (same training config), a writable run dir, the files the config names (pretrained weights,
    a checkpoint to resume) and every real dataset packed."""
    from trainer.data.prepare import check_datasets
    from trainer.train import check_files, check_resume_config, check_run_dir

    check_resume_config(cfg)
    check_run_dir(cfg)
    check_datasets(cfg.data)
    check_files(cfg)


def compose_job(overrides: list[str]) -> tuple[Config, list[str]]:
    """Compose the user's overrides, then pin the run directory to an absolute path; the returned
    overrides are exactly what every rank composes in the job."""
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"config: override {o!r}: expected key=value")
    cfg = compose(overrides)
    run_dir = Path(cfg.run_dir).resolve()
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith("run_dir=")] + [f"run_dir={run_dir}"]
    cfg = compose(job_overrides)
    return cfg, job_overrides


def plan(cluster: str, res: Resources, overrides: list[str], folder: str | None = None) -> LaunchPlan:
    """Check a launch of ``overrides`` (``exp=NAME key=value …``) on ``cluster`` with ``res``; each
    user mistake is a one-line :class:`~shards.errors.UserError`. Nothing is written."""
    cfg, job_overrides = compose_job(overrides)
    container = container_setup(res, os.getcwd(), cfg.run_dir)
    check_run(cfg)
    run_dir = Path(cfg.run_dir)
    where = Path(folder).resolve() if folder else run_dir / "submitit" / "%j"
    return LaunchPlan(cluster=cluster, res=res, cfg=cfg, overrides=job_overrides, folder=where,
                      job_name=f"reid-{cfg.name}", container=container)
