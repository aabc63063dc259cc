"""``python launch/slurm.py [options] exp=NAME key=value …`` — submit a training run with submitit.

The config is composed and validated here, before anything is written or queued, and so are the
flags (against what the cluster kind can honour), the run directory, the packed datasets and, to
submit, the SLURM client: each mistake is a one-line error, exit 2 (``--dry-run`` checks the same,
except the SLURM client); synthetic datasets are prepared here, in one process, so that N
nodes don't race; the run directory gets the resolved ``config.yaml``; then a :class:`TrainJob`
(a submitit Checkpointable) is submitted to SLURM (``--cluster slurm``), to local processes
(``local``) or run in this process (``debug``). From Python: :func:`submit_and_wait` (or
:func:`launch.plan.plan`, :func:`submit`, :func:`wait`) does the same without a command line.

Preemption and time limits (every rank, :class:`trainer.engine.stop.StopFlag`): SLURM sends SIGUSR2
``--signal-delay`` seconds before the limit; every rank sets its stop flag, the ranks agree at the
next step boundary, save ONE checkpoint together and return; only then does rank 0 hand over to
submitit's own USR2 handler, which calls :meth:`TrainJob.checkpoint` and requeues the job. The
restarted job resumes from the newest checkpoint (``train.resume=auto``). A rank that dies makes the
others fail in a collective; the first survivor requeues the job (same counter and cap). Requeues are
counted in ``run_dir/requeues.json`` and capped by ``--max-requeues`` (:mod:`launch.requeue`).

The launcher's parts: :mod:`launch.resources` (the request and its checks), :mod:`launch.executor`
(sbatch parameters, executors, containers), :mod:`launch.plan` (a launch checked end to end),
:mod:`launch.requeue` (the ledger), :mod:`launch.cli` (flags and the dry-run printout); here, the job
every rank runs and the submission. :class:`TrainJob` stays in this module: submitit pickles it by
name, and SLURM's own requeue unpickles the original submission.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

try:  # the one import mechanism is the project's editable install: say so in one line where it is missing
    import launch  # noqa: F401
except ModuleNotFoundError:
    print(f"{Path(sys.argv[0]).name}: error: the project is not installed in this Python ({sys.executable}); run "
          f"`make venv` and use .venv/bin/python, or `pip install -e .` in the checkout", file=sys.stderr)
    raise SystemExit(2) from None

import submitit
import torch

from launch.cli import PROG, build_parser, print_dry_run, resources_from_args
from launch.executor import (
    check_slurm_installed,
    job_environment,
    make_executor,
    slurm_parameters,
)
from launch.plan import LaunchPlan, plan
from launch.progress import Follower, offset
from launch.requeue import (
    LAUNCH_LOG,
    REQUEUES_FILE,
    launch_log,
    read_requeues,
    record_requeue,
    reset_requeues,
)
from launch.resources import START_ALLOWANCE_S, LaunchError, Resources, parse_mem, parse_time
from shards.atomic import atomic_write_bytes
from shards.errors import run_cli
from trainer import dist
from trainer.config import Config, compose
from trainer.engine.checkpoint import resolve_resume
from trainer.engine.stop import StopFlag

__all__ = [
    # the submission and the job
    "JobFailed", "TrainJob", "main", "submit", "submit_and_wait", "wait", "progress_follower", "is_comm_failure",
    # the launcher's parts, reachable from its entry point
    "LAUNCH_LOG", "REQUEUES_FILE", "START_ALLOWANCE_S", "LaunchError", "Resources", "build_parser", "make_executor",
    "parse_mem", "parse_time", "read_requeues", "record_requeue", "reset_requeues", "resources_from_args",
    "slurm_parameters", "job_environment",
]

LAUNCH_FILE = "launch.json"
LOCAL_REQUEUE_EXIT = 144
"""submitit's local controller restarts all tasks when one exits with this code (its requeue)."""


# -- in the job ------------------------------------------------------------------------------------

_COMM_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL",
                 "ProcessGroup", "Socket Timeout", "Connection refused")


