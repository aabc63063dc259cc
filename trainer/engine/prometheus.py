"""Every rank's metrics for Prometheus (``train.metrics_port``), named by Prometheus' conventions.

Each rank serves ``http://<train.metrics_addr>:<train.metrics_port + local rank>/metrics`` (127.0.0.1
by default: expose it on purpose, e.g. ``train.metrics_addr=0.0.0.0`` behind a firewall; port 0 = any
free port per rank) from the records of its own steps, every metric labelled with the ``run`` and the
global ``rank``; ``train.metrics_push_url`` also pushes them to a Pushgateway for jobs that cannot be
scraped. One prefix (``reid_``), base units (seconds, bytes), ``_total`` counters, ratios in [0, 1]:

- ``reid_build_info{version,strategy,method}`` 1
- ``reid_train_samples_total``, ``reid_train_steps_total``: images and optimizer steps of this rank
  (this process: a resumed run counts from 0 again, which Prometheus' ``rate()`` takes as a reset)
- ``reid_step_duration_seconds``, ``reid_data_wait_seconds``: histograms, one observation per step
- ``reid_loss{term}`` (``total`` and the method's terms), ``reid_learning_rate``, ``reid_mfu_ratio``,
  ``reid_memory_sync_seconds``, ``reid_device_memory_peak_bytes``, ``reid_train_epoch``,
  ``reid_train_global_step``: latest step
- ``reid_cluster_duration_seconds{phase=extract|cluster}``, ``reid_clusters``,
  ``reid_cluster_outlier_ratio``: latest re-clustering (TMGF's ``cluster`` records)
- ``reid_eval_{map,rank1,rank5,rank10,minp}_ratio{target}``, ``reid_eval_duration_seconds``: latest
  evaluation; ``reid_checkpoint_global_step``: latest checkpoint

metrics.jsonl (rank 0) keeps the full history of every field; docs/observability.md has queries.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

from shards.errors import UserError
from trainer.engine.metrics import loss_terms

log = logging.getLogger(__name__)

PREFIX = "reid"
PUSH_EVERY_S = 15.0
"""Seconds between two pushes to ``train.metrics_push_url`` (and one more at the end of the run)."""
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
"""Step durations: a ViT step on a GPU (milliseconds) to a large batch on a CPU (a minute)."""
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, float("inf"))
"""Data waits: a prefetched batch (sub-millisecond) to a starved loader (seconds)."""
EVAL_RATIOS = {"mAP": "map", "R1": "rank1", "R5": "rank5", "R10": "rank10", "mINP": "minp"}
"""Evaluation fields (fractions in [0, 1]) → their metric's stem: ``reid_eval_<stem>_ratio{target}``."""


class MetricsPortError(UserError):
    """The exporter cannot listen where ``train.metrics_port``/``train.metrics_addr`` say."""


def check_port(port: int, addr: str = "127.0.0.1", local_rank: int = 0) -> None:
    """Raise :class:`MetricsPortError` unless the exporter of ``local_rank`` could serve on ``addr:port +
    local_rank`` now. Starts and stops the very server the sink uses, so the check binds exactly as the run
    will (a port taken in between is still refused by the sink itself)."""
    PrometheusSink(port, addr, local_rank=local_rank).close()


def _serve(base: int, addr: str, local_rank: int,
           registry: CollectorRegistry) -> tuple[Any, threading.Thread]:
    port = base + local_rank if base > 0 else 0
    where = f"{addr}:{port}" + (f" (local rank {local_rank}: the base port + {local_rank})" if local_rank else "")
    fix = ("pass another train.metrics_port, train.metrics_port=0 for any free port, or train.metrics_port=-1 to "
           "turn the exporter off")
    if port > 65535:
        raise MetricsPortError(f"train.metrics_port={base}: cannot serve metrics on {where} (past 65535); {fix}")
    try:
        return start_http_server(port, addr=addr, registry=registry)
    except socket.gaierror as exc:
        raise MetricsPortError(f"train.metrics_addr={addr}: not an address of this host ({exc.strerror or exc}); "
                               "pass an IP of this host (127.0.0.1, 0.0.0.0 for all)") from None
    except OSError as exc:  # port taken, address not on this host, no permission (< 1024)
        raise MetricsPortError(f"train.metrics_port={base}: cannot serve metrics on {where} "
                               f"({exc.strerror or exc}); {fix}") from None


class _Pusher:
    """Pushes a registry to a Pushgateway every :data:`PUSH_EVERY_S` seconds from a thread, and once at close.
    A gateway that does not answer is logged, never fatal: the run matters more than its metrics."""

    def __init__(self, url: str, registry: CollectorRegistry, grouping: dict[str, str], every_s: float) -> None:
        self.url, self.registry, self.grouping = url, registry, grouping
        self._stop = threading.Event()
        self._failed = False
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="metrics-push", daemon=True)
        self._thread.start()

    def push(self) -> None:
        try:
            push_to_gateway(self.url, job=PREFIX, registry=self.registry, grouping_key=self.grouping, timeout=5)
            self._failed = False
        except OSError as exc:  # refused, unreachable, HTTP error (urllib's errors are OSErrors)
            if not self._failed:  # once per outage, not every 15 s
                log.warning("train.metrics_push_url=%s: push failed (%s); will retry", self.url, exc)
            self._failed = True

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.push()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.push()  # the final numbers: a batch job's gateway keeps them after the job is gone


