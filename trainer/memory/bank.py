"""Per-part, per-image memory bank for PAT's CSL/PSD, sharded by rows across ranks.

Logically the bank is ``M ∈ R^{P×N×D}`` (one bank per part token, one row per training image,
addressed by the dataset's global ``index``) plus one identity label per row. Physically rank ``r``
stores only its rows ``dist.shard_range(N)`` (memory O(N/W)); the labels (N int64) are replicated.
The tensors are plain fp32 tensors, deliberately *not* module buffers: DeepSpeed casts buffers to
bf16/fp16, and the bank must stay fp32 (docs/design.md; DeepSpeed casts module buffers).

Write rule (paper Eq. 5 + the official ``PatchMemory``), applied to every (index, feature) pair in
order:

- row not yet written (``filled`` is False): ``M[j] ← f`` and the row becomes filled;
- row already written: ``M[j] ← (1 − m)·M[j] + m·f`` (``m = momentum = 0.1``: the NEW feature gets
  weight 0.1, the memory keeps 0.9).

Every write is collective: the local batch (indices, features) is all-gathered in rank order and
every rank applies the pairs that fall into its own rows. Pairs are applied *sequentially in
gathered order* (rank 0's batch first, within a batch in batch order), so an index that repeats in
one global batch is written twice, exactly as a python loop over the gathered batch would. The
vectorised implementation folds a run of ``t`` writes to one row into one update:
``M ← (1−m)^t·M + Σ_s m(1−m)^{t−s}·f_s`` (first write to an unfilled row: weight ``(1−m)^{t−1}``
and no old term), which is the same sum the loop computes.

Rows that were never written are excluded from neighbour search (``filled`` is False) until their
first write. This is what the official code does implicitly: its bank only contains images that
were already seen, and images that the PK sampler drops in the init pass are inserted the first
time they appear in training. Labels follow the same order (the last write of a row sets it);
:meth:`PartMemoryBank.set_labels` sets them all at once from the dataset instead.

The bank also records the order of first writes (``write_order``): the official bank is a list that
appends an image the first time it is seen, so a row's position there is its rank in that order.
``pat.repo_index_bug`` needs those positions to reproduce the official neighbour-label lookup.

Squared row norms are cached (``sqnorms()``; refreshed per written row, fully recomputed after any
other in-place change of ``feats``) so a CSL step reads the bank once, not twice.

Checkpoints: :meth:`~PartMemoryBank.state_dict` is this rank's shard (same world size to reload);
:meth:`~PartMemoryBank.full_state_dict` consolidates the bank (collective, once per save) and
:meth:`~PartMemoryBank.load_full_state_dict` slices it for any world size.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer import dist

_STATE_VERSION = 1


class PartMemoryBank:
    """Sharded fp32 memory ``P×N×D`` with per-row labels and a ``filled`` flag.

    Args:
        num_rows: N, the number of rows (training images; the dataset's global ``index`` range).
        num_parts: P, the number of part tokens (3 for PAT).
        dim: D, the feature width.
        momentum: weight of the NEW feature in the momentum rule (0.1 in PAT).
        device: where the shard lives (the rank's compute device; defaults to ``dist.info().device``).
        rank, world_size: override the process group's values (tests, offline tools).
    """

    def __init__(
        self,
        num_rows: int,
        num_parts: int,
        dim: int,
        momentum: float = 0.1,
        device: torch.device | str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if num_rows <= 0 or num_parts <= 0 or dim <= 0:
            raise ValueError(
                f"PartMemoryBank(num_rows={num_rows}, num_parts={num_parts}, dim={dim}): expected positive sizes"
            )
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"PartMemoryBank momentum={momentum}: expected 0 < momentum <= 1")
        self.num_rows = int(num_rows)
        self.num_parts = int(num_parts)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.rank = dist.get_rank() if rank is None else int(rank)
        self.world_size = dist.get_world_size() if world_size is None else int(world_size)
        self.device = torch.device(device) if device is not None else dist.info().device
        self.start, self.stop = dist.shard_range(self.num_rows, self.rank, self.world_size)
        self.feats = torch.zeros(self.num_parts, self.num_local, self.dim, dtype=torch.float32, device=self.device)
        """The owned shard, ``P × (stop − start) × D`` fp32; row ``j`` is global row ``start + j``."""
        self.filled = torch.zeros(self.num_local, dtype=torch.bool, device=self.device)
        """Owned rows that were written at least once (only those take part in neighbour search)."""
        self.labels = torch.full((self.num_rows,), -1, dtype=torch.long, device=self.device)
        """Identity label of every row (replicated on all ranks); −1 = unknown."""
        self.write_order = torch.full((self.num_rows,), -1, dtype=torch.long, device=self.device)
        """Rank of every row in the order of first writes (replicated; −1 = never written)."""
        self._sqnorm = torch.zeros(self.num_parts, self.num_local, dtype=torch.float32, device=self.device)
        self._sqnorm_version = -1  # feats._version the cache matches (−1: stale)

    def sqnorms(self) -> torch.Tensor:
        """``||M_j^p||²`` of the owned rows (``P × n_local``), cached across steps.

        Writes through this class refresh only the written rows; any other in-place change of
        ``feats`` (a different tensor version) triggers a full recompute, so the cache cannot go stale.
        """
        if self._sqnorm_version != self.feats._version:
            torch.sum(self.feats * self.feats, dim=-1, out=self._sqnorm)
            self._sqnorm_version = self.feats._version
        return self._sqnorm

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_local(self) -> int:
        """Number of rows this rank owns."""
        return self.stop - self.start

    def num_filled(self) -> int:
        """Filled rows over the whole bank (a collective when distributed)."""
        n = torch.tensor([int(self.filled.sum())], dtype=torch.long, device=dist.comm_device())
        return int(dist.all_reduce(n)[0])

    def reset(self) -> None:
        """Forget every row (features zeroed, nothing filled, labels unknown)."""
        self.feats.zero_()
        self.filled.zero_()
        self.labels.fill_(-1)
        self.write_order.fill_(-1)

    def _check_batch(self, indices: torch.Tensor, feats: torch.Tensor) -> None:
        if indices.dim() != 1 or feats.shape != (indices.shape[0], self.num_parts, self.dim):
            raise ValueError(
                f"PartMemoryBank batch: indices {tuple(indices.shape)} and feats {tuple(feats.shape)}: "
                f"expected (B,) and (B, {self.num_parts}, {self.dim})"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_rows):
            raise ValueError(
                f"PartMemoryBank batch: index range [{int(indices.min())}, {int(indices.max())}] "
                f"outside [0, {self.num_rows})"
            )

    # ------------------------------------------------------------------ writes
    def gather(
        self, indices: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """All-gather a local batch (rank order, no gradient). Local batch sizes may differ (the
        last batch of an exact-once init loader), even be empty; every rank must call it."""
        self._check_batch(indices, feats)
        g_idx = dist.all_gather_variable(indices.to(self.device, torch.long))
        g_feats = dist.all_gather_variable(feats.detach().to(self.device, torch.float32))
        g_labels = None if labels is None else dist.all_gather_variable(labels.to(self.device, torch.long))
        return g_idx, g_feats, g_labels

    def update(self, indices: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Collective momentum update from this rank's batch (``feats`` ``B×P×D``, detached inside).

        ``labels`` (optional) record the rows' identities. A training step that has gathered its
        batch already (:func:`trainer.memory.batch.gather_batch`, shared with the losses) writes it
        with :meth:`write_gathered` instead: PAT's memory hook, before the CSL loss of the same step
        (the official order).
        """
        g_idx, g_feats, g_labels = self.gather(indices, feats, labels)
        self.write_gathered(g_idx, g_feats, g_labels)

    def initialize(self, indices: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch of the no-grad init pass: same write rule as :meth:`update`, labels required.

        First writes set the row; an index seen again (in the same pass or batch) gets the momentum
        rule, as in the official init. Call :meth:`reset` first to start from an empty bank.
        """
        self.update(indices, feats, labels)

    @torch.no_grad()
    def write_gathered(
        self, indices: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor | None = None
    ) -> None:
        """Apply already-gathered pairs (identical on every rank) to the owned rows. No communication."""
        self._check_batch(indices, feats)
        indices = indices.to(self.device, torch.long)
        self._record_first_writes(indices)
        if labels is not None:
            # Sequential semantics for labels too: the last occurrence wins (index_put_ with
            # duplicates is unordered, so keep only each index's last position).
            labels = labels.to(self.device, torch.long)
            rev = torch.flip(indices, dims=[0])
            uniq, inv = torch.unique(rev, return_inverse=True)
            first_in_rev = torch.full((uniq.numel(),), rev.numel(), dtype=torch.long, device=self.device)
            first_in_rev.scatter_reduce_(0, inv, torch.arange(rev.numel(), device=self.device), "amin")
            self.labels[uniq] = torch.flip(labels, dims=[0])[first_in_rev]
        own = (indices >= self.start) & (indices < self.stop)
        if not bool(own.any()):
            return
        rows = indices[own] - self.start
        f = feats[own].to(self.device, torch.float32)
        m = self.momentum
        keep = 1.0 - m
        # Runs of writes to the same row, in order of appearance (stable sort keeps the order).
        sorted_rows, perm = torch.sort(rows, stable=True)
        uniq, inv, counts = torch.unique_consecutive(sorted_rows, return_inverse=True, return_counts=True)
        run_start = torch.cumsum(counts, 0) - counts
        pos = torch.arange(sorted_rows.numel(), device=self.device) - run_start[inv]  # 0-based position in run
        later = (counts[inv] - 1 - pos).to(torch.float64)  # writes after this one in the run
        was_filled = self.filled[uniq]
        weight = m * keep**later
        first_write = (pos == 0) & ~was_filled[inv]
        weight = torch.where(first_write, keep**later, weight)  # M ← f, then the later writes decay it
        acc = torch.zeros(uniq.numel(), self.num_parts, self.dim, dtype=torch.float64, device=self.device)
        acc.index_add_(0, inv, weight[:, None, None] * f[perm].to(torch.float64))
        old = torch.where(was_filled, keep ** counts.to(torch.float64), 0.0)  # no old term on a first write
        new = (old[None, :, None] * self.feats[:, uniq].to(torch.float64) + acc.transpose(0, 1)).to(torch.float32)
        cache_ok = self._sqnorm_version == self.feats._version
        self.feats[:, uniq] = new
        self.filled[uniq] = True
        if cache_ok:  # refresh only the written rows' norms
            self._sqnorm[:, uniq] = (new * new).sum(-1)
            self._sqnorm_version = self.feats._version

    def _record_first_writes(self, indices: torch.Tensor) -> None:
        """Give rows written for the first time the next ranks, in gathered order (no host sync)."""
        if indices.numel() == 0:
            return
        pos = torch.arange(indices.numel(), device=self.device)
        first = torch.full((self.num_rows,), indices.numel(), dtype=torch.long, device=self.device)
        first.scatter_reduce_(0, indices, pos, "amin")
        new = (first[indices] == pos) & (self.write_order[indices] < 0)  # first occurrence of an unwritten row
        rank = self.write_order.max().clamp(min=-1) + torch.cumsum(new.long(), 0)
        self.write_order.scatter_reduce_(0, indices, torch.where(new, rank, -1), "amax")

    def set_labels(self, labels: torch.Tensor) -> None:
        """Set the label of every row at once (``labels``: N int64, e.g. the dataset's relabelled pids)."""
        if labels.shape != (self.num_rows,):
            raise ValueError(f"PartMemoryBank.set_labels: shape {tuple(labels.shape)}, expected ({self.num_rows},)")
        self.labels.copy_(labels.to(self.device, torch.long))

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "num_rows": self.num_rows,
            "num_parts": self.num_parts,
            "dim": self.dim,
            "momentum": self.momentum,
        }

    def _check_meta(self, state: dict[str, Any], where: str) -> None:
        for key, want in self._meta().items():
            if key == "momentum":
                continue
            if state.get(key) != want:
                raise ValueError(f"PartMemoryBank.{where}: state[{key!r}]={state.get(key)!r}, expected {want!r}")

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (reload only with the same world size; see :meth:`full_state_dict`)."""
        return {
            **self._meta(),
            "world_size": self.world_size,
            "rank": self.rank,
            "start": self.start,
            "stop": self.stop,
            "feats": self.feats.detach().cpu().clone(),
            "filled": self.filled.cpu().clone(),
            "labels": self.labels.cpu().clone(),
            "write_order": self.write_order.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a shard saved by :meth:`state_dict` on the same rank of a same-size job."""
        self._check_meta(state, "load_state_dict")
        if (state.get("start"), state.get("stop")) != (self.start, self.stop):
            raise ValueError(
                f"PartMemoryBank.load_state_dict: shard rows [{state.get('start')}, {state.get('stop')}) "
                f"saved with world_size={state.get('world_size')}, this rank owns [{self.start}, {self.stop}); "
                "use full_state_dict()/load_full_state_dict() to change the world size"
            )
        self.feats.copy_(state["feats"])
        self.filled.copy_(state["filled"])
        self.labels.copy_(state["labels"])
        self._load_write_order(state)

    @torch.no_grad()
    def full_state_dict(self, to_all: bool = False) -> dict[str, Any] | None:
        """Consolidate the whole bank (collective). Returns it on rank 0 (or on every rank if ``to_all``).

        Each owner broadcasts its shard in turn, so a non-receiving rank holds one shard at a time:
        O(N/W) extra memory there, O(N) on the receiver. Communication is O(N·P·D), once per save.
        """
        feats = torch.empty(self.num_parts, self.num_rows, self.dim, dtype=torch.float32) if (
            to_all or self.rank == 0) else None
        filled = torch.zeros(self.num_rows, dtype=torch.bool)
        cdev = dist.comm_device()
        for r in range(self.world_size):
            s, e = dist.shard_range(self.num_rows, r, self.world_size)
            if r == self.rank:
                buf_f = self.feats.to(cdev).contiguous()
                buf_m = self.filled.to(cdev, torch.uint8)
            else:
                buf_f = torch.empty(self.num_parts, e - s, self.dim, dtype=torch.float32, device=cdev)
                buf_m = torch.empty(e - s, dtype=torch.uint8, device=cdev)
            if self.world_size > 1:
                dist.broadcast(buf_f, src=r)
                dist.broadcast(buf_m, src=r)
            if feats is not None:
                feats[:, s:e] = buf_f.cpu()
            filled[s:e] = buf_m.cpu().bool()
        if feats is None:
            return None
        return {**self._meta(), "feats": feats, "filled": filled, "labels": self.labels.cpu().clone(),
                "write_order": self.write_order.cpu().clone()}

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        """Load a consolidated bank (any saving world size): each rank copies its own row slice."""
        self._check_meta(state, "load_full_state_dict")
        self.feats.copy_(state["feats"][:, self.start : self.stop])
        self.filled.copy_(state["filled"][self.start : self.stop])
        self.labels.copy_(state["labels"])
        self._load_write_order(state)

    def _load_write_order(self, state: dict[str, Any]) -> None:
        """The saved order; a checkpoint from before it was recorded gets dataset order (unknown then)."""
        if "write_order" in state:
            self.write_order.copy_(state["write_order"])
            return
        if state["filled"].numel() == self.num_rows:
            filled = state["filled"].to(self.device)
        else:  # a shard: the replicated order cannot be rebuilt from one rank's rows
            filled = torch.ones(self.num_rows, dtype=torch.bool, device=self.device)
        self.write_order.copy_(torch.where(filled, torch.cumsum(filled.long(), 0) - 1, -1))

    def __repr__(self) -> str:
        return (
            f"PartMemoryBank(N={self.num_rows}, P={self.num_parts}, D={self.dim}, momentum={self.momentum}, "
            f"rows=[{self.start}, {self.stop}) of rank {self.rank}/{self.world_size}, device={self.device})"
        )


__all__ = ["PartMemoryBank"]
