"""k-nearest neighbours (squared L2) for the clustering step, without an N x N matrix.

Exactness is defined on *snapped* features (:func:`snap_features`): every coordinate is put on a
grid of step ``2**-b`` chosen so that every inner product, norm and squared distance is an integer
multiple of ``2**-2b`` below ``2**52`` — exactly representable in float64, so any summation order
(BLAS, faiss, torch, GPU) gives the same bits. The snap moves a similarity by about 1e-6, the size of
the float32 noise of the official faiss search; in return the k-NN lists, and every similarity used
later, are unique and reproducible: ties are broken by the lower index.

Entry point: :func:`search_knn` (``index="flat"``: exact, :func:`exact_knn`; ``index="ivf"``: an IVF
index, approximate, with its recall measured by :func:`knn_recall`). ``docs/knn.md`` says which to
pick.

**Flat, fp32** (:func:`exact_knn`): a fast float32 pass (torch blocked GEMM, CPU or CUDA, or faiss)
returns ``k + extra`` candidates per row with a proven error bound ``delta`` on every approximate key
(the float32 dot product error is at most ``gamma_d * |x| |y|``, ``gamma_d = d u / (1 - d u)``,
``u = 2**-24``). If the k-th smallest approximate key is ``t``, every true top-k member has an
approximate key ``<= t + 2 delta`` (at least k points have a true key ``<= t + delta``). Rows whose
approximate order is not separated by more than ``2 delta`` are re-scored exactly in float64; rows
whose window extends past the kept candidates are solved exactly against all points.

**Flat, bf16 candidates** (``precision="bf16"``, chosen by ``"auto"`` on CUDA and on CPUs with
avx512_bf16/AMX): the GEMM runs on bf16 copies of the features (2.3x the fp32 rate on this
avx512_bf16 CPU), keeps ``k + margin + 1`` candidates per row, and the kept ones are re-scored exactly
(float64 on the snapped features: the same keys, hence the same lists and tie order, as the fp32
path). A row is accepted only when its exact k-th score beats the bf16 bound on every point left out
(:func:`_bf16_bound`); the others are searched again by the fp32 path, so the lists are identical to
fp32 exact search on every input.

**IVF** (:func:`search_knn` with ``index="ivf"``): see :func:`_search_ivf`. The lists are the exact
top-k of the points in the probed lists (a per-row definition, so they do not depend on the number of
ranks, nor on the scan: faiss-gpu, or on the CPU a list-major float32 GEMM scan); recall against exact
search is what ``nprobe`` buys.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import re
import time
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch

from trainer import dist

Backend = Literal["auto", "torch", "faiss"]
Precision = Literal["auto", "fp32", "bf16"]
Index = Literal["flat", "ivf"]
_U32 = 2.0**-24  # unit roundoff of float32
_UBF16 = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand, round to nearest)
_SAFETY = 2.0  # multiplies the proven bound: headroom for the few roundings it does not itemise
_BF16_MIN_PAIRS = 1 << 26  # "auto" on CPU: below ~8k x 8k scores the bf16 pass saves nothing worth its setup
IVF_LIST_SIZE = 20
"""Default IVF list size: ``N // IVF_LIST_SIZE`` lists (:func:`default_nlist`)."""
IVF_TRAIN_PER_LIST = 8
"""k-means training sample of the IVF quantizer: this many points per list (seeded choice of rows)."""
IVF_KMEANS_ITERS = 5
"""k-means iterations of the IVF quantizer."""
IVF_SEED = 1234
"""Seed of the IVF training sample and of faiss's k-means initialisation."""


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


def _grid_ok(q: float, d: int) -> bool:
    """The snap's exactness conditions for a largest grid value ``q`` (integer arithmetic when exact)."""
    if q > 2.0**24:
        return False
    return d * int(q) * int(q) <= 2**50 if q.is_integer() else d * q * q <= 2.0**50


def _abs_max(x: np.ndarray, chunk: int = 16384) -> float:
    """``max |x|`` a chunk of rows at a time (``np.abs(x)`` would copy all of ``x``)."""
    return max((float(np.abs(x[s : s + chunk]).max()) for s in range(0, len(x), chunk)), default=0.0)


def _snap_like(y: np.ndarray, x: np.ndarray, amax: float | None = None) -> np.ndarray:
    """``y`` snapped onto a grid on which products with the snapped ``x`` stay exact in float64
    (``amax``: ``max |x|`` when the caller has it).

    ``x``'s own step ``2**-b`` satisfies the snap's conditions for ``amax = max|x|`` (its largest
    grid value is ``amax * 2**b``), so the finest step ``2**-b'`` that still satisfies them has
    ``b' >= b``: ``x`` lies on it. ``y`` is rounded to that grid and clipped to ``[-amax, amax]``,
    so every sum of products of the two, and every norm, stays an integer multiple of ``2**-2b'``
    below ``2**52``.
    """
    d = x.shape[1]
    amax = _abs_max(x) if amax is None else amax
    if amax == 0.0:
        return np.zeros(y.shape, np.float32)
    b = math.floor(math.log2(min(2.0**24, math.sqrt(2.0**50 / d)) / amax))
    while _grid_ok(amax * 2.0 ** (b + 1), d):
        b += 1
    while not _grid_ok(amax * 2.0**b, d):
        b -= 1
    qmax = math.floor(amax * 2.0**b)
    q = np.clip(np.rint(y.astype(np.float64) * 2.0**b), -qmax, qmax)
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
    return _dots2(x, rows, x, cols, chunk)


