"""Metrics hooks: the engine reports every record to each sink; rank 0 writes ``metrics.jsonl``.

Rank 0's sinks: ``metrics.jsonl`` (the full history), the console and TensorBoard
(``trainer/engine/tensorboard.py``); every rank's: its Prometheus exporter
(``trainer/engine/prometheus.py``), fed that rank's own records. A method adds records of its own
through ``Method.log_event`` (bound to :meth:`Metrics.log`). docs/observability.md lists every field.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

TRAIN_FIELDS = frozenset({"kind", "time", "step", "epoch", "loss", "lr", "sec", "img_per_s", "progress", "eta_s",
                          "data_wait_s", "data_wait_ratio", "memory_s", "mfu", "mem_peak_bytes", "rank_images"})
"""Fields of a train record the engine writes; every other number is one of the method's terms
(``StepResult.logs``)."""
RATIO_TERMS = ("acc",)
"""Method terms that are fractions in [0, 1] (batch accuracy), not losses."""


def method_terms(record: dict[str, Any]) -> dict[str, float]:
    """The method's numeric terms of a train record (losses and :data:`RATIO_TERMS`)."""
    return {k: float(v) for k, v in record.items()
            if k not in TRAIN_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def loss_terms(record: dict[str, Any]) -> dict[str, float]:
    """Every loss of a train record by term: ``total`` (what was back-propagated) and the method's terms."""
    terms = {k: v for k, v in method_terms(record).items() if k not in RATIO_TERMS}
    return {"total": float(record["loss"]), **terms} if "loss" in record else terms


class MetricsSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """Append one JSON object per line; flushed every record so a killed job keeps its history."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True, default=_jsonable) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class ConsoleSink:
    """A compact line per record for humans."""

    def __init__(self, every: int = 1) -> None:
        self.every = max(1, every)

    def log(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "train" and record.get("step", 0) % self.every:
            return
        parts = [f"{k}={_fmt(v)}" for k, v in record.items() if k not in ("kind", "time")]
        print(f"[{kind}] " + " ".join(parts), flush=True)

    def close(self) -> None:
        pass


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list) and len(v) > 4:  # a curve (the CMC): metrics.jsonl has it whole
        return f"[{_fmt(v[0])}, {_fmt(v[1])}, … {len(v)} values]"
    return str(v)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)


class Metrics:
    """Fan-out to sinks, stamping time: ``sinks`` on rank 0 only (``enabled``), ``every_rank`` on every rank
    (a rank's exporter shows that rank's own step times, losses and memory)."""

    def __init__(self, sinks: list[MetricsSink], enabled: bool = True,
                 every_rank: list[MetricsSink] | None = None) -> None:
        self.sinks = [*(sinks if enabled else []), *(every_rank or [])]

    def log(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "time": time.time(), **fields}
        for s in self.sinks:
            s.log(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
