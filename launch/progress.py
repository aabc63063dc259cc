"""Live progress of a submitted run where the user is: the launcher's ``--wait`` follows rank 0's
``run_dir/metrics.jsonl`` while the job runs.

On a terminal, one bar redrawn in place (epoch, step/total, loss, img/s, MFU, ETA); elsewhere (SLURM
logs, CI) a plain line every ``every_s`` seconds. Either way each evaluation's table is printed when it
ends, and each re-clustering in one line. The ETA adds to the remaining steps (at the mean of the last
:data:`PACE_STEPS` steps) the evaluations still to come (at the mean duration of those seen; ``+ eval``
until one was) and, once the run has re-clustered, one re-clustering per remaining epoch (TMGF's
schedule) at the mean duration seen.

The follower reads only what the job appends after the submission, whole lines only (a line being
written is read on the next poll), and never changes the file.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

METRICS = "metrics.jsonl"
PACE_STEPS = 20
"""Train records whose mean step time paces the ETA: recent enough to follow a change of speed."""
POLL_S = 0.5
EVAL_COLUMNS = ("mAP", "R1", "R5", "R10", "mINP")
NOT_TARGETS = ("train_clustering",)


def offset(run_dir: str | os.PathLike[str]) -> int:
    """Where the follower starts reading: the end of the metrics of earlier jobs in this run dir."""
    path = Path(run_dir) / METRICS
    return path.stat().st_size if path.is_file() else 0


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def eval_table(record: dict[str, Any]) -> str:
    """An evaluation record as a markdown table in % (and TMGF's training-set clustering in one line)."""
    results = record.get("results") or {}
    epoch = record.get("epoch", 0)
    when = "before training" if epoch < 0 else f"after epoch {epoch + 1}"
    head = f"evaluation {when} (step {record.get('step', 0)}, {record.get('seconds', 0):.1f} s):"
    rows = [[str(t)] + [f"{100 * m[c]:.1f}" if isinstance(m.get(c), (int, float)) else "-" for c in EVAL_COLUMNS]
            for t, m in results.items() if isinstance(m, dict) and t not in NOT_TARGETS]
    lines = [head]
    if rows:
        header = ["target", *EVAL_COLUMNS]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header]]
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    clustering = results.get("train_clustering")
    if isinstance(clustering, dict):
        lines.append("training set clustering: " + ", ".join(f"{k} {_num(v)}" for k, v in clustering.items()))
    return "\n".join(lines)


def cluster_line(record: dict[str, Any]) -> str:
    seconds = float(record.get("extract_s", 0)) + float(record.get("cluster_s", 0))
    parts = [f"{k} {_num(record[k])}" for k in ("clusters", "outliers", "proxies", "true_ids", "ari") if k in record]
    return f"re-clustered before epoch {int(record.get('epoch', 0)) + 1}: {', '.join(parts)} ({seconds:.1f} s)"


