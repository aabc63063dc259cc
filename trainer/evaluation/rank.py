"""Exact Market-1501 ranking metrics (mAP, CMC, mINP) that scale to MSMT17 without a dense q×g matrix.

The protocol (Market-1501 / TransReID / fast-reid / ClusterContrast, ``max_rank`` 50):

1. For each query, order the gallery by distance, ascending. **Ties are broken by gallery index**
   (a stable sort): the order is lexicographic in ``(distance, gallery index)``. The official codes
   use ``np.argsort`` (quicksort, unspecified tie order); float32 distances at MSMT17 scale contain
   many exact ties, so a fixed rule is what makes results reproducible.
2. Remove gallery items with the query's pid **and** camera (same-camera views of the same person).
3. Skip a query that has no remaining true match (same pid, other camera).
4. With ``r_1 < r_2 < … < r_m`` the 0-based positions of the ``m`` true matches in the filtered order:
   ``AP = mean_k k / (r_k + 1)`` (k = 1..m; precision at each true match), ``INP = m / (r_m + 1)``,
   and the CMC curve ``cmc[t] = [r_1 <= t]``. mAP, mINP and CMC are averaged over valid queries.

How it stays exact and cheap: only the positions of the true matches matter, and a true match's
position only depends on the gallery items that come before it. So per query we take the distance
``t`` of its *hardest* true match and keep the gallery items with distance ``<= t`` (the candidates:
for a useful model, a small fraction of the gallery). Each candidate gets one integer key packing
``(query row, distance, gallery index)`` (float32 bits made monotone), so comparing keys applies the
tie rule; a true match's position is the number of candidates with a smaller key (one
``searchsorted`` into the few sorted true-match keys and a ``bincount``) minus the removed
same-camera items among them. No gallery row is ever sorted. All arithmetic on positions is
integer and AP terms are summed per query in float64 in a fixed order, so the result does not
depend on the block size or the device.

:func:`evaluate` takes a distance matrix (numpy or torch, any device). :func:`evaluate_features`
takes features and computes the distances block by block (``block × g`` at a time, on CUDA when
available), so peak memory is ``O(block × g)`` instead of ``O(q × g)`` (3.8 GB in fp32 for MSMT17).

Work that divides by the world size: the metrics are means over queries of per-query results
(:class:`QueryResults`: AP, INP, first-match position), and a query's results depend on its own row
alone. With ``sharded=True`` each rank ranks only its rows :func:`query_rows` (``dist.shard_range``)
against the whole gallery, the per-query arrays (24 bytes a query) are all-gathered once in query
order, and :func:`summarize` forms the means from the same array as one process would, so the
numbers are bit-identical to one process ranking every query.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer import dist

ArrayLike = np.ndarray | torch.Tensor

# Elements of a ``block × g`` distance block per query block: 64 MB of fp32 on CPU, 512 MB on CUDA.
_BLOCK_ELEMS_CPU = 1 << 24
_BLOCK_ELEMS_CUDA = 1 << 27
# Candidates processed at once; rows of a block are split further when a poor model puts many gallery
# items before its hardest match (~48 bytes per candidate: ~100 MB at most).
_MAX_CANDIDATES = 1 << 21


def _as_long(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D array of ids, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer ids, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


@dataclass
class _Ids:
    """Query/gallery ids on the compute device plus the gallery grouped by pid (CSR)."""

    q_pids: torch.Tensor
    q_camids: torch.Tensor
    g_pids: torch.Tensor
    g_camids: torch.Tensor
    by_pid: torch.Tensor
    """Gallery indices sorted by (pid, index)."""
    upids: torch.Tensor
    """Distinct gallery pids, ascending."""
    starts: torch.Tensor
    """Offset of each distinct pid's run in ``by_pid``."""
    counts: torch.Tensor
    """Length of each run."""

    @classmethod
    def build(cls, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike,
              num_q: int, num_g: int, device: torch.device) -> _Ids:
        qp, gp = _as_long(q_pids, "q_pids", device), _as_long(g_pids, "g_pids", device)
        qc, gc = _as_long(q_camids, "q_camids", device), _as_long(g_camids, "g_camids", device)
        for name, t, n in (("q_pids", qp, num_q), ("q_camids", qc, num_q), ("g_pids", gp, num_g),
                           ("g_camids", gc, num_g)):
            if t.numel() != n:
                raise ValueError(f"{name}: expected {n} entries (from the distances/features), got {t.numel()}")
        # Grouping on the host (numpy's stable argsort; torch's is slow on CPU), used on the device.
        gp_host = gp.cpu().numpy()
        by_pid = np.argsort(gp_host, kind="stable")
        upids, starts, counts = np.unique(gp_host[by_pid], return_index=True, return_counts=True)
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)  # noqa: E731
        return cls(qp, qc, gp, gc, to(by_pid), to(upids), to(starts), to(counts))


