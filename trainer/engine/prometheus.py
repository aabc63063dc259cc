"""A metrics sink that serves the run's latest numbers to Prometheus (``train.metrics_port``).

Rank 0 serves ``http://<train.metrics_addr>:<port>/metrics`` (127.0.0.1 by default: expose it on
purpose, e.g. ``train.metrics_addr=0.0.0.0`` behind a firewall). Every numeric field of every record
becomes a gauge named ``<prefix>_<kind>_<field>`` holding its latest value, labelled with the run
name; per-target results become a ``target`` label, so an evaluation record
``{"results": {"dukemtmc": {"mAP": 0.41}}}`` sets ``reid_eval_mAP{run="…", target="dukemtmc"}``,
the end record's best sets ``reid_end_best_mAP{…}``, and TMGF's ``train_clustering`` entry sets
``reid_eval_train_clustering_clusters{run="…"}``; other nested dicts join their keys into the name.
Strings and lists are skipped (metrics.jsonl has everything), as are ``time`` and ``kind``.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from shards.errors import UserError

_NAME = re.compile(r"[^a-zA-Z0-9_]")
_PER_TARGET = ("results", "best", "last", "initial")
"""Record fields that hold one dict of metrics per target dataset (the target becomes a label)."""
_NOT_TARGETS = ("train_clustering",)
"""Entries of those dicts that are not targets (TMGF's clustering of its training set)."""


def _metric_name(*parts: str) -> str:
    name = "_".join(_NAME.sub("_", p) for p in parts if p)
    return name if not name[0].isdigit() else "_" + name


class MetricsPortError(UserError):
    """The exporter cannot listen where ``train.metrics_port``/``train.metrics_addr`` say."""


def check_port(port: int, addr: str = "127.0.0.1") -> None:
    """Raise :class:`MetricsPortError` unless an exporter could serve on ``addr:port`` now.

    Starts and stops the very server the sink uses, so the check binds exactly as the run will
    (a port taken in between is still refused by the sink itself)."""
    PrometheusSink(port, addr).close()


class PrometheusSink:
    """Latest value of every numeric metric, served over HTTP from a background thread."""

    def __init__(self, port: int, addr: str = "127.0.0.1", run: str = "", prefix: str = "reid") -> None:
        self.registry = CollectorRegistry()
        self.run = run
        self.prefix = prefix
        self._gauges: dict[str, tuple[Gauge, tuple[str, ...]]] = {}
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except socket.gaierror as exc:
            raise MetricsPortError(f"train.metrics_addr={addr}: not an address of this host ({exc.strerror or exc}); "
                                   "pass an IP of this host (127.0.0.1, 0.0.0.0 for all)") from None
        except OSError as exc:  # port taken, address not on this host, no permission (< 1024)
            raise MetricsPortError(
                f"train.metrics_port={port}: cannot serve metrics on {addr}:{port} ({exc.strerror or exc}); pass "
                f"another train.metrics_port, train.metrics_port=0 for any free port, or train.metrics_port=-1 to "
                f"turn the exporter off") from None
        self.port = int(self._server.server_port)  # the bound port (port 0 asks the OS for a free one)
        self.addr = addr

    def _set(self, name: str, value: float, labels: dict[str, str]) -> None:
        keys = ("run", *sorted(labels))
        if name not in self._gauges:
            gauge = Gauge(name, f"latest {name} (metrics.jsonl has the history)", keys, registry=self.registry)
            self._gauges[name] = (gauge, keys)
        gauge, known = self._gauges[name]
        if known == keys:  # a field seen before with other label names is left alone
            gauge.labels(run=self.run, **labels).set(value)

    def _walk(self, parts: list[str], value: Any, labels: dict[str, str]) -> None:
        if isinstance(value, (bool, int, float)):
            self._set(_metric_name(self.prefix, *parts), float(value), labels)
        elif isinstance(value, dict):
            for k, v in value.items():
                self._walk([*parts, str(k)], v, labels)

    def log(self, record: dict[str, Any]) -> None:
        kind = str(record.get("kind", "record"))
        for key, value in record.items():
            if key in ("kind", "time"):
                continue
            if key in _PER_TARGET and isinstance(value, dict):
                stem = [kind] if key == "results" else [kind, key]
                for target, sub in value.items():
                    if isinstance(sub, dict) and target not in _NOT_TARGETS:
                        self._walk(stem, sub, {"target": str(target)})
                    else:
                        self._walk([*stem, str(target)], sub, {})
            else:
                self._walk([kind, key], value, {})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


__all__ = ["MetricsPortError", "PrometheusSink", "check_port"]
