"""Exact k-nearest neighbours (squared L2) for the clustering step, without an N x N matrix.

Exactness is defined on *snapped* features (:func:`snap_features`): every coordinate is put on a
grid of step ``2**-b`` chosen so that every inner product, norm and squared distance is an integer
multiple of ``2**-2b`` below ``2**52`` — exactly representable in float64, so any summation order
(BLAS, faiss, torch, GPU) gives the same bits. The snap moves a similarity by about 1e-6, the size of
the float32 noise of the official faiss search; in return the k-NN lists, and every similarity used
later, are unique and reproducible: ties are broken by the lower index.

Search: a fast float32 pass (torch blocked GEMM, CPU or CUDA, or faiss) returns ``k + extra``
candidates per row with a proven error bound ``delta`` on every approximate key (the float32 dot
product error is at most ``gamma_d * |x| |y|``, ``gamma_d = d u / (1 - d u)``, ``u = 2**-24``). If
the k-th smallest approximate key is ``t``, every true top-k member has an approximate key
``<= t + 2 delta`` (at least k points have a true key ``<= t + delta``). Rows whose approximate order is
not separated by more than ``2 delta`` are re-scored exactly in float64; rows whose window extends
past the kept candidates are solved exactly against all points.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import numpy as np
import torch

Backend = Literal["auto", "torch", "faiss"]
_U32 = 2.0**-24  # unit roundoff of float32
_SAFETY = 2.0  # multiplies the proven bound: headroom for the few roundings it does not itemise


def snap_features(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float32 copy of ``features`` on the grid that makes float64 inner products exact.

    With ``q = rint(x * 2**b)`` the grid step ``2**-b`` is the finest for which
    ``d * max|q|**2 <= 2**50`` (so norms and squared distances stay below ``2**52``) and
    ``max|q| <= 2**24`` (so the snapped values are exact float32 numbers).
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"features: expected a non-empty 2-D (N, d) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    amax = float(np.abs(x).max())
    if not math.isfinite(amax):
        raise ValueError("features: contain NaN or inf")
    if amax == 0.0:
        return np.zeros(x.shape, np.float32)
    d = x.shape[1]
    bits = min(50.0 / 2 - math.log2(d) / 2, 24.0)  # log2 of the largest allowed |q|
    b = math.floor(bits - math.log2(amax))
    while True:
        qmax = math.floor(amax * 2.0**b + 0.5)
        if d * qmax * qmax <= 2**50 and qmax <= 2**24:
            break
        b -= 1
    if b > 480:
        raise ValueError(f"features: max |x| = {amax:g} is too small to snap without underflow")
    q = np.rint(x.astype(np.float64) * 2.0**b)
    return np.ascontiguousarray((q * 2.0**-b).astype(np.float32))


def exact_sqdist(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, norms: np.ndarray,
                 chunk: int = 1024) -> np.ndarray:
    """Exact squared distances ``|x_r - x_c|^2`` (float64) for paired index arrays (snapped ``x``)."""
    return norms[rows] + norms[cols] - 2.0 * exact_dots(x, rows, cols, chunk)


def exact_dots(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Exact inner products ``<x_r, x_c>`` (float64) for paired index arrays of snapped features.

    Exact whatever the summation order, so the cheapest kernel wins: small cache-resident chunks,
    converted to float64 on the fly (no float64 copy of the whole matrix).
    """
    out = np.empty(len(rows), np.float64)
    for s in range(0, len(rows), chunk):
        a = x[rows[s : s + chunk]].astype(np.float64)
        b = x[cols[s : s + chunk]].astype(np.float64)
        out[s : s + chunk] = np.einsum("nd,nd->n", a, b)
    return out


