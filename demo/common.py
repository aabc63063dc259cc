"""What both demos do: prepare and verify their data, train through the launcher, print a table and
where the run's pictures are."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from launch.resources import resources
from launch.slurm import JobFailed, submit_and_wait
from trainer.config import Config

NPROC = 2
"""Local gloo processes a demo trains with."""


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def prepare(cfg: Config) -> None:
    """Synthesize + pack the config's datasets (cached) and verify their shards, printing as it goes."""
    from shards.pack import summary
    from shards.verify import verify
    from trainer.data.prepare import ensure_datasets

    t0 = time.time()
    print(f"      synthesize + pack (cached under {cfg.data.cache_dir})", flush=True)
    folders = ensure_datasets(cfg.data)
    print(f"      {time.time() - t0:.1f}s; verify shards (hashes, keys, every image decoded)", flush=True)
    for folder in folders:
        print("      " + summary(verify(folder, decode=True), folder).replace("\n", "\n      "))


def train_local(overrides: list[str]) -> int:
    """Train ``overrides`` on the launcher's local cluster with NPROC gloo processes, one thread each
    (the path a cluster user takes: the launcher checks, writes the run dir and submits), and wait.
    Returns 0, or 1 when the job failed (said on stderr, naming its log); a user's mistake raises."""
    res = resources("local", nodes=1, tasks_per_node=NPROC, cpus_per_task=1, time="60")
    try:
        result = submit_and_wait("local", res, overrides)
    except JobFailed as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    print(f"      {result['status']} at step {result['step']} (epoch {result['epoch']})", flush=True)
    return 0


def print_pictures(run_dir: Path) -> None:
    """Draw the run's pictures (:mod:`trainer.report`) and print where they are and what each shows.

    A picture that fails to draw is said on stderr and never changes the demo's exit status: the
    status reports the training and its acceptance bars."""
    from trainer.report import describe, report

    try:
        rep = report(run_dir)
    except Exception as exc:  # see the docstring; the command printed below shows the traceback
        print(f"pictures: not drawn ({type(exc).__name__}: {exc}); run python -m trainer.report {run_dir}",
              file=sys.stderr)
        return
    print(describe(rep))
    print(f"  (python -m trainer.report {run_dir} draws them again, also while a run is going)")
