"""``python -m trainer.report RUN_DIR [--out DIR]``: the pictures of a run, from its ``metrics.jsonl`` alone.

No model and no torch: it reads the records the engine and the method logged, so it works on a run
that is still going (a last line cut mid-write is skipped) and on a copy of the file alone. It writes
one PNG per figure of :data:`FIGURES` into ``RUN_DIR/plots/`` (or ``--out``), atomically, and skips a
figure whose records do not exist yet (no evaluation so far, no clustering in a PAT run), saying why.

A resumed run repeats the steps after its checkpoint: the last record of a step (of an epoch, for
evaluations and clusterings) is the one drawn, as it is the one the run continued from.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shards.atomic import atomic_write_bytes
from shards.errors import CliParser, UserError, run_cli

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PROG = "report"
METRICS = "metrics.jsonl"
PLOTS = "plots"
"""Default folder of the PNGs, under the run dir."""

FIGURES: dict[str, str] = {
    "losses.png": "training loss by term per step (and the ID head's accuracy when logged)",
    "lr.png": "learning rate per step",
    "retrieval.png": "mAP and R1 per target over epochs",
    "cmc.png": "CMC curve of the last evaluation per target",
    "throughput.png": "images/s and seconds per step (data wait when logged)",
    "clustering.png": "TMGF: clusters vs true ids, outliers, ARI/NMI against the true ids",
}
"""Every figure the report draws → what it shows (the demos print this list)."""

ENGINE_FIELDS = frozenset({"kind", "time", "step", "epoch", "loss", "lr", "sec", "img_per_s", "progress",
                           "eta_s", "data_wait_s", "data_wait_ratio", "memory_s", "mfu", "mem_peak_bytes",
                           "rank_images"})
"""Fields of a train record the engine writes; every other number is one of the method's terms."""
ACCURACY_FIELDS = ("acc",)
"""Method terms that are fractions in [0, 1], not losses: drawn on their own axis, in %."""
NOT_TARGETS = ("train_clustering",)
"""Entries of an evaluation's results that are not a retrieval target (TMGF's clustering of the train set)."""

Series = dict[str, tuple[list[float], list[float]]]
"""Line label → (x, y), as drawn."""


@dataclass
class Report:
    """What :func:`report` wrote and drew: the PNGs, the figures skipped and why, and every series."""

    written: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)
    """Figure name → its series, exactly the numbers drawn (the tests compare them with the records)."""
    notes: list[str] = field(default_factory=list)