class PrometheusSink:
    """This rank's metrics: served over HTTP from a background thread (``port`` >= 0; ``None`` = no server)
    and/or pushed to ``push_url``. ``local_rank`` offsets the port; ``rank`` labels every metric."""

    def __init__(self, port: int | None, addr: str = "127.0.0.1", run: str = "", rank: int = 0,
                 local_rank: int = 0, build: dict[str, str] | None = None, push_url: str = "",
                 push_every_s: float = PUSH_EVERY_S) -> None:
        self.registry = CollectorRegistry()
        self.run, self.rank = run, rank
        self._server: Any = None
        self.addr, self.port = addr, -1
        if port is not None and port >= 0:
            self._server, _ = _serve(port, addr, local_rank, self.registry)
            self.port = int(self._server.server_port)  # the bound port (port 0 asks the OS for a free one)
        self._define(build or {})
        self._pusher = _Pusher(push_url, self.registry, {"run": run, "rank": str(rank)}, push_every_s) \
            if push_url else None

    @property
    def url(self) -> str:
        """Where a Prometheus scrapes this rank (the host's name when bound to every address)."""
        host = socket.gethostname() if self.addr in ("0.0.0.0", "::", "") else self.addr
        return f"http://{host}:{self.port}/metrics"

    def _define(self, build: dict[str, str]) -> None:
        base = ("run", "rank")
        r = self.registry

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, (*base, *labels), registry=r)

        info = gauge("build_info", "1, labelled with what runs: package version, strategy, method",
                     "version", "strategy", "method")
        info.labels(self.run, str(self.rank), build.get("version", ""), build.get("strategy", ""),
                    build.get("method", "")).set(1)
        self.samples = Counter(f"{PREFIX}_train_samples", "images trained on by this rank", base, registry=r)
        self.steps = Counter(f"{PREFIX}_train_steps", "optimizer steps taken by this rank", base, registry=r)
        self.step_seconds = Histogram(f"{PREFIX}_step_duration_seconds", "wall time of one training step, data "
                                      "wait included", base, buckets=STEP_BUCKETS, registry=r)
        self.wait_seconds = Histogram(f"{PREFIX}_data_wait_seconds", "time a step waited for its batch", base,
                                      buckets=WAIT_BUCKETS, registry=r)
        self.loss = gauge("loss", "latest training loss by term (total: the one back-propagated)", "term")
        self.lr = gauge("learning_rate", "latest learning rate (first parameter group)")
        self.mfu = gauge("mfu_ratio", "latest model FLOP utilization against the device's stated peak")
        self.memory_sync = gauge("memory_sync_seconds", "latest step's memory hook (proxy/bank update) wall time")
        self.mem_peak = gauge("device_memory_peak_bytes", "peak device memory allocated (CPU: peak resident set)")
        self.epoch = gauge("train_epoch", "epoch being trained (0-based)")
        self.global_step = gauge("train_global_step", "optimizer steps of the run so far (resumes included)")
        self.cluster_seconds = gauge("cluster_duration_seconds", "latest re-clustering's wall time by phase",
                                     "phase")
        self.clusters = gauge("clusters", "clusters found by the latest re-clustering")
        self.outlier_ratio = gauge("cluster_outlier_ratio", "share of training images left out of every cluster")
        self.eval_ratio = {field: gauge(f"eval_{stem}_ratio", f"latest evaluation's {field} (0..1)", "target")
                           for field, stem in EVAL_RATIOS.items()}
        self.eval_seconds = gauge("eval_duration_seconds", "latest evaluation's wall time")
        self.checkpoint_step = gauge("checkpoint_global_step", "global step of the latest checkpoint")

    def _labels(self, metric: Any, **labels: str) -> Any:
        return metric.labels(run=self.run, rank=str(self.rank), **labels)

    def _train(self, r: dict[str, Any]) -> None:
        self._labels(self.steps).inc()
        if "rank_images" in r:
            self._labels(self.samples).inc(r["rank_images"])
        if "sec" in r:
            self._labels(self.step_seconds).observe(r["sec"])
        if "data_wait_s" in r:
            self._labels(self.wait_seconds).observe(r["data_wait_s"])
        for term, value in loss_terms(r).items():
            self._labels(self.loss, term=term).set(value)
        for key, gauge in (("lr", self.lr), ("mfu", self.mfu), ("memory_s", self.memory_sync),
                           ("mem_peak_bytes", self.mem_peak), ("epoch", self.epoch), ("step", self.global_step)):
            if isinstance(r.get(key), (int, float)):
                self._labels(gauge).set(r[key])

    def _cluster(self, r: dict[str, Any]) -> None:
        for phase in ("extract", "cluster"):
            if f"{phase}_s" in r:
                self._labels(self.cluster_seconds, phase=phase).set(r[f"{phase}_s"])
        if "clusters" in r:
            self._labels(self.clusters).set(r["clusters"])
        if r.get("images") and "outliers" in r:  # the ratio needs the clustered set's size
            self._labels(self.outlier_ratio).set(r["outliers"] / r["images"])

    def _eval(self, r: dict[str, Any]) -> None:
        for target, metrics in (r.get("results") or {}).items():
            if not isinstance(metrics, dict):
                continue
            for field, gauge in self.eval_ratio.items():
                if isinstance(metrics.get(field), (int, float)):
                    self._labels(gauge, target=str(target)).set(metrics[field])
        if "seconds" in r:
            self._labels(self.eval_seconds).set(r["seconds"])

    def _position(self, r: dict[str, Any]) -> None:
        if "step" in r:
            self._labels(self.checkpoint_step if r["kind"] == "checkpoint" else self.global_step).set(r["step"])

    def log(self, record: dict[str, Any]) -> None:
        handler: dict[str, Callable[[dict[str, Any]], None]] = {
            "train": self._train, "cluster": self._cluster, "eval": self._eval,
            "checkpoint": self._position, "resume": self._position}
        if record.get("kind") in handler:
            handler[record["kind"]](record)

    def close(self) -> None:
        if self._pusher is not None:
            self._pusher.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


__all__ = ["MetricsPortError", "PrometheusSink", "check_port"]
