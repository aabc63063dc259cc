"""Curves from ``metrics.jsonl``: training losses per step and target mAP/R1 per epoch, as one PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON record ({exc.msg})") from exc
    return records


def plot_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write ``run_dir/plots/curves.png`` (or ``out``); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    # a resumed run repeats steps after its checkpoint: keep the last record of each step
    by_step = {r["step"]: r for r in train}
    steps = sorted(by_step)
    # TMGF runs with eval_clustering also report the training set's clustering: a third panel
    clustering = [r for r in evals if "clusters" in r.get("results", {}).get("train_clustering", {})]
    fig, axes = plt.subplots(1, 3 if clustering else 2, figsize=(16.5 if clustering else 11, 4))
    ax1, ax2 = axes[0], axes[1]
    keys = [k for k in ("loss", "id", "tri", "csl", "global_off", "global_on", "part_off", "part_on")
            if steps and k in by_step[steps[-1]]]
    for k in keys:
        ax1.plot(steps, [by_step[s].get(k, float("nan")) for s in steps], label=k, lw=1)
    ax1.set_xlabel("step")
    ax1.set_title("training loss")
    ax1.legend()
    by_epoch: dict[int, dict[str, Any]] = {r["epoch"]: r for r in evals}
    epochs = sorted(by_epoch)
    targets = sorted({t for r in evals for t, m in r.get("results", {}).items() if "mAP" in m})
    for t in targets:
        xs = [e + 1 for e in epochs if t in by_epoch[e]["results"]]
        ax2.plot(xs, [100 * by_epoch[e]["results"][t]["mAP"] for e in epochs if t in by_epoch[e]["results"]],
                 marker="o", label=f"{t} mAP")
        ax2.plot(xs, [100 * by_epoch[e]["results"][t]["R1"] for e in epochs if t in by_epoch[e]["results"]],
                 marker="s", ls="--", label=f"{t} R1")
    ax2.set_xlabel("epochs trained")
    ax2.set_ylabel("%")
    ax2.set_title("target retrieval")
    if targets:
        ax2.legend()
    if clustering:
        ax3 = axes[2]
        xs = [r["epoch"] + 1 for r in clustering]
        stats = [r["results"]["train_clustering"] for r in clustering]
        ax3.plot(xs, [c["clusters"] / c["true_ids"] for c in stats], marker="o", label="clusters / true ids")
        ax3.plot(xs, [c["ari"] for c in stats], marker="s", ls="--", label="ARI")
        ax3.set_xlabel("epochs trained")
        ax3.set_title("training-set clustering")
        ax3.legend()
    fig.tight_layout()
    path = Path(out) if out else run_dir / "plots" / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
