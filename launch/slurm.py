"""``python launch/slurm.py [options] exp=NAME key=value …`` — submit a training run with submitit.

The config is composed and validated here, before anything is written or queued, and so are the
flags (against what the cluster kind can honour), the run directory, the packed datasets and, to
submit, the SLURM client: each mistake is a one-line error, exit 2 (``--dry-run`` checks the same,
except the SLURM client); synthetic datasets are prepared here, in one process, so that N
nodes don't race; the run directory gets the resolved ``config.yaml``; then a :class:`TrainJob`
(a submitit Checkpointable) is submitted to SLURM (``--cluster slurm``), to local processes
(``local``) or run in this process (``debug``).

Preemption and time limits (every rank, see :class:`PreemptionTrap`): SLURM sends SIGUSR2
``--signal-delay`` seconds before the limit; every rank sets the engine's StopFlag, the ranks agree
at the next step boundary, save ONE checkpoint together and return; only then does rank 0 hand
over to submitit's own USR2 handler, which calls :meth:`TrainJob.checkpoint` and requeues the job.
The restarted job resumes from the newest checkpoint (``train.resume=auto``). A rank that dies
makes the others fail in a collective; the first survivor requeues the job (same counter and cap).
Requeues are counted in ``run_dir/requeues.json`` and capped by ``--max-requeues``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script: the repo's packages must be importable
    sys.path.insert(0, str(_REPO))

import submitit  # noqa: E402
import torch  # noqa: E402

from shards.errors import CliParser, UserError, run_cli  # noqa: E402
from shards.records import atomic_write_bytes  # noqa: E402
from trainer import dist  # noqa: E402
from trainer.config import Config, ConfigError, compose  # noqa: E402
from trainer.engine.checkpoint import resolve_resume  # noqa: E402
from trainer.engine.loop import StopFlag  # noqa: E402

log = logging.getLogger("launch")

CLUSTERS = ("slurm", "local", "debug")
REQUEUES_FILE = "requeues.json"
LAUNCH_FILE = "launch.json"
LAUNCH_LOG = "launch.log"
LOCAL_REQUEUE_EXIT = 144
"""submitit's local controller restarts all tasks when one exits with this code (its requeue)."""


class LaunchError(UserError):
    """A bad launcher argument: the message is one line naming it."""


# -- resources ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    """What one job asks the scheduler for."""

    nodes: int = 1
    """Nodes (``--nodes``)."""
    gpus_per_node: int = 0
    """GPUs per node; 0 runs on CPU (gloo)."""
    tasks_per_node: int = 1
    """Processes (ranks) per node: one per GPU, or 1 on CPU."""
    cpus_per_task: int | None = None
    """CPU cores per rank (data workers + 1); None leaves it to the cluster's default."""
    mem: str | None = None
    """Memory per node in sbatch form (``64G``, ``4000M``); None: the cluster's default."""
    time_min: int = 24 * 60
    """Time limit in minutes; SLURM warns ``signal_delay_s`` before it."""
    signal_delay_s: int = 120
    """Seconds between the USR2 warning and the time limit: must cover one step plus a checkpoint."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    max_requeues: int = 3
    """Requeues (preemption, time limit or a failed rank) allowed for this submission."""
    apptainer: str | None = None
    """Run every rank in this Apptainer/Singularity image (``apptainer exec``)."""
    container_image: str | None = None
    """Run every rank in this image through pyxis/enroot (``srun --container-image``)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(text: str) -> int:
    """``--time``: minutes (``90``), ``HH:MM:SS``, ``MM:SS`` or ``D-HH[:MM[:SS]]`` → whole minutes (rounded up)."""
    m = _TIME.match(text.strip())
    if not m:
        raise LaunchError(f"--time={text!r}: expected minutes or [D-]HH:MM:SS")
    days, a, b, c = m.groups()
    if days is None and b is None:  # plain minutes
        minutes = int(a)
    elif days is None and c is None:  # MM:SS
        minutes = int(a) + (1 if int(b) else 0)
    else:
        h, mi, s = int(a), int(b or 0), int(c or 0)
        minutes = int(days or 0) * 1440 + h * 60 + mi + (1 if s else 0)
    if minutes <= 0:
        raise LaunchError(f"--time={text!r}: expected a positive duration")
    return minutes


