"""Sparse k-reciprocal Jaccard distance (ClusterContrast/TMGF ``compute_jaccard_distance``), O(N k) memory.

Every step reproduces the official dense code value for value (``reference.py`` is the dense
restatement the tests compare against):

1. ``S_i = Rk(i, k1)`` and ``H_i = Rk(i, round(k1/2))`` from the first ``min(k+1, k1)`` columns of the
   k-NN list (self is one of the k1 columns).
2. ``E_i = unique(S_i + H_c for c in S_i if |H_c & S_i| > 2/3 |H_c|)``.
3. ``V[i, E_i] = float32(softmax(-(2 - 2 <x_i, x_j>)))`` computed in float64 with a left-to-right sum
   (the similarities are exact, see ``knn.py``).
4. Query expansion: ``V'[i] = float32 mean of V[R[i, :k2]]``, summed in k-NN order in float32 like
   ``np.mean(axis=0)``.
5. ``m_ij = sum over shared columns c, ascending, of min(V'_ic, V'_jc)`` accumulated in float32 and
   ``J_ij = 1 - m/(2 - m)`` in float32 — the official loop's exact arithmetic, so the values are
   bit-identical. Only pairs with shared support are visited; every other pair has ``J = 1``.

Only the pairs with ``J <= eps`` are returned (DBSCAN needs nothing else), as ``i <= j`` edges; ``m`` is
symmetric bit for bit because both orders add the same terms in the same column order.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .knn import exact_dots


def _reciprocal(r: np.ndarray, cols: int, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Mask ``(len(rows), cols)``: is ``R[i, t]`` k-reciprocal, i.e. ``i in R[R[i, t], :cols]``."""
    m = np.ascontiguousarray(r[:, :cols], dtype=np.int32)  # int32 halves the memory traffic
    out = np.empty((len(rows), cols), bool)
    for s in range(0, len(rows), chunk):
        i = rows[s : s + chunk].astype(np.int32)
        hits = (m[m[i]] == i[:, None, None]).view(np.uint8)  # i occurs at most once per list
        out[s : s + chunk] = hits.sum(-1, dtype=np.uint8) > 0
    return out