class _NumpyOps:
    """Array ops of the candidate stage on CPU: numpy's kernels (single-threaded, vectorized) are
    several times faster than torch's for these 1-D passes, which pay a thread-pool sync per op."""

    @staticmethod
    def arr(t: torch.Tensor) -> np.ndarray:
        return t.numpy()

    @staticmethod
    def host(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def f32_bits(v: np.ndarray) -> np.ndarray:
        return (v + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into +0.0 (they must tie)

    @staticmethod
    def i64(x: np.ndarray) -> np.ndarray:
        return x.astype(np.int64)

    @staticmethod
    def searchsorted_right(a: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.searchsorted(a, v, side="right")

    @staticmethod
    def bincount(x: np.ndarray, n: int) -> np.ndarray:
        return np.bincount(x, minlength=n)

    @staticmethod
    def cumsum(x: np.ndarray) -> np.ndarray:
        return np.cumsum(x)

    @staticmethod
    def argsort(x: np.ndarray) -> np.ndarray:
        return np.argsort(x, kind="stable")

    @staticmethod
    def unique_inverse(x: np.ndarray) -> np.ndarray:
        return np.unique(x + 0.0, return_inverse=True)[1].reshape(-1)

    @staticmethod
    def cat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs)

    @staticmethod
    def candidates(dist: torch.Tensor, hardest: torch.Tensor) -> tuple[np.ndarray, Callable[[int, int], Any]]:
        dn = dist.numpy()
        below = dn <= hardest.numpy()[:, None]
        per_row = np.count_nonzero(below, axis=1).astype(np.int64)

        def fetch(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            flat = np.flatnonzero(below[start:stop])
            return flat, np.ascontiguousarray(dn[start:stop]).reshape(-1)[flat]

        return per_row, fetch


class _TorchOps:
    """The same ops on the tensors' own device (CUDA)."""

    @staticmethod
    def arr(t: torch.Tensor) -> torch.Tensor:
        return t

    @staticmethod
    def host(x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()

    @staticmethod
    def f32_bits(v: torch.Tensor) -> torch.Tensor:
        return (v + 0.0).view(torch.int32)

    @staticmethod
    def i64(x: torch.Tensor) -> torch.Tensor:
        return x.long()

    @staticmethod
    def searchsorted_right(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(a, v, right=True)

    @staticmethod
    def bincount(x: torch.Tensor, n: int) -> torch.Tensor:
        return torch.bincount(x, minlength=n)

    @staticmethod
    def cumsum(x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, 0)

    @staticmethod
    def argsort(x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, stable=True).indices

    @staticmethod
    def unique_inverse(x: torch.Tensor) -> torch.Tensor:
        return torch.unique(x + 0.0, sorted=True, return_inverse=True)[1]

    @staticmethod
    def cat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs)

    @staticmethod
    def candidates(dist: torch.Tensor, hardest: torch.Tensor) -> tuple[torch.Tensor, Callable[[int, int], Any]]:
        below = dist <= hardest[:, None]

        def fetch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            flat = below[start:stop].reshape(-1).nonzero().squeeze(1)
            return flat, dist[start:stop].reshape(-1)[flat]

        return below.sum(1), fetch


def _ops_for(device: torch.device) -> Any:
    return _NumpyOps if device.type == "cpu" else _TorchOps


def _value_keys(ops: Any, *values: Any) -> list[Any]:
    """Integer keys (int64, in ``[0, 2**32)``) that order like the float values, equal iff equal.

    float32: the IEEE bit pattern made monotone (no sort needed). Other dtypes: the index of each
    value among the sorted distinct values (one ``unique`` over the candidates).
    """
    if values[0].dtype in (np.float32, torch.float32):
        out = []
        for v in values:
            bits = ops.f32_bits(v)
            bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
            out.append(ops.i64(bits) + (1 << 31))
        return out
    inverse = ops.unique_inverse(ops.cat(list(values)))
    bounds = np.cumsum([0] + [len(v) for v in values]).tolist()
    return [inverse[bounds[i] : bounds[i + 1]] for i in range(len(values))]


def _match_ranks(dist: torch.Tensor, row0: int, ids: _Ids) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the true matches of queries ``row0 … row0+b-1`` given their distance rows.

    Returns ``(rows, ranks)`` (numpy int64): global query index and 0-based position in the filtered
    gallery order of every true match, sorted by row, then by position.

    Each gallery item of a row gets the key ``(row, distance, gallery index)`` packed into one int64,
    so "comes before" is one integer comparison that already applies the tie rule. The position of
    true match ``k`` is the number of candidates (items with distance <= the row's hardest match)
    whose key is smaller, minus the removed same-camera items among them: counted with one
    ``searchsorted`` of the candidates into the few sorted true-match keys and a ``bincount``.
    """
    b, num_g, device = dist.shape[0], dist.shape[1], dist.device
    empty = np.empty(0, dtype=np.int64)
    if ids.upids.numel() == 0:  # empty gallery
        return empty, empty
    qp, qc = ids.q_pids[row0 : row0 + b], ids.q_camids[row0 : row0 + b]

    # Same-pid gallery items of every query, from the CSR grouping (no b×g pid comparison needed);
    # rows come out ascending, gallery indices ascending within a row.
    pos = torch.searchsorted(ids.upids, qp).clamp_(max=ids.upids.numel() - 1)
    seg_len = torch.where(ids.upids[pos] == qp, ids.counts[pos], 0)
    rows = torch.repeat_interleave(torch.arange(b, device=device), seg_len)
    offs = torch.arange(rows.numel(), device=device) - (torch.cumsum(seg_len, 0) - seg_len)[rows]
    cols = ids.by_pid[ids.starts[pos][rows] + offs]
    vals = dist[rows, cols]
    good = ids.g_camids[cols] != qc[rows]
    if not bool(good.any()):
        return empty, empty

    # Distance of the hardest true match per query; -inf (no candidates) for queries without one.
    hardest = torch.full((b,), float("-inf"), dtype=dist.dtype, device=device)
    hardest.scatter_reduce_(0, rows[good], vals[good], reduce="amax")
    junk = ~good & (vals <= hardest[rows])  # removed items that can precede a true match

    ops = _ops_for(device)
    g_rows, g_cols, g_vals = ops.arr(rows[good]), ops.arr(cols[good]), ops.arr(vals[good])
    j_rows, j_cols, j_vals = ops.arr(rows[junk]), ops.arr(cols[junk]), ops.arr(vals[junk])
    per_row, fetch = ops.candidates(dist, hardest)
    j_per_row = ops.bincount(j_rows, b)

    col_bits = max(1, (num_g - 1).bit_length())
    shift = 32 + col_bits
    if shift > 62:
        raise ValueError(f"gallery of {num_g} items is too large for 64-bit ranking keys")
    max_rows = 1 << (63 - shift)  # row | 32-bit value key | column must fit in an int64
    cum = ops.host(ops.cumsum(per_row)).tolist()
    g_bounds = ops.host(ops.cumsum(ops.bincount(g_rows, b))).tolist()
    j_bounds = ops.host(ops.cumsum(j_per_row)).tolist()
    out_rows, out_ranks = [], []
    start = 0
    while start < b:
        # Largest run of rows whose candidates fit the memory budget (at least one row).
        base = cum[start - 1] if start else 0
        stop = max(start + 1, bisect.bisect_right(cum, base + _MAX_CANDIDATES, lo=start))
        stop = min(stop, start + max_rows)
        gs, ge = (g_bounds[start - 1] if start else 0), g_bounds[stop - 1]
        js, je = (j_bounds[start - 1] if start else 0), j_bounds[stop - 1]
        if ge > gs:
            flat, v = fetch(start, stop)
            kc, kg, kj = _value_keys(ops, v, g_vals[gs:ge], j_vals[js:je])
            r = flat // num_g
            cand = (r << shift) | (kc << col_bits) | (flat - r * num_g)
            hit_rows = g_rows[gs:ge] - start
            hits = (hit_rows << shift) | (kg << col_bits) | g_cols[gs:ge]
            order = ops.argsort(hits)
            hits, hit_rows = hits[order], hit_rows[order]
            removed = ((j_rows[js:je] - start) << shift) | (kj << col_bits) | j_cols[js:je]
            n = len(hits) + 1
            # before[k] = #candidates with a smaller key than hit k, minus removed ones (all rows of
            # this run); then subtract what earlier rows of the run contribute (all their kept items).
            before = (ops.bincount(ops.searchsorted_right(hits, cand), n)
                      - ops.bincount(ops.searchsorted_right(hits, removed), n))
            before = ops.cumsum(before)[:-1]
            kept = per_row[start:stop] - j_per_row[start:stop]
            kept_before = ops.cumsum(kept) - kept
            out_rows.append(ops.host(hit_rows + (start + row0)))
            out_ranks.append(ops.host(before - kept_before[hit_rows]))
        start = stop
    if not out_rows:
        return empty, empty
    return np.concatenate(out_rows), np.concatenate(out_ranks)


def _check_max_rank(max_rank: int) -> None:
    if int(max_rank) != max_rank or max_rank < 1:
        raise ValueError(f"max_rank={max_rank}: expected an integer >= 1")


@dataclass
class QueryResults:
    """The protocol's outcome for each of a run of consecutive queries (one rank's share, or all).

    Everything the metrics need, per query: the means and the CMC curve are formed from these arrays
    alone (:func:`summarize`), so gathering them from the ranks that ranked the queries gives the
    metrics of one process ranking every query.
    """

    ap: np.ndarray
    """float64: average precision; NaN for a query skipped by the protocol (no true match)."""
    inp: np.ndarray
    """float64: inverse negative penalty; NaN for a skipped query."""
    first: np.ndarray
    """int64: 0-based position of the first true match in the filtered order; -1 for a skipped query."""

    def __len__(self) -> int:
        return int(self.first.size)

    @classmethod
    def concat(cls, parts: list[QueryResults]) -> QueryResults:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ap", "inp", "first")))


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)  # none: a rank without queries


def _per_query(rows: np.ndarray, ranks: np.ndarray, num_q: int) -> QueryResults:
    """Per-query results from the (row, rank) list of all true matches, sorted by row then rank.

    Each query's AP sums its own terms (one ``reduceat`` segment), so its value does not depend on
    which other queries are ranked with it."""
    ap, inp = np.full(num_q, np.nan), np.full(num_q, np.nan)
    first_rank = np.full(num_q, -1, dtype=np.int64)
    if rows.size:
        first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        valid_rows = rows[first]
        count = np.diff(np.r_[first, rows.size])
        m = count.astype(np.float64)
        k = np.arange(rows.size, dtype=np.float64) - np.repeat(first, count) + 1.0
        terms = k / (ranks.astype(np.float64) + 1.0)
        ap[valid_rows] = np.add.reduceat(terms, first) / m
        last = np.r_[first[1:], rows.size] - 1
        inp[valid_rows] = m / (ranks[last].astype(np.float64) + 1.0)
        first_rank[valid_rows] = ranks[first]
    return QueryResults(ap, inp, first_rank)


def summarize(results: QueryResults, max_rank: int = 50, return_per_query: bool = False) -> dict[str, Any]:
    """mAP / CMC / mINP over the valid queries of ``results`` (the means taken in query order).

    Raises ``ValueError`` if no query has a valid match."""
    _check_max_rank(max_rank)
    valid = results.first >= 0
    if not bool(valid.any()):
        raise ValueError("no query has a true match in the gallery (same pid, other camera): "
                         "mAP/CMC are undefined; check the query/gallery pids and camids")
    first_rank = results.first[valid]
    hist = np.bincount(first_rank[first_rank < max_rank], minlength=max_rank).astype(np.float64)
    nvalid = int(first_rank.size)
    out: dict[str, Any] = {
        "mAP": float(np.mean(results.ap[valid])),
        "cmc": np.cumsum(hist) / nvalid,
        "mINP": float(np.mean(results.inp[valid])),
        "num_valid_queries": nvalid,
    }
    if return_per_query:
        out["AP"], out["INP"] = results.ap.copy(), results.inp.copy()
    return out


# -- sharded queries: each rank ranks its share, the per-query results are gathered once -------------
def query_rows(num_queries: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``[start, stop)``: the queries a rank ranks in a sharded evaluation (``dist.shard_range``).

    Its work is ``(stop - start) × gallery`` distances and their ranking: ``⌈q/W⌉`` rows at most."""
    return dist.shard_range(num_queries, rank, world_size)


def _own_ids(ids: ArrayLike, name: str, num_rows: int) -> torch.Tensor:
    """This rank's slice of the ids of all queries, checked against the rows it holds."""
    t = _as_long(ids, name, torch.device("cpu"))
    start, stop = query_rows(t.numel())
    if num_rows != stop - start:
        raise ValueError(f"sharded evaluation: rank {dist.get_rank()} holds {num_rows} query rows, expected its "
                         f"share [{start}, {stop}) of the {t.numel()} queries in {name} (dist.shard_range; "
                         "an exact-once extraction with gather=False gives it)")
    return t[start:stop]


def _gather_queries(rank_own: Callable[[], QueryResults]) -> QueryResults:
    """Every rank's :class:`QueryResults` in rank order (= query order), from one all-gather.

    A rank whose ranking fails (NaN features in its share, say) still joins the gather, with its
    error instead of results, so every rank raises instead of waiting for it."""
    try:
        own, error = rank_own(), None
    except Exception as exc:  # re-raised below, after the collective every rank is in
        own, error = None, exc
    parts = dist.all_gather_object((own, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    for r, (_, message) in enumerate(parts):
        if message is not None:
            raise RuntimeError(f"sharded evaluation: ranking failed on rank {r}: {message}")
    return QueryResults.concat([p for p, _ in parts])


def _rows_of(x: ArrayLike) -> int:
    shape = x.shape if isinstance(x, (np.ndarray, torch.Tensor)) else np.shape(x)
    return int(shape[0]) if len(shape) else 0


@torch.no_grad()
def rank_distances(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                   g_camids: ArrayLike, *, block_size: int | None = None) -> QueryResults:
    """Per-query results of the rows of a ``q × g`` distance matrix (the work of :func:`evaluate`,
    no collective; a query without a true match is marked, not an error)."""
    d = distmat.detach() if isinstance(distmat, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(distmat))
    if d.dim() != 2 or not d.is_floating_point():
        raise ValueError(f"distmat: expected a 2-D float matrix (q × g), got shape {tuple(d.shape)} dtype {d.dtype}")
    num_q, num_g = d.shape
    ids = _Ids.build(q_pids, g_pids, q_camids, g_camids, num_q, num_g, d.device)
    bs = _feature_block_size(block_size, num_g, torch.device("cpu"))  # temporaries only: CPU budget
    rows, ranks = [], []
    for s in range(0, num_q, bs):
        block = d[s : s + bs]
        if block.dtype in (torch.float16, torch.bfloat16):
            block = block.float()  # exact; keeps to the float32 key path
        lo, hi = torch.aminmax(block)  # NaN propagates: one cheap pass instead of isfinite's bool matrix
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            raise ValueError(f"distmat: non-finite distances in query rows [{s}, {min(s + bs, num_q)})")
        r, k = _match_ranks(block, s, ids)
        rows.append(r)
        ranks.append(k)
    return _per_query(_cat(rows), _cat(ranks), num_q)


@torch.no_grad()
def evaluate(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
             g_camids: ArrayLike, max_rank: int = 50, *, block_size: int | None = None,
             return_per_query: bool = False, sharded: bool = False) -> dict[str, Any]:
    """Market-1501 mAP / CMC / mINP from a ``q × g`` distance matrix (smaller = more similar).

    Args:
        distmat: numpy array or torch tensor (any float dtype, any device; computed where it lives).
        q_pids, g_pids, q_camids, g_camids: 1-D integer ids (numpy or torch).
        max_rank: length of the CMC curve. It may exceed the gallery size: entries past the last
            gallery position hold the final value (every valid query has its first match by then).
        block_size: query rows processed at once (temporaries are ``O(block_size × g)``).
        return_per_query: also return ``AP`` and ``INP`` per query (numpy, NaN for skipped queries).
        sharded: ``distmat`` holds only this rank's rows :func:`query_rows` of the queries, while
            ``q_pids``/``q_camids`` cover all of them. Collective: every rank returns the metrics of
            all queries, equal to one process given the whole matrix.

    Returns:
        ``{"mAP": float, "cmc": np.ndarray[max_rank] (float64), "mINP": float,
        "num_valid_queries": int}`` (plus ``AP``/``INP`` on request). Raises ``ValueError`` if no
        query has a valid match.
    """
    _check_max_rank(max_rank)
    if not sharded:
        return summarize(rank_distances(distmat, q_pids, g_pids, q_camids, g_camids, block_size=block_size),
                         max_rank, return_per_query)

    def rank_own() -> QueryResults:
        n = _rows_of(distmat)
        return rank_distances(distmat, _own_ids(q_pids, "q_pids", n), g_pids, _own_ids(q_camids, "q_camids", n),
                              g_camids, block_size=block_size)

    return summarize(_gather_queries(rank_own), max_rank, return_per_query)


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _prepare(qf: ArrayLike, gf: ArrayLike, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.as_tensor(qf)
    g = torch.as_tensor(gf)
    for name, t in (("qf", q), ("gf", g)):
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name}: expected a 2-D float feature matrix, got shape {tuple(t.shape)} dtype {t.dtype}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"qf has dimension {q.shape[1]} but gf has {g.shape[1]}: expected equal feature sizes")
    dtype = torch.float64 if q.dtype == torch.float64 and g.dtype == torch.float64 else torch.float32
    q = q.to(device=device, dtype=dtype)
    g = g.to(device=device, dtype=dtype)  # no copy when already there in that dtype
    # Queries are normalized (a small copy); the gallery is not copied: its inverse norms scale the
    # dot products instead, so memory stays O(block × g) beyond the inputs.
    q_norm, g_norm = q.norm(dim=1), g.norm(dim=1)
    for name, n in (("qf", q_norm), ("gf", g_norm)):  # a NaN/inf entry makes its row's norm non-finite
        if not bool(torch.isfinite(n).all()):
            raise ValueError(f"{name}: features contain NaN or inf (or overflow the norm)")
    qn = q / (q_norm.clamp_min(1e-12) * -0.5)[:, None]  # -2·q/|q|: the factor -2 of 2 - 2cos, exact
    g_inv = g_norm.clamp_min_(1e-12).reciprocal_()
    return qn, g, g_inv


def _distance_block(qn_block: torch.Tensor, g: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """``2 − 2 cos(q, g)`` = squared Euclidean distance of the unit vectors (same ranking as cosine)."""
    return torch.mm(qn_block, g.t()).mul_(g_inv).add_(2.0)


def _feature_block_size(block_size: int | None, num_g: int, device: torch.device) -> int:
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: expected >= 1")
        return block_size
    budget = _BLOCK_ELEMS_CUDA if device.type == "cuda" else _BLOCK_ELEMS_CPU
    return max(1, budget // max(num_g, 1))


@torch.no_grad()
def pairwise_distance(qf: ArrayLike, gf: ArrayLike, *, block_size: int | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The dense ``q × g`` distance matrix that :func:`evaluate_features` ranks, block by block.

    Each block is computed by the same code on the same rows as in :func:`evaluate_features` with the
    same ``block_size`` and device, so ``evaluate(pairwise_distance(...))`` gives bit-identical
    metrics. (A matmul's last bits may depend on the block shape, so a different ``block_size`` can
    move a distance by ~1 ulp; that changes a metric only where two gallery distances of a query
    are that close across a true match.) Returns a tensor on ``device``; memory ``q × g``.
    """
    device = _default_device(device)
    qn, g, g_inv = _prepare(qf, gf, device)
    bs = _feature_block_size(block_size, g.shape[0], device)
    out = torch.empty((qn.shape[0], g.shape[0]), dtype=qn.dtype, device=device)
    for s in range(0, qn.shape[0], bs):
        out[s : s + bs] = _distance_block(qn[s : s + bs], g, g_inv)
    return out


@torch.no_grad()
def rank_queries(qf: ArrayLike, gf: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                 g_camids: ArrayLike, *, block_size: int | None = None,
                 device: torch.device | str | None = None) -> QueryResults:
    """Per-query results of the queries ``qf`` against the gallery ``gf`` (the work of
    :func:`evaluate_features` without re-ranking; no collective: in a sharded evaluation, the part
    that divides by the world size). A query without a true match is marked, not an error."""
    device = _default_device(device)
    qn, g, g_inv = _prepare(qf, gf, device)
    num_q, num_g = qn.shape[0], g.shape[0]
    ids = _Ids.build(q_pids, g_pids, q_camids, g_camids, num_q, num_g, device)
    bs = _feature_block_size(block_size, num_g, device)
    rows, ranks = [], []
    for s in range(0, num_q, bs):
        r, k = _match_ranks(_distance_block(qn[s : s + bs], g, g_inv), s, ids)
        rows.append(r)
        ranks.append(k)
    return _per_query(_cat(rows), _cat(ranks), num_q)


@torch.no_grad()
def evaluate_features(qf: ArrayLike, gf: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike,
                      q_camids: ArrayLike, g_camids: ArrayLike, max_rank: int = 50, *,
                      block_size: int | None = None, device: torch.device | str | None = None,
                      rerank: bool = False, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                      return_per_query: bool = False, sharded: bool = False) -> dict[str, Any]:
    """Market-1501 metrics from query and gallery features, never holding the ``q × g`` matrix.

    Features are L2-normalized here (inputs are never modified; a float32/float64 gallery already on
    ``device`` is not copied either: its inverse norms scale the dot products); the distance is the
    squared Euclidean distance of unit vectors, ``2 − 2 cos``, which orders the gallery like the
    official ``‖q‖² + ‖g‖² − 2 q·g`` on normalized features (up to float rounding). Query rows are
    processed ``block_size`` at a time (default: about 64 MB of distances on CPU, 512 MB on CUDA):
    distances, candidate selection below each query's hardest true match, exact positions, metrics.
    ``device=None`` picks CUDA when available, CPU otherwise. fp16/bf16 features are computed in fp32,
    fp64 features in fp64.

    Equal to ``evaluate(pairwise_distance(qf, gf, block_size=B, device=D), ...)`` bit for bit.

    ``sharded=True``: ``qf`` holds only this rank's rows :func:`query_rows` of the queries (``gf``
    the whole gallery; ``q_pids``/``q_camids`` all queries). Each rank ranks its rows, the
    per-query results are all-gathered once, and every rank returns the metrics of all queries:
    bit-identical to one process whenever each query's distances are (a matmul's last bit may
    depend on the block's row count, see :func:`pairwise_distance`). Collective.

    ``rerank=True`` applies k-reciprocal re-ranking (:func:`trainer.evaluation.rerank.re_ranking`
    with ``k1``, ``k2``, ``lambda_value``) first; that path is dense, ``O((q+g)²)`` memory, and needs
    every query (not ``sharded``).

    Returns the same dict as :func:`evaluate`.
    """
    _check_max_rank(max_rank)
    if rerank:
        if sharded:
            raise ValueError("re-ranking needs every query against the gallery: pass all query features, "
                             "not a rank's share (sharded=False)")
        from .rerank import re_ranking

        distmat = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value, device=device)
        return evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, block_size=block_size,
                        return_per_query=return_per_query)
    if not sharded:
        results = rank_queries(qf, gf, q_pids, g_pids, q_camids, g_camids, block_size=block_size, device=device)
        return summarize(results, max_rank, return_per_query)

    def rank_own() -> QueryResults:
        n = _rows_of(qf)
        return rank_queries(qf, gf, _own_ids(q_pids, "q_pids", n), g_pids, _own_ids(q_camids, "q_camids", n),
                            g_camids, block_size=block_size, device=device)

    return summarize(_gather_queries(rank_own), max_rank, return_per_query)


__all__ = ["QueryResults", "evaluate", "evaluate_features", "pairwise_distance", "query_rows",
           "rank_distances", "rank_queries", "summarize"]