_MEM = re.compile(r"^(\d+)([KMGT]?)B?$", re.IGNORECASE)


def parse_mem(text: str) -> str:
    """``--mem``: ``64G``, ``64GB``, ``4000M`` or ``4000`` (megabytes, SLURM's unit) → sbatch form."""
    m = _MEM.match(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise LaunchError(f"--mem={text!r}: expected a size such as 64G or 4000M")
    return f"{int(m.group(1))}{(m.group(2) or 'M').upper()}"


_NAME = re.compile(r"^[A-Za-z0-9_.,:+=@%/#-]+$")


def _name_arg(flag: str, value: str | None) -> str | None:
    # sbatch directives are not a shell, but a newline or space in one would still break the file
    if value is not None and not _NAME.match(value):
        raise LaunchError(f"{flag}={value!r}: expected letters, digits and _.,:+=@%/#- only")
    return value


def container_setup(res: Resources, workdir: str, run_dir: str) -> dict[str, Any]:
    """SlurmExecutor arguments that run each rank in a container: ``python`` (the command that
    starts python in the job; every word shell-quoted here) and ``srun_args``. The checkout and the
    run directory are mounted at the same paths, so the job runs this checkout's code with the
    image's dependencies."""
    for path in (workdir, run_dir):
        if (res.apptainer or res.container_image) and not _NAME.match(path):
            raise LaunchError(f"{path!r}: container mounts need a path without spaces or commas")
    if res.apptainer:
        words = ["apptainer", "exec", *(["--nv"] if res.gpus_per_node else []), "--bind",
                 f"{workdir},{run_dir}", "--pwd", workdir, res.apptainer, "python"]
        return {"python": " ".join(shlex.quote(w) for w in words)}
    if res.container_image:
        return {"python": "python", "srun_args": [
            f"--container-image={res.container_image}", f"--container-mounts={workdir}:{workdir},{run_dir}:{run_dir}",
            f"--container-workdir={workdir}"]}
    return {}


def slurm_parameters(res: Resources, job_name: str) -> dict[str, Any]:
    """Keyword arguments of submitit's SlurmExecutor (``update_parameters``) for ``res``.

    The one description of the sbatch request: it is what is submitted (prefixed ``slurm_``
    through AutoExecutor) and what ``--dry-run`` prints.
    """
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "time": res.time_min,
        "signal_delay_s": res.signal_delay_s,
        # --requeue: SLURM itself requeues on node failure / preemption; `scontrol requeue` needs it
        # where the cluster's default is JobRequeue=0
        "additional_parameters": {"requeue": True},
    }
    optional = {"gpus_per_node": res.gpus_per_node or None, "cpus_per_task": res.cpus_per_task, "mem": res.mem,
                "partition": res.partition, "account": res.account, "qos": res.qos, "constraint": res.constraint}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def render_sbatch(params: dict[str, Any], folder: str | os.PathLike[str]) -> str:
    """The ``#SBATCH`` lines submitit writes for ``params`` (same names, same quoting)."""
    flags: dict[str, Any] = {k: v for k, v in params.items() if k not in ("signal_delay_s", "additional_parameters")}
    flags["signal"] = f"{submitit.JobEnvironment.USR_SIG}@{params['signal_delay_s']}"
    flags["output"] = str(Path(folder) / "%j_0_log.out")
    flags["error"] = str(Path(folder) / "%j_0_log.err")
    flags["open-mode"] = "append"
    flags["wckey"] = "submitit"  # submitit's default workload key
    flags.update(params.get("additional_parameters") or {})
    lines = []
    for key in sorted(flags):
        value = flags[key]
        name = key.replace("_", "-")
        lines.append(f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={shlex.quote(str(value))}")
    return "\n".join(lines)


def executor_parameters(res: Resources, cluster: str, job_name: str) -> dict[str, Any]:
    """``update_parameters`` keywords of the executor :func:`make_executor` builds for ``cluster``.

    ``local``: what submitit's LocalExecutor honours (time limit, warning delay, ranks, GPUs);
    ``debug`` runs in this process and honours none (its flags are refused, see :data:`NOT_HONOURED`).
    """
    if cluster == "slurm":
        return {f"slurm_{k}": v for k, v in slurm_parameters(res, job_name).items()}
    if cluster == "debug":
        return {}
    params: dict[str, Any] = {"nodes": 1, "tasks_per_node": res.tasks_per_node, "timeout_min": res.time_min,
                              "signal_delay_s": res.signal_delay_s}
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    return params


def make_executor(cluster: str, folder: str | os.PathLike[str], res: Resources, job_name: str,
                  container: dict[str, Any]) -> submitit.Executor:
    """The submitit executor for ``cluster``, its parameters set. ``local`` is built directly:
    AutoExecutor does not pass ``signal_delay_s`` (nor the time-out cap) to the LocalExecutor."""
    params = executor_parameters(res, cluster, job_name)
    executor: submitit.Executor
    if cluster == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=res.max_requeues,
                                         **({"slurm_python": container["python"]} if "python" in container else {}))
        if "srun_args" in container:
            params["slurm_srun_args"] = container["srun_args"]
    elif cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=res.max_requeues)
    else:
        executor = submitit.DebugExecutor(folder=folder)
    executor.update_parameters(**params)
    return executor


