"""Metrics hooks: the engine reports every record to each sink; rank 0 writes ``metrics.jsonl``.

The Prometheus exporter (``trainer/engine/prometheus.py``, ``train.metrics_port``) is one more sink;
a method adds records of its own through ``Method.log_event`` (bound to :meth:`Metrics.log`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol


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
    return str(v)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)


class Metrics:
    """Fan-out to sinks, stamping time; does nothing on ranks other than 0."""

    def __init__(self, sinks: list[MetricsSink], enabled: bool = True) -> None:
        self.sinks = sinks if enabled else []

    def log(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "time": time.time(), **fields}
        for s in self.sinks:
            s.log(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
