"""Clustering step of TMGF/O2CAP: k-reciprocal Jaccard distance + DBSCAN, exact and O(N k) memory.

``jaccard_dbscan(features, k1, k2, eps, min_samples)`` returns the labels that the official dense
pipeline (``faiss_rerank.compute_jaccard_distance`` + ``sklearn.cluster.DBSCAN(metric="precomputed")``)
gives on the same (snapped) features, numbered like sklearn, without ever building an N x N array:

    k-NN (exact, faiss/torch)  ->  k-reciprocal expansion sets  ->  sparse softmax rows V
    ->  query expansion V'  ->  Jaccard only on pairs with shared support, kept if J <= eps
    ->  DBSCAN as core components + sklearn's border rule

``distributed=True`` shards the query rows over the ranks (``dist.shard_range``): k-NN lists,
V rows, V' rows and eps-edges are computed where they are owned and all-gathered (all small), every
rank then runs the same DBSCAN, and rank 0's labels are broadcast. Every rank must pass the full
feature matrix; the result equals the single-process one bit for bit.

``eps`` must satisfy ``0 < eps`` and ``float32(eps) < 1``: at ``J = 1`` every pair without shared
support would be a neighbour, which only a dense N x N method can represent. ``eps`` is used as a
Python float, so ``J <= eps`` compares in float32 exactly like sklearn's ``D <= eps`` on the float32
matrix (a ``np.float64`` eps would make sklearn compare in float64: ``float32(0.6) <= 0.6`` flips).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from trainer import dist
from trainer.cluster.dbscan import dbscan_edges
from trainer.cluster.jaccard import encode, expansion_sets, jaccard_edges, query_expansion
from trainer.cluster.knn import Backend, exact_knn, snap_features


def _check(n: int, k1: int, k2: int, eps: float, min_samples: int) -> None:
    if not (isinstance(k1, (int, np.integer)) and 1 <= k1 <= n):
        raise ValueError(f"jaccard_dbscan: k1={k1} must be an integer in [1, N={n}]")
    if not (isinstance(k2, (int, np.integer)) and 1 <= k2 <= k1):
        raise ValueError(f"jaccard_dbscan: k2={k2} must be an integer in [1, k1={k1}]")
    if not (eps > 0 and np.float32(eps) < 1):
        raise ValueError(f"jaccard_dbscan: eps={eps} must be > 0 and < 1 (pairs without shared support have J = 1)")
    if not (isinstance(min_samples, (int, np.integer)) and min_samples >= 1):
        raise ValueError(f"jaccard_dbscan: min_samples={min_samples} must be an integer >= 1")


def _gather_rows(x: np.ndarray) -> np.ndarray:
    """All-gather a row block (rank order = shard order), exact bits."""
    if not dist.is_initialized():
        return x
    t = torch.from_numpy(np.ascontiguousarray(x)).to(dist.comm_device())
    return dist.all_gather_variable(t).cpu().numpy()


def _gather_csr(local: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """All-gather the row blocks of a CSR matrix into the full ``n x n`` matrix."""
    if not dist.is_initialized():
        return local
    lens = _gather_rows(np.diff(local.indptr).astype(np.int64))
    indices = _gather_rows(local.indices.astype(np.int64))
    data = _gather_rows(local.data.astype(np.float32))
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    return sp.csr_matrix((data, indices, indptr), shape=(n, n))


def jaccard_dbscan(features: np.ndarray | torch.Tensor, k1: int = 20, k2: int = 6, eps: float = 0.5,
                   min_samples: int = 4, *, distributed: bool = False, knn_backend: Backend = "auto",
                   device: torch.device | str | None = None, stats: dict[str, Any] | None = None) -> np.ndarray:
    """DBSCAN labels (int64 [N], -1 = outlier) on the k-reciprocal Jaccard distance of ``features``.

    Args:
        features: (N, d) features (every rank passes the same full matrix when ``distributed``).
        k1, k2: k-reciprocal and query-expansion sizes (TMGF: 20, 6).
        eps, min_samples: DBSCAN parameters (TMGF: 0.5, 4); a neighbour means ``J <= eps``, self counts.
        distributed: shard the work over the initialized process group (same labels on every rank).
        knn_backend: ``"torch"`` (blocked GEMM on CUDA or CPU), ``"faiss"`` or ``"auto"`` (= torch).
        device: k-NN device (default: CUDA when available).
        stats: if given, filled with per-stage seconds and sizes.
    """
    tick = time.perf_counter()
    times: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        times[name] = now - tick
        tick = now

    x = snap_features(features)
    n = x.shape[0]
    _check(n, k1, k2, eps, min_samples)
    eps = float(eps)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    q0, q1 = dist.shard_range(n, rank, world)
    lap("snap")
    r_local = exact_knn(x, k1, rows=(q0, q1), backend=knn_backend, device=device)
    r = _gather_rows(r_local) if distributed else r_local
    lap("knn")
    indptr, indices = expansion_sets(r, k1, rows=(q0, q1))
    lap("expansion")
    data = encode(x, indptr, indices, row0=q0)
    v_local = sp.csr_matrix((data, indices, indptr), shape=(q1 - q0, n))
    v_local.eliminate_zeros()
    v = _gather_csr(v_local, n) if distributed else v_local
    lap("encode")
    vq_local = query_expansion(v, r, k2, rows=(q0, q1))
    vq = _gather_csr(vq_local, n) if distributed else vq_local
    lap("query_expansion")
    ei, ej = jaccard_edges(vq, eps, rows=(q0, q1))
    if distributed:
        ei, ej = _gather_rows(ei), _gather_rows(ej)
    lap("jaccard")
    labels = dbscan_edges(n, ei, ej, min_samples)
    if distributed and dist.is_initialized():
        t = torch.from_numpy(labels).to(dist.comm_device())
        labels = dist.broadcast(t, src=0).cpu().numpy()
    lap("dbscan")
    if stats is not None:
        stats.update(times=times, nnz_v=int(v.nnz), nnz_vq=int(vq.nnz), edges=int(len(ei)))
    return labels

