"""Dense restatement of the official TMGF/ClusterContrast clustering step (tests and benchmark only).

A line-by-line numpy port of ``faiss_rerank.compute_jaccard_distance`` (k1, k2) followed by
``sklearn.cluster.DBSCAN(eps, min_samples, metric="precomputed")``: dense N x N float32 ``V``,
``V_qe`` and Jaccard matrices, the official loops, the official dtypes. Two choices make it a
*definition* the scalable path can match bit for bit (documented in ``knn.py``/``jaccard.py``):

* features are snapped (:func:`trainer.cluster.knn.snap_features`), so the k-NN search and every
  similarity are exact (float64) and ties go to the lower index — the official faiss float32 search
  is exact only up to its own rounding noise;
* the softmax of a V row is computed in float64 with a left-to-right sum, then cast to float32
  (the official code uses torch's float32 softmax, whose internal summation order is unspecified).

Memory is O(N^2) (three dense float32 matrices): never call it on large N outside the benchmark.
"""

from __future__ import annotations

import numpy as np

from .knn import snap_features


def reference_knn(x64: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Exact k-NN by squared L2 from dense distance rows (ties: lower index first)."""
    n = x64.shape[0]
    norms = np.einsum("nd,nd->n", x64, x64)
    out = np.empty((n, k), np.int64)
    for s in range(0, n, chunk):
        d = norms[s : s + chunk, None] + norms[None, :] - 2.0 * (x64[s : s + chunk] @ x64.T)
        kth = np.partition(d, k - 1, axis=1)[:, k - 1]
        for t in range(d.shape[0]):
            cand = np.flatnonzero(d[t] <= kth[t])  # ascending index: a stable sort breaks ties by index
            out[s + t] = cand[np.argsort(d[t, cand], kind="stable")[:k]]
    return out


def _k_reciprocal_neigh(initial_rank: np.ndarray, i: int, k1: int) -> np.ndarray:
    forward_k_neigh_index = initial_rank[i, : k1 + 1]
    backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
    fi = np.where(backward_k_neigh_index == i)[0]
    return forward_k_neigh_index[fi]


def reference_jaccard(features: np.ndarray, k1: int = 20, k2: int = 6) -> np.ndarray:
    """Dense N x N float32 Jaccard distance, the official algorithm on snapped features."""
    x = snap_features(features)
    x64 = x.astype(np.float64)
    n = x.shape[0]
    initial_rank = reference_knn(x64, k1)

    nn_k1 = [_k_reciprocal_neigh(initial_rank, i, k1) for i in range(n)]
    nn_k1_half = [_k_reciprocal_neigh(initial_rank, i, int(np.around(k1 / 2))) for i in range(n)]

    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        k_reciprocal_index = nn_k1[i]
        k_reciprocal_expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_k_reciprocal_index = nn_k1_half[candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2 / 3 * len(
                candidate_k_reciprocal_index
            ):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        if len(k_reciprocal_expansion_index) == 0:
            continue
        sims = x64[k_reciprocal_expansion_index] @ x64[i]  # exact (snapped features)
        dist = 2.0 - 2.0 * sims
        z = -dist
        e = np.exp(z - z.max())
        v[i, k_reciprocal_expansion_index] = (e / np.cumsum(e)[-1]).astype(np.float32)

    if k2 != 1:
        v_qe = np.zeros_like(v, dtype=np.float32)
        for i in range(n):
            v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
        del v_qe

    inv_index = [np.where(v[:, i] != 0)[0] for i in range(n)]

    jaccard_dist = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        temp_min = np.zeros((1, n), dtype=np.float32)
        ind_non_zero = np.where(v[i, :] != 0)[0]
        ind_images = [inv_index[ind] for ind in ind_non_zero]
        for j in range(len(ind_non_zero)):
            temp_min[0, ind_images[j]] = temp_min[0, ind_images[j]] + np.minimum(
                v[i, ind_non_zero[j]], v[ind_images[j], ind_non_zero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    del inv_index, v
    jaccard_dist[jaccard_dist < 0] = 0.0
    return jaccard_dist


def reference_jaccard_dbscan(features: np.ndarray, k1: int = 20, k2: int = 6, eps: float = 0.5,
                             min_samples: int = 4) -> np.ndarray:
    """Official labels: sklearn DBSCAN on the dense Jaccard matrix."""
    from sklearn.cluster import DBSCAN

    jac = reference_jaccard(features, k1, k2)
    dbscan = DBSCAN(eps=float(eps), min_samples=min_samples, metric="precomputed", n_jobs=-1)
    return dbscan.fit_predict(jac).astype(np.int64)


__all__ = ["reference_knn", "reference_jaccard", "reference_jaccard_dbscan"]
