"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), dense, for moderate evaluation sets.

With ``X = [query; gallery]`` (``N = q + g`` rows, L2-normalized) and ``d`` the squared Euclidean
distance of unit vectors, each row divided by its maximum (``d̃``):

* ``N(i, k)``: the first ``k + 1`` items of row ``i`` ordered by ``(d̃, index)`` (``i`` itself included).
* ``R(i, k) = {j ∈ N(i, k) : i ∈ N(j, k)}`` (k-reciprocal neighbours).
* ``R*(i) = R(i, k1) ∪ R(c, k1h)`` for every ``c ∈ R(i, k1)`` with
  ``|R(c, k1h) ∩ R(i, k1)| > 2/3 · |R(c, k1h)|``, where ``k1h = round(k1 / 2)`` (half to even, as
  ``np.around`` in the reference code).
* ``V[i, j] = exp(−d̃[i, j]) / Σ_{j' ∈ R*(i)} exp(−d̃[i, j'])`` for ``j ∈ R*(i)``, else 0; then, if
  ``k2 > 1``, local query expansion ``V[i] ← mean of V[j] over the first k2 items of row i``.
* Jaccard distance ``1 − Σ_k min(V[i,k], V[j,k]) / Σ_k max(V[i,k], V[j,k])``, and the result
  ``(1 − λ) · jaccard + λ · d̃`` on the query × gallery block.

The reference implementation stores V in float16; this one computes in float32, so values can
differ from it in the 3rd-4th digit while following the same definitions exactly.

Memory: dense ``N × N`` float32 matrices, about ``8 · N²`` bytes at peak (Market-1501:
N = 19,281 → about 3 GB; MSMT17: N = 93,820 → about 70 GB, out of reach — use the sparse
k-NN Jaccard of ``trainer.cluster`` for such sets). Time is ``O(N² log N)`` for the row sorts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor


def _reciprocal(top: torch.Tensor, k: int) -> torch.Tensor:
    """``mask[i, a]``: whether ``top[i, a]`` (a ≤ k) has ``i`` among its own first ``k + 1``."""
    fwd = top[:, : k + 1]
    me = torch.arange(top.shape[0], device=top.device)[:, None, None]
    return (fwd[fwd] == me).any(-1)  # [N, k+1]; fwd[fwd] is [N, k+1, k+1]


@torch.no_grad()
def re_ranking(qf: ArrayLike, gf: ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               device: torch.device | str | None = None, chunk: int = 1024) -> np.ndarray:
    """Re-ranked ``q × g`` distance matrix (numpy float32) from query and gallery features.

    ``k1`` (k-reciprocal neighbourhood), ``k2`` (query expansion), ``lambda_value`` (weight of the
    original distance) follow the paper's notation; defaults are the TMGF/O2CAP values. Features
    are L2-normalized here, as in :func:`trainer.evaluation.rank.evaluate_features`.
    See the module docstring for the definitions and the **O(N²) memory** (moderate sizes only).
    """
    if k1 < 1 or k2 < 1:
        raise ValueError(f"re_ranking: k1={k1}, k2={k2}: expected both >= 1")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"re_ranking: lambda_value={lambda_value}: expected a value in [0, 1]")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    q = torch.as_tensor(qf).to(device, torch.float32)
    g = torch.as_tensor(gf).to(device, torch.float32)
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"re_ranking: expected q×d and g×d features, got {tuple(q.shape)} and {tuple(g.shape)}")
    num_q = q.shape[0]
    x = F.normalize(torch.cat([q, g]), dim=1)
    n = x.shape[0]
    k1h = int(round(k1 / 2))
    width = min(n, max(k1 + 1, k2))

    # Row-normalized distances and the first `width` neighbours of every row (stable: ties by index).
    dist = torch.empty((n, n), dtype=torch.float32, device=device)
    top = torch.empty((n, width), dtype=torch.long, device=device)
    for s in range(0, n, chunk):
        block = (2.0 - 2.0 * (x[s : s + chunk] @ x.t())).clamp_min_(0.0)
        block /= block.amax(dim=1, keepdim=True).clamp_min_(1e-12)
        dist[s : s + chunk] = block
        top[s : s + chunk] = torch.sort(block, dim=1, stable=True).indices[:, :width]

    kk1, kk1h = min(k1, width - 1), min(k1h, width - 1)
    rec = _reciprocal(top, kk1)  # [N, k1+1]
    rec_h = _reciprocal(top, kk1h)  # [N, k1h+1]
    fwd, fwd_h = top[:, : kk1 + 1], top[:, : kk1h + 1]
    size_h = rec_h.sum(1)  # |R(c, k1h)|

    # V row by row (chunks): expanded set R*(i) as a dense mask, then softmax of -d̃ over it.
    v = torch.zeros((n, n), dtype=torch.float32, device=device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        r_idx, r_ok = fwd[s:e], rec[s:e]  # R(i): [b, k1+1] with validity
        cand_idx = fwd_h[r_idx]  # R(c, k1h) of each c ∈ N(i, k1): [b, k1+1, k1h+1]
        cand_ok = rec_h[r_idx] & r_ok[:, :, None]
        in_r = ((cand_idx[..., None] == r_idx[:, None, None, :]) & r_ok[:, None, None, :]).any(-1)
        overlap = (in_r & cand_ok).sum(-1)  # |R(c, k1h) ∩ R(i, k1)|
        take = r_ok & (3 * overlap > 2 * size_h[r_idx])  # |∩| > 2/3 |R(c, k1h)|, in integers
        mask = torch.zeros((e - s, n + 1), dtype=torch.bool, device=device)  # column n: discarded
        mask.scatter_(1, torch.where(r_ok, r_idx, n), True)
        extra = torch.where(cand_ok & take[:, :, None], cand_idx, n).reshape(e - s, -1)
        mask.scatter_(1, extra, True)
        mask = mask[:, :n]
        w = torch.exp(-dist[s:e]) * mask
        v[s:e] = w / w.sum(1, keepdim=True)
    dist_qg = dist[:num_q, num_q:].clone()
    del dist

    if k2 > 1:
        v_qe = torch.empty_like(v)
        for s in range(0, n, chunk):
            v_qe[s : s + chunk] = v[top[s : s + chunk, :k2]].mean(1)
        v = v_qe

    # Jaccard distance of each query to every gallery item, over the query's non-zero columns.
    sums = v.sum(1)
    gallery = v[num_q:]
    jaccard = torch.empty((num_q, n - num_q), dtype=torch.float32, device=device)
    for i in range(num_q):
        cols = torch.nonzero(v[i]).squeeze(1)
        inter = torch.minimum(v[i, cols][None, :], gallery[:, cols]).sum(1)
        jaccard[i] = 1.0 - inter / (sums[i] + sums[num_q:] - inter)
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist_qg
    return final.cpu().numpy()


__all__ = ["re_ranking"]