def job_environment(res: Resources, cluster: str, environ: dict[str, str]) -> dict[str, str]:
    """Variables to set in the launcher's environment, which sbatch and the local executor pass to
    the job: the checkout first on PYTHONPATH (the job imports ``launch`` and ``trainer`` from it)
    and, on ``local``, ``--cpus-per-task`` as each rank's thread count (SLURM grants it as cores)."""
    rest = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(_REPO)]
    env = {"PYTHONPATH": os.pathsep.join([str(_REPO)] + rest)}
    if cluster == "local" and res.cpus_per_task is not None:
        env["OMP_NUM_THREADS"] = str(res.cpus_per_task)
    return env


# -- requeue bookkeeping (run_dir/requeues.json) ---------------------------------------------------

def read_requeues(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(run_dir) / REQUEUES_FILE
    if not path.is_file():
        return {"count": 0, "max": 0, "events": []}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: unreadable requeue counter ({exc})") from exc


def reset_requeues(run_dir: str | os.PathLike[str], max_requeues: int) -> None:
    """A new submission starts a new count (earlier submissions' events are kept). Called before
    submitting, so a fast-starting job never has its first requeue wiped."""
    state = read_requeues(run_dir)
    events = state.get("events", []) + [{"event": "submitted", "time": time.time()}]
    _write_requeues(run_dir, {"count": 0, "max": max_requeues, "events": events})


def record_requeue(run_dir: str | os.PathLike[str], reason: str, step: int | None, job_id: str) -> int:
    """Count one requeue (one writer: rank 0, or the rank that claimed a failure); returns the new count."""
    state = read_requeues(run_dir)
    state["count"] = int(state.get("count", 0)) + 1
    state.setdefault("events", []).append(
        {"event": "requeue", "reason": reason, "step": step, "job_id": job_id, "time": time.time()})
    _write_requeues(run_dir, state)
    return state["count"]


def _write_requeues(run_dir: str | os.PathLike[str], state: dict[str, Any]) -> None:
    atomic_write_bytes(Path(run_dir) / REQUEUES_FILE, (json.dumps(state, indent=1) + "\n").encode())


def _launch_log(run_dir: Path, message: str) -> None:
    log.info(message)
    with open(run_dir / LAUNCH_LOG, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")


# -- in the job ------------------------------------------------------------------------------------

class PreemptionTrap:
    """Every rank: SIGUSR2 (SLURM's warning before a time limit or preemption) and SIGTERM only set
    the engine's :class:`StopFlag`; the engine agrees on it at the next step boundary and all ranks
    save one checkpoint together.

    submitit's own USR2 handler (rank 0: ``checkpoint()``, dump, ``scontrol requeue``, exit) is
    kept aside rather than chained: run inside the signal it would exit rank 0 mid-step, before
    the collective save, and leave the other ranks hanging. :meth:`requeue` calls it afterwards.
    SIGTERM (``scancel``, SLURM's own preemption requeue) saves and stops without a requeue of ours.
    """

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def install(self, signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> PreemptionTrap:
        for sig in signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)  # no I/O in a handler
        self.flag.set()

    @property
    def preempted(self) -> bool:
        """USR2 arrived: a time limit or preemption warning (asks for a requeue)."""
        return signal.SIGUSR2 in self.received

    def submitit_handler(self) -> Any:
        """submitit's USR2 handler, if this process runs in a submitit job that installed one."""
        prev = self._previous.get(signal.SIGUSR2)
        return prev if callable(prev) else None


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
        flag = StopFlag()
        trap = PreemptionTrap(flag).install()
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
            if result.status == "stopped" and trap.preempted:
                self._requeue_after_preemption(run_dir, job_id, trap, result.global_step)
            rank = dist.get_rank()
            if rank == 0:
                _launch_log(run_dir, f"job {job_id}: {result.status} at step {result.global_step} "
                                     f"(epoch {result.epoch})")
            dist.shutdown()
            return {"status": result.status, "step": result.global_step, "epoch": result.epoch, "rank": rank,
                    "run_dir": str(run_dir)}
        finally:
            trap.uninstall()

    def _requeue_after_preemption(self, run_dir: Path, job_id: str, trap: PreemptionTrap, step: int) -> None:
        """All ranks saved; rank 0 hands over to submitit (checkpoint() + requeue + exit)."""
        if not dist.is_main():
            return  # only task 0 may requeue; the others return and are ended by the requeue
        count = read_requeues(run_dir).get("count", 0)
        handler = trap.submitit_handler()
        if count >= self.max_requeues:
            message = (f"job {job_id}: stopped at step {step}; requeue cap reached ({count}/{self.max_requeues}): "
                       f"not requeued. Submit the same command again to continue from the checkpoint")
            _launch_log(run_dir, message)
            raise submitit.core.utils.UncompletedJobError(message)
        if handler is None:
            _launch_log(run_dir, f"job {job_id}: stopped at step {step}; not in a submitit job, not requeued")
            return
        n = record_requeue(run_dir, "preempted", step, job_id)
        _launch_log(run_dir, f"job {job_id}: stopped at step {step} (checkpoint saved); requeue {n}/"
                             f"{self.max_requeues}")
        dist.shutdown()
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
            _launch_log(run_dir, f"job {job_id}: {reason}; requeue cap reached ({count}/{self.max_requeues}): "
                                 f"the job fails. Submit the same command again to continue from the checkpoint")
            return
        executor = os.environ.get("SUBMITIT_EXECUTOR")
        if executor not in ("slurm", "local"):
            return
        n = record_requeue(run_dir, "failure", None, job_id)
        _launch_log(run_dir, f"job {job_id}: {reason}; requeue {n}/{self.max_requeues}")
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
    _launch_log(run_dir, f"job {job_id} start (SLURM restart {restarts}, requeues {state.get('count', 0)}/"
                         f"{max_requeues}, world {dist.get_world_size()}): {where}")


# -- the launcher ----------------------------------------------------------------------------------

PROG = "launch/slurm.py"
DEFAULT_TIME = "24:00:00"
DEFAULT_SIGNAL_DELAY_S = 120
DEFAULT_MAX_REQUEUES = 3
START_ALLOWANCE_S = 120
"""Seconds of ``--time`` that are not training, besides ``--signal-delay``: process start, imports,
rendezvous, data loading and one checkpoint (60 s), and the up to 60 s by which SLURM may send the
warning signal early. A shorter ``--time`` would be killed before it could save anything."""
LOCAL_MAX_REQUEUES = 5
"""submitit's local controller starts a job at most 6 times: 5 requeues."""

NOT_HONOURED: dict[str, tuple[tuple[str, ...], str, str]] = {
    "local": (("--mem", "--partition", "--account", "--qos", "--constraint", "--apptainer", "--container-image"),
              "its processes run here, with no scheduler to grant memory, a partition, an account, a QoS or node "
              "features, and no container", "submit with --cluster slurm"),
    "debug": (("--cpus-per-task", "--mem", "--time", "--signal-delay", "--max-requeues", "--partition", "--account",
               "--qos", "--constraint", "--apptainer", "--container-image"),
              "the job runs in this process: nothing enforces a time limit, sends the warning, requeues, allots "
              "CPUs or memory, or starts a container", "use --cluster local or slurm"),
}
"""Per cluster kind: the flags it cannot honour (refused when given, never dropped), why, and the fix.
Refused rather than warned about: each is a request to a scheduler, and a run that went on without
it would not be the run the command describes."""


def build_parser() -> argparse.ArgumentParser:
    # flags a cluster kind may not honour default to None, so that "given" can be told from "default"
    p = CliParser(PROG, prog="python launch/slurm.py",
                description="Submit a training run (exp=NAME key=value ...) to SLURM with submitit.")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0: CPU, gloo)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: GPUs per node, 1 on CPU)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPU cores per rank (local: each rank's thread count, OMP_NUM_THREADS)")
    p.add_argument("--mem", default=None, help="memory per node: 64G, 4000M (slurm only)")
    p.add_argument("--time", default=None, help=f"time limit: minutes or [D-]HH:MM:SS (default {DEFAULT_TIME}); "
                                                f"at least --signal-delay + {START_ALLOWANCE_S} s")
    p.add_argument("--signal-delay", type=int, default=None,
                   help=f"seconds of warning (USR2) before the time limit (default {DEFAULT_SIGNAL_DELAY_S})")
    p.add_argument("--partition", default=None, help="slurm only")
    p.add_argument("--account", default=None, help="slurm only")
    p.add_argument("--qos", default=None, help="slurm only")
    p.add_argument("--constraint", default=None, help="slurm only")
    p.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                   help="slurm (sbatch), local (local processes), debug (in this process)")
    p.add_argument("--max-requeues", type=int, default=None,
                   help=f"requeues allowed (default {DEFAULT_MAX_REQUEUES}; local: at most {LOCAL_MAX_REQUEUES})")
    p.add_argument("--apptainer", metavar="IMAGE", default=None,
                   help="run the ranks in this Apptainer image (.sif): apptainer exec [--nv] IMAGE python")
    p.add_argument("--container-image", metavar="IMAGE", default=None,
                   help="run the ranks in this image through pyxis/enroot (srun --container-image)")
    p.add_argument("--folder", default=None, help="submitit folder (default RUN_DIR/submitit/%%j)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, print what would be submitted and exit (needs no SLURM here)")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit non-zero if it fails")
    p.add_argument("overrides", nargs="*", help="config overrides: exp=NAME key=value ...")
    return p