def expansion_sets(r: np.ndarray, k1: int, rows: tuple[int, int] | None = None,
                   chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """CSR pattern ``(indptr, indices)`` of the expansion sets ``E_i`` for rows ``[start, stop)``.

    ``r`` is the full ``(N, k1)`` k-NN list (sorted, as :func:`trainer.cluster.knn.exact_knn` returns it).
    """
    n, kcols = r.shape
    if kcols != k1:
        raise ValueError(f"expansion_sets: k-NN list has {kcols} columns, expected k1={k1}")
    q0, q1 = rows if rows is not None else (0, n)
    cs = min(k1 + 1, k1)  # the official slice R[i, :k1+1] on a k1-column array
    ch = min(int(np.around(k1 / 2)) + 1, k1)
    all_rows = np.arange(n)
    # H is needed for every candidate c, which can be any point
    r = np.ascontiguousarray(r, dtype=np.int32)  # ids < 2**31; int32 halves the memory traffic
    h_mask = _reciprocal(r, ch, all_rows)
    h_ids = np.where(h_mask, r[:, :ch], np.int32(-1))
    h_len = h_mask.sum(1)
    keys = []
    for s in range(q0, q1, chunk):
        i = np.arange(s, min(q1, s + chunk))
        s_mask = _reciprocal(r, cs, i)
        s_ids = np.where(s_mask, r[i, :cs], np.int32(-2))  # -2 never matches an H pad (-1)
        cand = r[i, :cs]
        hc = h_ids[cand]  # (b, cs, ch)
        # |H_c & S_i|: both sets hold distinct ids, so counting equal pairs counts the intersection
        eq = (hc[..., None] == s_ids[:, None, None, :]).view(np.uint8)
        cnt = eq.reshape(len(i), cs, -1).sum(-1, dtype=np.int32)
        accept = s_mask & (cnt > 2 / 3 * h_len[cand])
        ids = np.concatenate([s_ids.reshape(len(i), -1), np.where(accept[..., None], hc, -1).reshape(len(i), -1)], 1)
        valid = ids >= 0
        keys.append(np.repeat(i.astype(np.int64), valid.sum(1)) * n + ids[valid].astype(np.int64))
    key = np.sort(np.concatenate(keys)) if keys else np.empty(0, np.int64)
    if len(key):  # unique by sorting: np.unique's hash path is many times slower on int64 keys
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    row = key // n
    indices = key - row * n
    indptr = np.zeros(q1 - q0 + 1, np.int64)
    np.cumsum(np.bincount(row - q0, minlength=q1 - q0), out=indptr[1:])
    return indptr, indices


def encode(x: np.ndarray, indptr: np.ndarray, indices: np.ndarray, row0: int = 0,
           chunk: int = 4096) -> np.ndarray:
    """Float32 softmax weights ``V[i, E_i]`` (row ``i = row0 + local``), aligned with ``indices``.

    ``x`` are the snapped features: the similarities are exact (see ``knn.py``)."""
    nrow = len(indptr) - 1
    lens = np.diff(indptr)
    rows = np.repeat(np.arange(row0, row0 + nrow), lens)
    sims = exact_dots(x, rows, indices)
    z_flat = -(2.0 - 2.0 * sims)
    data = np.empty(len(indices), np.float32)
    for s in range(0, nrow, chunk):
        e = min(nrow, s + chunk)
        lo, hi = indptr[s], indptr[e]
        width = int(lens[s:e].max()) if e > s and hi > lo else 0
        if width == 0:
            continue
        loc = np.repeat(np.arange(e - s), lens[s:e])
        pos = np.arange(hi - lo) - (indptr[s:e] - lo)[loc]
        z = np.full((e - s, width), -np.inf)
        z[loc, pos] = z_flat[lo:hi]
        zmax = z.max(1, keepdims=True)
        zmax[~np.isfinite(zmax)] = 0.0
        ex = np.exp(z - zmax)  # padding gives exp(-inf) = 0 at the end of a row
        tot = np.cumsum(ex, axis=1)[:, -1:]  # left-to-right, like the reference's cumsum
        w = (ex / np.where(tot > 0, tot, 1.0)).astype(np.float32)
        data[lo:hi] = w[loc, pos]
    return data


def query_expansion(v: sp.csr_matrix, r: np.ndarray, k2: int, rows: tuple[int, int] | None = None) -> sp.csr_matrix:
    """``V'[i] = mean(V[R[i, :k2]])`` in float32 for rows ``[start, stop)`` (k2 = 1: V unchanged)."""
    n = v.shape[0]
    q0, q1 = rows if rows is not None else (0, n)
    if k2 == 1:
        out = v[q0:q1].astype(np.float32)
    else:
        acc = v[r[q0:q1, 0]]
        acc.sort_indices()
        for t in range(1, k2):  # left to right in k-NN order: float32 (((v0 + v1) + v2) + ...)
            part = v[r[q0:q1, t]]
            part.sort_indices()
            acc = acc + part
        out = acc.tocsr()
        out.data = (out.data / np.float32(k2)).astype(np.float32)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def jaccard_edges(vq: sp.csr_matrix, eps: float, rows: tuple[int, int] | None = None,
                  budget: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i <= j``, ``i`` in ``[start, stop)``, with ``J_ij <= eps`` (self pairs included)."""
    i, j, _ = jaccard_pairs(vq, eps, rows, budget)
    return i, j


def jaccard_pairs(vq: sp.csr_matrix, eps: float | None = None, rows: tuple[int, int] | None = None,
                  budget: int = 1 << 22, max_triples: int = 1 << 19) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, J_ij)`` for ``i <= j``, ``i`` in ``[start, stop)``, with shared support (and ``J <= eps``).

    Without ``eps`` every pair with shared support is returned (tests compare them with the dense
    reference); all other pairs have ``J = 1`` exactly.

    ``vq`` is the full query-expanded V' (N x N CSR, sorted indices). Rows are processed in blocks
    whose dense float32 accumulator (block x N, the official ``temp_min``) has at most ``budget``
    entries and whose triples ``(i, c, j)`` number about ``max_triples``; triples are added with
    ``np.add.at``, which adds in array order: for each pair the shared columns arrive in ascending
    order, as in the official loop. ``J`` is non-increasing in ``m`` (every float32 step is monotone),
    so only pairs with ``m`` just below the exact threshold ``2(1 - eps)/(2 - eps)`` or above are
    evaluated with the float32 formula.
    """
    n = vq.shape[0]
    q0, q1 = rows if rows is not None else (0, n)
    csc = vq.tocsc()
    csc.sort_indices()
    c_ptr, c_idx, c_val = csc.indptr, csc.indices.astype(np.int64), csc.data
    r_ptr, r_idx, r_val = vq.indptr, vq.indices, vq.data
    # position of each CSR entry (i, c) inside column c of the CSC: the suffix after it holds j >= i
    nnz = len(r_idx)
    r_row = np.repeat(np.arange(n, dtype=np.int64), np.diff(r_ptr))
    order = np.lexsort((r_row, r_idx))  # CSR entries sorted by (column, row) = CSC order
    csc_pos = np.empty(nnz, np.int64)
    csc_pos[order] = np.arange(nnz)
    del order
    suffix = c_ptr[r_idx.astype(np.int64) + 1] - csc_pos  # triples of each CSR entry
    row_tri = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(r_row, weights=suffix, minlength=n).astype(np.int64), out=row_tri[1:])
    max_rows = max(1, budget // max(n, 1))
    m_lo = -1.0 if eps is None else 2 * (1 - eps) / (2 - eps) * (1 - 1e-4)
    acc = np.zeros(min(q1 - q0, max_rows) * n, np.float32)
    last = np.full(len(acc), -1, np.int32)
    out_i, out_j, out_v = [], [], []
    b0 = q0
    while b0 < q1:
        # rows [b0, b1): at most max_rows, about max_triples triples (at least one row)
        b1 = int(np.searchsorted(row_tri, row_tri[b0] + max_triples, side="right")) - 1
        b1 = min(q1, b0 + max_rows, max(b1, b0 + 1))
        lo, hi = r_ptr[b0], r_ptr[b1]
        lens = suffix[lo:hi]
        tot = int(row_tri[b1] - row_tri[b0])
        if tot == 0:
            b0 = b1
            continue
        starts = np.cumsum(lens) - lens
        pos = np.arange(tot) + np.repeat(csc_pos[lo:hi] - starts, lens)
        key = np.repeat((r_row[lo:hi] - b0) * n, lens) + c_idx[pos]
        val = np.minimum(np.repeat(r_val[lo:hi], lens), c_val[pos])
        del pos
        np.add.at(acc, key, val)
        m = acc[key]
        acc[key] = 0
        cand = np.flatnonzero(m >= m_lo).astype(np.int32)
        kc = key[cand]
        np.maximum.at(last, kc, cand)  # one triple per pair: its last one
        pick = cand[last[kc] == cand]
        last[kc] = -1
        mp = m[pick]
        jac = 1 - mp / (2 - mp)  # float32, as the official ``1 - temp_min / (2 - temp_min)``
        jac[jac < 0] = 0
        if eps is not None:
            keep = jac <= eps
            pick, jac = pick[keep], jac[keep]
        kp = key[pick]
        out_i.append(kp // n + b0)
        out_j.append(kp % n)
        out_v.append(jac)
        b0 = b1
    if not out_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_v)


__all__ = ["expansion_sets", "encode", "query_expansion", "jaccard_edges", "jaccard_pairs"]
