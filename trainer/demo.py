"""``python -m trainer.demo [exp=NAME] [key=value …]`` — the whole system on an embedded default.

Synthesizes two domains of persons (``exp=pat_demo``: domain A to train, domain B as the unseen
target), packs and verifies their shards, trains with 2 local gloo processes submitted through
``launch/slurm.py --cluster local`` (the path a cluster user takes), evaluates on the target before
and after, prints a table and writes a PNG of the curves. ``exp=tmgf_demo`` does the same for TMGF.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from trainer.config import ConfigError, compose

NPROC = 2


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    exp = [a for a in args if a.startswith("exp=")] or ["exp=pat_demo"]
    overrides = exp + [a for a in args if not a.startswith("exp=")]
    try:
        cfg = compose(overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from shards.pack import summary
    from shards.verify import verify
    from trainer.data.prepare import ensure_datasets

    t0 = time.time()
    print(f"[1/4] synthesize + pack (cached under {cfg.data.cache_dir})", flush=True)
    folders = ensure_datasets(cfg.data)
    print(f"      {time.time() - t0:.1f}s")
    print("[2/4] verify shards (hashes, keys, every image decoded)", flush=True)
    for folder in folders:
        print("      " + summary(verify(folder, decode=True), folder).replace("\n", "\n      "))
    print(f"[3/4] train with {NPROC} local processes (gloo) through the SLURM launcher's local cluster: "
          f"{cfg.run_dir}", flush=True)
    # The same path a cluster user takes: launch/slurm.py composes, writes the run dir and submits.
    launcher = Path(__file__).resolve().parents[1] / "launch" / "slurm.py"
    cmd = [sys.executable, str(launcher), "--cluster", "local", "--nodes", "1", f"--tasks-per-node={NPROC}",
           "--cpus-per-task", "1", "--time", "60", "--wait", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"error: training exited with {rc}", file=sys.stderr)
        return rc
    print("[4/4] results", flush=True)
    from trainer.plots import plot_run, read_metrics

    run_dir = Path(cfg.run_dir)
    end = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "end"][-1]
    rows = [("target", "model", "mAP", "R1", "R5", "mINP")]
    for target, last in end["last"].items():
        for name, m in (("untrained", end["initial"].get(target)), ("trained (last)", last),
                        (f"best (epoch {end['best'].get(target, {}).get('epoch', -1) + 1})", end["best"].get(target))):
            if m:
                rows.append((target, name, f"{100 * m['mAP']:.1f}", f"{100 * m['R1']:.1f}", f"{100 * m['R5']:.1f}",
                             f"{100 * m['mINP']:.1f}"))
    print(_table(rows))
    print(f"curves: {plot_run(run_dir)}")
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
