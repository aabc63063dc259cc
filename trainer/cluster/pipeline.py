"""Clustering step of TMGF/O2CAP: k-reciprocal Jaccard distance + DBSCAN, exact and O(N k) memory.

``jaccard_dbscan(features, k1, k2, eps, min_samples)`` returns the labels that the official dense
pipeline (``faiss_rerank.compute_jaccard_distance`` + ``sklearn.cluster.DBSCAN(metric="precomputed")``)
gives on the same (snapped) features, numbered like sklearn, without ever building an N x N array:

    k-NN (exact, faiss/torch; or faiss IVF)  ->  k-reciprocal expansion sets  ->  sparse softmax rows V
    ->  query expansion V'  ->  Jaccard only on pairs with shared support, kept if J <= eps
    ->  DBSCAN as core components + sklearn's border rule

``distributed=True`` shards every stage by rows over the ranks (``dist.shard_range``): a rank computes
and keeps the k-NN lists, expansion sets, V rows, V' rows and eps-edges of its own points only, and
asks other ranks for the few rows or answers a stage needs (``shard.py``, ``jaccard.py``); the DBSCAN
merges the per-rank edge sets (``dbscan.py``). Work and memory per rank fall with W; the labels are the
single-process ones bit for bit, on every rank. Every rank passes the full feature matrix (the k-NN
database and the similarities of V are over all points). docs/clustering.md explains the stages.

``eps`` must satisfy ``0 < eps`` and ``float32(eps) < 1``: at ``J = 1`` every pair without shared
support would be a neighbour, which only a dense N x N method can represent. ``eps`` is used as a
Python float, so ``J <= eps`` compares in float32 exactly like sklearn's ``D <= eps`` on the float32
matrix (a ``np.float64`` eps would make sklearn compare in float64: ``float32(0.6) <= 0.6`` flips).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch

from trainer import dist
from trainer.cluster.dbscan import dbscan_sharded
from trainer.cluster.jaccard import (
    column_table,
    encode,
    expansion_sets_sharded,
    jaccard_pairs_sharded,
    query_expansion_sharded,
)
from trainer.cluster.knn import (
    Backend,
    Precision,
    exact_knn,
    knn_recall,
    recall_warning,
    search_knn,
    snap_features,
)
from trainer.cluster.shard import Shards

log = logging.getLogger(__name__)

KnnIndex = Literal["flat", "ivf"]
KNN_BLOCK = 2048
"""Side of the exact k-NN's GEMM blocks at W = 1 (``knn.exact_knn``'s default)."""


def _check(n: int, k1: int, k2: int, eps: float, min_samples: int) -> None:
    if not (isinstance(k1, (int, np.integer)) and 1 <= k1 <= n):
        raise ValueError(f"jaccard_dbscan: k1={k1} must be an integer in [1, N={n}]")
    if not (isinstance(k2, (int, np.integer)) and 1 <= k2 <= k1):
        raise ValueError(f"jaccard_dbscan: k2={k2} must be an integer in [1, k1={k1}]")
    if not (eps > 0 and np.float32(eps) < 1):
        raise ValueError(f"jaccard_dbscan: eps={eps} must be > 0 and < 1 (pairs without shared support have J = 1)")
    if not (isinstance(min_samples, (int, np.integer)) and min_samples >= 1):
        raise ValueError(f"jaccard_dbscan: min_samples={min_samples} must be an integer >= 1")


def snapped(features: np.ndarray | torch.Tensor, cells: int = 1 << 20) -> np.ndarray:
    """The snapped float32 features (``knn.snap_features``), chunk by chunk; the input itself, not a copy,
    when it already is snapped float32 (snapping is idempotent).

    ``snap_features``' grid depends only on ``max |x|`` and ``d``, so a chunk snapped together with one
    row holding the global ``max |x|`` lies on the grid of the whole matrix: the only full-size array is
    the float32 result (``snap_features`` on the whole matrix would add two float64 N x d temporaries),
    and a caller that keeps its features snapped saves the clustering even that copy on every rank."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features)
    if x.ndim != 2 or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
        return snap_features(x)  # its errors and conversions
    chunk = max(1, cells // x.shape[1])
    parts = range(0, len(x), chunk)
    amax = max(float(np.abs(x[a : a + chunk]).max()) for a in parts)
    if not math.isfinite(amax) or amax == 0.0:
        return snap_features(x)
    probe = np.zeros((1, x.shape[1]), x.dtype)
    probe[0, 0] = amax

    def snap(a: int) -> np.ndarray:
        return snap_features(np.concatenate([x[a : a + chunk], probe]))[:-1]

    if x.dtype == np.float32 and x.flags.c_contiguous and all(np.array_equal(snap(a), x[a : a + chunk]) for a in parts):
        return x
    out = np.empty(x.shape, np.float32)
    for a in parts:
        out[a : a + chunk] = snap(a)
    return out


def _mean(sh: Shards, value: float, weight: int) -> float:
    """Mean of a per-rank value weighted by ``weight``, over the ranks."""
    if not sh.group:
        return float(value)
    t = torch.tensor([value * weight, float(weight)], dtype=torch.float64, device=dist.comm_device())
    dist.all_reduce(t)
    return float(t[0] / max(t[1].item(), 1.0))


def _recall(x: np.ndarray, r: np.ndarray, sh: Shards, k1: int, sample: int,
            device: torch.device | str | None) -> float:
    """Recall@k1 of this rank's lists ``r`` against exact search, on about ``sample`` queries over all ranks."""
    own = min(sh.rows, -(-sample // sh.world))
    value = knn_recall(x, r, (sh.lo, sh.hi), k1, sample=own, seed=sh.rank, device=device) if own else 0.0
    return _mean(sh, value, own)


def jaccard_dbscan(features: np.ndarray | torch.Tensor, k1: int = 20, k2: int = 6, eps: float = 0.5,
                   min_samples: int = 4, *, distributed: bool = False, knn_backend: Backend = "auto",
                   device: torch.device | str | None = None, knn_index: KnnIndex = "flat", nprobe: int = 16,
                   knn_precision: Precision = "auto",
                   recall_sample: int = 1000, recall_floor: float | None = None,
                   stats: dict[str, Any] | None = None) -> np.ndarray:
    """DBSCAN labels (int64 [N], -1 = outlier) on the k-reciprocal Jaccard distance of ``features``.

    Args:
        features: (N, d) features (every rank passes the same full matrix when ``distributed``).
            Snapped float32 features (``knn.snap_features``) are used without a copy.
        k1, k2: k-reciprocal and query-expansion sizes (TMGF: 20, 6).
        eps, min_samples: DBSCAN parameters (TMGF: 0.5, 4); a neighbour means ``J <= eps``, self counts.
        distributed: shard every stage over the initialized process group (same labels on every rank).
        knn_backend: ``"torch"`` (blocked GEMM on CUDA or CPU), ``"faiss"`` or ``"auto"``.
        device: k-NN device (default: CUDA when available).
        knn_index: ``"flat"`` (exact search, the default) or ``"ivf"`` (faiss IVF: approximate; its
            recall@k1 against exact search on ``recall_sample`` queries is logged and put in ``stats``).
        nprobe: IVF lists visited per query (more: higher recall, slower).
        knn_precision: exact search's candidate pass, ``"fp32"``, ``"bf16"`` (re-scored: the same lists)
            or ``"auto"`` (``knn.exact_knn``); IVF takes ``"auto"`` or ``"fp32"``.
        recall_sample: queries (over all ranks) on which the IVF recall is measured.
        recall_floor: with IVF, a recall below it is logged as a one-line warning naming the fix.
        stats: if given, filled with per-stage seconds, sizes (summed over ranks), this rank's bytes
            sent and, with IVF, ``recall``.
    """
    tick = time.perf_counter()
    times: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        times[name] = now - tick
        tick = now

    if knn_index not in ("flat", "ivf"):
        raise ValueError(f"jaccard_dbscan: knn_index={knn_index!r}: expected 'flat' or 'ivf'")
    x = snapped(features)
    n = x.shape[0]
    _check(n, k1, k2, eps, min_samples)
    eps = float(eps)
    sh = Shards(n, distributed)
    block = sh.round_size()
    lap("snap")
    knn_stats: dict[str, Any] = {}
    if knn_index == "flat":
        # GEMM blocks of side 2048 / W: a block and its score temporaries (~8 block-sized buffers) are the
        # k-NN's largest transient; at 1/W^2 they stay below the shard's own rows as W grows, where a 1/W
        # fall would leave them the bulk of a rank's memory (W = 4: 21 vs 37 MiB at N = 32,621)
        block_knn = max(256, KNN_BLOCK // sh.world)
        r = exact_knn(x, k1, rows=(sh.lo, sh.hi), backend=knn_backend, device=device, block=block_knn,
                      precision=knn_precision, stats=knn_stats)
    else:
        r = search_knn(x, k1, rows=(sh.lo, sh.hi), index=knn_index, nprobe=nprobe, backend=knn_backend,
                       device=device, distributed=sh.group, stats=knn_stats, precision=knn_precision)
    recall = None
    if knn_index == "ivf":
        lap("knn")
        recall = _recall(x, r, sh, k1, recall_sample, device)
        log.info("clustering: IVF k-NN recall@%d = %.4f against exact search on %d queries (nprobe=%d)",
                 k1, recall, min(n, recall_sample), nprobe)
        warning = recall_warning(recall, recall_floor, k1, nprobe) if recall_floor is not None else None
        if warning is not None:
            log.warning(warning)
    r = np.ascontiguousarray(r, dtype=np.int32 if n < 2**31 - 1 else np.int64)
    lap("recall" if knn_index == "ivf" else "knn")
    indptr, indices = expansion_sets_sharded(sh, r, k1, block)
    lap("expansion")
    data = encode(x, indptr, indices, row0=sh.lo, chunk=block)
    v = sp.csr_matrix((data, indices, indptr), shape=(sh.rows, n))
    del data, indices, indptr
    v.eliminate_zeros()
    nnz_v = v.nnz
    lap("encode")
    vq = query_expansion_sharded(sh, v, r, k2, block)
    del v, r
    lap("query_expansion")
    table = column_table(sh, vq, sh.lo, block)
    ei, ej, _ = jaccard_pairs_sharded(sh, vq, sh.lo, table, eps, block)
    nnz_vq = vq.nnz
    del table, vq
    lap("jaccard")
    labels = dbscan_sharded(sh, ei, ej, min_samples)
    lap("dbscan")
    if stats is not None:
        stats.update(times=times, nnz_v=sh.sum(nnz_v), nnz_vq=sh.sum(nnz_vq), edges=sh.sum(len(ei)),
                     bytes_sent=sh.bytes_sent, rows=sh.rows, knn=knn_stats)
        if recall is not None:
            stats["recall"] = recall
    return labels
