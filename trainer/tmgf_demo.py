"""``python -m trainer.tmgf_demo [--nproc N] [key=value …]`` — TMGF, fully unsupervised, on this machine.

Synthesizes and packs a synthetic person set (``exp=tmgf_demo``), trains TMGF on its *unlabeled*
training split (re-clustering every epoch) with N local gloo processes, and prints, before and after
training: target mAP/CMC and the clustering of the training set (#clusters against the true number
of identities, ARI/NMI: the labels are read for this report only). Then checks the demo's two
acceptance bars: #clusters within 20% of the true identities, target mAP 15 points above the untrained model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, compose


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def summarize(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """Table of the run's untrained/last evaluation and the acceptance numbers."""
    from trainer.plots import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    end = [r for r in records if r["kind"] == "end"][-1]
    initial, last = end["initial"], end["last"]
    rows = [("model", "target", "mAP", "R1", "R5", "clusters", "true ids", "outliers", "ARI")]
    for name, res in (("untrained", initial), ("trained (last)", last)):
        c = res.get("train_clustering", {})
        for target, m in res.items():
            if target == "train_clustering":
                continue
            rows.append((name, target, f"{100 * m['mAP']:.1f}", f"{100 * m['R1']:.1f}", f"{100 * m['R5']:.1f}",
                         str(c.get("clusters", "-")), str(c.get("true_ids", "-")), str(c.get("outliers", "-")),
                         f"{c['ari']:.3f}" if "ari" in c else "-"))
    targets = [t for t in last if t != "train_clustering"]
    gain = min(100 * (last[t]["mAP"] - initial[t]["mAP"]) for t in targets) if initial else float("nan")
    c = last.get("train_clustering", {})
    ratio = c["clusters"] / c["true_ids"] if c else float("nan")
    numbers = {"mAP_gain_points": gain, "clusters_over_true_ids": ratio}
    text = _table(rows) + (f"\nacceptance: mAP gain {gain:+.1f} points (bar: >= 15) -> {'OK' if gain >= 15 else 'FAIL'}; "
                           f"clusters / true ids = {ratio:.2f} (bar: 0.8..1.2) -> "
                           f"{'OK' if 0.8 <= ratio <= 1.2 else 'FAIL'}")
    return text, numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="local processes (gloo); 1 runs without torchrun")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = ["exp=tmgf_demo", *overrides]
    try:
        cfg = compose(overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from trainer.data.prepare import ensure_datasets

    t0 = time.time()
    print(f"[1/3] synthesize + pack (cached under {cfg.data.cache_dir})", flush=True)
    ensure_datasets(cfg.data)
    print(f"[2/3] train TMGF (unsupervised) with {args.nproc} local process(es): {cfg.run_dir}", flush=True)
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "trainer.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "trainer.train", *overrides]
    rc = subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    if rc != 0:
        print(f"error: training exited with {rc}", file=sys.stderr)
        return rc
    print("[3/3] results", flush=True)
    text, _ = summarize(Path(cfg.run_dir))
    print(text)
    try:
        from trainer.plots import plot_run

        print(f"curves: {plot_run(Path(cfg.run_dir))}")
    except Exception as exc:  # plotting is a nicety: never fail the demo on it
        print(f"(no plot: {exc})")
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
