"""Camera-aware proxy memory (TMGF/O2CAP): one fp32 centre per proxy and feature slot.

Slot 0 holds the global feature, slots 1..S-1 the part features; every slot is indexed by the same
proxy ids (the parts reuse the global clustering). The memory is rebuilt from the proxy centres at
every re-clustering and then follows the official momentum rule after each step::

    M[k, p] <- mu * M[k, p] + (1 - mu) * x_k ;  M[k, p] <- M[k, p] / ||M[k, p]||      (mu = 0.2)

applied sample after sample in batch order (a proxy that appears 4 times is updated 4 times).

Order of a training step (the official code updates inside the autograd backward, i.e. after the
loss of the step was computed with the old memory)::

    loss = tmgf_loss(feats, memory.memory, proxy_ids, tables)   # reads the pre-update memory
    loss.backward()
    memory.update(feats.detach(), proxy_ids)                    # collective: every rank calls it

Updating before ``backward`` is refused by autograd (the scores saved the memory for the
gradient), which keeps that order honest. In a distributed run ``update`` all-gathers the features
and proxy ids of every rank in rank order, so the global batch is applied in the same sample order
on every rank and the replicated memories never drift apart.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainer import dist


def occurrence_rank(ids: torch.Tensor) -> torch.Tensor:
    """[B] -> [B]: how many earlier entries of ``ids`` hold the same value (0 for the first one)."""
    b = ids.numel()
    if b == 0:
        return torch.zeros(0, dtype=torch.long, device=ids.device)
    sorted_ids, order = torch.sort(ids, stable=True)
    _, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    group_start = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(b, device=ids.device) - torch.repeat_interleave(group_start, counts)
    out = torch.empty_like(rank_sorted)
    out[order] = rank_sorted
    return out


@torch.no_grad()
def sequential_momentum_update(memory: torch.Tensor, features: torch.Tensor, ids: torch.Tensor,
                               momentum: float) -> None:
    """Apply the per-sample momentum + renormalise rule in sample order, in place.

    ``memory`` [S, P, D], ``features`` [B, S, D], ``ids`` [B]. Equal to the loop
    ``for i: M[:, ids[i]] = normalize(mu * M[:, ids[i]] + (1 - mu) * features[i])``: the j-th
    occurrence of a proxy only depends on its (j-1)-th, and rows within one round are distinct, so
    round j updates all j-th occurrences at once. The loop runs over the largest multiplicity
    (K = 4 in a proxy-balanced batch), not over the batch.
    """
    if ids.numel() == 0:
        return
    ids = ids.to(device=memory.device, dtype=torch.long)
    x = features.to(device=memory.device, dtype=memory.dtype).transpose(0, 1)  # [S, B, D]
    occ = occurrence_rank(ids)
    for j in range(int(occ.max().item()) + 1):
        sel = torch.nonzero(occ == j).flatten()
        rows = ids[sel]
        new = momentum * memory[:, rows] + (1.0 - momentum) * x[:, sel]
        memory[:, rows] = new / new.norm(dim=-1, keepdim=True)


class ProxyMemory:
    """Replicated fp32 proxy memory of shape [num_slots, num_proxies, dim] (not a model parameter)."""

    def __init__(self, num_slots: int = 6, num_proxies: int = 0, dim: int = 384, momentum: float = 0.2,
                 device: torch.device | str | None = None) -> None:
        if num_slots < 1 or num_proxies < 0 or dim < 1:
            raise ValueError(f"ProxyMemory: num_slots={num_slots}, num_proxies={num_proxies}, dim={dim}: expected "
                             "num_slots >= 1, num_proxies >= 0, dim >= 1")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ProxyMemory: momentum={momentum}: expected 0 <= momentum < 1")
        self.momentum = float(momentum)
        device = torch.device(device) if device is not None else dist.info().device
        self.memory = torch.zeros(num_slots, num_proxies, dim, dtype=torch.float32, device=device)

    @property
    def num_slots(self) -> int:
        return int(self.memory.shape[0])

    @property
    def num_proxies(self) -> int:
        return int(self.memory.shape[1])

    @property
    def dim(self) -> int:
        return int(self.memory.shape[2])

    @property
    def device(self) -> torch.device:
        return self.memory.device

    def slot(self, k: int) -> torch.Tensor:
        """[P, D] view of slot ``k`` (0 = global)."""
        return self.memory[k]

    @torch.no_grad()
    def init_from_centers(self, centers: torch.Tensor) -> None:
        """Replace the memory by ``centers`` [S, P', D] (P' may differ: proxies are rebuilt every epoch)."""
        if centers.dim() != 3 or centers.shape[0] != self.num_slots or centers.shape[2] != self.dim:
            raise ValueError(f"ProxyMemory.init_from_centers: centers {tuple(centers.shape)}: expected "
                             f"[{self.num_slots}, P, {self.dim}]")
        self.memory = F.normalize(centers.detach().to(device=self.device, dtype=torch.float32), dim=-1).contiguous()

    @torch.no_grad()
    def update(self, features: torch.Tensor, proxy_ids: torch.Tensor) -> None:
        """Momentum update with this rank's batch; a collective (every rank must call it).

        Args:
            features: [B, S, D] L2-normalised output features of this rank's batch (detached;
                any float dtype, converted to fp32).
            proxy_ids: [B] proxy id of each sample.
        """
        if features.dim() != 3 or features.shape[1:] != (self.num_slots, self.dim):
            raise ValueError(f"ProxyMemory.update: features {tuple(features.shape)}: expected [B, {self.num_slots}, "
                             f"{self.dim}]")
        if proxy_ids.shape != (features.shape[0],):
            raise ValueError(f"ProxyMemory.update: proxy_ids {tuple(proxy_ids.shape)}: expected ({features.shape[0]},)")
        feats = features.detach().to(dtype=torch.float32)
        ids = proxy_ids.detach().to(dtype=torch.long)
        if dist.get_world_size() > 1:
            # Rank order = the global batch order; the variable-size gather tolerates ragged last batches.
            comm = dist.comm_device()
            feats = dist.all_gather_variable(feats.to(comm))
            ids = dist.all_gather_variable(ids.to(comm))
        if ids.numel():
            lo, hi = torch.stack([ids.min(), ids.max()]).tolist()  # one device sync
            if lo < 0 or hi >= self.num_proxies:
                raise ValueError(f"ProxyMemory.update: proxy ids must lie in [0, {self.num_proxies}), got "
                                 f"[{lo}, {hi}] (outliers must not reach the loss)")
        sequential_momentum_update(self.memory, feats, ids, self.momentum)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.detach().cpu().clone(), "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mem = state.get("memory")
        if not torch.is_tensor(mem) or mem.dim() != 3 or mem.shape[0] != self.num_slots or mem.shape[2] != self.dim:
            shape = tuple(mem.shape) if torch.is_tensor(mem) else type(mem).__name__
            raise ValueError(f"ProxyMemory.load_state_dict: 'memory' {shape}: "
                             f"expected [{self.num_slots}, P, {self.dim}]")
        self.memory = mem.to(device=self.device, dtype=torch.float32).clone().contiguous()
        self.momentum = float(state.get("momentum", self.momentum))


__all__ = ["ProxyMemory", "sequential_momentum_update", "occurrence_rank"]