def _num(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@dataclass
class RunState:
    """What the records so far say about the run, and its ETA."""

    epochs: int | None = None
    """``train.epochs`` (None: unknown, the engine's own ETA is shown)."""
    eval_period: int = 1
    last: dict[str, Any] = field(default_factory=dict)
    """The latest train record."""
    secs: deque[float] = field(default_factory=lambda: deque(maxlen=PACE_STEPS))
    eval_s: list[float] = field(default_factory=list)
    cluster_s: list[float] = field(default_factory=list)
    evaluated: int = -1
    """The latest epoch evaluated after (0-based): an epoch's last step is logged before its evaluation."""
    clustered: int = -1
    """The latest epoch re-clustered before."""

    def update(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "train":
            self.last = record
            if isinstance(record.get("sec"), (int, float)):
                self.secs.append(float(record["sec"]))
        elif kind == "eval" and isinstance(record.get("seconds"), (int, float)):
            self.eval_s.append(float(record["seconds"]))
            self.evaluated = max(self.evaluated, int(record.get("epoch", -1)))
        elif kind == "cluster":
            self.cluster_s.append(float(record.get("extract_s", 0)) + float(record.get("cluster_s", 0)))
            self.clustered = max(self.clustered, int(record.get("epoch", -1)))

    @property
    def total_steps(self) -> int | None:
        progress = self.last.get("progress")
        return round(self.last["step"] / progress) if progress else None

    def evals_left(self, epoch: int) -> int:
        """Evaluations still to come after epochs ``epoch`` .. last (0-based): every ``eval_period``-th and the last."""
        assert self.epochs is not None
        return sum(1 for f in range(max(epoch, self.evaluated + 1), self.epochs)
                   if (f + 1) % self.eval_period == 0 or f + 1 == self.epochs)

    def clusterings_left(self, epoch: int) -> int:
        """Re-clusterings still to come, once the run has re-clustered: one before each later epoch (TMGF's)."""
        assert self.epochs is not None
        return max(0, self.epochs - max(epoch + 1, self.clustered + 1)) if self.cluster_s else 0

    def eta(self) -> tuple[float, bool] | None:
        """Seconds left and whether evaluations of unknown length remain (not in the figure)."""
        total = self.total_steps
        if not self.last or total is None:
            return None
        if self.epochs is None or not self.secs:
            return float(self.last.get("eta_s", 0)), False
        epoch = int(self.last.get("epoch", 0))
        left = (total - self.last["step"]) * sum(self.secs) / len(self.secs)
        evals = self.evals_left(epoch)
        if self.eval_s:
            left += evals * sum(self.eval_s) / len(self.eval_s)
        if self.cluster_s:
            left += self.clusterings_left(epoch) * sum(self.cluster_s) / len(self.cluster_s)
        return left, evals > 0 and not self.eval_s

    def describe(self) -> str:
        """The step's figures: ``epoch 2/16 step 120/512 23% loss 2.35 812 img/s MFU 1.2% data 12% ETA 3m10s``."""
        r = self.last
        if not r:
            return "waiting for the first step"
        total = self.total_steps
        epochs = f"/{self.epochs}" if self.epochs else ""
        parts = [f"epoch {int(r.get('epoch', 0)) + 1}{epochs}", f"step {r['step']}" + (f"/{total}" if total else "")]
        if r.get("progress") is not None:
            parts.append(f"{100 * r['progress']:.0f}%")
        if isinstance(r.get("loss"), (int, float)):
            parts.append(f"loss {r['loss']:.4g}")
        if isinstance(r.get("img_per_s"), (int, float)):
            parts.append(f"{r['img_per_s']:.0f} img/s")
        if isinstance(r.get("mfu"), (int, float)):
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if isinstance(r.get("data_wait_ratio"), (int, float)):
            parts.append(f"data wait {100 * r['data_wait_ratio']:.0f}%")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {duration(eta[0])}" + (" + eval" if eta[1] else ""))
        return " ".join(parts)


class Follower:
    """Tails ``path`` from ``start`` and writes the run's progress to ``out`` (see the module doc)."""

    def __init__(self, path: str | os.PathLike[str], out: TextIO | None = None, tty: bool | None = None,
                 every_s: float = 30.0, epochs: int | None = None, eval_period: int = 1, start: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.every_s = every_s
        self.state = RunState(epochs=epochs, eval_period=max(1, eval_period))
        self._pos = start
        self._tail = b""
        self._clock = clock
        self._last_line: float | None = None
        self._said = ""  # the latest progress line printed
        self._bar = False  # a bar is on the terminal's current line

    # -- reading ---------------------------------------------------------------------------------
    def _new_records(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._pos += len(chunk)
        *lines, self._tail = (self._tail + chunk).split(b"\n")
        out = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not a record (a cut line of a killed job): metrics.jsonl keeps it, we skip it
            if isinstance(record, dict):
                out.append(record)
        return out

    # -- writing ---------------------------------------------------------------------------------
    def _print(self, text: str) -> None:
        if self._bar:
            self.out.write("\r\x1b[2K")  # clear the bar; it is redrawn below the text
            self._bar = False
        self.out.write(text + "\n")

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        self.out.write("\r\x1b[2K" + self.state.describe()[: width - 1])
        self._bar = True

    def _periodic(self, force: bool = False) -> None:
        now = self._clock()
        line = f"[progress] {self.state.describe()}"
        if line != self._said and (force or self._last_line is None or now - self._last_line >= self.every_s):
            self._print(line)
            self._last_line, self._said = now, line

    def poll(self) -> None:
        """Read what was appended and show it."""
        records = self._new_records()
        trained = False
        for r in records:
            self.state.update(r)
            kind = r.get("kind")
            if kind == "train":
                trained = True
            elif kind == "eval":
                self._print(eval_table(r))
            elif kind == "cluster":
                self._print(cluster_line(r))
            elif kind == "metrics_server":
                self._print("metrics: " + " ".join(r.get("urls") or [str(r.get("url"))]))
            elif kind == "resume":
                self._print(f"resumed from step {r.get('step')} (epoch {int(r.get('epoch', 0)) + 1})")
            elif kind == "end":
                if trained and self.tty:  # the last steps' bar, before the run's last line
                    self._draw()
                self.close()
                self._print(f"{r.get('status')} at step {r.get('step')}")
                trained = False
        if trained:
            if self.tty:
                self._draw()
            else:
                self._periodic()
        self.out.flush()

    def close(self) -> None:
        """End the bar's line, or print the latest figures once more."""
        if self.tty and self._bar:
            self.out.write("\n")
            self._bar = False
        elif not self.tty and self.state.last:
            self._periodic(force=True)  # the latest figures, unless that very line was the last one
        self.out.flush()

    def follow(self, done: Callable[[], bool], poll_s: float = POLL_S) -> None:
        """Poll until ``done()`` (the job ended, whichever way), then read the last records."""
        while not done():
            self.poll()
            time.sleep(poll_s)
        self.poll()
        self.close()


__all__ = ["Follower", "RunState", "cluster_line", "duration", "eval_table", "offset"]