def _dots2(a: np.ndarray, ia: np.ndarray, b: np.ndarray, ib: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Exact ``<a_ia, b_ib>`` (float64) for paired index arrays; ``a`` and ``b`` on a common snap grid."""
    out = np.empty(len(ia), np.float64)
    for s in range(0, len(ia), chunk):
        u = a[ia[s : s + chunk]].astype(np.float64)
        v = b[ib[s : s + chunk]].astype(np.float64)
        out[s : s + chunk] = np.einsum("nd,nd->n", u, v)
    return out


def exact_norms(x: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Exact squared norms (float64) of snapped features (float64 rows ``chunk`` at a time: a small fixed
    temporary, so a rank's working memory keeps falling with its share of the rows)."""
    out = np.empty(len(x), np.float64)
    for s in range(0, len(x), chunk):
        a = x[s : s + chunk].astype(np.float64)
        out[s : s + chunk] = np.einsum("nd,nd->n", a, a)
    return out


def _topk_exact_vs(q: np.ndarray, y: np.ndarray, yn: np.ndarray, k: int, cols: int = 32768,
                   rows: int = 256) -> np.ndarray:
    """Exact top-k of the queries ``q`` against every point of ``y`` (smallest squared distance, lower
    index first on ties), in float64 column blocks (exact on a common snap grid). For the rare rows
    the fast passes cannot settle: no float64 copy of ``y`` is made."""
    m, n = len(q), len(y)
    best_key = np.full((m, k), np.inf)
    best_id = np.full((m, k), n, np.int64)  # sentinel id beyond every real one
    qa = q.astype(np.float64)
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        yb = y[c0:c1].astype(np.float64)
        kk = min(k, c1 - c0)
        for r0 in range(0, m, rows):
            keys = yn[None, c0:c1] - 2.0 * (qa[r0 : r0 + rows] @ yb.T)  # |q|^2 is constant per row: ordering only
            kth = np.partition(keys, kk - 1, axis=1)[:, kk - 1]
            for t in range(keys.shape[0]):
                cand = np.flatnonzero(keys[t] <= kth[t])
                ak = np.concatenate([best_key[r0 + t], keys[t, cand]])
                ai = np.concatenate([best_id[r0 + t], cand + c0])
                o = np.lexsort((ai, ak))[:k]
                best_key[r0 + t], best_id[r0 + t] = ak[o], ai[o]
    return best_id


def _gamma(d: int) -> float:
    return d * _U32 / (1.0 - d * _U32)


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
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


@contextlib.contextmanager
def _exact_matmul() -> Iterator[None]:
    """No TF32 for float32 GEMMs and no reduced-precision reduction for bf16 ones: both would void
    the error bounds."""
    prev = torch.get_float32_matmul_precision()
    prev_bf16 = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = prev_bf16


def _gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T``. For bf16 inputs the products are accumulated in fp32; CUDA returns the fp32
    accumulator, the CPU kernels round it once to bf16 (both inside :func:`_bf16_bound`) and the result
    stays bf16: :class:`_TopK` reads it at half the bytes."""
    if a.dtype == torch.bfloat16 and a.device.type == "cuda":
        return torch.mm(a, b.T, out_dtype=torch.float32)
    return a @ b.T


def _chunks(a: int, b: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(b, s + size)) for s in range(a, b, size)]


def _device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _TopK:
    """Per-row running top-``kk`` of approximate scores (larger is better), merged from sparse candidates."""

    def __init__(self, m: int, kk: int, device: torch.device):
        self.kk = kk
        self.val = torch.full((m, kk), -torch.inf, device=device)
        self.idx = torch.zeros((m, kk), dtype=torch.int64, device=device)
        self.thr = torch.full((m,), -torch.inf, device=device)  # kk-th best so far: a candidate must beat it

    def set_dense(self, r0: int, scores: torch.Tensor, c0: int) -> None:
        v, i = torch.topk(scores, min(self.kk, scores.shape[1]), dim=1)
        v = v.float()
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
        thresholds are tight). A bf16 block is read as it is (half the bytes) and only the rows
        with hits are converted to float32 (exactly)."""
        nrow = s.shape[1] if transposed else s.shape[0]
        thr = self.thr[r0 : r0 + nrow]
        best = s.amax(0) if transposed else s.amax(1)
        hit = torch.nonzero(best > thr).flatten()
        if hit.numel() == 0:
            return
        # the hit rows as float32 (exact), one row per query row (a transposed view: no copy)
        sub = s.index_select(1, hit).float().T if transposed else s.index_select(0, hit).float()
        mask = sub > thr.index_select(0, hit)[:, None]
        # rows with many candidates (loose thresholds): a dense top-k is cheaper, and they are taken out
        # before the sparse listing, whose indices (16 bytes a candidate) would otherwise dwarf the block
        heavy_mask = mask.sum(1) > 2 * self.kk
        if bool(heavy_mask.any()):
            heavy = torch.nonzero(heavy_mask).flatten()
            v, i = torch.topk(sub.index_select(0, heavy), min(self.kk, sub.shape[1]), dim=1)
            self.merge_dense(hit[heavy] + r0, v, i + c0)
            light = torch.nonzero(~heavy_mask).flatten()
            sub, mask, hit = sub.index_select(0, light), mask.index_select(0, light), hit[light]
        rj, ci = torch.nonzero(mask, as_tuple=True)  # row-major: grouped by row, columns ascending
        self.merge(hit[rj] + r0, ci + c0, sub[rj, ci])

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
    so the thresholds are tight from the start; exactness never depends on it. Runs in ``xt``'s dtype
    (bf16 for the bf16 pass), the centroid sums in float32."""
    n = xt.shape[0]
    k = max(1, n // cell)
    gen = torch.Generator(device="cpu").manual_seed(0)
    cent = xt[torch.randperm(n, generator=gen)[:k].to(xt.device)].float()
    assign = torch.empty(n, dtype=torch.int64, device=xt.device)
    for it in range(iters + 1):
        half = ((cent * cent).sum(1) / 2).to(xt.dtype)
        c = cent.to(xt.dtype)
        for s in range(0, n, block):
            assign[s : s + block] = torch.addmm(half, xt[s : s + block], c.T, beta=-1).argmax(1)
        if it == iters:
            break
        cnt = torch.bincount(assign, minlength=k).clamp_(min=1).unsqueeze(1).float()
        acc = torch.zeros_like(cent)
        for s in range(0, n, block):
            acc.index_add_(0, assign[s : s + block], xt[s : s + block].float())
        cent = acc / cnt
    return torch.argsort(assign, stable=True)


def _approx_torch(x32: np.ndarray, norms: np.ndarray, q0: int, q1: int, kk: int, device: torch.device,
                  block: int, low: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """Approximate top-``kk`` of ``score_ij = <x_i, x_j> - |x_j|^2 / 2`` for rows ``[q0, q1)``.

    Blocked GEMM (float32, or bf16 with ``low``). Each row block first takes a dense top-k over its own
    column block (which sets a good threshold: with all rows queried, the points are first put in a
    cluster-sorted order, so that block already holds most true neighbours), then every other block
    only hands over the entries that beat the row's current k-th best. With all rows queried, only
    blocks ``I < J`` are computed and serve both directions (the Gram matrix is symmetric): half the
    FLOPs. When the norms are (nearly) equal the ``|x_j|^2 / 2`` term is dropped ("folded", returned
    True): the scores are then the bare inner products.
    """
    with _exact_matmul():
        xt = torch.from_numpy(x32).to(device)
        n = xt.shape[0]
        spread = float(norms.max() - norms.min()) / 2
        fold = spread <= 1e-4 * max(float(norms.max()), 1e-300)
        hn = None if fold else torch.from_numpy((norms / 2).astype(np.float32)).to(device)
        symmetric = q0 == 0 and q1 == n
        if low and symmetric:  # every block serves many others: convert the whole matrix once
            xt = xt.to(torch.bfloat16)
        # a slice of the rows (a rank's shard): bf16 copies of its own rows only, and of each column block
        # as the GEMM takes it (1/block of the GEMM's work), not an N x d copy on every rank
        convert = low and not symmetric
        own = xt[q0:q1].to(torch.bfloat16) if convert else None
        perm = None
        if symmetric and n > 2 * block:  # cluster-sorted order: tight thresholds from the first block
            perm = _locality_order(xt)
            xt = xt[perm]
            hn = None if hn is None else hn[perm]
        top = _TopK(q1 - q0, kk, device)
        row_blocks = _chunks(q0, q1, block)

        def part(a: int, b: int) -> torch.Tensor:
            if own is not None and q0 <= a and b <= q1:
                return own[a - q0 : b - q0]
            return xt[a:b].to(torch.bfloat16) if convert else xt[a:b]

        def scores(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
            g = _gemm(part(r0, r1), part(c0, c1))
            return g if hn is None else g.float().sub_(hn[c0:c1])  # the subtraction in float32

        for r0, r1 in row_blocks:  # dense start: the rows' own block
            g = scores(r0, r1, r0, r1)
            with _one_thread(device):
                top.set_dense(r0 - q0, g, r0)
        if symmetric:  # blocks I < J serve rows of I and rows of J
            for a, (r0, r1) in enumerate(row_blocks):
                for c0, c1 in row_blocks[a + 1 :]:
                    g = _gemm(xt[r0:r1], xt[c0:c1])
                    g = g if hn is None else g.float()
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
        return v.cpu().numpy(), i.cpu().numpy(), fold


def _approx_vs(q32: np.ndarray, y32: np.ndarray, yn: np.ndarray, kk: int, device: torch.device,
               block: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Approximate float32 top-``kk`` of ``<q_i, y_j> - |y_j|^2 / 2`` for arbitrary queries ``q`` against
    the database ``y`` (the rows the bf16 pass could not settle, the IVF probes, recall samples).
    Same blocked scheme as :func:`_approx_torch` without the symmetric shortcut."""
    with _exact_matmul():
        q = torch.from_numpy(np.ascontiguousarray(q32)).to(device)
        y = torch.from_numpy(np.ascontiguousarray(y32)).to(device)
        spread = float(yn.max() - yn.min()) / 2
        fold = spread <= 1e-4 * max(float(yn.max()), 1e-300)
        hn = None if fold else torch.from_numpy((yn / 2).astype(np.float32)).to(device)
        top = _TopK(q.shape[0], kk, device)
        col_blocks = _chunks(0, y.shape[0], block)
        for r0, r1 in _chunks(0, q.shape[0], block):
            for b, (c0, c1) in enumerate(col_blocks):
                g = q[r0:r1] @ y[c0:c1].T
                if hn is not None:
                    g.sub_(hn[c0:c1])
                with _one_thread(device):
                    if b == 0:
                        top.set_dense(r0, g, c0)
                    else:
                        top.offer(r0, c0, g)
        v, o = torch.sort(top.val, dim=1, descending=True)
        return v.cpu().numpy(), torch.gather(top.idx, 1, o).cpu().numpy(), fold


def _torch_keys(sc: np.ndarray, fold: bool, d: int, qn: np.ndarray, yn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Approximate keys ``|y_j|^2 - 2 <q_i, y_j>`` from the float32 scores, and their bound ``delta``."""
    keys = -2.0 * sc.astype(np.float64)  # key = |y_j|^2 - 2 <q_i, y_j> (+ |q_i|^2, constant per row)
    spread = float(yn.max() - yn.min()) / 2 if fold else 0.0
    qr, ymax = np.sqrt(qn), math.sqrt(float(yn.max()))
    # dot error gamma*|q||y|, the roundings of |y_j|^2/2 and of the subtraction, the dropped norm
    # spread; all doubled by the key's factor 2
    delta = 2 * (_gamma(d) * qr * ymax + 2 * _U32 * (float(yn.max()) + qr * ymax) + spread)
    return keys, _SAFETY * delta + 1e-300


def _faiss_delta(d: int, qn: np.ndarray, yn_max: float) -> np.ndarray:
    """Bound on a faiss float32 squared distance: faiss may compute ``|x - y|^2`` directly or as
    norms - 2 dot; bound both generously."""
    delta = 4 * _gamma(d + 2) * (np.sqrt(qn) + math.sqrt(yn_max)) ** 2 + 8 * _U32 * (qn + yn_max)
    return _SAFETY * delta + 1e-300


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
    dist_, ids = index.search(np.ascontiguousarray(x32[q0:q1]), kk)
    keys = dist_.astype(np.float64) - norms[q0:q1, None]
    return keys, ids.astype(np.int64)


def faiss_has_gpu() -> bool:
    """Whether the installed faiss is the GPU build and sees a GPU (faiss-cpu: never)."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve(keys: np.ndarray, ids: np.ndarray, delta: np.ndarray, k: int, q: np.ndarray, qn: np.ndarray,
             y: np.ndarray, yn: np.ndarray) -> np.ndarray:
    """Exact top-k lists from approximate ``(m, kk)`` keys (ascending) and their bound ``delta``.

    Approximate keys closer than 2 delta form "tie groups" (chains in sorted order); the true order
    agrees with the approximate one between groups, so only members of groups of size > 1 that
    reach into the top k need exact keys. A group that reaches the last kept column may continue
    among points that were not kept: such rows are solved exactly against all points.
    """
    m, kk = keys.shape
    n = len(y)
    out = np.empty((m, k), np.int64)
    if m == 0:
        return out
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
        qi, yi = rows_r[rr], ids[rows_r][rr, cc]
        ex[rr, cc] = qn[qi] + yn[yi] - 2.0 * _dots2(q, qi, y, yi)
        g = group[rows_r]
        sid = ids[rows_r]
        # within a row: by group, then exact key (0 outside tie groups: singletons), then index
        rank_key = g + (np.arange(len(rows_r)) * (kk + 1))[:, None]  # rows never interleave
        order = np.lexsort((sid.ravel(), ex.ravel(), rank_key.ravel()))
        out[rows_r] = sid.ravel()[order].reshape(len(rows_r), kk)[:, :k]
    full = np.flatnonzero(overflow)
    if len(full):
        out[full] = _topk_exact_vs(q[full], y, yn, k)
    return out


def _exact_vs(q: np.ndarray, y: np.ndarray, yn: np.ndarray, k: int, *, qn: np.ndarray | None = None,
              extra: int = 8, block: int = 2048, device: torch.device | None = None,
              precision: Precision = "fp32", stats: dict[str, Any] | None = None) -> np.ndarray:
    """Exact top-k of arbitrary snapped queries ``q`` against the snapped database ``y``: from float32
    candidates, or (``precision`` bf16, or auto where :func:`_use_bf16` picks it) from bf16 candidates
    proven complete as in :func:`_bf16_search`, the unproven rows searched again from float32 ones.
    ``stats`` (if given) counts ``bf16_rows`` and ``bf16_fallback_rows``."""
    qn = exact_norms(q) if qn is None else qn
    dev = _device(device)
    if len(q) and _use_bf16(precision, "torch", dev, len(q) * len(y)):
        return _bf16_vs(q, y, yn, k, qn, extra, block, dev, stats)
    kk = min(len(y), k + max(1, extra))
    sc, ids, fold = _approx_vs(q, y, yn, kk, dev, block)
    keys, delta = _torch_keys(sc, fold, y.shape[1], qn, yn)
    return _resolve(keys, ids, delta, k, q, qn, y, yn)


def _augmented(a: np.ndarray, last: float | np.ndarray) -> np.ndarray:
    """Float32 ``[a, last, 0...]`` (zero-padded to a multiple of 16 columns). Queries take ``last = 1`` and
    database rows ``last = -|y|^2 / 2``: their inner product is then the score ``<q, y> - |y|^2 / 2``
    itself, so a bf16 GEMM of them needs no float32 pass over its output to subtract the norms."""
    d = a.shape[1]
    out = np.zeros((len(a), d + 1 + (-(d + 1)) % 16), np.float32)
    out[:, :d], out[:, d] = a, last
    return out


def _augmented_bound(qa: np.ndarray, ya_norms: tuple[float, float], hn_max: float) -> np.ndarray:
    """Per query: a bound on ``|s~_ij - s_ij|``, ``s~`` the bf16 GEMM of the augmented rows
    (:func:`_augmented`) and ``s_ij = <q_i, y_j> - |y_j|^2 / 2`` exact: :func:`_bf16_bound` of the
    augmented vectors (a bare inner product) plus the float32 rounding of ``|y_j|^2 / 2`` (doubled)."""
    hq, eq = _bf16_norms(qa)
    return _bf16_bound_of(hq, eq, ya_norms[0], ya_norms[1], qa.shape[1], 0.0, True) + 2 * _U32 * hn_max


def _bf16_vs(q: np.ndarray, y: np.ndarray, yn: np.ndarray, k: int, qn: np.ndarray, extra: int, block: int,
             device: torch.device, stats: dict[str, Any] | None) -> np.ndarray:
    """:func:`_bf16_search` for queries ``q`` against a small database ``y`` (the IVF centroids): same
    margin, proof and fp32 fallback. Each block of queries is scored against all of ``y`` by one bf16
    GEMM of augmented rows (:func:`_augmented`) and one top-k over the bf16 scores: at 50,000 centroids
    the blocked merge of :func:`_approx_vs` spent several times the GEMM's time passing over scores."""
    ny = len(y)
    m = len(q)
    kb = min(ny, k + max(2 * extra, k))
    kk = min(ny, kb + 1)
    ya = _augmented(y, -(yn / 2))
    hy, ey = _bf16_norms(ya)
    big = (float(hy.max()), float(ey.max()))
    yt = torch.from_numpy(ya).to(device).to(torch.bfloat16)
    hn_max = float(yn.max()) / 2
    out = np.empty((m, k), np.int64)
    redo: list[np.ndarray] = []
    rows = max(16, min(4096, (1 << 23) // max(1, ny)))  # score blocks of at most 16 MB (bf16)
    with _exact_matmul():
        for r0, r1 in _chunks(0, m, rows):
            qa = _augmented(q[r0:r1], 1.0)
            v, i = torch.topk(_gemm(torch.from_numpy(qa).to(device).to(torch.bfloat16), yt), kk, dim=1)
            sc = v.double().cpu().numpy()
            cand = i.cpu().numpy()[:, :kb]
            c = r1 - r0
            sq = (np.repeat(qn[r0:r1], kb) + yn[cand.ravel()]
                  - 2.0 * _dots2(q[r0:r1], np.repeat(np.arange(c), kb), y, cand.ravel())).reshape(c, kb)
            order = np.lexsort((cand, sq))  # per row: exact squared distance, then index
            out[r0:r1] = np.take_along_axis(cand, order[:, :k], 1)
            if kb < ny:  # some points were left out: prove none of them belongs in the top k
                s_k = (qn[r0:r1] - np.take_along_axis(sq, order[:, k - 1 : k], 1)[:, 0]) / 2  # exact k-th score
                bad = ~(s_k > sc[:, kb] + _augmented_bound(qa, big, hn_max))
                redo.append(np.flatnonzero(bad) + r0)
    back = np.concatenate(redo) if redo else np.empty(0, np.int64)
    if len(back):
        out[back] = _exact_vs(q[back], y, yn, k, qn=qn[back], extra=extra, block=block, device=device)
    if stats is not None:
        stats["bf16_rows"] = stats.get("bf16_rows", 0) + m
        stats["bf16_fallback_rows"] = stats.get("bf16_fallback_rows", 0) + len(back)
    return out


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX, as /proc/cpuinfo lists them) and
    torch's oneDNN kernels can use it. Without them a bf16 GEMM is emulated: slower than fp32."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", info) is not None


def _use_bf16(precision: str, backend: str, device: torch.device, pairs: int) -> bool:
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"knn precision={precision!r}: expected 'auto', 'fp32' or 'bf16'")
    if precision == "bf16" and backend == "faiss":
        raise ValueError("knn precision='bf16' needs the torch backend (faiss's flat index is float32 only)")
    if precision != "auto":
        return precision == "bf16"
    if backend != "torch":
        return False
    if device.type == "cuda":  # tensor cores
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16() and pairs >= _BF16_MIN_PAIRS


def _bf16_norms(x32: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """``(|bf16(x_i)|, |x_i - bf16(x_i)|)`` in float64: the rounded rows and their exact rounding errors
    (``x - bf16(x)`` is exact in float64), from the same round-to-nearest conversion the GEMM uses."""
    nh = np.empty(len(x32))
    ne = np.empty(len(x32))
    for s in range(0, len(x32), chunk):
        t = torch.from_numpy(x32[s : s + chunk])
        h = t.to(torch.bfloat16).double()
        nh[s : s + chunk] = torch.linalg.vector_norm(h, dim=1).numpy()
        ne[s : s + chunk] = torch.linalg.vector_norm(t.double() - h, dim=1).numpy()
    return nh, ne


def _bf16_bound(nh: np.ndarray, ne: np.ndarray, q0: int, q1: int, d: int, hn_max: float, fold: bool) -> np.ndarray:
    """Per query row ``i``: a bound on ``|s~_ij - s_ij|`` for every ``j``, where ``s~`` is the bf16-pass
    score and ``s_ij = <x_i, x_j> - |x_j|^2 / 2`` (folded: ``<x_i, x_j>``) the exact one.

    With ``h = bf16(x)`` (round to nearest, ``|h_k - x_k| <= 2**-8 |x_k|``) and ``e = x - h``:

    * inputs: ``<x_i, x_j> - <h_i, h_j> = <h_i, e_j> + <e_i, h_j> + <e_i, e_j>``, so by Cauchy-Schwarz
      the error is at most ``|h_i| E + |e_i| H + |e_i| E`` with ``H = max_j |h_j|``, ``E = max_j |e_j|``
      (the norms of the actual rounding errors: about 0.4 * 2**-8 |x| each, not the worst case 2**-8);
    * accumulation: bf16 x bf16 products are exact in fp32, and any order of fp32 additions errs by at
      most ``gamma_d sum_k |h_ik h_jk| <= gamma_d |h_i| H``;
    * result: rounding the fp32 accumulator to bf16 (CPU) errs by ``2**-8 (1 + gamma_d) |h_i| H``. These
      last two, the library's part, are doubled: that also covers a kernel that rounds partial sums
      over slices of ``d`` to bf16 once more (their magnitudes sum to at most ``|h_i| H`` by
      Cauchy-Schwarz);
    * subnormal products or sums flushed to zero: ``2 d 2**-126``;
    * unfolded: the float32 roundings of ``|x_j|^2 / 2`` and of the subtraction.
    """
    return _bf16_bound_of(nh[q0:q1], ne[q0:q1], float(nh.max()), float(ne.max()), d, hn_max, fold)


def _bf16_bound_of(hq: np.ndarray, eq: np.ndarray, big_h: float, big_e: float, d: int, hn_max: float,
                   fold: bool) -> np.ndarray:
    """:func:`_bf16_bound` from the queries' ``|h_i|``, ``|e_i|`` and the database's ``H``, ``E``."""
    g = _gamma(d)
    bound = hq * big_e + eq * big_h + eq * big_e
    bound += 2 * (g + _UBF16 * (1 + g)) * hq * big_h + 2 * d * 2.0**-126
    if not fold:
        bound += _U32 * ((1 + 3 * _UBF16) * hq * big_h + 3 * hn_max)
    return bound * (1 + 2.0**-30)  # the float64 evaluation of this bound


def _bf16_search(x32: np.ndarray, norms: np.ndarray, q0: int, q1: int, k: int, extra: int, block: int,
                 device: torch.device, stats: dict[str, Any] | None) -> np.ndarray:
    """Exact lists from bf16 candidates (module docstring): keep the top ``kb = k + margin`` bf16 scores
    plus the best score left out, re-score the ``kb`` exactly, accept a row when its exact k-th score
    beats that best left-out score plus the bound; search the other rows again in fp32."""
    n, d = x32.shape
    kb = min(n, k + max(2 * extra, k))  # the margin: ReID features leave a gap there (docs/knn.md)
    kk = min(n, kb + 1)
    sc, ids, fold = _approx_torch(x32, norms, q0, q1, kk, device, block, low=True)
    m = q1 - q0
    cand = ids[:, :kb]
    sq = exact_sqdist(x32, np.repeat(np.arange(q0, q1), kb), cand.ravel(), norms).reshape(m, kb)
    order = np.lexsort((cand, sq))  # per row: exact squared distance, then index
    out = np.take_along_axis(cand, order[:, :k], 1)
    bad = np.zeros(m, bool)
    if kb < n:  # some points were left out: prove none of them belongs in the top k
        s_k = (norms[q0:q1] - np.take_along_axis(sq, order[:, k - 1 : k], 1)[:, 0]) / 2  # exact k-th score
        left = sc[:, kb].astype(np.float64)  # no left-out point has a larger bf16 score
        if fold:  # folded scores are bare dots; s_j = dot_j - |x_j|^2/2 <= dot_j - min |x|^2 / 2
            left = left - float(norms.min()) / 2
        nh, ne = _bf16_norms(x32)
        bad = ~(s_k > left + _bf16_bound(nh, ne, q0, q1, d, float(norms.max()) / 2, fold))
    redo = np.flatnonzero(bad)
    if len(redo):
        out[redo] = _exact_vs(x32[redo + q0], x32, norms, k, qn=norms[redo + q0], extra=extra, block=block,
                              device=device)
    if stats is not None:
        stats.update(precision="bf16", bf16_candidates=kb, bf16_fallback_rows=len(redo))
    return out


def exact_knn(features: np.ndarray, k: int, rows: tuple[int, int] | None = None, backend: Backend = "auto",
              extra: int = 8, block: int = 2048, device: torch.device | str | None = None,
              precision: Precision = "auto", stats: dict[str, Any] | None = None) -> np.ndarray:
    """Exact k nearest neighbours by squared L2 (self included), ties by lower index.

    ``features`` must already be snapped (:func:`snap_features`). ``rows = (start, stop)`` restricts the
    queries to a slice (the sharded distributed path); the database is always all N points. Returns
    ``(stop - start, k)`` int64 ids sorted by distance. ``precision``: ``"fp32"`` candidates, ``"bf16"``
    candidates re-scored exactly (same lists, torch backend only), ``"auto"``: bf16 on CUDA and on CPUs
    with native bf16 (:func:`cpu_has_fast_bf16`) for large searches, else fp32. ``stats`` (if given)
    receives ``precision`` and, for bf16, ``bf16_fallback_rows`` (rows searched again in fp32).
    """
    x32 = np.ascontiguousarray(features, dtype=np.float32)
    n, d = x32.shape
    if not 1 <= k <= n:
        raise ValueError(f"knn: k={k} must be in [1, N={n}]")
    q0, q1 = rows if rows is not None else (0, n)
    if not 0 <= q0 <= q1 <= n:
        raise ValueError(f"knn: rows={rows} is not a slice of [0, {n}]")
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"knn backend={backend!r}: expected 'auto', 'torch' or 'faiss'")
    norms = exact_norms(x32)
    kk = min(n, k + max(1, extra))
    gpu = faiss_has_gpu()
    if backend == "auto":  # faiss-gpu where faiss sees a GPU; else the torch GEMM (faster than faiss-cpu here)
        backend = "faiss" if gpu else "torch"
    dev = _device(device)
    if q1 > q0 and _use_bf16(precision, backend, dev, (q1 - q0) * n):
        return _bf16_search(x32, norms, q0, q1, k, extra, block, dev, stats)
    if stats is not None:
        stats.update(precision="fp32")
    if backend == "torch":
        sc, ids, fold = _approx_torch(x32, norms, q0, q1, kk, dev, block)
        keys, delta = _torch_keys(sc, fold, d, norms[q0:q1], norms)
    else:
        keys, ids = _approx_faiss(x32, norms, q0, q1, kk, gpu)
        delta = _faiss_delta(d, norms[q0:q1], float(norms.max()))
    return _resolve(keys.astype(np.float64), ids, delta, k, x32[q0:q1], norms[q0:q1], x32, norms)


# --- IVF ----------------------------------------------------------------------------------------------------


def default_nlist(n: int) -> int:
    """Default number of IVF lists: ``N // IVF_LIST_SIZE`` (lists of ~20 points), at least 1 — 10,000
    lists at N = 200,000, 50,000 at N = 1,000,000.

    Finer than faiss's usual ``4 sqrt(N)`` because ReID features are many small clusters (an identity's
    images under one camera: a few to a few tens) and a k-NN list lives in a few of them: lists as
    coarse as ``4 sqrt(N)`` (~250 points at 1M) cut through them, and recall@20 >= 0.99 then needed a
    quarter of the database scanned; lists of ~20 points reach it scanning about 1 % (docs/knn.md).
    The price is the quantizer: k-means and the probes cost ``N x nlist x d``, i.e. N / 20 of one
    exact search's ``N^2 d`` each.
    """
    return max(1, n // IVF_LIST_SIZE)


class _ShardedSample:
    """The k-means training sample as faiss's python k-means (``faiss.contrib.clustering.kmeans``) sees
    it — its ``DatasetAssign`` interface — with the assignment step sharded over the ranks and exact.

    faiss's C++ ``Kmeans`` runs in one process; at 50,000 lists its assignment passes are the largest
    cost of the IVF path, so each rank assigns its own share of the sample rows and the ranks combine:
    the sums per centroid by an all-reduce, the assignments and distances by an all-gather. Every rank
    then runs faiss's same update on the same numbers and holds the same centroids, with no broadcast.
    Exact at every W: the centroids are snapped onto the features' grid before each assignment, the
    nearest centroid is exact (:func:`_exact_vs`, ties by lower id), and the per-centroid sums are float64
    sums of grid values far below ``2**53`` grid steps, exact in any order — so the quantizer, and the
    lists, do not depend on the number of ranks.
    """

    def __init__(self, x: np.ndarray, sample: np.ndarray, group: bool):
        self.x, self.sample, self.group = x, sample, group
        rank, world = (dist.get_rank(), dist.get_world_size()) if group else (0, 1)
        a, b = dist.shard_range(len(sample), rank, world)
        self.own = np.ascontiguousarray(x[sample[a:b]])  # this rank's share of the sample rows
        self.own_norms = exact_norms(self.own)
        self.amax = _abs_max(x)

    def count(self) -> int:
        return len(self.sample)

    def dim(self) -> int:
        return int(self.x.shape[1])

    def get_subset(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.x[self.sample[indices]], np.float64)

    def assign_to(self, centroids: np.ndarray, weights: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(nearest centroid, its squared distance, per-centroid sums)`` of the whole sample."""
        if weights is not None:
            raise ValueError("knn ivf k-means: weighted assignment is not supported")
        c = _snap_like(np.asarray(centroids), self.x, self.amax)
        cn = exact_norms(c)
        ii = _exact_vs(self.own, c, cn, 1, qn=self.own_norms, precision="auto")[:, 0] if len(self.own) \
            else np.empty(0, np.int64)
        dd = self.own_norms + cn[ii] - 2.0 * _dots2(self.own, np.arange(len(ii)), c, ii)
        sums = torch.zeros((len(c), c.shape[1]), dtype=torch.float64)
        for s in range(0, len(ii), 4096):  # float64 rows a few MB at a time
            sums.index_add_(0, torch.from_numpy(ii[s : s + 4096]),
                            torch.from_numpy(self.own[s : s + 4096].astype(np.float64)))
        if self.group:
            dev = dist.comm_device()
            sums = dist.all_reduce(sums.to(dev)).cpu()
            ii = dist.all_gather_variable(torch.from_numpy(ii).to(dev)).cpu().numpy()
            dd = dist.all_gather_variable(torch.from_numpy(dd).to(dev)).cpu().numpy()
        return ii, dd, sums.numpy()


def _train_centroids(x: np.ndarray, nlist: int, distributed: bool = False) -> np.ndarray:
    """k-means (L2) centroids on a seeded sample of ``IVF_TRAIN_PER_LIST * nlist`` rows (``IVF_SEED``):
    faiss's python k-means (its initialisation, update and splitting of empty centroids) over
    :class:`_ShardedSample`, so with ``distributed`` every rank assigns only its share of the sample and
    all ranks get the same centroids as one process."""
    import io

    from faiss.contrib.clustering import kmeans

    n = len(x)
    size = min(n, IVF_TRAIN_PER_LIST * nlist)
    sample = np.sort(np.random.default_rng(IVF_SEED).choice(n, size, replace=False))
    data = _ShardedSample(x, sample, distributed and dist.is_initialized())
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress word even with verbose=False
        cent = kmeans(nlist, data, niter=IVF_KMEANS_ITERS, seed=IVF_SEED, verbose=False)
    return np.ascontiguousarray(cent, dtype=np.float32)


IVFScan = Literal["auto", "faiss", "lists"]
_SCANS: tuple[IVFScan, ...] = ("faiss", "lists")  # the codes by which ranks tell each other their scan
_SCAN_BLOCK = 1 << 18
"""List-major scan: at most this many scores (1 MiB of float32) per GEMM block of queries x list members."""
_SCAN_ROWS = 2048
"""List-major scan: at most this many queries per GEMM block (3 MiB of gathered float32 rows at d = 384)."""


def _ivf_scan(scan: IVFScan) -> IVFScan:
    """The scan ``"auto"`` picks: faiss where faiss sees a GPU (faiss-gpu), else the list-major scan."""
    if scan not in ("auto", *_SCANS):
        raise ValueError(f"knn ivf scan={scan!r}: expected 'auto', 'faiss' or 'lists'")
    return ("faiss" if faiss_has_gpu() else "lists") if scan == "auto" else scan


class _IVFShard:
    """This rank's part of the IVF database (the rows ``[s0, s1)``, each in its assigned list) and the
    scan returning each query's best candidates among them in the query's probed lists.

    ``scan="faiss"``: a faiss ``IndexIVFFlat`` (L2) and its ``search_preassigned``, on this rank's GPU
    when faiss sees one (faiss-gpu), else on the CPU. ``"lists"``: the list-major CPU scan
    (:meth:`search`), float32 GEMMs. The CPU scan is written here because faiss's CPU IVF
    scan is query-major: one query against one probed list at a time, without BLAS (under 1 G
    multiply-adds/s on the 2-core bench machine, against ~40 G per core for a float32 GEMM), so at the
    nprobe ReID features need (64-128 of ~1,000 lists) it was slower than exact search. The list-major
    scan scores all the queries probing a list against its members in one GEMM.
    """

    def __init__(self, cent: np.ndarray, xs: np.ndarray, s0: int, assign: np.ndarray, nprobe: int,
                 scan: IVFScan):
        d = cent.shape[1]
        self.scan = scan
        self.res = None
        if scan == "lists":  # the rows sorted by list (a copy), their ids and halved exact norms
            order = np.argsort(assign, kind="stable")
            self.start = np.searchsorted(assign[order], np.arange(len(cent) + 1))
            self.y = torch.from_numpy(np.ascontiguousarray(xs[order]))
            self.ids = torch.from_numpy(order + s0)
            self.hn = torch.from_numpy((exact_norms(xs[order]) / 2).astype(np.float32))
            self.nbytes = len(xs) * (4 * d + 12)
            return
        import faiss
        from faiss.contrib.ivf_tools import add_preassigned

        self.quantizer = faiss.IndexFlatL2(d)
        self.quantizer.add(cent)  # trained before the IVF index is made: it is then trained too
        cpu = faiss.IndexIVFFlat(self.quantizer, d, len(cent), faiss.METRIC_L2)
        # named arrays: add_preassigned keeps only raw pointers to them, temporaries could be freed
        xs = np.ascontiguousarray(xs)
        lists = np.ascontiguousarray(assign, dtype=np.int64)
        ids = np.arange(s0, s0 + len(xs), dtype=np.int64)
        add_preassigned(cpu, xs, lists, ids)
        cpu.nprobe = nprobe
        cpu.parallel_mode = 3  # search_preassigned parallelises over queries only in modes 1-3 (default 0: one thread)
        self.index: Any = cpu
        if faiss_has_gpu():
            self.res = faiss.StandardGpuResources()
            dev = torch.cuda.current_device() if torch.cuda.is_available() else 0  # the rank's own GPU
            self.index = faiss.index_cpu_to_gpu(self.res, dev, cpu)
            self.index.nprobe = nprobe
            del cpu
        self.nbytes = len(xs) * (4 * d + 8)

    def search(self, q: np.ndarray, qn: np.ndarray, probes: np.ndarray, kp: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``kp`` nearest of each query (snapped ``q``, exact squared norms ``qn``) among this shard's
        points in the query's probed lists, ascending: approximate squared distances (float64; error
        bound: :func:`_ivf_delta`) and ids, ``inf`` and ``-1`` where there are fewer.

        List-major scan: the (query, probe) pairs are sorted by list; for each list, the queries probing
        it are gathered and scored against its members, ``<q, y> - |y|^2 / 2`` in float32 (a GEMM, then
        the subtraction), in blocks of at most ``_SCAN_BLOCK`` scores and ``_SCAN_ROWS`` queries, and
        merged into the running per-query top-``kp`` (:class:`_TopK`). Two
        passes: every query's first probe (its nearest list, which sets tight thresholds), then the
        rest, where most blocks then have nothing to offer. Memory: the blocks, ``kp`` candidates per
        query and ~20 bytes per (query, probe) pair.
        """
        if self.scan == "faiss":
            dd, ii = self.index.search_preassigned(np.ascontiguousarray(q), kp,
                                                   np.ascontiguousarray(probes, dtype=np.int64), None)
            return dd.astype(np.float64), ii
        # one worker thread per torch thread, each on its own slice of the queries with single-threaded
        # ops: the bookkeeping between GEMMs runs in parallel too (torch releases the GIL), and no
        # OpenMP team waits on a descheduled thread on a busy host
        prev = torch.get_num_threads()
        cuts = np.linspace(0, len(q), max(1, min(prev, len(q) // _SCAN_ROWS)) + 1).astype(np.int64)
        torch.set_num_threads(1)
        try:
            with _exact_matmul(), concurrent.futures.ThreadPoolExecutor(len(cuts) - 1) as pool:
                res = list(pool.map(lambda a, b: self._scan(q[a:b], probes[a:b], kp), cuts[:-1], cuts[1:]))
        finally:
            torch.set_num_threads(prev)
        v = torch.cat([r[0] for r in res])
        s = v.numpy().astype(np.float64)
        ii = np.where(np.isfinite(s), torch.cat([r[1] for r in res]).numpy(), -1)
        return qn[:, None] - 2.0 * s, ii  # -inf scores (nothing there) become inf distances

    def _scan(self, q: np.ndarray, probes: np.ndarray, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The list-major scan of :meth:`search` for the queries ``q``: their top-``kp`` scores (descending)
        and ids."""
        c, npb = probes.shape
        qt = torch.from_numpy(np.ascontiguousarray(q))
        top = _TopK(c, kp, torch.device("cpu"))
        # reused buffers: fresh multi-MB tensors would be mmap'ed and page-faulted in at every block,
        # which costs as much as the GEMM
        qbuf = torch.empty((min(c, _SCAN_ROWS), qt.shape[1]))
        sbuf = torch.empty(max(_SCAN_BLOCK, int(np.diff(self.start).max(initial=0))))  # >= every block
        for p0, p1 in ((0, 1), (1, npb)):
            flat = probes[:, p0:p1].ravel()
            order = np.argsort(flat, kind="stable")  # pairs by list, queries ascending within a list
            qstart = np.searchsorted(flat[order], np.arange(len(self.start)))
            pair_q = torch.from_numpy(order // (p1 - p0))
            for lst in np.flatnonzero((np.diff(qstart) > 0) & (np.diff(self.start) > 0)):
                m0, m1 = int(self.start[lst]), int(self.start[lst + 1])
                y, hn, ids = self.y[m0:m1], self.hn[m0:m1], self.ids[m0:m1]
                step = max(1, min(_SCAN_ROWS, _SCAN_BLOCK // (m1 - m0)))
                for r0, r1 in _chunks(int(qstart[lst]), int(qstart[lst + 1]), step):
                    rows = pair_q[r0:r1]
                    size = (r1 - r0) * (m1 - m0)
                    qs = torch.index_select(qt, 0, rows, out=qbuf[: r1 - r0])
                    sc = torch.mm(qs, y.T, out=sbuf[:size].view(r1 - r0, m1 - m0))
                    _offer_rows(top, rows, ids, sc.sub_(hn))
        v, o = torch.sort(top.val, dim=1, descending=True)
        return v, torch.gather(top.idx, 1, o)


def _offer_rows(top: _TopK, rows: torch.Tensor, cols: torch.Tensor, s: torch.Tensor) -> None:
    """Offer the scores ``s`` of the queries ``rows`` (ascending) against the points ``cols`` to ``top``:
    only the rows with an entry beating their threshold, each with its best entries (dense merge)."""
    thr = top.thr.index_select(0, rows)
    hit = torch.nonzero(s.amax(1) > thr).flatten()
    if hit.numel() == 0:
        return
    sub = s.index_select(0, hit)
    # no row needs more than its entries beating the threshold: once the thresholds are tight, a
    # few, and a top-few costs far less than a top-kk
    width = min(top.kk, int((sub > thr.index_select(0, hit)[:, None]).sum(1).max()))
    v, i = torch.topk(sub, width, dim=1)
    top.merge_dense(rows.index_select(0, hit), v, cols[i])


def _ivf_probes(x: np.ndarray, r0: int, r1: int, cent: np.ndarray, cn: np.ndarray, npb: int, chunk: int,
                extra: int, block: int, device: torch.device) -> np.ndarray:
    """The ``npb`` nearest centroids of the rows ``[r0, r1)``, exactly (ties by centroid id), as int32. In
    row chunks of at most ``2**23 / (npb + extra + 1)`` rows: the candidate pass keeps ~40 bytes per row
    and candidate, ~40 GB for N = 10**6 at nprobe = 1,152 in one piece, ~320 MB per chunk."""
    out = np.empty((r1 - r0, npb), np.int32)
    rows = max(256, min(chunk, (1 << 23) // (npb + extra + 1)))
    for c0, c1 in _chunks(r0, r1, rows):
        out[c0 - r0 : c1 - r0] = _exact_vs(x[c0:c1], cent, cn, npb, extra=extra, block=block, device=device,
                                           precision="auto")
    return out


def _ivf_delta(scans: set[IVFScan], d: int, norms: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Per query row ``r0 .. r1 - 1``: a bound on the error of every approximate squared distance the
    ``scans`` return (the larger of their bounds, for a job whose ranks scan differently):

    * faiss: :func:`_faiss_delta`;
    * lists: ``|q|^2 - 2 (<q, y> - |y|^2 / 2)`` from the float32 GEMM (error ``gamma_d |q| |y|``) and the
      float32 roundings of ``|y|^2 / 2`` and of the subtraction, doubled by the factor 2 (the bound of
      :func:`_torch_keys`, with its safety factor).
    """
    qn, yn_max = norms[r0:r1], float(norms.max())
    out = np.zeros(r1 - r0)
    if "faiss" in scans:
        out = np.maximum(out, _faiss_delta(d, qn, yn_max))
    if "lists" in scans:
        qr, ymax = np.sqrt(qn), math.sqrt(yn_max)
        out = np.maximum(out, _SAFETY * 2 * (_gamma(d) * qr * ymax + 2 * _U32 * (yn_max + qr * ymax)) + 1e-300)
    return out


class _ListMembers:
    """Which points each IVF list holds (CSR over the global assignment), for the exact fallback."""

    def __init__(self, assign: np.ndarray, nlist: int):
        self.order = np.argsort(assign, kind="stable")
        self.start = np.searchsorted(assign[self.order], np.arange(nlist + 1))

    def members(self, lists: np.ndarray) -> np.ndarray:
        return np.concatenate([self.order[self.start[c] : self.start[c + 1]] for c in lists])


def _ivf_merge(x: np.ndarray, norms: np.ndarray, r0: int, dd: np.ndarray, ii: np.ndarray, k: int,
               kp: int, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge the shards' candidates of queries ``r0, r0 + 1, ...``: ``dd``/``ii`` are ``(W, c, kp)``.

    Keeps the ``kp`` best by scan distance (then id), re-scores them exactly and returns
    ``(top-k ids, certified, exhausted)``. A row is certified when its exact k-th distance is below
    every distance the probed points left out can have: ``L - delta`` (``delta``: the scans' error
    bound per row, :func:`_ivf_delta`), with ``L`` the smallest scan distance not kept (the last one of
    every shard that returned ``kp``, the first one dropped here).
    ``exhausted``: the probed lists hold fewer than k points.
    """
    n, d = x.shape
    w, c, _ = dd.shape
    dist_all = np.concatenate(list(dd), 1).astype(np.float64)
    ids_all = np.concatenate(list(ii), 1)
    missing = ids_all < 0
    dist_all[missing] = np.inf
    ids_all = np.where(missing, n, ids_all)  # sentinel: after every real id
    o = np.lexsort((ids_all, dist_all))
    dist_s, ids_s = np.take_along_axis(dist_all, o, 1), np.take_along_axis(ids_all, o, 1)
    left = np.full(c, np.inf)
    for s in range(w):  # a shard that returned kp points may hold more, at least as far
        left = np.where(ii[s, :, kp - 1] >= 0, np.minimum(left, dd[s, :, kp - 1].astype(np.float64)), left)
    if dist_s.shape[1] > kp:
        left = np.minimum(left, dist_s[:, kp])
    cand = ids_s[:, :kp]
    valid = cand < n
    ex = np.full(cand.shape, np.inf)
    rr, cc = np.nonzero(valid)
    ex[rr, cc] = exact_sqdist(x, rr + r0, cand[rr, cc], norms)
    o2 = np.lexsort((cand, ex))
    top = np.take_along_axis(cand, o2[:, :k], 1)
    exk = np.take_along_axis(ex, o2[:, k - 1 : k], 1)[:, 0]
    nvalid = valid.sum(1)
    certified = (nvalid >= k) & (exk < left - delta)
    exhausted = (nvalid < k) & np.isinf(left)
    return top, certified, exhausted


def _search_ivf(x: np.ndarray, k: int, rows: tuple[int, int], nprobe: int, nlist: int | None, extra: int,
                block: int, device: torch.device, distributed: bool, chunk: int,
                stats: dict[str, Any] | None, scan: IVFScan = "auto") -> np.ndarray:
    """k-NN lists from an IVF index (squared L2 on the snapped features): faiss's k-means quantizer;
    the inverted lists scanned by faiss-gpu where faiss sees a GPU, else by the list-major GEMM scan
    of :class:`_IVFShard` (``scan``: :func:`_ivf_scan`; tests and benchmarks force one).

    1. **Quantizer**: ``nlist`` centroids (:func:`default_nlist`) by faiss k-means on a seeded sample,
       trained on rank 0 and broadcast, then snapped onto ``x``'s grid (:func:`_snap_like`).
    2. **Probes**: each query's ``nprobe`` nearest centroids and each stored point's nearest one, *exactly*
       (the flat machinery, ties by centroid id; :func:`_ivf_probes`), so the list a point lives in and
       the lists a query visits are a function of that point alone — not of how the rows were batched or
       split over ranks. A point lives in its nearest centroid's list (its first probe's).
    3. **Sharded database**: with ``distributed`` each rank indexes only its own rows
       (``dist.shard_range``); every rank scans every query's probed lists in its shard, query owner by
       owner and chunk by chunk (the owner broadcasts the chunk's probes), and the owner gathers the
       ``kp = k + extra`` best of each shard. Per rank: index memory ``N/W`` times ``4d + 8`` bytes
       (faiss) or ``4d + 12`` (list-major scan), probes ``4 nprobe`` bytes per own query, candidate
       traffic ``kp x 12`` bytes per query sent in all (``N/W`` queries to each owner) and received
       for each own query from each rank.
    4. **Exact within the probed lists**: the candidates are re-scored exactly; a row is accepted when
       the scan's error bound proves nothing left out of the probed lists is closer (:func:`_ivf_merge`),
       otherwise all its probed points are scored exactly. The list is thus the exact top-k of the
       points in its probed lists (rows whose lists hold fewer than k points: the exact top-k of all
       points) — identical for any number of ranks and any scan.
    """
    n, d = x.shape
    group = distributed and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if group else (0, 1)
    q0, q1 = rows
    if group and (q0, q1) != dist.shard_range(n, rank, world):
        own = dist.shard_range(n, rank, world)
        raise ValueError(f"knn ivf: distributed rows={rows} must be this rank's shard {own}")
    nl = default_nlist(n) if nlist is None else nlist
    if not 1 <= nl <= n:
        raise ValueError(f"knn ivf: nlist={nl} must be in [1, N={n}]")
    if nprobe < 1:
        raise ValueError(f"knn ivf: nprobe={nprobe} must be >= 1")
    npb = min(nprobe, nl)
    own_scan = _ivf_scan(scan)
    times: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - tick
        tick = now

    cent = _snap_like(_train_centroids(x, nl, group), x)
    lap("train")
    s0, s1 = (q0, q1) if group else (0, n)  # the rows this rank stores
    cn = exact_norms(cent)
    probes = _ivf_probes(x, q0, q1, cent, cn, npb, chunk, extra, block, device)  # the query rows'
    assign = probes[:, 0] if (s0, s1) == (q0, q1) else \
        _ivf_probes(x, s0, s1, cent, cn, 1, chunk, extra, block, device)[:, 0]  # homes of the stored rows
    lap("probes")
    shard = _IVFShard(cent, x[s0:s1], s0, assign, npb, own_scan)
    scans = {own_scan}
    if group:
        assign = dist.all_gather_variable(torch.from_numpy(assign).to(dist.comm_device())).cpu().numpy()
        code = torch.tensor([_SCANS.index(own_scan)], dtype=torch.int64, device=dist.comm_device())
        scans = {_SCANS[int(c)] for c in dist.all_gather_variable(code).cpu()}  # a mixed job: every bound
    lap("build")
    norms = exact_norms(x)
    kp = min(n, k + max(1, extra))
    out = np.empty((q1 - q0, k), np.int64)
    rescan: list[np.ndarray] = []
    flat: list[np.ndarray] = []
    for owner in range(world):
        o0, o1 = dist.shard_range(n, owner, world) if group else (q0, q1)
        for c0, c1 in _chunks(o0, o1, chunk):
            pr = probes[c0 - q0 : c1 - q0] if rank == owner else np.empty((c1 - c0, npb), probes.dtype)
            if group:
                pr = dist.broadcast(torch.from_numpy(np.ascontiguousarray(pr)).to(dist.comm_device()),
                                    src=owner).cpu().numpy()
            dd, ii = shard.search(x[c0:c1], norms[c0:c1], pr, kp)
            lap("search")
            if group:
                dd_all = _gather_to(torch.from_numpy(dd), owner)
                ii_all = _gather_to(torch.from_numpy(ii), owner)
            else:
                dd_all, ii_all = dd[None], ii[None]
            lap("exchange")
            if rank == owner:
                delta = _ivf_delta(scans, d, norms, c0, c1)
                top, ok, exhausted = _ivf_merge(x, norms, c0, dd_all, ii_all, k, kp, delta)
                out[c0 - q0 : c1 - q0] = top
                rescan.append(np.flatnonzero(~ok & ~exhausted) + c0)
                flat.append(np.flatnonzero(exhausted) + c0)
                lap("merge")
    redo = np.concatenate(rescan) if rescan else np.empty(0, np.int64)
    if len(redo):  # exact over every point of the probed lists
        members = _ListMembers(assign, nl)
        for i in redo:
            cand = members.members(probes[i - q0])
            ex = exact_sqdist(x, np.full(len(cand), i), cand, norms)
            out[i - q0] = cand[np.lexsort((cand, ex))[:k]]
    full = np.concatenate(flat) if flat else np.empty(0, np.int64)
    if len(full):
        out[full - q0] = _exact_vs(x[full], x, norms, k, qn=norms[full], extra=extra, block=block, device=device)
    lap("fallback")
    if stats is not None:
        stats.update(index="ivf", nlist=nl, nprobe=npb, ivf_scan=own_scan, ivf_candidates=kp,
                     ivf_rescanned_rows=len(redo), ivf_exhausted_rows=len(full), index_bytes=shard.nbytes,
                     ivf_times=times)
    return out


def _gather_to(t: torch.Tensor, dst: int) -> np.ndarray:
    """Gather equally shaped tensors on rank ``dst`` (rank order, stacked); other ranks get an empty array."""
    import torch.distributed as tdist

    t = t.to(dist.comm_device()).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())] if dist.get_rank() == dst else None
    tdist.gather(t, parts, dst=dst)
    return torch.stack(parts).cpu().numpy() if parts is not None else np.empty(0)


# --- entry points -------------------------------------------------------------------------------------------


def search_knn(x: np.ndarray, k: int, *, rows: tuple[int, int], index: Index = "flat", nprobe: int = 16,
               nlist: int | None = None, backend: Backend = "auto", device: torch.device | str | None = None,
               distributed: bool = False, stats: dict[str, Any] | None = None, precision: Precision = "auto",
               chunk: int = 16384) -> np.ndarray:
    """k-NN lists of the query rows ``rows = (start, stop)`` of the snapped features ``x`` (every rank
    passes all N rows): ``(stop - start, k)`` int64 ids, by squared L2 then lower index, self included.

    ``index="flat"``: exact search (:func:`exact_knn`, ``backend``/``precision`` as there); each rank
    searches its own rows against all points. ``index="ivf"``: an IVF index (:func:`_search_ivf`) with
    ``nlist`` lists (default :func:`default_nlist`) of which ``nprobe`` are visited per query;
    ``distributed=True`` shards its database by rows (``rows`` must then be ``dist.shard_range``) and
    gives the same lists as one process. Its quantizer is faiss k-means (``backend`` must be ``auto`` or
    ``faiss``); its lists are scanned by faiss-gpu on this rank's GPU where faiss sees one, else by a
    list-major float32 GEMM scan on the CPU: ``precision`` must be ``auto`` or ``fp32``.
    ``stats`` (if given) receives what was done (precision, fallback rows, IVF sizes and times).
    """
    xs = np.ascontiguousarray(x, dtype=np.float32)
    n = xs.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"knn: k={k} must be in [1, N={n}]")
    q0, q1 = rows
    if not 0 <= q0 <= q1 <= n:
        raise ValueError(f"knn: rows={rows} is not a slice of [0, {n}]")
    if index == "flat":
        if stats is not None:
            stats.update(index="flat")
        return exact_knn(xs, k, rows=rows, backend=backend, device=device, precision=precision, stats=stats)
    if index != "ivf":
        raise ValueError(f"knn index={index!r}: expected 'flat' or 'ivf'")
    if backend not in ("auto", "faiss"):
        raise ValueError(f"knn backend={backend!r} has no IVF index: use 'auto' or 'faiss' with index='ivf'")
    if precision not in ("auto", "fp32"):
        raise ValueError(f"knn precision={precision!r}: the IVF scan is float32 ('auto' or 'fp32')")
    return _search_ivf(xs, k, rows, nprobe, nlist, 8, 2048, _device(device), distributed, chunk, stats)


def knn_recall(x: np.ndarray, lists: np.ndarray, rows: tuple[int, int], k: int, sample: int = 1000,
               seed: int = 0, device: torch.device | str | None = None) -> float:
    """recall@k of ``lists`` (the k-NN lists of the query rows ``rows``) against exact search: the mean
    over a seeded sample of ``sample`` rows of ``|lists[i, :k] & exact_i| / k``. Only the sampled rows
    are searched exactly (float32 pass + exact resolution, :func:`_exact_vs`)."""
    xs = np.ascontiguousarray(x, dtype=np.float32)
    q0, q1 = rows
    m = q1 - q0
    if lists.shape[0] != m or lists.shape[1] < k or not 1 <= k <= len(xs):
        raise ValueError(f"knn_recall: lists of shape {lists.shape} do not hold k={k} columns for rows={rows}")
    if m == 0:
        return 1.0
    pick = np.sort(np.random.default_rng(seed).choice(m, min(m, sample), replace=False))
    norms = exact_norms(xs)
    want = _exact_vs(xs[pick + q0], xs, norms, k, qn=norms[pick + q0], device=_device(device))
    hits = (lists[pick, :k, None] == want[:, None, :]).any(2).sum()
    return float(hits) / (len(pick) * k)


def recall_warning(recall: float, floor: float, k: int, nprobe: int) -> str | None:
    """The one-line warning for an IVF recall below ``tmgf.knn_recall_floor`` (None when it is not)."""
    if recall >= floor:
        return None
    return (f"k-NN recall@{k} of the IVF index is {recall:.4f} < tmgf.knn_recall_floor={floor}: raise "
            f"tmgf.knn_nprobe (now {nprobe}, e.g. tmgf.knn_nprobe={2 * nprobe}) or use tmgf.knn_index=flat")


__all__ = ["snap_features", "exact_dots", "exact_norms", "exact_sqdist", "exact_knn", "search_knn", "knn_recall",
           "recall_warning", "default_nlist", "cpu_has_fast_bf16", "faiss_has_gpu"]