def check_cluster_flags(args: argparse.Namespace) -> None:
    """Refuse, in one line, every given flag that ``args.cluster`` cannot honour."""
    if args.cluster not in NOT_HONOURED:
        return
    flags, why, fix = NOT_HONOURED[args.cluster]
    given = [f"{f}={getattr(args, f[2:].replace('-', '_'))}" for f in flags
             if getattr(args, f[2:].replace("-", "_")) is not None]
    if given:
        them = "it" if len(given) == 1 else "them"
        raise LaunchError(f"{' '.join(given)}: --cluster {args.cluster} cannot honour {them} ({why}); "
                          f"drop {them}, or {fix}")


def resources_from_args(args: argparse.Namespace) -> Resources:
    check_cluster_flags(args)
    time_text = DEFAULT_TIME if args.time is None else args.time
    delay = DEFAULT_SIGNAL_DELAY_S if args.signal_delay is None else args.signal_delay
    max_requeues = DEFAULT_MAX_REQUEUES if args.max_requeues is None else args.max_requeues
    for flag, value, low in (("--nodes", args.nodes, 1), ("--gpus-per-node", args.gpus_per_node, 0),
                             ("--max-requeues", max_requeues, 0), ("--signal-delay", delay, 1)):
        if value < low:
            raise LaunchError(f"{flag}={value}: expected >= {low}")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(1, args.gpus_per_node)
    if tasks < 1:
        raise LaunchError(f"--tasks-per-node={tasks}: expected >= 1")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task={args.cpus_per_task}: expected >= 1")
    res = Resources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=tasks, cpus_per_task=args.cpus_per_task,
        mem=parse_mem(args.mem) if args.mem else None, time_min=parse_time(time_text),
        signal_delay_s=delay, partition=_name_arg("--partition", args.partition),
        account=_name_arg("--account", args.account), qos=_name_arg("--qos", args.qos),
        constraint=_name_arg("--constraint", args.constraint), max_requeues=max_requeues,
        apptainer=_name_arg("--apptainer", args.apptainer),
        container_image=_name_arg("--container-image", args.container_image))
    if res.apptainer and res.container_image:
        raise LaunchError("--apptainer and --container-image: choose one")
    if args.cluster in ("local", "debug") and res.nodes != 1:
        raise LaunchError(f"--nodes={res.nodes}: --cluster {args.cluster} runs on this machine only (use 1)")
    if args.cluster == "debug" and res.tasks_per_node != 1:
        raise LaunchError(f"--tasks-per-node={res.tasks_per_node}: --cluster debug runs one process (use 1)")
    if args.cluster == "local" and res.max_requeues > LOCAL_MAX_REQUEUES:
        raise LaunchError(f"--max-requeues={res.max_requeues}: --cluster local restarts a job at most "
                          f"{LOCAL_MAX_REQUEUES} times (submitit's local controller); use {LOCAL_MAX_REQUEUES} or less")
    check_time(res, time_text)
    check_gpus_here(res, args.cluster)
    return res


