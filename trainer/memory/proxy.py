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
on every rank.

Layouts (``tmgf.memory_layout``, ``docs/proxy_memory.md``):

* ``replicated``: every rank holds all ``[S, P, D]`` and applies every update (identical copies);
* ``sharded``: rank ``r`` holds the contiguous proxies ``dist.shard_range(P, r, W)`` (all slots),
  ``[S, P_r, D]`` with ``P_r ≈ P/W``, and applies the updates of its own proxies only — still in
  global sample order, so each row sees exactly the updates the replicated row sees. The loss is then
  computed model-parallel (:func:`trainer.losses.o2cap.tmgf_loss_sharded`).

``memory`` is always the rows this rank holds (``start``..``stop``; all of them when replicated).
Checkpoints: :meth:`~ProxyMemory.full_state_dict` consolidates the whole memory (collective when
sharded) and :meth:`~ProxyMemory.load_full_state_dict` keeps this rank's rows, so a run resumes at any
world size and in either layout, as the CSL bank does (``trainer/memory/bank.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainer import dist

MEMORY_LAYOUTS = ("replicated", "sharded")
"""Physical layouts of the proxy memory (``tmgf.memory_layout`` adds ``auto``: :func:`resolve_layout`)."""

_DTYPE = torch.float32  # the memory's dtype whatever the model's precision


def resolve_layout(layout: str, world_size: int) -> str:
    """``auto`` -> ``sharded`` on several ranks, ``replicated`` on one; the two names pass through."""
    if layout == "auto":
        return "sharded" if world_size > 1 else "replicated"
    if layout not in MEMORY_LAYOUTS:
        raise ValueError(f"proxy memory layout={layout!r}: expected 'auto' or one of {MEMORY_LAYOUTS}")
    return layout


def proxy_range(num_proxies: int, layout: str, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of the proxies ``rank`` holds: all of them when replicated, its
    ``dist.shard_range`` slice when sharded (the first ranks take the remainder)."""
    if resolve_layout(layout, world_size) == "replicated":
        return 0, int(num_proxies)
    return dist.shard_range(int(num_proxies), rank, world_size)


def proxy_memory_bytes(layout: str, num_proxies: int, num_slots: int, dim: int, world_size: int) -> list[int]:
    """Bytes of proxy memory each rank holds (rank order), from the same ranges :class:`ProxyMemory` uses."""
    itemsize = torch.empty((), dtype=_DTYPE).element_size()
    return [num_slots * (stop - start) * dim * itemsize
            for start, stop in (proxy_range(num_proxies, layout, r, world_size) for r in range(world_size))]


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
    """fp32 proxy memory ``[num_slots, num_proxies, dim]``, replicated or sharded by proxies (not a
    model parameter).

    Args:
        num_slots, num_proxies, dim: S, P (changes at every re-clustering), D.
        momentum: mu of the update (the memory keeps mu, the new feature weighs 1 - mu).
        device: where the rows live (default the rank's compute device).
        layout: ``replicated``, ``sharded`` or ``auto`` (sharded when the world has several ranks).
        rank, world_size: override the process group's values (tests, offline tools).
    """

    def __init__(self, num_slots: int = 6, num_proxies: int = 0, dim: int = 384, momentum: float = 0.2,
                 device: torch.device | str | None = None, layout: str = "replicated", rank: int | None = None,
                 world_size: int | None = None) -> None:
        if num_slots < 1 or num_proxies < 0 or dim < 1:
            raise ValueError(f"ProxyMemory: num_slots={num_slots}, num_proxies={num_proxies}, dim={dim}: expected "
                             "num_slots >= 1, num_proxies >= 0, dim >= 1")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ProxyMemory: momentum={momentum}: expected 0 <= momentum < 1")
        self.momentum = float(momentum)
        self.rank = dist.get_rank() if rank is None else int(rank)
        self.world_size = dist.get_world_size() if world_size is None else int(world_size)
        self.layout = resolve_layout(layout, self.world_size)
        self._slots, self._dim = int(num_slots), int(dim)
        device = torch.device(device) if device is not None else dist.info().device
        self._resize(int(num_proxies), device)

    def _resize(self, num_proxies: int, device: torch.device) -> None:
        self._num_proxies = num_proxies
        self.start, self.stop = self.range_for(num_proxies)
        self.memory = torch.zeros(self._slots, self.stop - self.start, self._dim, dtype=_DTYPE, device=device)
        """The rows this rank holds, ``[S, stop - start, D]``: row ``j`` is proxy ``start + j``."""

    def range_for(self, num_proxies: int) -> tuple[int, int]:
        """The proxies this rank holds in a memory of ``num_proxies`` (see :func:`proxy_range`)."""
        return proxy_range(num_proxies, self.layout, self.rank, self.world_size)

    @property
    def sharded(self) -> bool:
        return self.layout == "sharded"

    @property
    def num_slots(self) -> int:
        return self._slots

    @property
    def num_proxies(self) -> int:
        """P over all ranks (not only the rows held here)."""
        return self._num_proxies

    @property
    def num_local(self) -> int:
        return self.stop - self.start

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def device(self) -> torch.device:
        return self.memory.device

    def slot(self, k: int) -> torch.Tensor:
        """[stop - start, D] view of slot ``k`` (0 = global) over the rows held here."""
        return self.memory[k]

    def _check_centers(self, centers: torch.Tensor, rows: int | None, where: str) -> None:
        if (centers.dim() != 3 or centers.shape[0] != self.num_slots or centers.shape[2] != self.dim
                or (rows is not None and centers.shape[1] != rows)):
            want = "P" if rows is None else str(rows)
            raise ValueError(f"ProxyMemory.{where}: centers {tuple(centers.shape)}: expected "
                             f"[{self.num_slots}, {want}, {self.dim}]")

    @torch.no_grad()
    def init_from_centers(self, centers: torch.Tensor, num_proxies: int | None = None) -> None:
        """Replace the memory by L2-normalised centres (P may differ: proxies are rebuilt every epoch).

        ``centers`` is the whole ``[S, P, D]`` (this rank keeps its rows), or, with ``num_proxies``
        given, only this rank's rows ``range_for(num_proxies)`` (a sharded rank never builds all P).
        """
        if num_proxies is None:
            self._check_centers(centers, None, "init_from_centers")
            num_proxies = int(centers.shape[1])
            start, stop = self.range_for(num_proxies)
            centers = centers[:, start:stop]
        else:
            start, stop = self.range_for(num_proxies)
            self._check_centers(centers, stop - start, "init_from_centers")
        self._num_proxies = int(num_proxies)
        self.start, self.stop = start, stop
        self.memory = F.normalize(centers.detach().to(device=self.device, dtype=_DTYPE), dim=-1).contiguous()

    def _check_batch(self, features: torch.Tensor, proxy_ids: torch.Tensor, where: str) -> None:
        if features.dim() != 3 or features.shape[1:] != (self.num_slots, self.dim):
            raise ValueError(f"ProxyMemory.{where}: features {tuple(features.shape)}: expected [B, {self.num_slots}, "
                             f"{self.dim}]")
        if proxy_ids.shape != (features.shape[0],):
            raise ValueError(f"ProxyMemory.{where}: proxy_ids {tuple(proxy_ids.shape)}: expected "
                             f"({features.shape[0]},)")

    @torch.no_grad()
    def update(self, features: torch.Tensor, proxy_ids: torch.Tensor) -> None:
        """Momentum update with this rank's batch; a collective (every rank must call it).

        Args:
            features: [B, S, D] L2-normalised output features of this rank's batch (detached;
                any float dtype, converted to fp32). Batch sizes may differ across ranks.
            proxy_ids: [B] proxy id of each sample.
        """
        self._check_batch(features, proxy_ids, "update")
        feats = features.detach().to(dtype=_DTYPE)
        ids = proxy_ids.detach().to(dtype=torch.long)
        if dist.get_world_size() > 1:
            # Rank order = the global batch order; the variable-size gather tolerates ragged last batches.
            comm = dist.comm_device()
            feats = dist.all_gather_variable(feats.to(comm))
            ids = dist.all_gather_variable(ids.to(comm))
        self.update_gathered(feats, ids)

    @torch.no_grad()
    def update_gathered(self, features: torch.Tensor, proxy_ids: torch.Tensor) -> None:
        """Apply an already-gathered global batch (identical on every rank, rank order) to the rows held
        here; no communication. Each row receives its updates in batch order, as in the replicated memory."""
        self._check_batch(features, proxy_ids, "update_gathered")
        ids = proxy_ids.detach().to(device=self.device, dtype=torch.long)
        if ids.numel():
            lo, hi = torch.stack([ids.min(), ids.max()]).tolist()  # one device sync
            if lo < 0 or hi >= self.num_proxies:
                raise ValueError(f"ProxyMemory.update: proxy ids must lie in [0, {self.num_proxies}), got "
                                 f"[{lo}, {hi}] (outliers must not reach the loss)")
        feats = features.detach()
        if self.num_local != self.num_proxies:  # keep the held rows' updates, in their order
            mine = (ids >= self.start) & (ids < self.stop)
            ids, feats = ids[mine] - self.start, feats[mine.to(feats.device)]
        sequential_momentum_update(self.memory, feats, ids, self.momentum)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The rows held here (reload with the same layout and world size; see :meth:`full_state_dict`)."""
        return {"memory": self.memory.detach().cpu().clone(), "momentum": self.momentum,
                "num_proxies": self.num_proxies, "start": self.start, "stop": self.stop, "layout": self.layout,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict` of this rank of a same-layout, same-size job; a state without a row range
        (a whole memory, as checkpoints before sharding held) goes to :meth:`load_full_state_dict`."""
        if "start" not in state:
            self.load_full_state_dict(state)
            return
        num_proxies = int(state["num_proxies"])
        want = self.range_for(num_proxies)
        if (state["start"], state["stop"]) != want:
            raise ValueError(f"ProxyMemory.load_state_dict: rows [{state['start']}, {state['stop']}) saved by a "
                             f"{state.get('layout')} memory on {state.get('world_size')} ranks, this rank holds "
                             f"[{want[0]}, {want[1]}); use full_state_dict()/load_full_state_dict() to change the "
                             "layout or the world size")
        self._load_rows(state, num_proxies, want, "load_state_dict")

    @torch.no_grad()
    def full_state_dict(self, to_all: bool = False) -> dict[str, Any] | None:
        """The whole memory (collective when sharded): on rank 0, or on every rank with ``to_all``.

        Sharded: each owner broadcasts its rows in turn (as ``PartMemoryBank.full_state_dict``), so a
        rank that does not receive holds one shard at a time; once per checkpoint.
        """
        meta = {"momentum": self.momentum, "num_proxies": self.num_proxies}
        if not self.sharded or self.world_size == 1:
            return {"memory": self.memory.detach().cpu().clone(), **meta}
        receive = to_all or self.rank == 0
        full = torch.empty(self.num_slots, self.num_proxies, self.dim, dtype=_DTYPE) if receive else None
        cdev = dist.comm_device()
        for r in range(self.world_size):
            s, e = proxy_range(self.num_proxies, self.layout, r, self.world_size)
            if e == s:
                continue
            if r == self.rank:
                buf = self.memory.to(cdev).contiguous()
            else:
                buf = torch.empty(self.num_slots, e - s, self.dim, dtype=_DTYPE, device=cdev)
            dist.broadcast(buf, src=r)
            if full is not None:
                full[:, s:e] = buf.cpu()
        return None if full is None else {"memory": full, **meta}

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        """Load a whole memory saved by any layout and world size: this rank keeps its rows."""
        mem = state.get("memory")
        if not torch.is_tensor(mem) or mem.dim() != 3 or mem.shape[0] != self.num_slots or mem.shape[2] != self.dim:
            shape = tuple(mem.shape) if torch.is_tensor(mem) else type(mem).__name__
            raise ValueError(f"ProxyMemory.load_full_state_dict: 'memory' {shape}: "
                             f"expected [{self.num_slots}, P, {self.dim}]")
        num_proxies = int(mem.shape[1])
        start, stop = self.range_for(num_proxies)
        self._load_rows({**state, "memory": mem[:, start:stop]}, num_proxies, (start, stop), "load_full_state_dict")

    def _load_rows(self, state: dict[str, Any], num_proxies: int, rows: tuple[int, int], where: str) -> None:
        mem = state["memory"]
        if not torch.is_tensor(mem) or tuple(mem.shape) != (self.num_slots, rows[1] - rows[0], self.dim):
            shape = tuple(mem.shape) if torch.is_tensor(mem) else type(mem).__name__
            raise ValueError(f"ProxyMemory.{where}: 'memory' {shape}: expected "
                             f"[{self.num_slots}, {rows[1] - rows[0]}, {self.dim}]")
        self._num_proxies = num_proxies
        self.start, self.stop = rows
        self.memory = mem.to(device=self.device, dtype=_DTYPE).clone().contiguous()
        self.momentum = float(state.get("momentum", self.momentum))

    def __repr__(self) -> str:
        return (f"ProxyMemory(S={self.num_slots}, P={self.num_proxies}, D={self.dim}, {self.layout}: rows "
                f"[{self.start}, {self.stop}) on rank {self.rank}/{self.world_size}, device={self.device})")


__all__ = ["MEMORY_LAYOUTS", "ProxyMemory", "occurrence_rank", "proxy_memory_bytes", "proxy_range", "resolve_layout",
           "sequential_momentum_update"]
