"""O2CAP offline/online association losses over camera-aware proxy memories, and the TMGF total loss.

For a slot (global feature or one part) with L2-normalised features ``x`` [B, D], the memory
``M`` [P, D] (read *before* this step's momentum update) and each sample's proxy ``p_i``:

* scores ``s = x M^T``, logits ``z = s / tau`` (tau = 0.07);
* **offline** (``docs/methods/tmgf.md`` §Offline loss): positives = every proxy of ``p_i``'s cluster,
  negatives = the ``neg_k`` (50) highest-scoring other proxies (all of them when fewer exist);
* **online** (§Online loss): balanced similarity ``S = w s + (1 - w) <M[p_i], M[q]>`` (w = 0.15, detached);
  per camera the proxy with the largest S (cameras without proxies are skipped); positives = the
  ``pos_k`` (3) best of those per-camera candidates, negatives = the ``neg_k`` highest-S others;
* both: soft-target cross entropy over positives + negatives, target ``1/|Pos|`` on each positive.

Everything is vectorised over slots and samples with masks over the P proxies (no loop over the
batch; the official code loops over samples and cameras and forms the full P x P proxy Gram
matrix, here only the B needed rows are computed). The scores are computed in fp32 even inside an
autocast region (the official scores are fp16 under AMP; fp32 costs little here and keeps the
positive/negative selection free of fp16 ties).

Ties: every top-k (hard negatives, per-camera best proxy, online positives) breaks exact ties by the
lower proxy id (``torch.topk`` leaves the order unspecified), so both memory layouts select the same
proxies.

Distributed runs: each sample's loss depends only on its own features and the memory, so with
``reduction="mean"`` and equal per-rank batches, DDP's gradient averaging reproduces the
single-process global-batch gradient exactly. ``camera_groups`` reduces each rank's own batch
(a per-rank camera grouping, not the global one).

Sharded memory (:func:`tmgf_loss_sharded`, ``docs/proxy_memory.md``): rank r holds only the proxies
``[start, stop)``. The features of the global batch are gathered once (with autograd); each rank
scores all of them against its own proxies and sends, per sample and slot, only what the merge needs:
the partial log-sum-exp and score sum over its positives of the offline loss, its top-``neg_k``
offline candidates, its best proxy per camera (online), then its top-(fill + ``neg_k``) online
candidates outside the positives — volumes set by the batch, ``neg_k``/``pos_k`` and the number of
cameras, never by P. Each rank merges its own samples' pieces (ties by proxy id) and reduces them as
above, so its loss and the gradient that reaches its samples equal the replicated layout's (the CSL
convention, ``trainer/losses/csl.py``: every gather's backward returns each rank's share).

Edge cases (the official code fails on the first and last; the second it does implicitly):

* a camera whose images are all outliers has no proxy: it is skipped (the official argmax over an
  empty set fails);
* fewer cameras with proxies than ``pos_k``: the official code still gives target ``1/pos_k`` to
  the last ``pos_k`` selected logits, i.e. it fills the positives with the highest-S remaining
  proxies. ``few_cams="fill"`` (default) reproduces that; ``few_cams="clip"`` uses only the
  per-camera candidates (target ``1/#candidates``);
* fewer proxies than ``|Pos| + neg_k``: every proxy is used (the O2CAP repository's online loss
  would fail on a length mismatch; TMGF's slicing already does this).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer import dist
from trainer.cluster.proxies import CameraProxies
from trainer.config import O2CAP_FEW_CAMS as FEW_CAMS
from trainer.config import O2CAP_REDUCTIONS as REDUCTIONS
from trainer.config import O2CAPLossConfig


@dataclass
class ProxyTables:
    """The proxy lookup tables as device tensors (built once per re-clustering)."""

    proxy2cluster: torch.Tensor
    """[P] long: cluster of each proxy."""
    proxy2cam: torch.Tensor
    """[P] long: camera of each proxy."""
    cam_table: torch.Tensor
    """[C', L] long: proxies of each camera that has any, padded with -1 (C' cameras, L = largest)."""

    @property
    def num_proxies(self) -> int:
        return int(self.proxy2cluster.shape[0])

    @property
    def device(self) -> torch.device:
        return self.proxy2cluster.device

    def to(self, device: torch.device | str) -> ProxyTables:
        return ProxyTables(self.proxy2cluster.to(device), self.proxy2cam.to(device), self.cam_table.to(device))

    @classmethod
    def from_proxies(cls, proxies: CameraProxies, device: torch.device | str = "cpu") -> ProxyTables:
        sizes = np.diff(proxies.cam_ptr)
        cams = np.nonzero(sizes > 0)[0]
        width = int(sizes.max()) if cams.size else 0
        table = np.full((cams.size, width), -1, dtype=np.int64)
        for row, cam in enumerate(cams):  # C' <= a few dozen cameras: once per epoch
            members = proxies.cam2proxy(int(cam))
            table[row, : members.size] = members
        as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long, device=device)  # noqa: E731
        return cls(as_t(proxies.proxy2cluster), as_t(proxies.proxy2cam), as_t(table))


def _scores(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """[S, B, D] x [S, P, D] -> [S, B, P] cosine scores, fp32 or wider even under autocast."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, memory.dtype), torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.matmul(x.to(dtype), memory.to(dtype).transpose(-1, -2))