def check_time(res: Resources, time_text: str) -> None:
    """``--time`` must hold the start-up allowance plus the warning delay: a shorter job is warned
    (or killed) before it could save a checkpoint."""
    need_s = res.signal_delay_s + START_ALLOWANCE_S
    if res.time_min * 60 < need_s:
        raise LaunchError(
            f"--time={time_text} ({res.time_min * 60} s) is too short: it must hold "
            f"--signal-delay={res.signal_delay_s} s plus {START_ALLOWANCE_S} s (start-up, one checkpoint, SLURM's "
            f"early warning); use --time={-(-need_s // 60)} or more, or a smaller --signal-delay")


def check_gpus_here(res: Resources, cluster: str) -> None:
    """``local`` and ``debug`` run the job on this machine: it must have the GPUs asked for (with
    ``slurm`` they are on the compute nodes, which this machine cannot see)."""
    if cluster == "slurm" or res.gpus_per_node == 0:
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if res.gpus_per_node > have:
        here = "no CUDA GPU" if have == 0 else f"{have} CUDA GPU{'s' if have > 1 else ''}"
        raise LaunchError(f"--gpus-per-node={res.gpus_per_node}: --cluster {cluster} runs the job on this machine, "
                          f"which has {here}; use --gpus-per-node 0 to run on CPU with gloo"
                          + (f", or at most {have}" if have else ""))


