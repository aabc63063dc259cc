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

Distributed runs: each sample's loss depends only on its own features and the (replicated) memory,
so with ``reduction="mean"`` and equal per-rank batches, DDP's gradient averaging reproduces the
single-process global-batch gradient exactly. ``camera_groups`` reduces each rank's own batch
(a per-rank camera grouping, not the global one).

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
    """Mask of the ``k`` largest ``values`` outside ``exclude`` (fewer where fewer remain)."""
    mask = torch.zeros(exclude.shape, dtype=torch.bool, device=exclude.device)
    k = min(k, values.shape[-1])
    if k == 0:
        return mask
    top = values.masked_fill(exclude, float("-inf")).topk(k, dim=-1)
    return mask.scatter_(-1, top.indices, torch.isfinite(top.values))


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
        pos_ids = cand.gather(-1, cand_sim.topk(k1, dim=-1).indices)
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
    cams = tables.proxy2cam[ids]
    off = reduce_per_sample(offline_per_sample(scores, ids, tables, cfg.temperature, cfg.neg_k), cams, cfg.reduction)
    on = reduce_per_sample(online_per_sample(scores, mem, ids, tables, cfg.temperature, cfg.neg_k, cfg.pos_k,
                                             cfg.balance_w, cfg.few_cams), cams, cfg.reduction)
    zero = off.new_zeros(())
    part_off = off[1:].mean() if off.shape[0] > 1 else zero
    part_on = on[1:].mean() if on.shape[0] > 1 else zero
    loss = off[0] + on[0] + cfg.part_weight * (part_off + part_on)
    return {"loss": loss, "global_off": off[0].detach(), "global_on": on[0].detach(),
            "part_off": part_off.detach(), "part_on": part_on.detach()}


__all__ = [
    "O2CAPLossConfig", "ProxyTables", "offline_per_sample", "online_per_sample", "reduce_per_sample",
    "offline_association_loss", "online_association_loss", "tmgf_loss",
]