def _soft_ce(z: torch.Tensor, pos: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Per-sample soft-target CE over the selected logits: logsumexp_sel(z) - mean_pos(z). [..., P] -> [...]."""
    lse = torch.logsumexp(z.masked_fill(~sel, float("-inf")), dim=-1)
    n_pos = pos.sum(dim=-1).to(z.dtype)
    return lse - (z * pos.to(z.dtype)).sum(dim=-1) / n_pos


def _top_mask(values: torch.Tensor, k: int, exclude: torch.Tensor) -> torch.Tensor:
    """Mask of the ``k`` largest ``values`` outside ``exclude`` (fewer where fewer remain).

    Exact ties at the k-th value go to the lowest positions of the last dimension (the lowest proxy
    ids, in either layout): ``topk`` gives the k-th value, the cumulative count of its ties the order.
    """
    mask = torch.zeros(exclude.shape, dtype=torch.bool, device=exclude.device)
    k = min(k, values.shape[-1])
    if k == 0:
        return mask
    v = values.masked_fill(exclude, float("-inf"))
    kth = v.topk(k, dim=-1).values[..., -1:]
    above = v > kth
    tie = (v == kth) & torch.isfinite(kth)
    need = k - above.sum(dim=-1, keepdim=True)
    return above | (tie & (tie.cumsum(dim=-1) <= need))


def _lex_top(values: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``values`` along the last dimension, exact ties to the smaller ``keys``
    (proxy ids). Two stable sorts: for short rows (cameras, merged candidates), not for all P proxies."""
    by_key = keys.argsort(dim=-1, stable=True)
    by_value = values.gather(-1, by_key).argsort(dim=-1, descending=True, stable=True)
    return by_key.gather(-1, by_value[..., :k])


def _masked_lse(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension restricted to ``mask``: -inf for an empty set, with a finite
    (zero) gradient there, and an empty last dimension allowed (a rank that holds no proxy)."""
    if x.shape[-1] == 0:
        return x.sum(dim=-1) + float("-inf")  # stays in the graph: every rank's gathers need a backward
    xm = x.masked_fill(~mask, float("-inf"))
    top = xm.detach().amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (xm - top).exp().sum(dim=-1)
    some = total > 0
    return torch.where(some, top.squeeze(-1) + torch.log(torch.where(some, total, torch.ones_like(total))),
                       torch.full_like(total, float("-inf")))


def _check_ids(proxy_ids: torch.Tensor, num_proxies: int, b: int) -> torch.Tensor:
    if proxy_ids.shape != (b,):
        raise ValueError(f"o2cap: proxy_ids {tuple(proxy_ids.shape)}: expected ({b},)")
    if b:
        lo, hi = torch.stack([proxy_ids.min(), proxy_ids.max()]).tolist()  # one device sync
        if lo < 0 or hi >= num_proxies:
            raise ValueError(f"o2cap: proxy ids must lie in [0, {num_proxies}), got [{lo}, {hi}] "
                             "(outliers must be dropped before the loss)")
    return proxy_ids.long()


def offline_per_sample(scores: torch.Tensor, proxy_ids: torch.Tensor, tables: ProxyTables,
                       temperature: float = 0.07, neg_k: int = 50) -> torch.Tensor:
    """Offline association loss per sample. ``scores`` [S, B, P] cosines -> [S, B]."""
    z = scores / temperature
    clusters = tables.proxy2cluster[proxy_ids]  # [B]
    pos = (tables.proxy2cluster.unsqueeze(0) == clusters.unsqueeze(1)).expand_as(z)  # [S, B, P]
    neg = _top_mask(z.detach(), neg_k, pos)
    return _soft_ce(z, pos, pos | neg)


def online_per_sample(scores: torch.Tensor, memory: torch.Tensor, proxy_ids: torch.Tensor, tables: ProxyTables,
                      temperature: float = 0.07, neg_k: int = 50, pos_k: int = 3, balance_w: float = 0.15,
                      few_cams: str = "fill") -> torch.Tensor:
    """Online association loss per sample. ``scores`` [S, B, P] cosines, ``memory`` [S, P, D] -> [S, B]."""
    if few_cams not in FEW_CAMS:
        raise ValueError(f"online_per_sample: few_cams={few_cams!r}: expected one of {FEW_CAMS}")
    z = scores / temperature
    with torch.no_grad(), torch.autocast(device_type=scores.device.type, enabled=False):
        mem = memory.to(scores.dtype)
        # Only the B rows of the proxy Gram matrix the batch needs: [S, B, D] x [S, D, P].
        gram = torch.matmul(mem[:, proxy_ids], mem.transpose(-1, -2))
        sim = balance_w * scores.detach() + (1.0 - balance_w) * gram  # [S, B, P]
        table = tables.cam_table  # [C', L]
        per_cam = sim[..., table.clamp(min=0)].masked_fill(table < 0, float("-inf"))  # [S, B, C', L]
        best = per_cam.argmax(dim=-1, keepdim=True)  # first maximum, like the official argmax
        cand_sim = per_cam.gather(-1, best).squeeze(-1)  # [S, B, C']
        cand = table.expand(*per_cam.shape).gather(-1, best).squeeze(-1)  # [S, B, C'] proxy ids
        k1 = min(pos_k, cand.shape[-1])
        pos_ids = cand.gather(-1, _lex_top(cand_sim, cand, k1))
        pos = torch.zeros(sim.shape, dtype=torch.bool, device=sim.device).scatter_(-1, pos_ids, True)
        if few_cams == "fill" and k1 < pos_k:
            # Official behaviour: the last pos_k selected logits are the targets, i.e. the best
            # remaining proxies by S complete the positives.
            fill = _top_mask(sim, min(pos_k, sim.shape[-1]) - k1, pos)
            pos = pos | fill
        neg = _top_mask(sim, neg_k, pos)
    return _soft_ce(z, pos, pos | neg)


def reduce_per_sample(losses: torch.Tensor, cams: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """[..., B] per-sample losses -> [...]: batch mean, camera-group sum of means, or unchanged (``none``)."""
    if reduction == "mean":
        return losses.mean(dim=-1)
    if reduction == "camera_groups":
        _, inverse, counts = torch.unique(cams, return_inverse=True, return_counts=True)
        return (losses / counts[inverse].to(losses.dtype)).sum(dim=-1)
    if reduction == "none":
        return losses
    raise ValueError(f"reduce_per_sample: reduction={reduction!r}: expected one of {REDUCTIONS}")


def _as_slots(x: torch.Tensor, memory: torch.Tensor, tables: ProxyTables) -> tuple[torch.Tensor, torch.Tensor, bool]:
    single = x.dim() == 2
    if single:
        x, memory = x.unsqueeze(0), memory.unsqueeze(0)
    if x.dim() != 3 or memory.dim() != 3 or x.shape[0] != memory.shape[0] or x.shape[-1] != memory.shape[-1]:
        raise ValueError(f"o2cap: features {tuple(x.shape)} and memory {tuple(memory.shape)}: expected [B, D] with "
                         "[P, D], or [S, B, D] with [S, P, D]")
    if memory.shape[1] != tables.num_proxies:
        raise ValueError(f"o2cap: memory has {memory.shape[1]} proxies but the tables {tables.num_proxies}: "
                         "re-initialise the memory after re-clustering")
    if tables.device != x.device or memory.device != x.device:
        raise ValueError(f"o2cap: features on {x.device}, memory on {memory.device}, tables on {tables.device}: "
                         "expected one device (ProxyTables.to(device))")
    return x, memory, single


def offline_association_loss(x: torch.Tensor, memory: torch.Tensor, proxy_ids: torch.Tensor, tables: ProxyTables,
                             temperature: float = 0.07, neg_k: int = 50, reduction: str = "mean") -> torch.Tensor:
    """Offline loss of one slot (``x`` [B, D], ``memory`` [P, D]) -> scalar, or of S slots -> [S].

    ``reduction="none"`` returns the per-sample losses ([B] or [S, B]).
    """
    xs, mem, single = _as_slots(x, memory, tables)
    ids = _check_ids(proxy_ids, mem.shape[1], xs.shape[1])
    out = reduce_per_sample(offline_per_sample(_scores(xs, mem), ids, tables, temperature, neg_k),
                            tables.proxy2cam[ids], reduction)
    return out[0] if single else out


def online_association_loss(x: torch.Tensor, memory: torch.Tensor, proxy_ids: torch.Tensor, tables: ProxyTables,
                            temperature: float = 0.07, neg_k: int = 50, pos_k: int = 3, balance_w: float = 0.15,
                            reduction: str = "mean", few_cams: str = "fill") -> torch.Tensor:
    """Online loss of one slot (``x`` [B, D], ``memory`` [P, D]) -> scalar, or of S slots -> [S]."""
    xs, mem, single = _as_slots(x, memory, tables)
    ids = _check_ids(proxy_ids, mem.shape[1], xs.shape[1])
    per = online_per_sample(_scores(xs, mem), mem, ids, tables, temperature, neg_k, pos_k, balance_w, few_cams)
    out = reduce_per_sample(per, tables.proxy2cam[ids], reduction)
    return out[0] if single else out


def tmgf_loss(features: torch.Tensor, memory: torch.Tensor, proxy_ids: torch.Tensor, tables: ProxyTables,
              cfg: O2CAPLossConfig | None = None) -> dict[str, torch.Tensor]:
    """TMGF total: ``L_off^g + L_on^g + part_weight * (mean_k L_off^k + mean_k L_on^k)``.

    Args:
        features: [B, S, D] L2-normalised features, slot 0 global, slots 1.. parts (S >= 1).
        memory: [S, P, D] proxy memory *before* this step's update (``ProxyMemory.memory``).
        proxy_ids: [B] proxy of each sample.
        tables: :class:`ProxyTables` of the current proxies, on the features' device.
    Returns:
        ``loss`` (to backpropagate) and the detached terms ``global_off``, ``global_on``,
        ``part_off``, ``part_on`` (part terms averaged over parts, before ``part_weight``; zero if S == 1).
    """
    cfg = cfg or O2CAPLossConfig()
    if features.dim() != 3:
        raise ValueError(f"tmgf_loss: features {tuple(features.shape)}: expected [B, S, D]")
    if cfg.reduction == "none":
        raise ValueError("tmgf_loss: reduction='none' has no total; use offline_per_sample/online_per_sample")
    xs, mem, _ = _as_slots(features.transpose(0, 1), memory, tables)
    ids = _check_ids(proxy_ids, mem.shape[1], xs.shape[1])
    scores = _scores(xs, mem)  # one matmul for all slots
    off = offline_per_sample(scores, ids, tables, cfg.temperature, cfg.neg_k)
    on = online_per_sample(scores, mem, ids, tables, cfg.temperature, cfg.neg_k, cfg.pos_k, cfg.balance_w,
                           cfg.few_cams)
    return _total(off, on, tables.proxy2cam[ids], cfg)


def _total(off: torch.Tensor, on: torch.Tensor, cams: torch.Tensor, cfg: O2CAPLossConfig) -> dict[str, torch.Tensor]:
    """[S, B] per-sample offline/online losses -> the TMGF total and its detached terms."""
    off, on = reduce_per_sample(off, cams, cfg.reduction), reduce_per_sample(on, cams, cfg.reduction)
    zero = off.new_zeros(())
    part_off = off[1:].mean() if off.shape[0] > 1 else zero
    part_on = on[1:].mean() if on.shape[0] > 1 else zero
    loss = off[0] + on[0] + cfg.part_weight * (part_off + part_on)
    return {"loss": loss, "global_off": off[0].detach(), "global_on": on[0].detach(),
            "part_off": part_off.detach(), "part_on": part_on.detach()}


# -- sharded memory --------------------------------------------------------------------------------
def _held(mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[..., k]`` of the (at most ``k``) True entries of each row of ``mask``, and which are real."""
    n = mask.shape[-1]
    kk = min(k, n)
    key = torch.where(mask, n - torch.arange(n, device=mask.device), 0)  # the lowest position ranks first
    top = key.topk(kk, dim=-1)
    at, ok = top.indices, top.values > 0
    if kk < k:
        at = torch.cat([at, at.new_zeros(*at.shape[:-1], k - kk)], dim=-1)
        ok = torch.cat([ok, ok.new_zeros(*ok.shape[:-1], k - kk)], dim=-1)
    return at, ok


def _take(x: torch.Tensor, at: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``x[..., at]`` (differentiable), -inf where not ``ok``; ``x`` may have an empty last dimension."""
    if x.shape[-1] == 0:
        out = x.sum(dim=-1, keepdim=True).expand(*at.shape)  # zeros, kept in the graph
    else:
        out = x.gather(-1, at)
    return out.masked_fill(~ok, float("-inf"))


def _from_ranks(t: torch.Tensor, samples: slice, grad: bool) -> torch.Tensor:
    """Every rank's ``[S, G, ...]`` piece, for the given samples: ``[S, n, W, ...]`` in rank order."""
    g = dist.all_gather_autograd(t.unsqueeze(0)) if grad else dist.all_gather(t.unsqueeze(0))
    return g[:, :, samples].movedim(0, 2)


def _offline_sharded(z: torch.Tensor, ids: torch.Tensor, tables: ProxyTables, start: int, neg_k: int,
                     mine: slice) -> torch.Tensor:
    """Offline loss of this rank's samples ([S, b]) from ``z`` [S, G, P_r] over the proxies held here."""
    s, g, n = z.shape
    p2c = tables.proxy2cluster
    clusters = p2c[ids]
    pos = (p2c[start:start + n].unsqueeze(0) == clusters.unsqueeze(1)).expand(s, g, n)
    k = min(neg_k, tables.num_proxies)
    at, ok = _held(_top_mask(z.detach(), k, pos), k)
    local = torch.cat([_masked_lse(z, pos).unsqueeze(-1), (z * pos.to(z.dtype)).sum(dim=-1, keepdim=True),
                       _take(z, at, ok)], dim=-1)
    parts = _from_ranks(local, mine, grad=True)  # [S, b, W, 2 + k]
    cand_ids = _from_ranks(torch.where(ok, at + start, -1), mine, grad=False).flatten(-2)
    cand = parts[..., 2:].flatten(-2)  # [S, b, W*k]
    pick = _lex_top(cand.detach(), cand_ids, k)
    neg, neg_ok = cand.gather(-1, pick), cand_ids.gather(-1, pick) >= 0
    lse_pos = parts[..., 0]
    n_pos = torch.bincount(p2c)[clusters[mine]].to(z.dtype)
    lse = _masked_lse(torch.cat([lse_pos, neg], -1), torch.cat([torch.isfinite(lse_pos.detach()), neg_ok], -1))
    return lse - parts[..., 1].sum(dim=-1) / n_pos


def _online_sharded(scores: torch.Tensor, shard: torch.Tensor, ids: torch.Tensor, tables: ProxyTables, start: int,
                    cfg: O2CAPLossConfig, mine: slice) -> torch.Tensor:
    """Online loss of this rank's samples ([S, b]) from ``scores`` [S, G, P_r] over the proxies held here."""
    s, g, n = scores.shape
    stop, num = start + n, tables.num_proxies
    z = scores / cfg.temperature
    with torch.no_grad():
        mem = shard.to(scores.dtype)
        # M[p_i] of every sample: its owner contributes the row, the others zeros (the sum is exact)
        held = (ids >= start) & (ids < stop)
        rows = scores.new_zeros(s, g, shard.shape[-1])
        rows[:, held] = mem[:, ids[held] - start]
        rows = dist.all_reduce(rows)
        sim = cfg.balance_w * scores.detach() + (1.0 - cfg.balance_w) * torch.matmul(rows, mem.transpose(-1, -2))
        # this rank's best proxy per camera (first maximum = lowest id, as the replicated argmax)
        cams = tables.proxy2cam[tables.cam_table[:, 0]]  # camera of each table row, ascending
        c = int(cams.numel())
        row = torch.searchsorted(cams, tables.proxy2cam[start:stop]).expand(s, g, n)
        best = sim.new_full((s, g, c), float("-inf")).scatter_reduce(-1, row, sim, "amax")
        proxy = torch.arange(start, stop, device=sim.device).expand(s, g, n)
        hit = sim == best.gather(-1, row)
        best_id = torch.full((s, g, c), num, dtype=torch.long, device=sim.device).scatter_reduce(
            -1, row, torch.where(hit, proxy, num), "amin")
        has = best_id < num
    # every sample's per-camera candidates (all ranks need the positives to exclude them)
    parts = _from_ranks(torch.cat([_take(z, torch.where(has, best_id - start, 0), has), best], -1), slice(None), True)
    cand_ids = _from_ranks(torch.where(has, best_id, -1), slice(None), grad=False)  # [S, G, W, C']
    cand_sim = parts[..., c:].detach()
    top = cand_sim.amax(dim=2, keepdim=True)
    cand = torch.where((cand_sim == top) & (cand_ids >= 0), cand_ids, num).amin(dim=2)  # [S, G, C']
    owner = (cand_ids == cand.unsqueeze(2)).to(torch.int32).argmax(dim=2, keepdim=True)
    cand_z = parts[..., :c].gather(2, owner).squeeze(2)
    k1 = min(cfg.pos_k, c)
    sel = _lex_top(top.squeeze(2), cand, k1)
    pos_ids, pos_z = cand.gather(-1, sel), cand_z.gather(-1, sel)[:, mine]
    # fill positives (few_cams="fill") then negatives: the best by S outside the positives
    n_fill = max(0, min(cfg.pos_k, num) - k1) if cfg.few_cams == "fill" else 0
    k2 = min(n_fill + cfg.neg_k, num)
    with torch.no_grad():
        inside = (pos_ids >= start) & (pos_ids < stop)
        exclude = torch.zeros(s, g, n + 1, dtype=torch.bool, device=sim.device).scatter_(
            -1, torch.where(inside, pos_ids - start, n), True)[..., :n]
        at, ok = _held(_top_mask(sim, k2, exclude), k2)
    parts = _from_ranks(torch.cat([_take(z, at, ok), _take(sim, at, ok)], -1), mine, grad=True)
    cand_ids = _from_ranks(torch.where(ok, at + start, -1), mine, grad=False).flatten(-2)
    cz, cs = parts[..., :k2].flatten(-2), parts[..., k2:].flatten(-2).detach()
    pick = _lex_top(cs, cand_ids, k2)
    picked, picked_ok = cz.gather(-1, pick), cand_ids.gather(-1, pick) >= 0
    fill = picked_ok & (torch.arange(k2, device=sim.device) < n_fill)
    n_pos = (k1 + fill.sum(dim=-1)).to(z.dtype)
    pos_sum = pos_z.sum(dim=-1) + torch.where(fill, picked, torch.zeros_like(picked)).sum(dim=-1)
    lse = _masked_lse(torch.cat([pos_z, picked], -1), torch.cat([torch.ones_like(pos_ids[:, mine], dtype=torch.bool),
                                                                 picked_ok], -1))
    return lse - pos_sum / n_pos


def tmgf_loss_sharded(features: torch.Tensor, proxy_ids: torch.Tensor, shard: torch.Tensor, start: int,
                      tables: ProxyTables, cfg: O2CAPLossConfig | None = None) -> dict[str, torch.Tensor]:
    """:func:`tmgf_loss` of this rank's samples with the memory sharded by proxies (collective).

    Args:
        features: [G, S, D] the global batch, gathered with ``dist.all_gather_autograd`` from equal
            local batches (rank order); this rank's samples are rows ``rank*b .. (rank+1)*b``.
        proxy_ids: [G] the gathered proxy ids.
        shard: [S, P_r, D] the proxies ``start .. start+P_r`` this rank holds (``ProxyMemory.memory``),
            before this step's update; P_r may be 0.
        tables: the tables of all P proxies (replicated: P ints each).
    Returns:
        As :func:`tmgf_loss` for this rank's samples: equal to it (up to rounding) with the whole memory.
    """
    cfg = cfg or O2CAPLossConfig()
    if cfg.reduction == "none":
        raise ValueError("tmgf_loss_sharded: reduction='none' has no total")
    world, rank = dist.get_world_size(), dist.get_rank()
    if features.dim() != 3 or shard.dim() != 3 or shard.shape[0] != features.shape[1] \
            or shard.shape[2] != features.shape[2]:
        raise ValueError(f"tmgf_loss_sharded: features {tuple(features.shape)} and shard {tuple(shard.shape)}: "
                         "expected [G, S, D] with [S, P_r, D]")
    if features.shape[0] % world:
        raise ValueError(f"tmgf_loss_sharded: gathered batch {features.shape[0]} not divisible by {world} ranks "
                         "(the local batches must be equal)")
    if not 0 <= start <= start + shard.shape[1] <= tables.num_proxies:
        raise ValueError(f"tmgf_loss_sharded: rows [{start}, {start + shard.shape[1]}) outside the "
                         f"{tables.num_proxies} proxies of the tables: re-initialise the memory after re-clustering")
    if tables.device != features.device or shard.device != features.device:
        raise ValueError(f"tmgf_loss_sharded: features on {features.device}, shard on {shard.device}, tables on "
                         f"{tables.device}: expected one device")
    ids = _check_ids(proxy_ids, tables.num_proxies, features.shape[0])
    b = features.shape[0] // world
    mine = slice(rank * b, (rank + 1) * b)
    scores = _scores(features.transpose(0, 1), shard)  # [S, G, P_r], fp32 or wider
    with torch.autocast(device_type=features.device.type, enabled=False):
        off = _offline_sharded(scores / cfg.temperature, ids, tables, start, cfg.neg_k, mine)
        on = _online_sharded(scores, shard, ids, tables, start, cfg, mine)
    return _total(off, on, tables.proxy2cam[ids[mine]], cfg)


__all__ = [
    "O2CAPLossConfig", "ProxyTables", "offline_per_sample", "online_per_sample", "reduce_per_sample",
    "offline_association_loss", "online_association_loss", "tmgf_loss", "tmgf_loss_sharded",
]
