"""Pieces both methods share: stores of the configured datasets, transforms, target evaluation.

The datasets are ensured (synthetic ones made) once per run before any method is built
(``trainer.train.run``; the launcher before it submits): here they are only opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer import dist
from trainer.config import Config
from trainer.data.catalogue import SampleIndex
from trainer.data.decoded import open_pipeline_split
from trainer.data.loader import build_inference_loader
from trainer.data.prepare import dataset_dir
from trainer.data.transforms import Pipeline, build_transforms
from trainer.evaluation.extract import extract_features
from trainer.evaluation.rank import evaluate_features


def open_store(cfg: Config, names: list[str], split: str, relabel: bool) -> SampleIndex:
    roots = [dataset_dir(cfg.data, n) for n in names]
    pipeline = cfg.data.pipeline if split == "train" else "per_image"  # data.pipeline makes training batches
    return open_pipeline_split(cfg.data.store, roots, split, relabel=relabel, pipeline=pipeline,
                               size=cfg.data.transform.size)


def transforms(cfg: Config, train: bool) -> Pipeline:
    return build_transforms(cfg.data.transform, train=train)


@dataclass
class Target:
    """Query and gallery of one evaluation dataset."""

    name: str
    query: SampleIndex
    gallery: SampleIndex


def open_targets(cfg: Config) -> list[Target]:
    _, targets = cfg.data.resolved()
    return [Target(n, open_store(cfg, [n], "query", False), open_store(cfg, [n], "gallery", False)) for n in targets]


@torch.no_grad()
def extract(model: nn.Module, store: SampleIndex, transform: Pipeline, batch_size: int, num_workers: int,
            inputs: tuple[str, ...] = ("img",), gather: bool = True) -> torch.Tensor:
    """Features of every sample of ``store`` in index order, on every rank (exact-once sharded).

    The model is called as ``model(*batch[inputs])`` in eval mode (TMGF also takes ``camid``).
    ``gather=False``: this rank's rows ``dist.shard_range(len(store))`` only (no features exchanged)."""
    loader = build_inference_loader(store, transform, batch_size, num_workers)
    return extract_features(model, loader, len(store), dist.info().device, inputs=inputs, gather=gather)


def _record(m: dict[str, Any]) -> dict[str, Any]:
    """The numbers an evaluation record keeps: the usual summary plus the whole CMC curve."""
    cmc = m["cmc"]
    return {"mAP": float(m["mAP"]), "R1": float(cmc[0]), "R5": float(cmc[min(4, len(cmc) - 1)]),
            "R10": float(cmc[min(9, len(cmc) - 1)]), "mINP": float(m["mINP"]),
            "cmc": [float(c) for c in cmc]}


def evaluate_targets(model: nn.Module, targets: list[Target], transform: Pipeline, batch_size: int,
                     num_workers: int, rerank: bool = False, max_rank: int = 50,
                     inputs: tuple[str, ...] = ("img",)) -> dict[str, dict[str, Any]]:
    """mAP / CMC (``cmc``: ``max_rank`` floats) / mINP on each target (Market-1501 protocol).

    Collective; every rank gets the numbers. The work divides by the world size: each rank extracts
    and ranks its share of the queries (``dist.shard_range``) against the whole gallery (the one
    set of features all-gathered) and the per-query results are gathered once: the same numbers as
    one process. Re-ranking needs the whole query × gallery matrix: with ``rerank`` the query
    features are gathered too and every rank ranks every query."""
    out: dict[str, dict[str, Any]] = {}
    sharded = not rerank
    for t in targets:
        qf = extract(model, t.query, transform, batch_size, num_workers, inputs, gather=not sharded)
        gf = extract(model, t.gallery, transform, batch_size, num_workers, inputs)
        m = evaluate_features(qf, gf, t.query.pid, t.gallery.pid, t.query.camid, t.gallery.camid,
                              max_rank=max_rank, rerank=rerank, sharded=sharded)
        out[t.name] = _record(m)
    return out
