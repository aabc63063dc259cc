"""A metrics sink writing TensorBoard scalars to ``run_dir/tb`` (rank 0, ``train.tensorboard``).

Tags are grouped so TensorBoard shows one section per concern, every scalar at the run's global step:

- ``loss/total`` and ``loss/<term>`` (the method's terms), ``train/lr``, ``train/epoch``, ``train/<ratio>``
  (batch accuracy)
- ``throughput/img_per_s``, ``throughput/mfu``, ``throughput/step_s``, ``throughput/data_wait_s``,
  ``throughput/data_wait_ratio``
- ``memory/peak_mib``, ``memory/sync_s`` (the method's memory hook)
- ``eval/<target>/<mAP|R1|R5|R10|mINP>`` in %, ``eval/seconds``; ``eval/train_clustering/<field>``
- ``cluster/<clusters|outliers|proxies|ari|nmi|extract_s|cluster_s|outlier_ratio>`` (TMGF's re-clusterings)

and the run's config (``run_dir/config.yaml`` when written, else the loop's) as text under ``config``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer.engine.metrics import RATIO_TERMS, loss_terms, method_terms

FLUSH_S = 10
"""Seconds between flushes: ``tensorboard --logdir`` sees a live run at most this late."""
EVAL_FIELDS = ("mAP", "R1", "R5", "R10", "mINP")
THROUGHPUT = {"img_per_s": "img_per_s", "mfu": "mfu", "sec": "step_s", "data_wait_s": "data_wait_s",
              "data_wait_ratio": "data_wait_ratio"}
"""Train record field → tag under ``throughput/``."""


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Scalars with grouped tags and the config as text; a step for records that carry none (a
    re-clustering at an epoch's start) is the latest step seen."""

    def __init__(self, logdir: str | os.PathLike[str], config_text: str = "") -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self._w = SummaryWriter(str(self.logdir), flush_secs=FLUSH_S)
        self._step = 0
        if config_text:  # indented: TensorBoard renders text as markdown, this keeps it verbatim
            self._w.add_text("config", "\n".join("    " + line for line in config_text.splitlines()), 0)

    def _add(self, tag: str, value: float) -> None:
        self._w.add_scalar(tag, value, self._step)

    def _train(self, r: dict[str, Any]) -> None:
        for term, value in loss_terms(r).items():
            self._add(f"loss/{term}", value)
        for term, value in method_terms(r).items():
            if term in RATIO_TERMS:
                self._add(f"train/{term}", value)
        for key in ("lr", "epoch"):
            if key in r:
                self._add(f"train/{key}", float(r[key]))
        for key, tag in THROUGHPUT.items():
            if isinstance(r.get(key), (int, float)):
                self._add(f"throughput/{tag}", float(r[key]))
        if "mem_peak_bytes" in r:
            self._add("memory/peak_mib", r["mem_peak_bytes"] / 2**20)
        if "memory_s" in r:
            self._add("memory/sync_s", float(r["memory_s"]))

    def _eval(self, r: dict[str, Any]) -> None:
        for target, metrics in (r.get("results") or {}).items():
            if not isinstance(metrics, dict):
                continue
            if any(f in metrics for f in EVAL_FIELDS):
                for f in EVAL_FIELDS:
                    if isinstance(metrics.get(f), (int, float)):
                        self._add(f"eval/{target}/{f}", 100.0 * metrics[f])
            else:  # TMGF's clustering of its training set at this evaluation
                for k, v in _numbers(metrics).items():
                    self._add(f"eval/{target}/{k}", v)
        if "seconds" in r:
            self._add("eval/seconds", float(r["seconds"]))
        self._w.flush()  # an evaluation is what one opens TensorBoard for

    def _cluster(self, r: dict[str, Any]) -> None:
        for k, v in _numbers(r).items():
            if k not in ("epoch", "time"):
                self._add(f"cluster/{k}", v)
        if r.get("images") and "outliers" in r:
            self._add("cluster/outlier_ratio", r["outliers"] / r["images"])

    def log(self, record: dict[str, Any]) -> None:
        if isinstance(record.get("step"), int):
            self._step = record["step"]
        kind = record.get("kind")
        if kind == "train":
            self._train(record)
        elif kind == "eval":
            self._eval(record)
        elif kind == "cluster":
            self._cluster(record)
        elif kind == "checkpoint":  # a stopped run (preemption, max_steps) checkpoints, then returns unclosed
            self._w.flush()

    def close(self) -> None:
        self._w.close()


__all__ = ["TensorBoardSink"]
