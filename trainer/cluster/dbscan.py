"""DBSCAN on a sparse eps-graph with exactly scikit-learn's labels (``metric="precomputed"``).

scikit-learn's ``dbscan_inner`` scans points in ascending index and starts a new cluster at every
unlabelled core point, expanding it depth-first through core points before the next cluster starts.
Hence, with core points = points with at least ``min_samples`` neighbours (self included):

* a cluster is a connected component of core points over eps-edges;
* clusters are numbered in ascending order of their smallest core index;
* a border point (not core, at least one core neighbour) takes the smallest label among its core
  neighbours' clusters — the first cluster whose expansion reaches it;
* everything else is noise (-1).

Connected components via ``scipy.sparse.csgraph`` (a union-find equivalent), so no per-point Python.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components


def dbscan_edges(n: int, i: np.ndarray, j: np.ndarray, min_samples: int) -> np.ndarray:
    """Labels (int64, -1 noise) from the eps-neighbour pairs ``(i, j)`` with ``i <= j``.

    Each unordered pair appears once; a self pair ``(i, i)`` means the point is its own neighbour
    (as in sklearn, where it counts toward ``min_samples``).
    """
    if min_samples < 1:
        raise ValueError(f"dbscan: min_samples={min_samples} must be >= 1")
    i = np.asarray(i, np.int64)
    j = np.asarray(j, np.int64)
    if np.any(i > j):
        raise ValueError("dbscan_edges: expected pairs with i <= j")
    off = i != j
    deg = np.bincount(i, minlength=n) + np.bincount(j[off], minlength=n)
    core = deg >= min_samples
    labels = np.full(n, -1, np.int64)
    core_idx = np.flatnonzero(core)
    if len(core_idx) == 0:
        return labels
    cc = off & core[i] & core[j]
    pos = np.full(n, -1, np.int64)
    pos[core_idx] = np.arange(len(core_idx))
    g = sp.coo_matrix((np.ones(int(cc.sum()), np.int8), (pos[i[cc]], pos[j[cc]])),
                      shape=(len(core_idx), len(core_idx)))
    ncomp, comp = connected_components(g, directed=False)
    first = np.full(ncomp, n, np.int64)
    np.minimum.at(first, comp, core_idx)  # smallest core index of each component
    rank = np.empty(ncomp, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(ncomp)
    labels[core_idx] = rank[comp]
    # border points: smallest label among core neighbours
    a, b = i[off], j[off]
    ab = core[a] & ~core[b]
    ba = core[b] & ~core[a]
    border = np.concatenate([b[ab], a[ba]])
    lab = np.concatenate([labels[a[ab]], labels[b[ba]]])
    best = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(best, border, lab)
    hit = best != np.iinfo(np.int64).max
    labels[hit] = best[hit]
    return labels


__all__ = ["dbscan_edges"]