def is_comm_failure(exc: BaseException) -> bool:
    """A collective failed because a peer is gone (a killed rank, a lost node), not a bug of ours."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _COMM_FAILURE)


class TrainJob(submitit.helpers.Checkpointable):
    """The submitted callable: one rank of a training run. Stateless: everything a restart needs is
    in the run directory (config overrides here, checkpoints there), so the original pickle and
    the one :meth:`checkpoint` dumps behave the same (SLURM's own requeue reuses the original)."""

    def __init__(self, overrides: list[str], run_dir: str, workdir: str, max_requeues: int) -> None:
        self.overrides = list(overrides)
        self.run_dir = run_dir
        self.workdir = workdir
        self.max_requeues = max_requeues

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on task 0 only: the state is on disk already, so resubmit as is."""
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.overrides, self.run_dir, self.workdir, self.max_requeues))

    def __call__(self) -> dict[str, Any]:
        from trainer.train import run

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            force=True)
        logging.getLogger("submitit").propagate = False  # it has its own handler: no duplicate lines
        os.chdir(self.workdir)  # relative data paths mean what they meant to the launcher
        flag = StopFlag().install()  # submitit's USR2 handler is kept aside: see _requeue_after_preemption
        run_dir = Path(self.run_dir)
        job_id = _job_id()
        try:
            dist.init()
            cfg = compose(self.overrides)
            state = read_requeues(run_dir)
            if state.get("count", 0) > 0:
                cfg.train.resume = "auto"  # a restart always continues from the newest checkpoint
            if dist.is_main():
                _log_start(run_dir, cfg, job_id, state, self.max_requeues)
            try:
                result = run(cfg, flag)
            except Exception as exc:
                if dist.get_world_size() > 1 and is_comm_failure(exc):
                    self._requeue_after_failure(run_dir, job_id, state, exc)
                raise
            if result.status == "stopped" and flag.preempted:
                self._requeue_after_preemption(run_dir, job_id, flag, result.global_step)
            rank = dist.get_rank()
            if rank == 0:
                launch_log(run_dir, f"job {job_id}: {result.status} at step {result.global_step} "
                                    f"(epoch {result.epoch})")
            dist.shutdown(sync=True)
            return {"status": result.status, "step": result.global_step, "epoch": result.epoch, "rank": rank,
                    "run_dir": str(run_dir)}
        finally:
            flag.uninstall()

    def _requeue_after_preemption(self, run_dir: Path, job_id: str, flag: StopFlag, step: int) -> None:
        """All ranks saved; rank 0 hands over to submitit (checkpoint() + requeue + exit)."""
        if not dist.is_main():
            return  # only task 0 may requeue; the others return and are ended by the requeue
        count = read_requeues(run_dir).get("count", 0)
        handler = flag.submitit_handler()
        if count >= self.max_requeues:
            message = (f"job {job_id}: stopped at step {step}; requeue cap reached ({count}/{self.max_requeues}): "
                       f"not requeued. Submit the same command again to continue from the checkpoint")
            launch_log(run_dir, message)
            dist.shutdown(sync=True)  # the other ranks wait in run()'s clean shutdown
            raise submitit.core.utils.UncompletedJobError(message)
        if handler is None:
            launch_log(run_dir, f"job {job_id}: stopped at step {step}; not in a submitit job, not requeued")
            return
        n = record_requeue(run_dir, "preempted", step, job_id)
        launch_log(run_dir, f"job {job_id}: stopped at step {step} (checkpoint saved); requeue {n}/"
                            f"{self.max_requeues}")
        dist.shutdown(sync=True)  # the other ranks meet it in run()'s clean shutdown
        handler(signal.SIGUSR2, None)  # submitit: checkpoint() → dump → requeue → sys.exit

    def _requeue_after_failure(self, run_dir: Path, job_id: str, state: dict[str, Any], exc: BaseException) -> None:
        """A peer died: the first surviving rank to get here requeues the job (once per restart)."""
        claim = run_dir / f".requeue-claim-{job_id}-{state.get('count', 0)}"
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another rank handles it; this one fails as it would anyway
        os.close(fd)
        count = read_requeues(run_dir).get("count", 0)
        reason = f"rank {dist.get_rank()}: collective failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        if count >= self.max_requeues:
            launch_log(run_dir, f"job {job_id}: {reason}; requeue cap reached ({count}/{self.max_requeues}): "
                                f"the job fails. Submit the same command again to continue from the checkpoint")
            return
        executor = os.environ.get("SUBMITIT_EXECUTOR")
        if executor not in ("slurm", "local"):
            return
        n = record_requeue(run_dir, "failure", None, job_id)
        launch_log(run_dir, f"job {job_id}: {reason}; requeue {n}/{self.max_requeues}")
        if executor == "slurm":
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
            sys.exit(-1)  # as submitit after its requeue: no result pickle, the restarted job writes it
        sys.exit(LOCAL_REQUEUE_EXIT)


def _job_id() -> str:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or \
        os.environ.get("SUBMITIT_DEBUG_JOB_ID") or str(os.getpid())


def _log_start(run_dir: Path, cfg: Config, job_id: str, state: dict[str, Any], max_requeues: int) -> None:
    ckpt = resolve_resume(cfg.train.resume, run_dir / "checkpoints")
    where = "from scratch" if ckpt is None else f"resuming from step {int(ckpt.name.split('_')[-1])} ({ckpt})"
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    launch_log(run_dir, f"job {job_id} start (SLURM restart {restarts}, requeues {state.get('count', 0)}/"
                        f"{max_requeues}, world {dist.get_world_size()}): {where}")


# -- the submission ----------------------------------------------------------------------------------

class JobFailed(RuntimeError):
    """A submitted job failed (not a user's mistake: its own traceback is in its log, which this names)."""


def submit(launch: LaunchPlan, argv: list[str] | None = None) -> submitit.Job:
    """Submit a checked launch: the datasets prepared here, once (N nodes must not race to
    synthesize the same shards), the run config written, the requeue count reset, the job
    submitted; ``launch.json`` and ``launch.log`` record it. ``argv`` (default ``sys.argv``) is the
    command recorded as the one that submitted."""
    if launch.cluster == "slurm":
        check_slurm_installed()

    from trainer.data.prepare import ensure_datasets
    from trainer.train import write_run_config

    res, run_dir = launch.res, Path(launch.cfg.run_dir)
    ensure_datasets(launch.cfg.data)
    write_run_config(launch.cfg)
    os.environ.update(job_environment(res, launch.cluster))
    executor = make_executor(launch.cluster, launch.folder, res, launch.job_name, launch.container)
    reset_requeues(run_dir, res.max_requeues)
    job = executor.submit(TrainJob(launch.overrides, str(run_dir), os.getcwd(), res.max_requeues))
    atomic_write_bytes(run_dir / LAUNCH_FILE, (json.dumps({
        "job_id": str(job.job_id), "cluster": launch.cluster, "resources": asdict(res), "overrides": launch.overrides,
        "argv": sys.argv if argv is None else argv, "folder": str(job.paths.folder), "time": time.time(),
    }, indent=1) + "\n").encode())
    launch_log(run_dir, f"submitted job {job.job_id} ({launch.cluster}, {res.nodes}x{res.tasks_per_node} ranks)")
    return job


def progress_follower(launch: LaunchPlan, every_s: float = 30.0) -> Follower | None:
    """What shows a launch's progress while :func:`wait` waits (None for ``debug``: the job runs in this
    process and prints its own lines). Made before :func:`submit`: it reads only what the job appends."""
    if launch.cluster == "debug" or every_s <= 0:
        return None
    cfg = launch.cfg
    return Follower(Path(cfg.run_dir) / "metrics.jsonl", every_s=every_s, epochs=cfg.train.epochs,
                    eval_period=cfg.eval.period, start=offset(cfg.run_dir))


def wait(job: submitit.Job, follower: Follower | None = None) -> dict[str, Any]:
    """Wait for ``job``, showing its progress through ``follower`` (:func:`progress_follower`); rank 0's
    result (``status``, ``step``, ``epoch``, ``rank``, ``run_dir``), or :class:`JobFailed` naming the job's log."""
    if follower is not None:
        follower.follow(job.done)
    try:
        results = job.results()
    except Exception as exc:  # the job's own traceback is in its log
        raise JobFailed(f"job {job.job_id} failed: {str(exc).strip().splitlines()[-1][:300]} "
                        f"(log: {job.paths.stderr})") from exc
    return results[0]


def submit_and_wait(cluster: str, res: Resources, overrides: list[str],
                    progress_every_s: float = 30.0) -> dict[str, Any]:
    """Check, submit and wait for a training run of ``overrides`` (``exp=NAME key=value …``) on
    ``cluster`` with ``res`` (:func:`launch.resources.resources`): the launcher's path, from Python,
    showing the run's progress on stdout as ``--wait`` does (``progress_every_s``: seconds between
    two lines off a terminal; 0 shows none). A user's mistake raises a one-line
    :class:`~shards.errors.UserError` before anything is written; a failed job raises :class:`JobFailed`."""
    launch = plan(cluster, res, overrides)
    follower = progress_follower(launch, progress_every_s)
    return wait(submit(launch), follower)


# -- the command line ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """The launcher; a user's mistake is one line on stderr and exit 2 (:func:`shards.errors.run_cli`)."""
    return run_cli(PROG, lambda: _launch(argv))


def _launch(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    # every check, for a dry run too, before anything is written or queued
    res = resources_from_args(args)
    launch = plan(args.cluster, res, args.overrides, args.folder)
    if args.dry_run:
        print_dry_run(launch)
        return 0
    follower = progress_follower(launch, args.progress_every) if args.wait else None
    job = submit(launch, sys.argv if argv is None else argv)
    print(f"job {job.job_id} submitted ({args.cluster}, world size {res.world_size})")
    print(f"run dir: {launch.cfg.run_dir}")
    print(f"logs:    {job.paths.stdout}  (task 0; {job.paths.folder}/{job.job_id}_<task>_log.out|err)")
    if args.wait or args.cluster == "debug":
        try:
            result = wait(job, follower)
        except JobFailed as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        print(f"job {job.job_id}: {result['status']} at step {result['step']}")
    return 0


if __name__ == "__main__":
    from launch.slurm import main as _main  # the module copy: pickles name launch.slurm.TrainJob

    sys.exit(_main())
