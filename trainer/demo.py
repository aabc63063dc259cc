"""``python -m trainer.demo [exp=NAME] [key=value …]`` — the whole system on an embedded default.

Synthesizes two domains of persons (``exp=pat_demo``: domain A to train, domain B as the unseen
target), packs and verifies their shards, trains with 2 local gloo processes submitted through
``launch/slurm.py --cluster local`` (the path a cluster user takes), evaluates on the target before
and after, prints a table and writes a PNG of the curves. ``exp=tmgf_demo`` runs the TMGF demo
(:mod:`trainer.tmgf_demo`), which starts from this demo's model.

The table's main row is the last epoch. The row ``best on target (oracle, epoch N)`` is the epoch
with the best mAP on the target domain: choosing an epoch on the unseen domain is an oracle in domain
generalization (the official PAT code reports it), so it is labelled as such, never the result.
Exit status: 0, 2 for a user's mistake (one line on stderr), or the launcher's status when training failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from shards.errors import run_cli
from trainer.config import Config, compose

NPROC = 2


def table(rows: list[tuple[str, ...]]) -> str:
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


def launch_local(overrides: list[str]) -> int:
    """Train through ``launch/slurm.py --cluster local`` with NPROC gloo processes (the path a cluster
    user takes: the launcher composes, writes the run dir and submits); waits; returns the exit code
    (and says so on stderr when it is not 0)."""
    launcher = Path(__file__).resolve().parents[1] / "launch" / "slurm.py"
    cmd = [sys.executable, str(launcher), "--cluster", "local", "--nodes", "1", f"--tasks-per-node={NPROC}",
           "--cpus-per-task", "1", "--time", "60", "--wait", *overrides]
    rc = subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if rc != 0:
        print(f"error: training exited with {rc}", file=sys.stderr)
    return rc


def results_table(end: dict) -> str:
    """Per target: untrained, last epoch, and the target-selected epoch labelled as the oracle it is."""
    rows = [("target", "model", "mAP", "R1", "R5", "mINP")]
    for target, last in end["last"].items():
        best = end["best"].get(target)
        oracle = f"best on target (oracle, epoch {best['epoch'] + 1})" if best else ""
        for name, m in (("untrained", end["initial"].get(target)), ("trained (last)", last), (oracle, best)):
            if m:
                rows.append((target, name, f"{100 * m['mAP']:.1f}", f"{100 * m['R1']:.1f}", f"{100 * m['R5']:.1f}",
                             f"{100 * m['mINP']:.1f}"))
    return table(rows)


def run_pat_demo(overrides: list[str]) -> int:
    """The PAT demo: data, training, the before/after table and the curves."""
    cfg = compose(overrides)
    t0 = time.time()
    print("[1/3] data", flush=True)
    prepare(cfg)
    print(f"[2/3] train with {NPROC} local processes (gloo) through the SLURM launcher's local cluster: "
          f"{cfg.run_dir}", flush=True)
    rc = launch_local(overrides)
    if rc != 0:
        return rc
    print("[3/3] results", flush=True)
    from trainer.plots import plot_run, read_metrics

    run_dir = Path(cfg.run_dir)
    end = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "end"][-1]
    print(results_table(end))
    print(f"curves: {plot_run(run_dir)}")
    print(f"total {time.time() - t0:.0f}s")
    return 0


def run_demo(args: list[str]) -> int:
    exp = [a for a in args if a.startswith("exp=")] or ["exp=pat_demo"]
    rest = [a for a in args if not a.startswith("exp=")]
    if exp[-1] == "exp=tmgf_demo":
        from trainer.tmgf_demo import run_demo as run_tmgf_demo

        return run_tmgf_demo(rest)
    return run_pat_demo(exp + rest)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli("trainer.demo", lambda: run_demo(args))


if __name__ == "__main__":
    sys.exit(main())
