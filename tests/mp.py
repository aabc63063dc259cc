"""Run a function on N gloo ranks (CPU) and collect each rank's return value.

Usage in a test::

    def _body(rank, world_size, x):      # module-level, picklable
        ...
        return result                      # torch.save-able
    results = run_distributed(_body, 2, x)  # [result_rank0, result_rank1]

The function runs after ``trainer.dist.init()`` with RANK/WORLD_SIZE/MASTER_* set, exactly as under
torchrun, so the code under test takes its real distributed path.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, outdir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from trainer import dist

    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        dist.init(backend="gloo")
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report the traceback to the parent instead of a bare exit code
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        dist.shutdown()
        raise
    dist.shutdown(sync=True)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Spawn ``world_size`` gloo ranks running ``fn(rank, world_size, *args)``; return their results."""
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.start_processes(_worker, args=(world_size, free_port(), outdir, fn, args), nprocs=world_size,
                               join=True, start_method="spawn")
        except Exception:
            errors = []
            for r in range(world_size):
                p = os.path.join(outdir, f"rank{r}.pt")
                if os.path.exists(p):
                    rec = torch.load(p, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"rank {r}:\n{rec['error']}")
            raise RuntimeError("distributed test failed\n" + "\n".join(errors)) from None
        results = []
        for r in range(world_size):
            rec = torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
            results.append(rec["result"])
        return results
