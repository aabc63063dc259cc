"""Sparse k-reciprocal Jaccard distance (ClusterContrast/TMGF ``compute_jaccard_distance``), O(N k) memory,
sharded by rows over the ranks.

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

**Sharding** (``shard.Shards``; docs/clustering.md walks through it). Each rank holds the k-NN rows,
V rows and V' rows of its own points and asks other ranks only for what a row needs, in rounds of a
fraction of its rows (so a round's transient arrays shrink with W too):

* reciprocity: "is ``i`` in the k-NN list of ``c``, and where" is answered by the owner of ``c``
  (:func:`knn_positions`), so no k-NN row travels; each rank then knows ``S_i`` and ``H_i`` of its rows;
* expansion: the ``H_c`` rows (at most ``round(k1/2)+1`` ids) of the candidates ``c in S_i``;
* query expansion: the V rows of ``R[i, :k2]``;
* Jaccard: V' is transposed once to its column owners (an inverted index sharded by column,
  :func:`column_table`); a row asks for the columns of its support, only their entries ``j >= i``.

The functions without a ``Shards`` argument (``expansion_sets``, ``query_expansion``, ``jaccard_pairs``,
``jaccard_edges``) are the same code on one process, for whole matrices.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .knn import exact_dots
from .shard import Shards


def _ids_dtype(n: int) -> type[np.signedinteger]:
    return np.int32 if n < 2**31 - 1 else np.int64  # int32 ids halve the memory traffic


def _position(table: np.ndarray, who: np.ndarray) -> np.ndarray:
    """Position of ``who[p]`` in the list ``table[p]`` (``table.shape[1]`` if absent; ids are unique per list)."""
    if len(who) == 0:
        return np.empty(0, np.int32)
    eq = table == who[:, None].astype(table.dtype)
    return np.where(eq.any(1), eq.argmax(1), table.shape[1]).astype(np.int32)


def knn_positions(sh: Shards, r: np.ndarray, block: int) -> np.ndarray:
    """``pos[i, t]`` = position of ``i`` in the k-NN list of ``R[i, t]`` (``k1`` if absent), own rows ``i``.

    The owner of ``R[i, t]`` answers, so only (id, id) pairs travel, never k-NN rows."""
    m, k1 = r.shape
    pos = np.empty((m, k1), np.int32)
    for a, b in sh.blocks(m, block):
        who = np.repeat(np.arange(sh.lo + a, sh.lo + b, dtype=np.int64), k1)
        ans = sh.ask(r[a:b].reshape(-1), lambda loc, w: _position(r[loc], w), who)
        pos[a:b] = ans.reshape(b - a, k1)
    return pos


def _h_table(r: np.ndarray, pos: np.ndarray, k1: int) -> np.ndarray:
    """``H_i`` of the rows as ``(m, ch)`` ids padded with -1."""
    ch = min(int(np.around(k1 / 2)) + 1, k1)
    return np.where(pos[:, :ch] < ch, r[:, :ch], -1).astype(r.dtype)


def _expand(r: np.ndarray, s_mask: np.ndarray, cand: np.ndarray, cand_h: np.ndarray,
            chunk_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """``E_i`` of a block of rows as ``(lengths, sorted ids)``; ``cand_h`` are the H rows of the sorted ids
    ``cand``; the ``(rows, cs, ch, cs)`` comparison is done in chunks of about ``chunk_cells`` bytes."""
    b, cs = r.shape
    ch = cand_h.shape[1]
    lens = np.zeros(b, np.int64)
    out = []
    step = max(1, chunk_cells // max(1, cs * ch * cs))
    for s in range(0, b, step):
        rr, sm = r[s : s + step], s_mask[s : s + step]
        nb = len(rr)
        s_ids = np.where(sm, rr, -2)  # -2 never matches an H pad (-1)
        if len(cand):
            loc = np.minimum(np.searchsorted(cand, rr), len(cand) - 1)
            hc = np.where(sm[..., None], cand_h[loc], -1)  # only candidates in S_i are ever accepted
        else:
            hc = np.full((nb, cs, ch), -1, r.dtype)
        h_len = (hc >= 0).sum(-1)
        # |H_c & S_i|: both sets hold distinct ids, so counting equal pairs counts the intersection
        eq = (hc[..., None] == s_ids[:, None, None, :]).view(np.uint8)
        cnt = eq.reshape(nb, cs, -1).sum(-1, dtype=np.int32)
        accept = sm & (cnt > 2 / 3 * h_len)
        ids = np.concatenate([s_ids, np.where(accept[..., None], hc, -1).reshape(nb, -1)], 1)
        valid = ids >= 0
        n_all = int(ids.max(initial=0)) + 1
        key = np.repeat(np.arange(nb, dtype=np.int64), valid.sum(1)) * n_all + ids[valid].astype(np.int64)
        key.sort()  # unique by sorting: np.unique's hash path is many times slower on int64 keys
        key = key[np.concatenate([[True], key[1:] != key[:-1]])] if len(key) else key
        row = key // n_all
        lens[s : s + nb] = np.bincount(row, minlength=nb)
        out.append(key - row * n_all)
    return lens, (np.concatenate(out) if out else np.empty(0, np.int64))


def expansion_sets_sharded(sh: Shards, r: np.ndarray, k1: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR pattern ``(indptr, indices)`` of ``E_i`` for this rank's rows; ``r`` are their k-NN lists ``(m, k1)``."""
    m, kcols = r.shape
    if kcols != k1:
        raise ValueError(f"expansion_sets: k-NN list has {kcols} columns, expected k1={k1}")
    r = np.ascontiguousarray(r, dtype=_ids_dtype(sh.n))
    pos = knn_positions(sh, r, block)
    h_own = _h_table(r, pos, k1)
    s_mask = pos < k1  # the official slice R[i, :k1+1] on a k1-column array: reciprocal anywhere in the list
    del pos
    lens, parts = np.zeros(m, np.int64), []
    for a, b in sh.blocks(m, block):
        cand = np.unique(r[a:b][s_mask[a:b]])
        ln, ids = _expand(r[a:b], s_mask[a:b], cand, sh.ask(cand, lambda loc: h_own[loc]), 512 * block)
        lens[a:b] = ln
        parts.append(ids.astype(_ids_dtype(sh.n)))
    indptr = np.zeros(m + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    return indptr, (np.concatenate(parts) if parts else np.empty(0, _ids_dtype(sh.n)))


def expansion_sets(r: np.ndarray, k1: int, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """CSR pattern ``(indptr, indices)`` of the expansion sets ``E_i`` of all rows of the full k-NN list ``r``."""
    return expansion_sets_sharded(Shards(len(r)), r, k1, block)


def encode(x: np.ndarray, indptr: np.ndarray, indices: np.ndarray, row0: int = 0,
           chunk: int = 4096) -> np.ndarray:
    """Float32 softmax weights ``V[i, E_i]`` (row ``i = row0 + local``), aligned with ``indices``, ``chunk``
    rows at a time.

    ``x`` are the snapped features: the similarities are exact (see ``knn.py``)."""
    nrow = len(indptr) - 1
    lens = np.diff(indptr)
    data = np.empty(len(indices), np.float32)
    for s in range(0, nrow, chunk):
        e = min(nrow, s + chunk)
        lo, hi = indptr[s], indptr[e]
        width = int(lens[s:e].max()) if e > s and hi > lo else 0
        if width == 0:
            continue
        loc = np.repeat(np.arange(e - s), lens[s:e])
        sims = exact_dots(x, loc + (row0 + s), indices[lo:hi], chunk=256)  # ~1.5 MB of float64 rows at d=384
        pos = np.arange(hi - lo) - (indptr[s:e] - lo)[loc]
        z = np.full((e - s, width), -np.inf)
        z[loc, pos] = -(2.0 - 2.0 * sims)
        zmax = z.max(1, keepdims=True)
        zmax[~np.isfinite(zmax)] = 0.0
        ex = np.exp(z - zmax)  # padding gives exp(-inf) = 0 at the end of a row
        tot = np.cumsum(ex, axis=1)[:, -1:]  # left-to-right, like the reference's cumsum
        w = (ex / np.where(tot > 0, tot, 1.0)).astype(np.float32)
        data[lo:hi] = w[loc, pos]
    return data


def _take_rows(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, positions)`` of the CSR rows ``rows``: their entries' positions, row after row."""
    lens = indptr[rows + 1] - indptr[rows]
    tot = int(lens.sum())
    starts = np.cumsum(lens) - lens
    return lens, np.arange(tot, dtype=np.int64) + np.repeat(indptr[rows] - starts, lens)


def _csr_rows(m: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return m.indptr.astype(np.int64), m.indices, m.data


def query_expansion_sharded(sh: Shards, v: sp.csr_matrix, r: np.ndarray, k2: int, block: int) -> sp.csr_matrix:
    """``V'[i] = mean(V[R[i, :k2]])`` in float32 for this rank's rows (k2 = 1: V unchanged).

    ``v`` and ``r`` are this rank's rows of V (``m x N`` CSR) and of the k-NN lists; the V rows of
    ``R[i, :k2]`` come from their owners, one round of rows at a time."""
    m, n = v.shape
    if k2 == 1:
        out = v.astype(np.float32)
        out.eliminate_zeros()
        out.sort_indices()
        return out
    v_ptr, v_idx, v_val = _csr_rows(v)

    def answer(loc: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        lens, p = _take_rows(v_ptr, loc)
        return lens, [v_idx[p], v_val[p]]

    parts = []
    for a, b in sh.blocks(m, block):
        need = np.unique(r[a:b, :k2])
        lens, (idx, val) = sh.ask_rows(need, answer)
        ptr = np.zeros(len(need) + 1, np.int64)
        np.cumsum(lens, out=ptr[1:])
        got = sp.csr_matrix((val, idx, ptr), shape=(len(need), n))
        loc = np.searchsorted(need, r[a:b, :k2])
        acc = got[loc[:, 0]]
        acc.sort_indices()
        for t in range(1, k2):  # left to right in k-NN order: float32 (((v0 + v1) + v2) + ...)
            part = got[loc[:, t]]
            part.sort_indices()
            acc = acc + part
        acc = acc.tocsr()
        acc.data = (acc.data / np.float32(k2)).astype(np.float32)
        parts.append(acc)
    out = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, n), dtype=np.float32)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def query_expansion(v: sp.csr_matrix, r: np.ndarray, k2: int, block: int = 8192) -> sp.csr_matrix:
    """``V'[i] = mean(V[R[i, :k2]])`` in float32 for all rows of the full V and k-NN list (k2 = 1: V unchanged)."""
    return query_expansion_sharded(Shards(v.shape[0]), v, r, k2, block)


class ColumnTable:
    """This rank's columns of V' (an inverted index: for each column, its rows ``j`` ascending and values).

    ``key = local column * N + j`` is sorted, so the entries ``j >= i`` of a column are a suffix found by
    one ``searchsorted``."""

    def __init__(self, sh: Shards, key: np.ndarray, val: np.ndarray) -> None:
        self.n = sh.n
        self.key, self.val = key, val
        self.ptr = np.searchsorted(key, np.arange(sh.rows + 1, dtype=np.int64) * sh.n)

    def answer(self, loc: np.ndarray, jmin: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Entries ``j >= jmin`` of the local columns ``loc``: ``(lengths, [j, values])``."""
        start = np.searchsorted(self.key, loc * self.n + jmin)
        lens = self.ptr[loc + 1] - start
        starts = np.cumsum(lens) - lens
        p = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(start - starts, lens)
        k = self.key[p]
        return lens, [(k - (k // self.n) * self.n).astype(_ids_dtype(self.n)), self.val[p]]


def column_table(sh: Shards, vq: sp.csr_matrix, row0: int, block: int | None = None) -> ColumnTable:
    """Transpose the V' rows ``row0 + local`` (``vq``) to the owners of their columns, in rounds of
    ``block`` rows (default: all at once; the same on every rank), then sort each column's entries by row."""
    m, n = vq.shape
    ptr = vq.indptr.astype(np.int64)
    keys, vals = [], []
    for a, b in sh.blocks(m, block or max(sh.max_rows, m, 1)):
        lo, hi = ptr[a], ptr[b]
        rows = np.repeat(np.arange(row0 + a, row0 + b, dtype=np.int64), np.diff(ptr[a : b + 1]))
        col, (j, val) = sh.send_to_owners(vq.indices[lo:hi], rows, vq.data[lo:hi])
        keys.append(col * n + j)
        vals.append(val)
    key, val = np.concatenate(keys), np.concatenate(vals)
    del keys, vals
    order = np.argsort(key, kind="stable")
    key = key[order]
    val = val[order]
    return ColumnTable(sh, key, val)


def _ordered_sums(key: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 sums of ``val`` per distinct ``key``, each added left to right in array order.

    A stable sort groups the keys and keeps their order; the groups are then summed one position at a
    time (all groups at once), so every sum is ``((v0 + v1) + v2) + ...`` in float32, the order of the
    official ``temp_min[...] += ...`` loop — not numpy's pairwise summation."""
    order = np.argsort(key, kind="stable")
    ks, vs = key[order], val[order]
    del order
    head = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]])) if len(ks) else np.empty(0, np.int64)
    lens = np.diff(np.append(head, len(ks)))
    m = vs[head].copy()
    act = np.arange(len(head))
    t = 1
    while True:
        act = act[lens[act] > t]
        if len(act) == 0:
            break
        m[act] += vs[head[act] + t]
        t += 1
    return ks[head], m


