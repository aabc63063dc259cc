"""DBSCAN on a sparse eps-graph with exactly scikit-learn's labels (``metric="precomputed"``), sharded by rows.

scikit-learn's ``dbscan_inner`` scans points in ascending index and starts a new cluster at every
unlabelled core point, expanding it depth-first through core points before the next cluster starts.
Hence, with core points = points with at least ``min_samples`` neighbours (self included):

* a cluster is a connected component of core points over eps-edges;
* clusters are numbered in ascending order of their smallest core index;
* a border point (not core, at least one core neighbour) takes the smallest label among its core
  neighbours' clusters — the first cluster whose expansion reaches it;
* everything else is noise (-1).

**Sharded** (:func:`dbscan_sharded`): each rank holds the edges ``(i, j)`` of its own rows ``i``.

1. Every edge is sent to the owner of its other end, so each rank holds the whole adjacency of its
   points: degrees, hence core flags, are local; the core flags of remote neighbours are asked for.
2. Components: each rank joins its own core points over the core-core edges between them
   (``scipy.sparse.csgraph``) and names each piece by its smallest point. The pieces are joined
   across ranks by FastSV (hooking on grandparents plus shortcutting, a
   parallel union-find) on the edges between pieces, until no parent changes on any rank. At that
   fixed point every component is a star whose root is its smallest core point.
3. Roots are numbered in ascending order (a prefix sum of the per-rank root counts), every core point
   takes its root's number, border points the smallest number among their core neighbours, and the
   labels are all-gathered: the same array on every rank, equal to one process's.

With one process there are no edges between ranks and step 2 is one ``connected_components``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from .shard import Shards


def _lookup_unique(sh: Shards, ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[id - owner's lo]`` on the owner of each id (each distinct id asked once)."""
    uniq, inv = np.unique(ids, return_inverse=True)
    return sh.ask(uniq, lambda loc: table[loc])[inv.reshape(-1)]


def _fastsv(sh: Shards, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Parent ``f`` of this rank's points after FastSV over the edges ``(u own, v remote)``.

    The edge set must be symmetric across ranks (``(v, u)`` held by the owner of ``v``). At the fixed
    point ``f`` is the smallest node of each connected component (``f[p] <= p`` always, ``f`` only
    decreases, and a fixed point is a star that is constant along every edge)."""
    lo = sh.lo
    f = np.arange(lo, sh.hi, dtype=np.int64)
    ul = u - lo
    while True:
        mine = (f >= lo) & (f < sh.hi)
        gf = f.copy()
        gf[mine] = f[f[mine] - lo]
        gf[~mine] = _lookup_unique(sh, f[~mine], f)
        gv = _lookup_unique(sh, v, gf)  # grandparents of the remote ends
        fn = np.minimum(f, gf)  # shortcutting
        np.minimum.at(fn, ul, gv)  # aggressive hooking: u to its neighbour's grandparent
        tgt, best = f[ul], gv  # stochastic hooking: u's parent to the neighbour's grandparent
        if len(tgt):  # one (smallest) value per target
            order = np.lexsort((best, tgt))
            tgt, best = tgt[order], best[order]
            first = np.concatenate([[True], tgt[1:] != tgt[:-1]])
            tgt, best = tgt[first], best[first]
        loc, (val,) = sh.send_to_owners(tgt, best)
        np.minimum.at(fn, loc, val)
        changed = sh.sum(int(np.count_nonzero(fn != f)))
        f = fn
        if changed == 0:
            return f


def dbscan_sharded(sh: Shards, i: np.ndarray, j: np.ndarray, min_samples: int) -> np.ndarray:
    """Labels (int64 ``[N]``, -1 noise, the same on every rank) from this rank's eps-pairs ``(i, j)``.

    ``i`` are this rank's rows, ``i <= j``; each unordered pair is held once, by the owner of its
    smaller end; a self pair ``(i, i)`` means the point is its own neighbour (as in sklearn, where it
    counts toward ``min_samples``)."""
    if min_samples < 1:
        raise ValueError(f"dbscan: min_samples={min_samples} must be >= 1")
    i = np.asarray(i, np.int64)
    j = np.asarray(j, np.int64)
    if np.any(i > j):
        raise ValueError("dbscan_edges: expected pairs with i <= j")
    if np.any((i < sh.lo) | (i >= sh.hi)):
        raise ValueError(f"dbscan: pairs (i, j) must have i among this rank's rows [{sh.lo}, {sh.hi})")
    lo, m = sh.lo, sh.rows
    off = i != j
    back_a, (back_b,) = sh.send_to_owners(j[off], i[off])
    a = np.concatenate([i - lo, back_a])  # the whole adjacency of this rank's points (self pairs once)
    b = np.concatenate([j, back_b])
    del back_a, back_b
    core = np.bincount(a, minlength=m) >= min_samples
    core_b = _lookup_unique(sh, b, core)
    cc = core[a] & core_b & (b != a + lo)
    ca, cb = a[cc], b[cc]
    del cc
    here = (cb >= lo) & (cb < sh.hi)
    g = sp.coo_matrix((np.ones(int(here.sum()), np.int8), (ca[here], cb[here] - lo)), shape=(m, m))
    comp = connected_components(g, directed=False)[1] if m else np.empty(0, np.int32)
    del g
    first = np.full(int(comp.max(initial=-1)) + 1, m, np.int64)
    np.minimum.at(first, comp, np.arange(m))
    piece = first[comp] + lo  # each own point's piece, named by its smallest point
    # edges between pieces on different ranks (both directions are present: the adjacency is symmetric)
    cu = piece[ca[~here]]
    cv = _lookup_unique(sh, cb[~here], piece)
    key = np.unique(cu * sh.n + cv)
    cu, cv = key // sh.n, key % sh.n
    del ca, cb, here
    f = _fastsv(sh, cu, cv)
    root = f[piece - lo]  # smallest core point of each own core point's cluster
    is_root = core & (root == np.arange(lo, sh.hi))
    offset = int(sh.gather_counts(int(is_root.sum()))[: sh.rank].sum())
    labels = np.full(m, -1, np.int64)
    labels[is_root] = offset + np.arange(int(is_root.sum()))  # roots ascending = clusters in sklearn's order
    labels[core] = _lookup_unique(sh, root[core], labels)
    # border points: smallest label among core neighbours
    nb = ~core[a] & core_b
    lab = _lookup_unique(sh, b[nb], labels)
    best = np.full(m, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(best, a[nb], lab)
    hit = best != np.iinfo(np.int64).max
    labels[hit] = best[hit]
    return sh.gather_rows(labels)


def dbscan_edges(n: int, i: np.ndarray, j: np.ndarray, min_samples: int) -> np.ndarray:
    """Labels (int64, -1 noise) from the eps-neighbour pairs ``(i, j)`` with ``i <= j`` (one process).

    Each unordered pair appears once; a self pair ``(i, i)`` means the point is its own neighbour
    (as in sklearn, where it counts toward ``min_samples``).
    """
    return dbscan_sharded(Shards(n), i, j, min_samples)


__all__ = ["dbscan_edges", "dbscan_sharded"]
