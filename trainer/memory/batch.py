"""The global batch of one training step, gathered once and shared by the memory write and the losses.

A PAT step needs every rank's samples in three places: the bank write (rows and detached part
features), CSL (part features with autograd, rows) and the batch-hard triplet (labels). Gathering
each for each consumer costs a collective apiece and lets the copies drift apart; here the per-sample
metadata (the int64 columns stacked) travel in ONE all-gather and the part features in one autograd
all-gather, and every consumer reads the same :class:`GlobalBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from trainer import dist


@dataclass(frozen=True)
class GlobalBatch:
    """Every rank's local batch of one step, in rank order (``B = W·b`` samples)."""

    indices: torch.Tensor
    """``B`` int64 dataset rows (the bank's row addresses)."""
    labels: torch.Tensor
    """``B`` int64 identity labels."""
    parts: torch.Tensor | None = None
    """``B×P×D`` part features gathered with autograd (each rank's slice back-propagates to that
    rank), or None when the step has no features to share."""

    def detached(self) -> GlobalBatch:
        """The same batch without the autograd graph (what a memory write keeps after the loss)."""
        return replace(self, parts=None if self.parts is None else self.parts.detach())


def gather_batch(indices: torch.Tensor, labels: torch.Tensor, parts: torch.Tensor | None = None,
                 device: torch.device | None = None) -> GlobalBatch:
    """Collective: gather this rank's ``indices``/``labels`` (``b``) and ``parts`` (``b×P×D``, optional).

    Every rank must call it with the same local batch size. ``device``: where the gathered tensors
    live (the bank's device; default the indices' device)."""
    if indices.dim() != 1 or labels.shape != indices.shape:
        raise ValueError(f"gather_batch: indices {tuple(indices.shape)} / labels {tuple(labels.shape)}: "
                         "expected (b,) and (b,)")
    if parts is not None and parts.shape[0] != indices.shape[0]:
        raise ValueError(f"gather_batch: parts {tuple(parts.shape)} for {indices.shape[0]} samples")
    dev = indices.device if device is None else device
    meta = dist.all_gather(torch.stack([indices.to(dev, torch.long), labels.to(dev, torch.long)], dim=1))
    g_parts = None if parts is None else dist.all_gather_autograd(parts.to(dev))
    return GlobalBatch(meta[:, 0], meta[:, 1], g_parts)


__all__ = ["GlobalBatch", "gather_batch"]
