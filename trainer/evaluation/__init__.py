"""Evaluation: exact-once distributed feature extraction, exact Market-1501 ranking, re-ranking.

* :func:`extract` / :func:`extract_features` — every rank embeds its disjoint slice, the
  ``(index, feature)`` pairs are all-gathered and placed by index (checked exact-once).
* :func:`evaluate` — mAP / CMC / mINP from a distance matrix (numpy or torch).
* :func:`evaluate_features` — the same from features, ranked in query blocks on CUDA when
  available: never a dense ``q × g`` matrix (MSMT17: 3.8 GB in fp32).
* :func:`re_ranking` — k-reciprocal re-ranking (dense; moderate sizes).
"""

from __future__ import annotations

from .extract import extract, extract_features
from .rank import evaluate, evaluate_features, pairwise_distance
from .rerank import re_ranking

__all__ = ["extract", "extract_features", "evaluate", "evaluate_features", "pairwise_distance", "re_ranking"]