def exact_norms(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Exact squared norms (float64) of snapped features."""
    out = np.empty(len(x), np.float64)
    for s in range(0, len(x), chunk):
        a = x[s : s + chunk].astype(np.float64)
        out[s : s + chunk] = np.einsum("nd,nd->n", a, a)
    return out


def _topk_exact_rows(x: np.ndarray, norms: np.ndarray, rows: np.ndarray, k: int,
                     chunk: int = 256) -> np.ndarray:
    """Exact top-k (smallest squared distance, lower index first on ties) of ``rows`` against all points."""
    x64 = x.astype(np.float64)  # rare fallback: a float64 copy is fine here
    out = np.empty((len(rows), k), np.int64)
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        keys = norms[None, :] - 2.0 * (x64[r] @ x64.T)  # |x_r|^2 is constant per row: ordering only
        keys += norms[r][:, None]
        kth = np.partition(keys, k - 1, axis=1)[:, k - 1 : k]
        for t in range(len(r)):
            cand = np.flatnonzero(keys[t] <= kth[t, 0])
            order = np.lexsort((cand, keys[t, cand]))
            out[s + t] = cand[order[:k]]
    return out


def _gamma(d: int) -> float:
    return d * _U32 / (1.0 - d * _U32)


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """Run the top-k bookkeeping single-threaded on CPU: its many small ops pay more in OpenMP
    fork/join (badly so on a busy host) than they gain; the GEMMs keep every thread."""
    if device.type != "cpu":
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _chunks(a: int, b: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(b, s + size)) for s in range(a, b, size)]


class _TopK:
    """Per-row running top-``kk`` of approximate scores (larger is better), merged from sparse candidates."""

    def __init__(self, m: int, kk: int, device: torch.device):
        self.kk = kk
        self.val = torch.full((m, kk), -torch.inf, device=device)
        self.idx = torch.zeros((m, kk), dtype=torch.int64, device=device)
        self.thr = torch.full((m,), -torch.inf, device=device)  # kk-th best so far: a candidate must beat it

    def set_dense(self, r0: int, scores: torch.Tensor, c0: int) -> None:
        v, i = torch.topk(scores, min(self.kk, scores.shape[1]), dim=1)
        r1 = r0 + scores.shape[0]
        self.val[r0:r1, : v.shape[1]] = v
        self.idx[r0:r1, : v.shape[1]] = i + c0
        self.thr[r0:r1] = self.val[r0:r1].min(1).values

    def merge_dense(self, rows: torch.Tensor, vals: torch.Tensor, cols: torch.Tensor) -> None:
        """Merge a dense (len(rows), w) block of candidates into ``rows`` (index_select/index_copy_:
        much faster than advanced indexing on CPU)."""
        cv = torch.cat([self.val.index_select(0, rows), vals], 1)
        ci = torch.cat([self.idx.index_select(0, rows), cols], 1)
        v, sel = torch.topk(cv, self.kk, dim=1)
        self.val.index_copy_(0, rows, v)
        self.idx.index_copy_(0, rows, torch.gather(ci, 1, sel))
        self.thr.index_copy_(0, rows, v[:, -1].contiguous())

    def offer(self, r0: int, c0: int, s: torch.Tensor, transposed: bool = False) -> None:
        """Offer the block ``s``: rows ``r0 + a`` and columns ``c0 + b`` (``transposed``: the rows of
        ``s`` are the columns and vice versa). Only entries beating the row thresholds are merged;
        a max-reduction first skips the rows with nothing to offer (most of them, once the
        thresholds are tight)."""
        nrow = s.shape[1] if transposed else s.shape[0]
        thr = self.thr[r0 : r0 + nrow]
        best = s.amax(0) if transposed else s.amax(1)
        hit = torch.nonzero(best > thr).flatten()
        if hit.numel() == 0:
            return
        if transposed:
            sub = s.index_select(1, hit)
            ci, rj = torch.nonzero(sub > thr.index_select(0, hit)[None, :], as_tuple=True)
            vals = sub[ci, rj]
            o = torch.argsort(rj, stable=True)  # group by row
            rj, ci, vals = rj[o], ci[o], vals[o]
            sub = sub.T
        else:
            sub = s.index_select(0, hit)
            rj, ci = torch.nonzero(sub > thr.index_select(0, hit)[:, None], as_tuple=True)  # row-major
            vals = sub[rj, ci]
        heavy_mask = torch.bincount(rj, minlength=len(hit)) > 2 * self.kk
        if bool(heavy_mask.any()):  # rows with many candidates (loose thresholds): a dense top-k is cheaper
            heavy = torch.nonzero(heavy_mask).flatten()
            v, i = torch.topk(sub.index_select(0, heavy), min(self.kk, sub.shape[1]), dim=1)
            self.merge_dense(hit[heavy] + r0, v, i + c0)
            light = ~heavy_mask[rj]
            rj, ci, vals = rj[light], ci[light], vals[light]
        self.merge(hit[rj] + r0, ci + c0, vals)

    def merge(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        """Add candidates; ``rows`` must be grouped (non-decreasing), as ``torch.nonzero`` returns them."""
        if rows.numel() == 0:
            return
        urows, counts = torch.unique_consecutive(rows, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.repeat_interleave(torch.arange(len(urows), device=rows.device), counts)
        width = int(counts.max())
        flat = slot * width + torch.arange(len(rows), device=rows.device) - starts.index_select(0, slot)
        pv = torch.full((len(urows) * width,), -torch.inf, device=rows.device)
        pi = torch.zeros((len(urows) * width,), dtype=torch.int64, device=rows.device)
        pv.index_copy_(0, flat, vals)
        pi.index_copy_(0, flat, cols)
        self.merge_dense(urows, pv.view(len(urows), width), pi.view(len(urows), width))


def _locality_order(xt: torch.Tensor, cell: int = 256, iters: int = 4, block: int = 8192) -> torch.Tensor:
    """A permutation that puts similar points next to each other (a few k-means steps, cells of
    ~``cell`` points, sorted by cell). Only a speed device: it makes a block's own top-k nearly final,
    so the thresholds are tight from the start; exactness never depends on it."""
    n = xt.shape[0]
    k = max(1, n // cell)
    gen = torch.Generator(device="cpu").manual_seed(0)
    cent = xt[torch.randperm(n, generator=gen)[:k].to(xt.device)].clone()
    assign = torch.empty(n, dtype=torch.int64, device=xt.device)
    for it in range(iters + 1):
        half = (cent * cent).sum(1) / 2
        for s in range(0, n, block):
            assign[s : s + block] = torch.addmm(half, xt[s : s + block], cent.T, beta=-1).argmax(1)
        if it == iters:
            break
        cnt = torch.bincount(assign, minlength=k).clamp_(min=1).unsqueeze(1).to(xt.dtype)
        cent = torch.zeros_like(cent).index_add_(0, assign, xt) / cnt
    return torch.argsort(assign, stable=True)


def _approx_torch(x32: np.ndarray, norms: np.ndarray, q0: int, q1: int, kk: int,
                  device: torch.device, block: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Approximate top-``kk`` of ``score_ij = <x_i, x_j> - |x_j|^2 / 2`` for rows ``[q0, q1)``.

    Blocked float32 GEMM. Each row block first takes a dense top-k over its own column block (which
    sets a good threshold: with all rows queried, the points are first put in a cluster-sorted order,
    so that block already holds most true neighbours), then every other block only hands over the
    entries that beat the row's current k-th best. With all rows queried, only blocks ``I < J`` are computed and
    serve both directions (the Gram matrix is symmetric): half the FLOPs. When the norms are (nearly) equal the
    ``|x_j|^2 / 2`` term is dropped and its spread added to the error bound (returned).
    """
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 would void the error bound
    try:
        xt = torch.from_numpy(x32).to(device)
        n = xt.shape[0]
        spread = float(norms.max() - norms.min()) / 2
        fold = spread <= 1e-4 * max(float(norms.max()), 1e-300)
        hn = None if fold else torch.from_numpy((norms / 2).astype(np.float32)).to(device)
        symmetric = q0 == 0 and q1 == n
        perm = None
        if symmetric and n > 2 * block:  # cluster-sorted order: tight thresholds from the first block
            perm = _locality_order(xt)
            xt = xt[perm]
            hn = None if hn is None else hn[perm]
        top = _TopK(q1 - q0, kk, device)
        row_blocks = _chunks(q0, q1, block)

        def scores(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
            g = xt[r0:r1] @ xt[c0:c1].T
            return g if hn is None else g.sub_(hn[c0:c1])

        for r0, r1 in row_blocks:  # dense start: the rows' own block
            g = scores(r0, r1, r0, r1)
            with _one_thread(device):
                top.set_dense(r0 - q0, g, r0)
        if symmetric:  # blocks I < J serve rows of I and rows of J
            for a, (r0, r1) in enumerate(row_blocks):
                for c0, c1 in row_blocks[a + 1 :]:
                    g = xt[r0:r1] @ xt[c0:c1].T
                    with _one_thread(device):
                        top.offer(r0, c0, g if hn is None else g - hn[c0:c1])
                        top.offer(c0, r0, g if hn is None else g.sub_(hn[r0:r1, None]), transposed=True)
        else:
            for r0, r1 in row_blocks:
                for c0, c1 in _chunks(0, r0, block) + _chunks(r1, n, block):
                    g = scores(r0, r1, c0, c1)
                    with _one_thread(device):
                        top.offer(r0 - q0, c0, g)
        v, o = torch.sort(top.val, dim=1, descending=True)
        i = torch.gather(top.idx, 1, o)
        if perm is not None:  # back to the caller's numbering
            i = perm[i]
            v_orig, i_orig = torch.empty_like(v), torch.empty_like(i)
            v_orig[perm], i_orig[perm] = v, i
            v, i = v_orig, i_orig
        return v.cpu().numpy(), i.cpu().numpy(), (spread if fold else 0.0)
    finally:
        torch.set_float32_matmul_precision(prev)


def _approx_faiss(x32: np.ndarray, norms: np.ndarray, q0: int, q1: int, kk: int,
                  gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Approximate keys from a faiss flat L2 index (on this rank's GPU with ``gpu``), ``|x_i|^2`` removed."""
    import faiss

    d = x32.shape[1]
    index: faiss.Index
    if gpu:
        res = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        # the rank's own device: faiss's default is GPU 0, where every rank of a node would pile up
        config.device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        index = faiss.GpuIndexFlatL2(res, d, config)
    else:
        index = faiss.IndexFlatL2(d)
    index.add(x32)
    dist, ids = index.search(np.ascontiguousarray(x32[q0:q1]), kk)
    keys = dist.astype(np.float64) - norms[q0:q1, None]
    return keys, ids.astype(np.int64)


def faiss_has_gpu() -> bool:
    """Whether the installed faiss is the GPU build and sees a GPU (faiss-cpu: never)."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def exact_knn(features: np.ndarray, k: int, rows: tuple[int, int] | None = None, backend: Backend = "auto",
        extra: int = 8, block: int = 2048, device: torch.device | str | None = None) -> np.ndarray:
    """Exact k nearest neighbours by squared L2 (self included), ties by lower index.

    ``features`` must already be snapped (:func:`snap_features`). ``rows = (start, stop)`` restricts the
    queries to a slice (the sharded distributed path); the database is always all N points. Returns
    ``(stop - start, k)`` int64 ids sorted by distance.
    """
    x32 = np.ascontiguousarray(features, dtype=np.float32)
    n, d = x32.shape
    if not 1 <= k <= n:
        raise ValueError(f"knn: k={k} must be in [1, N={n}]")
    q0, q1 = rows if rows is not None else (0, n)
    if not 0 <= q0 <= q1 <= n:
        raise ValueError(f"knn: rows={rows} is not a slice of [0, {n}]")
    norms = exact_norms(x32)
    nrm = np.sqrt(norms)
    kk = min(n, k + max(1, extra))
    gpu = faiss_has_gpu()
    if backend == "auto":  # faiss-gpu where faiss sees a GPU; else the torch GEMM (faster than faiss-cpu here)
        backend = "faiss" if gpu else "torch"
    if backend == "torch":
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device) if device is not None else torch.device(auto)
        sc, ids, spread = _approx_torch(x32, norms, q0, q1, kk, dev, block)
        keys = -2.0 * sc.astype(np.float64)  # key = |x_j|^2 - 2 <x_i, x_j> (+ |x_i|^2, constant per row)
        # dot error gamma*|x||y|, the roundings of |x_j|^2/2 and of the subtraction, the dropped norm
        # spread; all doubled by the key's factor 2
        delta = 2 * (_gamma(d) * nrm[q0:q1] * nrm.max() + 2 * _U32 * (norms.max() + nrm[q0:q1] * nrm.max()) + spread)
    elif backend == "faiss":
        keys, ids = _approx_faiss(x32, norms, q0, q1, kk, gpu)
        # faiss may compute |x - y|^2 directly or as norms - 2 dot: bound both generously
        delta = 4 * _gamma(d + 2) * (nrm[q0:q1] + nrm.max()) ** 2 + 8 * _U32 * (norms[q0:q1] + norms.max())
    else:
        raise ValueError(f"knn backend={backend!r}: expected 'auto', 'torch' or 'faiss'")
    delta = _SAFETY * delta + 1e-300
    keys = keys.astype(np.float64)
    m = q1 - q0
    out = np.empty((m, k), np.int64)
    if m == 0:
        return out
    # Approximate keys closer than 2 delta form "tie groups" (chains in sorted order); the true order
    # agrees with the approximate one between groups, so only members of groups of size > 1 that
    # reach into the top k need exact keys. A group that reaches the last kept column may continue
    # among points that were not kept: such rows are solved exactly against all points.
    close = np.diff(keys, axis=1) <= 2 * delta[:, None]  # (m, kk-1): column t ties with t+1
    group = np.concatenate([np.zeros((m, 1), np.int64), np.cumsum(~close, axis=1)], axis=1)
    overflow = (group[:, -1] == group[:, k - 1]) if kk < n else np.zeros(m, bool)
    tied = np.zeros((m, kk), bool)
    tied[:, :-1] |= close
    tied[:, 1:] |= close
    need = tied & (group <= group[:, k - 1 : k]) & ~overflow[:, None]
    out[:] = ids[:, :k]
    rows_r = np.flatnonzero(need.any(1))
    if len(rows_r):
        sub = need[rows_r]
        ex = np.zeros((len(rows_r), kk))
        rr, cc = np.nonzero(sub)
        ex[rr, cc] = exact_sqdist(x32, rows_r[rr] + q0, ids[rows_r][rr, cc], norms)
        g = group[rows_r]
        sid = ids[rows_r]
        # within a row: by group, then exact key (0 outside tie groups: singletons), then index
        rank_key = g + (np.arange(len(rows_r)) * (kk + 1))[:, None]  # rows never interleave
        order = np.lexsort((sid.ravel(), ex.ravel(), rank_key.ravel()))
        out[rows_r] = sid.ravel()[order].reshape(len(rows_r), kk)[:, :k]
    full = np.flatnonzero(overflow)
    if len(full):
        out[full] = _topk_exact_rows(x32, norms, full + q0, k)
    return out


__all__ = ["snap_features", "exact_dots", "exact_norms", "exact_sqdist", "exact_knn"]
