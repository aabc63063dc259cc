"""A launch checked end to end before anything is written or queued (:func:`plan`): the config
composed with the run directory pinned, the container mounts, and what the run needs from this
machine. A dry run prints a :class:`LaunchPlan`; :func:`launch.slurm.submit` submits one."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.executor import container_setup
from launch.resources import LaunchError, Resources
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
    cfg.batch_plan(res.world_size)  # identities that do not split over the ranks: refused before queueing
    if cfg.train.strategy == "deepspeed":
        deepspeed_config_of(cfg, res)
    run_dir = Path(cfg.run_dir)
    where = Path(folder).resolve() if folder else run_dir / "submitit" / "%j"
    return LaunchPlan(cluster=cluster, res=res, cfg=cfg, overrides=job_overrides, folder=where,
                      job_name=f"reid-{cfg.name}", container=container)


def deepspeed_config_of(cfg: Config, res: Resources) -> dict[str, Any]:
    """The DeepSpeed config the job will derive (``trainer.engine.zero.deepspeed_config``) for this request."""
    from trainer.engine.strategy import resolve_precision
    from trainer.engine.zero import deepspeed_config

    if importlib.util.find_spec("deepspeed") is None:
        raise LaunchError("train.strategy=deepspeed: DeepSpeed is not installed in this Python; install the "
                          "project's requirements.txt (it pins deepspeed), or use train.strategy=ddp")
    t = cfg.train
    try:
        return deepspeed_config(zero_stage=t.zero_stage, clip_grad=t.clip_grad,
                                global_batch=cfg.batch_plan(res.world_size).images,
                                precision=resolve_precision(t.precision, "cuda" if res.gpus_per_node else "cpu"),
                                world_size=res.world_size)
    except ValueError as exc:
        raise LaunchError(f"train.strategy=deepspeed: {exc}; choose a number of ranks that divides it") from None