# -- reading ---------------------------------------------------------------------------------------
def read_records(path: str | Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in file order.

    A last line that does not parse is a record being written (the run is still going): skipped. An
    unparsable line before it is a record cut by a killed job that a resumed job wrote after: skipped
    too, and said in ``notes``, since the records after it are whole.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "kind" in record:
            records.append(record)
        elif n < len(lines):  # a whole line: the one being written has no newline yet
            bad.append(n)
    if bad and notes is not None:
        shown = ", ".join(map(str, bad[:10])) + (" …" if len(bad) > 10 else "")
        notes.append(f"{path}: skipped {len(bad)} line(s) that are not a JSON record: line {shown}")
    return records


def _num(v: Any) -> float:
    """A logged number as a float (non-finite floats may be logged as the strings 'nan', 'inf')."""
    if isinstance(v, (bool, int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return math.nan
    return math.nan


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and (isinstance(v, (int, float)) or v in ("nan", "inf", "-inf"))


def last_per(records: Iterable[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The last record of each value of ``key``, sorted by it (a resumed run repeats what followed its
    checkpoint; the later record is the one the run went on from)."""
    by: dict[float, dict[str, Any]] = {}
    for r in records:
        if key in r:
            by[_num(r[key])] = r
    return [by[k] for k in sorted(by)]


def of_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == kind]


def targets_of(evals: list[dict[str, Any]]) -> list[str]:
    """Retrieval targets in the order the evaluations first name them."""
    seen: dict[str, None] = {}
    for r in evals:
        for t, m in (r.get("results") or {}).items():
            if t not in NOT_TARGETS and isinstance(m, dict) and "mAP" in m:
                seen.setdefault(t)
    return list(seen)


# -- the figures: each returns its series, or the reason it has nothing to draw ----------------------
def _train_series(train: list[dict[str, Any]], name: str) -> tuple[list[float], list[float]]:
    rows = [r for r in train if name in r]
    return [_num(r["step"]) for r in rows], [_num(r[name]) for r in rows]


def losses_figure(records: list[dict[str, Any]]) -> tuple[Series, Callable[[Figure], None]] | str:
    train = last_per(of_kind(records, "train"), "step")
    if not train:
        return "no train record yet"
    terms = sorted({k for r in train for k, v in r.items() if k not in ENGINE_FIELDS and _is_number(v)})
    losses = ["loss"] + [t for t in terms if t not in ACCURACY_FIELDS]
    accs = [t for t in terms if t in ACCURACY_FIELDS]
    series = {k: _train_series(train, k) for k in losses + accs}
    resumes = [_num(r["step"]) for r in of_kind(records, "resume") if "step" in r]

    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, 2 if accs else 1, squeeze=False)[0]
        ax = axes[0]
        for i, k in enumerate(losses):
            _per_step(ax, *series[k], label="total" if k == "loss" else k, color="black" if k == "loss" else f"C{i}",
                      lw=2.0 if k == "loss" else 1.0)
        _mark_resumes(ax, resumes)
        ax.set(xlabel="step", ylabel="loss", title="training loss by term")
        ax.legend(fontsize="small")
        if accs:
            for i, k in enumerate(accs):
                xs, ys = series[k]
                _per_step(axes[1], xs, [100 * y for y in ys], label=k, color=f"C{i}", lw=1.0)
            _mark_resumes(axes[1], resumes)
            axes[1].set(xlabel="step", ylabel="%", title="training batch accuracy (ID head)", ylim=(-2, 102))
            axes[1].legend(fontsize="small")

    return series, draw


def lr_figure(records: list[dict[str, Any]]) -> tuple[Series, Callable[[Figure], None]] | str:
    train = last_per(of_kind(records, "train"), "step")
    if not any("lr" in r for r in train):
        return "no train record with lr yet"
    series = {"lr": _train_series(train, "lr")}

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        ax.plot(*series["lr"], lw=1.5, drawstyle="steps-post")  # constant within a step
        lo, hi = min(series["lr"][1]), max(series["lr"][1])
        if lo > 0 and hi / lo > 50:  # warm-up from a small factor and step decays read better in log
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="learning rate (first param group)", title="learning rate")

    return series, draw


def _epochs_trained(r: dict[str, Any]) -> float:
    """x of an evaluation: epochs trained when it ran (the start evaluation is logged as epoch -1)."""
    return _num(r["epoch"]) + 1


def retrieval_figure(records: list[dict[str, Any]]) -> tuple[Series, Callable[[Figure], None]] | str:
    evals = last_per(of_kind(records, "eval"), "epoch")
    targets = targets_of(evals)
    if not targets:
        return "no evaluation record yet"
    series: Series = {}
    for t in targets:
        rows = [r for r in evals if t in r["results"]]
        for metric in ("mAP", "R1"):
            series[f"{t} {metric}"] = ([_epochs_trained(r) for r in rows],
                                       [100 * _num(r["results"][t].get(metric)) for r in rows])

    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, 2)
        for ax, metric in zip(axes, ("mAP", "R1")):
            for t in targets:
                ax.plot(*series[f"{t} {metric}"], marker="o", label=t)
            ax.set(xlabel="epochs trained (0: before training)", ylabel=f"{metric} (%)",
                   title=f"{metric} per target")
            _epoch_x(ax, [x for t in targets for x in series[f"{t} {metric}"][0]])
            _percent_y(ax, [y for t in targets for y in series[f"{t} {metric}"][1]])
            ax.legend(fontsize="small")

    return series, draw


def cmc_figure(records: list[dict[str, Any]]) -> tuple[Series, Callable[[Figure], None]] | str:
    evals = of_kind(records, "eval")
    if not evals or not targets_of(evals[-1:]):
        return "no evaluation record yet"
    last = evals[-1]
    targets = targets_of([last])
    series: Series = {}
    full: dict[str, bool] = {}
    for t in targets:
        m = last["results"][t]
        curve = m.get("cmc")
        full[t] = isinstance(curve, list) and len(curve) > 0
        if full[t]:
            series[t] = ([float(k) for k in range(1, len(curve) + 1)], [100 * _num(c) for c in curve])
        else:  # the record holds the curve's R1/R5/R10 points only
            ranks = [k for k in (1, 5, 10) if f"R{k}" in m]
            series[t] = ([float(k) for k in ranks], [100 * _num(m[f"R{k}"]) for k in ranks])

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        for t in targets:
            if full[t]:
                ax.plot(*series[t], drawstyle="steps-post", label=t)
            else:
                ax.plot(*series[t], marker="o", ls=":", label=f"{t} (R1/R5/R10 only)")
        epoch = int(_epochs_trained(last))
        ax.set(xlabel="rank", ylabel="queries with a true match within rank (%)", ylim=(-2, 102),
               title=f"CMC of the last evaluation ({epoch} epochs trained, step {last.get('step', '?')})")
        _integer_x(ax)
        ax.legend(fontsize="small")

    return series, draw


def throughput_figure(records: list[dict[str, Any]]) -> tuple[Series, Callable[[Figure], None]] | str:
    train = last_per(of_kind(records, "train"), "step")
    if not train:
        return "no train record yet"
    names = [k for k in ("img_per_s", "sec", "data_wait_s") if any(k in r for r in train)]
    series = {k: _train_series(train, k) for k in names}
    resumes = [_num(r["step"]) for r in of_kind(records, "resume") if "step" in r]

    def draw(fig: Figure) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        if "img_per_s" in series:
            _per_step(ax1, *series["img_per_s"], label="images / s", color="C0", lw=1.0)
        _mark_resumes(ax1, resumes)
        ax1.set(xlabel="step", ylabel="images / s (all ranks)", title="training throughput")
        ax1.set_ylim(bottom=0)
        ax1.legend(fontsize="small")
        labels = {"sec": "whole step", "data_wait_s": "waiting for data"}
        for i, k in enumerate(("sec", "data_wait_s")):
            if k in series:
                _per_step(ax2, *series[k], label=labels[k], color=f"C{i}", lw=1.0)
        _mark_resumes(ax2, resumes)
        wait = "" if "data_wait_s" in series else " (no data-wait field in these records)"
        ax2.set(xlabel="step", ylabel="seconds", title=f"time per step{wait}")
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize="small")

    return series, draw


CLUSTER_COUNTS = ("clusters", "true_ids", "proxies")
CLUSTER_AGREEMENT = ("ari", "nmi")


def clustering_figure(records: list[dict[str, Any]]) -> tuple[Series, Callable[[Figure], None]] | str:
    # re-clusterings at an epoch's start (the pseudo labels it trains on), after `epoch` epochs trained
    recl = last_per(of_kind(records, "cluster"), "epoch")
    # evaluations with tmgf.eval_clustering: the clustering of the train set's features after the epoch
    evals = [r for r in last_per(of_kind(records, "eval"), "epoch")
             if isinstance((r.get("results") or {}).get("train_clustering"), dict)]
    if not recl and not evals:
        return "no clustering record (TMGF's cluster records, or evaluations with tmgf.eval_clustering)"
    sources = (("re-clustering", recl, lambda r: r, lambda r: _num(r["epoch"])),
               ("at evaluation", evals, lambda r: r["results"]["train_clustering"], _epochs_trained))
    series: Series = {}
    for name, rows, stats, x in sources:
        for k in (*CLUSTER_COUNTS, "outliers", *CLUSTER_AGREEMENT):
            have = [r for r in rows if k in stats(r)]
            if have:
                series[f"{k} ({name})"] = ([x(r) for r in have], [_num(stats(r)[k]) for r in have])

    def draw(fig: Figure) -> None:
        ax1, ax2, ax3 = fig.subplots(1, 3)
        # filled markers: the labels training used; hollow: the clustering measured at an evaluation
        styles: dict[str, dict[str, Any]] = {"re-clustering": dict(marker="o", ls="-"),
                                             "at evaluation": dict(marker="s", ls="--", mfc="none", ms=8)}

        def line(ax: Axes, key: str, label: str, color: str, **kw: Any) -> None:
            for name, style in styles.items():
                if f"{key} ({name})" in series:
                    ax.plot(*series[f"{key} ({name})"], color=color, label=f"{label} ({name})",
                            **{**style, **kw})

        truth = [y for k, (_, ys) in series.items() if k.startswith("true_ids") for y in ys]
        if truth and min(truth) == max(truth):  # one training set: one line
            ax1.axhline(truth[0], color="black", lw=1.5, label=f"true identities ({truth[0]:g})")
        else:
            line(ax1, "true_ids", "true identities", "black")
        line(ax1, "proxies", "camera proxies", "C2", lw=1, alpha=0.7)
        line(ax1, "clusters", "clusters", "C0", lw=2)
        line(ax2, "outliers", "outliers", "C3")
        line(ax3, "ari", "ARI", "C0")
        line(ax3, "nmi", "NMI", "C1")
        xs = [x for x_, _ in series.values() for x in x_]
        for ax in (ax1, ax2, ax3):
            _epoch_x(ax, xs)
            ax.set_xlabel("epochs trained before the clustering")
            if ax.lines:
                ax.legend(fontsize="x-small")
        ax1.set(ylabel="count", title="clusters vs true identities")
        ax1.set_ylim(bottom=0)
        ax2.set(ylabel="images in no cluster", title="DBSCAN outliers")
        ax2.set_ylim(bottom=0)
        agreement = "" if ax3.lines else " (no ari/nmi field in the records)"
        ax3.set(ylabel="score (1: the true identities)", title=f"agreement with the true ids{agreement}",
                ylim=(-0.05, 1.05))

    return series, draw


FIGURE_BUILDERS: dict[str, Callable[[list[dict[str, Any]]], tuple[Series, Callable[[Figure], None]] | str]] = {
    "losses.png": losses_figure,
    "lr.png": lr_figure,
    "retrieval.png": retrieval_figure,
    "cmc.png": cmc_figure,
    "throughput.png": throughput_figure,
    "clustering.png": clustering_figure,
}
assert FIGURE_BUILDERS.keys() == FIGURES.keys()


SMOOTH_FROM = 200
"""Steps from which a per-step series is drawn faint with its running mean over it (noise hides trends)."""


def _per_step(ax: Axes, xs: list[float], ys: list[float], label: str, color: str, lw: float) -> None:
    """A per-step series; over :data:`SMOOTH_FROM` steps, faint, under its running mean (NaN-aware)."""
    if len(xs) < SMOOTH_FROM:
        ax.plot(xs, ys, label=label, color=color, lw=lw)
        return
    import numpy as np

    w = len(xs) // 50
    y = np.asarray(ys, dtype=np.float64)
    ok = np.isfinite(y)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    cnt = np.concatenate([[0], np.cumsum(ok)])
    lo = np.maximum(np.arange(len(y)) - w + 1, 0)
    hi = np.arange(1, len(y) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (csum[hi] - csum[lo]) / (cnt[hi] - cnt[lo])
    ax.plot(xs, ys, color=color, lw=0.5, alpha=0.25)
    ax.plot(xs, mean, label=f"{label} (mean of {w} steps)", color=color, lw=lw)


def _mark_resumes(ax: Axes, steps: list[float]) -> None:
    """A dotted line where a resumed job took over (the steps after it were trained again)."""
    for i, s in enumerate(steps):
        ax.axvline(s, color="grey", ls=":", lw=1, label="resumed" if i == 0 else None)


def _integer_x(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _epoch_x(ax: Axes, xs: list[float]) -> None:
    """Whole epochs from 0, so one evaluation is not a lone point on a fractional axis."""
    _integer_x(ax)
    ax.set_xlim(-0.3, max([1.0, *xs]) + 0.3)


def _percent_y(ax: Axes, ys: list[float]) -> None:
    """From 0, with room above the best value (a range of zeros still gets an axis)."""
    finite = [y for y in ys if math.isfinite(y)]
    ax.set_ylim(0, min(102.0, max([5.0, *finite]) * 1.1))


# -- writing -----------------------------------------------------------------------------------------
def _render(draw: Callable[[Figure], None], title: str) -> bytes:
    """The PNG bytes of one figure (Agg, no display: it runs on login and compute nodes alike)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2), dpi=100, layout="constrained")
    draw(fig)
    fig.suptitle(title, fontsize="medium")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def check_run_dir(run_dir: Path, out: Path) -> Path:
    """The run's metrics.jsonl, or a UserError naming what is missing; ``out`` must be a folder."""
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such run dir; pass the run_dir=… of a training run (it holds {METRICS})")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder; pass the run dir of a training run (it holds {METRICS})")
    path = run_dir / METRICS
    if not path.is_file():
        raise UserError(f"{run_dir}: holds no {METRICS}; pass the run dir of a training run that has started "
                        f"(rank 0 writes {METRICS} at its first record)")
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
            break
    return path


def report(run_dir: str | Path, out: str | Path | None = None) -> Report:
    """Write the PNGs of :data:`FIGURES` that the run's records can draw into ``out`` (default
    ``run_dir/plots``); returns what was written, what was skipped and the series drawn."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / PLOTS
    path = check_run_dir(run_dir, out)
    rep = Report()
    records = read_records(path, rep.notes)
    if not records:
        raise UserError(f"{path}: no record yet; run the report again once the run has logged a step")
    name = run_dir.resolve().name
    built = {fig: build(records) for fig, build in FIGURE_BUILDERS.items()}
    out.mkdir(parents=True, exist_ok=True)
    for fig, result in built.items():
        if isinstance(result, str):
            rep.skipped[fig] = result
            continue
        series, draw = result
        atomic_write_bytes(out / fig, _render(draw, f"{name}: {FIGURES[fig]}"))
        rep.written[fig] = out / fig
        rep.series[fig] = series
    return rep


def describe(rep: Report) -> str:
    """What each picture shows, one line each, under the folder they are in (the CLI and the demos print it)."""
    folders = sorted({str(p.parent) for p in rep.written.values()})
    lines = [*rep.notes, f"pictures in {', '.join(folders) or '(none)'}:"]
    width = max(map(len, FIGURES))
    for fig in rep.written:
        lines.append(f"  {fig:<{width}}  {FIGURES[fig]}")
    for fig, why in rep.skipped.items():
        lines.append(f"  {fig:<{width}}  not drawn: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    figures = "\n".join(f"  {name:<15} {what}" for name, what in FIGURES.items())
    ap = CliParser(PROG, prog="python -m trainer.report", formatter_class=argparse.RawDescriptionHelpFormatter,
                   description="Draw a run's pictures from its metrics.jsonl alone (no model; a run still "
                               "going works too).",
                   epilog=f"figures (one PNG each, when the records hold them):\n{figures}")
    ap.add_argument("run_dir", type=Path, help=f"a training run's folder (it holds {METRICS})")
    ap.add_argument("--out", type=Path, default=None, help=f"folder of the PNGs (default: RUN_DIR/{PLOTS})")
    args = ap.parse_args(argv)

    def body() -> int:
        rep = report(args.run_dir, args.out)
        print(describe(rep))
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