def _pairs_block(r_ptr: np.ndarray, r_idx: np.ndarray, r_val: np.ndarray, row0: int, cols: np.ndarray,
                 c_len: np.ndarray, c_j: np.ndarray, c_val: np.ndarray, n: int, eps: float | None,
                 max_triples: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Pairs ``(i, j >= i, J)`` of a block of V' rows (``row0 + local``) from the fetched columns ``cols``."""
    nrow = len(r_ptr) - 1
    c_ptr = np.zeros(len(cols) + 1, np.int64)
    np.cumsum(c_len, out=c_ptr[1:])
    e_row = np.repeat(np.arange(row0, row0 + nrow, dtype=np.int64), np.diff(r_ptr))
    e_col = np.searchsorted(cols, r_idx)
    # The fetched columns hold the entries j >= row0, so the entries above (i, c) in column c are the
    # block's own entries of column c in rows before i: its rank in the column is its rank among them.
    by_col = np.argsort(e_col, kind="stable")  # row order within each column
    rank = np.empty(len(e_col), np.int64)
    cnt = np.bincount(e_col, minlength=len(cols))
    rank[by_col] = np.arange(len(e_col)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    del by_col
    start = c_ptr[e_col] + rank  # column suffix j >= i (the entry (i, c) itself first)
    suffix = c_ptr[e_col + 1] - start
    row_tri = np.zeros(nrow + 1, np.int64)
    np.cumsum(np.bincount(e_row - row0, weights=suffix, minlength=nrow).astype(np.int64), out=row_tri[1:])
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    out_v: list[np.ndarray] = []
    b0 = 0
    while b0 < nrow:  # rows [b0, b1): about max_triples triples (at least one row)
        b1 = int(np.searchsorted(row_tri, row_tri[b0] + max_triples, side="right")) - 1
        b1 = min(nrow, max(b1, b0 + 1))
        lo, hi = r_ptr[b0], r_ptr[b1]
        lens = suffix[lo:hi]
        tot = int(row_tri[b1] - row_tri[b0])
        if tot:
            starts = np.cumsum(lens) - lens
            p = np.arange(tot, dtype=np.int64) + np.repeat(start[lo:hi] - starts, lens)
            # triples in row order, each row's columns ascending, each column's j ascending: for a pair,
            # its shared columns arrive in ascending order, as in the official loop
            key = np.repeat(e_row[lo:hi] - (row0 + b0), lens) * n + c_j[p]
            val = np.minimum(np.repeat(r_val[lo:hi], lens), c_val[p])
            del p
            pk, mp = _ordered_sums(key, val)
            del key, val
            jac = 1 - mp / (2 - mp)  # float32, as the official ``1 - temp_min / (2 - temp_min)``
            jac[jac < 0] = 0
            if eps is not None:
                keep = jac <= eps
                pk, jac = pk[keep], jac[keep]
            out_i.append(pk // n + (row0 + b0))
            out_j.append(pk % n)
            out_v.append(jac)
        b0 = b1
    return out_i, out_j, out_v


def jaccard_pairs_sharded(sh: Shards, vq: sp.csr_matrix, row0: int, table: ColumnTable, eps: float | None,
                          block: int, max_triples: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, J_ij)``, ``i <= j``, for the V' rows ``row0 + local`` (``vq``) with shared support (and ``J <= eps``).

    Every rank runs the same number of rounds; in each, a rank asks the column owners (``table``) for
    the columns of its rows' support, only their entries ``j >= `` the round's first row. Triples
    ``(i, c, j)`` are summed ``max_triples`` at a time (default ``64 * block``: a few per row of a round)."""
    max_triples = max_triples or 64 * block
    m, n = vq.shape
    ptr, idx, val = _csr_rows(vq)
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    out_v: list[np.ndarray] = []
    for a, b in sh.blocks(m, block):
        lo, hi = ptr[a], ptr[b]
        cols = np.unique(idx[lo:hi])
        c_len, (c_j, c_val) = sh.ask_rows(cols, table.answer, np.full(len(cols), row0 + a, np.int64))
        pi, pj, pv = _pairs_block(ptr[a : b + 1] - lo, idx[lo:hi], val[lo:hi], row0 + a, cols, c_len,
                                  c_j.astype(np.int64), c_val, n, eps, max_triples)
        out_i += pi
        out_j += pj
        out_v += pv
    if not out_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_v)


def jaccard_pairs(vq: sp.csr_matrix, eps: float | None = None, rows: tuple[int, int] | None = None,
                  block: int = 8192, max_triples: int = 1 << 19) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, J_ij)`` for ``i <= j``, ``i`` in ``[start, stop)``, with shared support (and ``J <= eps``).

    Without ``eps`` every pair with shared support is returned (tests compare them with the dense
    reference); all other pairs have ``J = 1`` exactly. ``vq`` is the full query-expanded V'
    (N x N CSR, sorted indices). Pairs come sorted by ``(i, j)``."""
    n = vq.shape[0]
    q0, q1 = rows if rows is not None else (0, n)
    sh = Shards(n)
    return jaccard_pairs_sharded(sh, vq[q0:q1], q0, column_table(sh, vq, 0), eps, block, max_triples)


def jaccard_edges(vq: sp.csr_matrix, eps: float, rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i <= j``, ``i`` in ``[start, stop)``, with ``J_ij <= eps`` (self pairs included)."""
    i, j, _ = jaccard_pairs(vq, eps, rows)
    return i, j


__all__ = ["knn_positions", "expansion_sets", "expansion_sets_sharded", "encode", "query_expansion",
           "query_expansion_sharded", "ColumnTable", "column_table", "jaccard_pairs", "jaccard_pairs_sharded",
           "jaccard_edges"]