def check_slurm_installed() -> None:
    """Submitting to SLURM needs its client here (submitit calls sbatch, the script calls srun)."""
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise LaunchError(f"--cluster slurm: {' and '.join(missing)} not found on PATH (SLURM is not installed on "
                          f"this machine); run here with --cluster local, or see the sbatch script with --dry-run")


def check_run(cfg: Config) -> None:
    """What the run needs from this machine before anything is written or queued: a resumable run
    dir (same training config), a writable run dir, the files the config names (pretrained weights,
    a checkpoint to resume) and every real dataset packed."""
    from trainer.config import check_files
    from trainer.data.prepare import check_datasets
    from trainer.train import check_resume_config, check_run_dir

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


def main(argv: list[str] | None = None) -> int:
    """The launcher; a user's mistake is one line on stderr and exit 2 (:func:`shards.errors.run_cli`)."""
    return run_cli(PROG, lambda: _launch(argv))


def _launch(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    # every check, for a dry run too, before anything is written or queued
    res = resources_from_args(args)
    cfg, job_overrides = compose_job(args.overrides)
    container = container_setup(res, os.getcwd(), cfg.run_dir)
    check_run(cfg)
    run_dir = Path(cfg.run_dir)
    folder = Path(args.folder).resolve() if args.folder else run_dir / "submitit" / "%j"
    job_name = f"reid-{cfg.name}"
    if args.dry_run:
        _print_dry_run(args.cluster, res, cfg, job_overrides, folder, job_name, container)
        return 0
    if args.cluster == "slurm":
        check_slurm_installed()

    from trainer.data.prepare import ensure_datasets
    from trainer.train import write_run_config

    ensure_datasets(cfg.data)  # once, here: N nodes must not race to synthesize the same shards
    write_run_config(cfg)
    os.environ.update(job_environment(res, args.cluster, dict(os.environ)))
    executor = make_executor(args.cluster, folder, res, job_name, container)
    reset_requeues(run_dir, res.max_requeues)
    job = executor.submit(TrainJob(job_overrides, str(run_dir), os.getcwd(), res.max_requeues))
    atomic_write_bytes(run_dir / LAUNCH_FILE, (json.dumps({
        "job_id": str(job.job_id), "cluster": args.cluster, "resources": asdict(res), "overrides": job_overrides,
        "argv": sys.argv if argv is None else argv, "folder": str(job.paths.folder), "time": time.time(),
    }, indent=1) + "\n").encode())
    _launch_log(run_dir, f"submitted job {job.job_id} ({args.cluster}, {res.nodes}x{res.tasks_per_node} ranks)")
    print(f"job {job.job_id} submitted ({args.cluster}, world size {res.world_size})")
    print(f"run dir: {run_dir}")
    print(f"logs:    {job.paths.stdout}  (task 0; {job.paths.folder}/{job.job_id}_<task>_log.out|err)")
    if args.wait or args.cluster == "debug":
        try:
            results = job.results()
        except Exception as exc:  # the job's own traceback is in its log
            print(f"{PROG}: error: job {job.job_id} failed: {str(exc).strip().splitlines()[-1][:300]} "
                  f"(log: {job.paths.stderr})", file=sys.stderr)
            return 1
        print(f"job {job.job_id}: {results[0]['status']} at step {results[0]['step']}")
    return 0


def _print_dry_run(cluster: str, res: Resources, cfg: Config, overrides: list[str], folder: Path, job_name: str,
                   container: dict[str, Any]) -> None:
    print(f"# dry run: nothing submitted (cluster={cluster}, world size {res.world_size}, "
          f"max requeues {res.max_requeues})")
    print(f"# run dir: {cfg.run_dir}")
    print(f"# overrides: {' '.join(shlex.quote(o) for o in overrides)}")
    env = job_environment(res, cluster, dict(os.environ))
    print(f"# environment: {' '.join(f'{k}={shlex.quote(v)}' for k, v in sorted(env.items()))}")
    if cluster == "slurm":
        print(render_sbatch(slurm_parameters(res, job_name), folder))
        srun = " ".join(shlex.quote(a) for a in ["srun", "--unbuffered", *container.get("srun_args", [])])
        python = container.get("python", shlex.quote(sys.executable))
        print(f"{srun} {python} -u -m submitit.core._submit {shlex.quote(str(folder))}")
    elif cluster == "debug":
        print("# one rank in this process (submitit's DebugExecutor)")
    else:
        print(json.dumps(executor_parameters(res, cluster, job_name), sort_keys=True))


if __name__ == "__main__":
    from launch.slurm import main as _main  # the module copy: pickles name launch.slurm.TrainJob

    sys.exit(_main())
