"""Evaluation: exact-once distributed feature extraction, exact Market-1501 ranking, re-ranking.

* :func:`extract` / :func:`extract_features` — every rank embeds its disjoint slice, the
  ``(index, feature)`` pairs are all-gathered and placed by index (checked exact-once);
  ``gather=False`` keeps each rank's own rows (only the indices are exchanged).
* :func:`evaluate` — mAP / CMC / mINP from a distance matrix (numpy or torch).
* :func:`evaluate_features` — the same from features, ranked in query blocks on CUDA when
  available: never a dense ``q × g`` matrix (MSMT17: 3.8 GB in fp32). ``sharded=True``: each rank
  ranks its share of the queries (:func:`query_rows`), the per-query results are gathered once.
* :func:`rank_queries` / :func:`summarize` — the per-rank work and the metrics from its results.
* :func:`re_ranking` — k-reciprocal re-ranking (dense; moderate sizes).
"""

from __future__ import annotations

from .extract import extract, extract_features
from .rank import (
    QueryResults,
    evaluate,
    evaluate_features,
    pairwise_distance,
    query_rows,
    rank_distances,
    rank_queries,
    summarize,
)
from .rerank import re_ranking

__all__ = ["extract", "extract_features", "evaluate", "evaluate_features", "pairwise_distance", "re_ranking",
           "QueryResults", "query_rows", "rank_distances", "rank_queries", "summarize"]
