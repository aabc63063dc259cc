"""Process-group setup and the collectives the rest of the system uses (the ground floor).

Every import in ``trainer`` may use this module; it imports nothing from ``trainer`` itself.
The same calls work with one process (no process group: collectives are identities), with gloo
on CPU and with NCCL on GPU, so every distributed path has a CPU twin that tests can run.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank, 0..world_size-1."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node; selects the GPU."""
    backend: str
    """``nccl``, ``gloo`` or ``none`` (single process without a process group)."""
    device: torch.device
    """The device this rank computes on (``cuda:local_rank`` or ``cpu``)."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from exc


def init(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialize the default process group from the environment, or run as one process.

    The torchrun/TorchElastic variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``) select a distributed run; without them this is a single process and no
    process group is created. ``backend`` defaults to nccl when CUDA is available, gloo otherwise.
    The device is set before the group is initialized, as NCCL requires. Inside a submitit job
    (SLURM or submitit's local executor) the same variables are first derived from the job
    (:func:`export_job_env`).
    """
    export_job_env()
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size <= 1:
        return DistInfo(0, 1, 0, "none", device)
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return info()


def info() -> DistInfo:
    """The current process's place, whether or not a group was initialized."""
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not is_initialized():
        return DistInfo(0, 1, 0, "none", device)
    return DistInfo(
        dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend(), device
    )


def shutdown(sync: bool = False) -> None:
    """Destroy the process group (always call at the end: avoids exit-time aborts).

    ``sync=True`` on a clean exit first waits for every rank: a rank that tears its gloo pairs down while a
    peer still finishes its last collective can abort that peer ("terminate called without an active
    exception"). Never sync on an error path, where a peer may be gone and the barrier would wait for it.
    """
    if is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def comm_device() -> torch.device:
    """Device collectives run on: CUDA for NCCL, CPU for gloo or no group."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``max``, ``min``, ``prod``); returns the tensor."""
    if not is_initialized():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "prod": dist.ReduceOp.PRODUCT}
    if op not in ops:
        raise ValueError(f"all_reduce op={op!r}: expected one of {sorted(ops)}")
    dist.all_reduce(tensor, op=ops[op])
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src``; returns the tensor."""
    if is_initialized():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0 (rank order). No gradient."""
    if not is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _GatherAutograd(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the sum over ranks of the gradient
    of its own slice. The incoming gradient is made contiguous first: a strided gradient (e.g.
    after a transpose) would otherwise be filled in memory order by the collective (scrambled)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = tensor.shape[0]
        return all_gather(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        rank, rows = get_rank(), ctx.rows
        if dist.get_backend() == "nccl":
            out = torch.empty((rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad[rank * rows : (rank + 1) * rows].clone()


def all_gather_autograd(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather` (equal shapes), but differentiable: every rank's slice receives
    the sum over ranks of the gradients flowing into it.

    A loss computed from the gathered batch on every rank thus back-propagates into each rank's
    own inputs; with DDP averaging parameter gradients over ranks, the sum-then-average gives the
    single-process gradient when each rank's loss is the mean over its own samples (see
    ``trainer/losses/csl.py`` for the convention worked through).
    """
    if not is_initialized():
        return tensor
    return _GatherAutograd.apply(tensor.contiguous())


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs across ranks (rank order). No gradient."""
    if not is_initialized():
        return tensor
    n = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = all_gather(n).tolist()
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather(padded)
    chunks = [gathered[r * longest : r * longest + s] for r, s in enumerate(sizes)]
    return torch.cat(chunks, dim=0)


def all_gather_object(obj: Any) -> list[Any]:
    """Gather one picklable object per rank (rank order)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Broadcast one picklable object from ``src`` to every rank."""
    if not is_initialized():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` slice of ``n`` items owned by ``rank`` (first ranks take the remainder).

    The one rule for splitting rows among ranks: exact-once loaders, sharded banks and sharded
    k-NN queries all use it, so their slices agree.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# -- SLURM / submitit ---------------------------------------------------------------------------
# Inside a submitit job every task is started by srun (or submitit's local controller) without the
# torchrun variables. They are derived from submitit's JobEnvironment and exported, so that
# init(), DataLoader workers and anything else reading RANK/LOCAL_RANK agree.

_MASTER_PORT_BASE = 20000
_MASTER_PORT_SPAN = 20000


def master_port_for(job_id: str) -> int:
    """Rendezvous port of a job: 20000 + job id mod 20000.

    Deterministic, so every task of the job (and the job again after a requeue, which keeps its
    id) picks the same port without talking; distinct for concurrent jobs sharing a node.
    """
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise ValueError(f"job id {job_id!r}: expected a number (SLURM_JOB_ID)")
    return _MASTER_PORT_BASE + int(digits) % _MASTER_PORT_SPAN


def job_env_vars(job_env: Any) -> dict[str, str]:
    """The env:// variables of a task, from a submitit ``JobEnvironment`` (or anything with its
    attributes: ``cluster``, ``job_id``, ``global_rank``, ``local_rank``, ``num_tasks``,
    ``num_nodes``, ``hostnames``).

    MASTER_ADDR is the first host of the job's node list (rank 0 runs there: SLURM places tasks in
    block order); submitit's local executor runs every task on this machine (127.0.0.1).
    """
    num_nodes = max(1, int(job_env.num_nodes))
    if job_env.cluster == "local":
        master = "127.0.0.1"
    else:
        hosts = list(job_env.hostnames)
        if not hosts:
            raise ValueError(f"job {job_env.job_id}: empty node list (SLURM_JOB_NODELIST)")
        master = hosts[0]
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, int(job_env.num_tasks) // num_nodes)),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(master_port_for(job_env.job_id)),
    }


def in_submitit_job() -> bool:
    """True in a task started by submitit's SLURM or local executor (not under torchrun inside one)."""
    return os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local") and "TORCHELASTIC_RUN_ID" not in os.environ


def export_job_env() -> str:
    """Find where this process runs and make the torchrun variables describe it.

    Order: torchrun (``TORCHELASTIC_RUN_ID``: its variables are used as they are), a submitit job
    (variables derived from ``submitit.JobEnvironment`` and exported, replacing any stale ones the
    submitting shell exported into the job), explicit ``RANK``/``WORLD_SIZE`` variables, else a
    single process. Returns ``torchrun``, ``submitit``, ``env`` or ``single``.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if in_submitit_job():
        import submitit

        os.environ.update(job_env_vars(submitit.JobEnvironment()))
        return "submitit"
    if "WORLD_SIZE" in os.environ:
        return "env"
    return "single"


__all__ = [
    "DistInfo", "init", "info", "shutdown", "is_initialized", "get_rank", "get_world_size", "is_main",
    "barrier", "comm_device", "all_reduce", "broadcast", "all_gather", "all_gather_autograd",
    "all_gather_variable", "all_gather_object", "broadcast_object", "shard_range",
    "master_port_for", "job_env_vars", "in_submitit_job", "export_job_env",
]
