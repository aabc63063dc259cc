"""``python -m demo.tmgf [key=value …]`` — TMGF, unsupervised domain adaptation, on this machine.

Two stages, both through the launcher's local cluster with 2 gloo processes:

1. the source model: the PAT demo (``exp=pat_demo``: labelled synthetic domain A), trained only if
   ``model.pretrained`` (default ``runs/pat_demo/model_final.safetensors``) does not exist yet — the
   role LUPerson pre-training plays in the paper (a tiny ViT from scratch never starts: its features
   cluster by camera);
2. TMGF (``exp=tmgf_demo``) on the *unlabeled* training split of domain B, re-clustering every epoch.

Prints, for the source model and after TMGF: domain B's mAP/CMC and the clustering of its training
set (#clusters against the true number of identities, ARI; the labels are read for this report only),
then checks the demo's two acceptance bars: #clusters within 20% of the true identities, and target
mAP at least 15 points above the model TMGF started from. It writes the run's pictures
(:mod:`trainer.report`, among them clusters vs true ids and ARI per epoch) and prints where they are.

Exit status: 0 when both bars hold, 3 (:data:`ACCEPTANCE_FAILED`) when the run went through but a bar
does not hold, 2 for a user's mistake (one line on stderr), 1 when training failed (one line naming the
job's log). Only the last epoch is reported: TMGF picks no epoch on the target.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from demo.common import NPROC, prepare, print_pictures, table, train_local
from demo.pat import run_pat_demo
from shards.errors import UserError, run_cli
from trainer.config import compose

PROG = "demo.tmgf"
SOURCE_EXP = "pat_demo"
ACCEPTANCE_FAILED = 3
"""Exit status of a demo that ran but misses an acceptance bar (2 is a user's mistake, 1 a bug or a failed job)."""
MIN_MAP_GAIN = 15.0
"""Target mAP points TMGF must add to the source model."""
CLUSTER_RATIO = (0.8, 1.2)
"""Bounds of #clusters / #true identities of the training set after TMGF."""


def acceptance(numbers: dict[str, float]) -> tuple[bool, str]:
    """Whether the demo's two bars hold (a NaN — no start evaluation, no clustering — fails), and the line
    that says so."""
    gain, ratio = numbers["mAP_gain_points"], numbers["clusters_over_true_ids"]
    gain_ok = gain >= MIN_MAP_GAIN  # False for NaN
    ratio_ok = CLUSTER_RATIO[0] <= ratio <= CLUSTER_RATIO[1]
    text = (f"acceptance: mAP gain {gain:+.1f} points (bar: >= {MIN_MAP_GAIN:g}) -> {'OK' if gain_ok else 'FAIL'}; "
            f"clusters / true ids = {ratio:.2f} (bar: {CLUSTER_RATIO[0]}..{CLUSTER_RATIO[1]}) -> "
            f"{'OK' if ratio_ok else 'FAIL'}")
    return gain_ok and ratio_ok, text


def summarize(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """Table of the run's start/last evaluation and the acceptance numbers."""
    from trainer.report import METRICS, read_records

    records = read_records(run_dir / METRICS)
    end = [r for r in records if r["kind"] == "end"][-1]
    initial, last = end["initial"], end["last"]
    rows = [("model", "target", "mAP", "R1", "R5", "clusters", "true ids", "outliers", "ARI")]
    for name, res in (("start (source model)", initial), ("TMGF (last)", last)):
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
    return table(rows) + "\n" + acceptance(numbers)[1], numbers


def run_demo(args: list[str]) -> int:
    """The demo's body (see the module doc for its exit status); a user's mistake raises UserError."""
    flags = [a for a in args if a.startswith("--")]
    if flags:
        raise UserError(f"unknown option {flags[0]}; this demo takes only key=value overrides (e.g. train.epochs=10)")
    overrides = ["exp=tmgf_demo", *args]
    cfg = compose(overrides)
    source_cfg = compose([f"exp={SOURCE_EXP}"])
    t0 = time.time()
    source = Path(cfg.model.pretrained or "")
    default_source = Path(source_cfg.run_dir) / "model_final.safetensors"
    print(f"[1/3] source model (labelled domain A): {source}", flush=True)
    if not source.is_file():
        if source.resolve() != default_source.resolve():
            raise UserError(f"model.pretrained={str(source)!r} does not exist; pass an existing file, or leave "
                            f"model.pretrained unset to use (and, if needed, train) the PAT demo's {default_source}")
        print(f"      not there yet: running the PAT demo (exp={SOURCE_EXP}) first", flush=True)
        rc = run_pat_demo([f"exp={SOURCE_EXP}"])
        if rc != 0:
            return rc
    print("[2/3] data (unlabeled domain B)", flush=True)
    prepare(cfg)
    print(f"[3/3] train TMGF (unsupervised) with {NPROC} local processes (gloo) through the SLURM launcher's "
          f"local cluster: {cfg.run_dir}", flush=True)
    rc = train_local(overrides)
    if rc != 0:
        return rc
    text, numbers = summarize(Path(cfg.run_dir))
    print(text)
    print_pictures(Path(cfg.run_dir))
    print(f"total {time.time() - t0:.0f}s")
    return demo_status(numbers)


def demo_status(numbers: dict[str, float]) -> int:
    """0 when the acceptance bars hold, else :data:`ACCEPTANCE_FAILED` (said on stderr too)."""
    ok, text = acceptance(numbers)
    if ok:
        return 0
    print(f"tmgf_demo: acceptance failed ({text.removeprefix('acceptance: ')}); exit {ACCEPTANCE_FAILED}",
          file=sys.stderr)
    return ACCEPTANCE_FAILED


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: run_demo(args))


if __name__ == "__main__":
    sys.exit(main())
