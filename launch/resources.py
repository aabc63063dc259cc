"""What one job asks the scheduler for (:class:`Resources`), and every check of it against the
cluster kind that runs it: each mistake is a :class:`LaunchError`, one line naming the flag and the fix.

The names are the command line's (``--time``, ``--cluster local``): :func:`resources` is what
``python launch/slurm.py`` builds its request with, and a Python caller passes the same values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from shards.errors import UserError

CLUSTERS = ("slurm", "local", "debug")
"""Cluster kinds: SLURM (sbatch), local processes (submitit's LocalExecutor), this process (debug)."""
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
    "local": (("--mem", "--partition", "--account", "--qos", "--constraint", "--container-image"),
              "its processes run here, with no scheduler to grant memory, a partition, an account, a QoS or node "
              "features, and no srun to start a pyxis container", "submit with --cluster slurm"),
    "debug": (("--cpus-per-task", "--mem", "--time", "--signal-delay", "--max-requeues", "--partition", "--account",
               "--qos", "--constraint", "--apptainer", "--container-image"),
              "the job runs in this process: nothing enforces a time limit, sends the warning, requeues, allots "
              "CPUs or memory, or starts a container", "use --cluster local or slurm"),
}
"""Per cluster kind: the flags it cannot honour (refused when given, never dropped), why, and the fix.
Refused rather than warned about: each is a request to a scheduler, and a run that went on without
it would not be the run the command describes."""


class LaunchError(UserError):
    """A bad launcher argument: the message is one line naming it."""


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


NAME = re.compile(r"^[A-Za-z0-9_.,:+=@%/#-]+$")
"""What a value written into an sbatch directive or a container mount may hold."""


def _name_arg(flag: str, value: str | None) -> str | None:
    # sbatch directives are not a shell, but a newline or space in one would still break the file
    if value is not None and not NAME.match(value):
        raise LaunchError(f"{flag}={value!r}: expected letters, digits and _.,:+=@%/#- only")
    return value


def check_cluster_flags(cluster: str, given: dict[str, object]) -> None:
    """Refuse, in one line, every given flag (``given``: flag name with ``_`` → value, None = not
    given) that ``cluster`` cannot honour."""
    if cluster not in NOT_HONOURED:
        return
    flags, why, fix = NOT_HONOURED[cluster]
    named = [f"{f}={given.get(f[2:].replace('-', '_'))}" for f in flags
             if given.get(f[2:].replace("-", "_")) is not None]
    if named:
        them = "it" if len(named) == 1 else "them"
        raise LaunchError(f"{' '.join(named)}: --cluster {cluster} cannot honour {them} ({why}); "
                          f"drop {them}, or {fix}")


def resources(cluster: str, *, nodes: int = 1, gpus_per_node: int = 0, tasks_per_node: int | None = None,
              cpus_per_task: int | None = None, mem: str | None = None, time: str | None = None,
              signal_delay: int | None = None, partition: str | None = None, account: str | None = None,
              qos: str | None = None, constraint: str | None = None, max_requeues: int | None = None,
              apptainer: str | None = None, container_image: str | None = None) -> Resources:
    """The request for ``cluster``, every value checked; each keyword is the flag of the same name
    (``time`` is ``--time``'s text) and None means "not given": the default, never a refusal."""
    check_cluster_flags(cluster, {
        "cpus_per_task": cpus_per_task, "mem": mem, "time": time, "signal_delay": signal_delay,
        "max_requeues": max_requeues, "partition": partition, "account": account, "qos": qos,
        "constraint": constraint, "apptainer": apptainer, "container_image": container_image})
    time_text = DEFAULT_TIME if time is None else time
    delay = DEFAULT_SIGNAL_DELAY_S if signal_delay is None else signal_delay
    max_requeues = DEFAULT_MAX_REQUEUES if max_requeues is None else max_requeues
    for flag, value, low in (("--nodes", nodes, 1), ("--gpus-per-node", gpus_per_node, 0),
                             ("--max-requeues", max_requeues, 0), ("--signal-delay", delay, 1)):
        if value < low:
            raise LaunchError(f"{flag}={value}: expected >= {low}")
    tasks = tasks_per_node if tasks_per_node is not None else max(1, gpus_per_node)
    if tasks < 1:
        raise LaunchError(f"--tasks-per-node={tasks}: expected >= 1")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task={cpus_per_task}: expected >= 1")
    res = Resources(
        nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks, cpus_per_task=cpus_per_task,
        mem=parse_mem(mem) if mem else None, time_min=parse_time(time_text),
        signal_delay_s=delay, partition=_name_arg("--partition", partition),
        account=_name_arg("--account", account), qos=_name_arg("--qos", qos),
        constraint=_name_arg("--constraint", constraint), max_requeues=max_requeues,
        apptainer=_name_arg("--apptainer", apptainer),
        container_image=_name_arg("--container-image", container_image))
    if res.apptainer and res.container_image:
        raise LaunchError("--apptainer and --container-image: choose one")
    if cluster in ("local", "debug") and res.nodes != 1:
        raise LaunchError(f"--nodes={res.nodes}: --cluster {cluster} runs on this machine only (use 1)")
    if cluster == "debug" and res.tasks_per_node != 1:
        raise LaunchError(f"--tasks-per-node={res.tasks_per_node}: --cluster debug runs one process (use 1)")
    if cluster == "local" and res.max_requeues > LOCAL_MAX_REQUEUES:
        raise LaunchError(f"--max-requeues={res.max_requeues}: --cluster local restarts a job at most "
                          f"{LOCAL_MAX_REQUEUES} times (submitit's local controller); use {LOCAL_MAX_REQUEUES} or less")
    check_time(res, time_text)
    check_gpus_here(res, cluster)
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
