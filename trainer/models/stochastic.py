"""Stochastic depth seeded per sample: a sample's masks depend on (run seed, epoch, step, slot in the
global batch) — the seed its augmentation already uses — not on the rank or on how the global batch
is split over the ranks.

timm's ``DropPath`` draws its masks from the process's global RNG, so at W ranks every rank draws
the masks of its slice from the same stream: W = 2 can never reproduce one process's masks on the
whole batch. Here each block's two drop-paths draw a sample's keep decision from a hash of the
sample's seed and the drop-path's position in the network, computed with integer tensor ops on the
activations' device (the same bits on CPU and GPU, no generator state to carry or checkpoint).

The engine scopes a step's per-sample seeds (``batch["seed"]``) with :func:`sample_seeds`; a forward
in train mode without seeds in scope (a unit test calling the model directly) draws from torch's
global RNG, as timm does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

_SEEDS: ContextVar[torch.Tensor | None] = ContextVar("reid_sample_seeds", default=None)
_M32 = 0xFFFFFFFF


@contextmanager
def sample_seeds(seeds: torch.Tensor | None) -> Iterator[None]:
    """Scope per-sample seeds (int64, one per row of the batch the model is about to see)."""
    token = _SEEDS.set(seeds)
    try:
        yield
    finally:
        _SEEDS.reset(token)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``x`` in [0, 2**32), without int64 overflow (products stay below 2**48)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply rounds; full avalanche) on int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """One float64 in [0, 1) per seed, a pure function of (seed, salt); 32 bits of resolution."""
    s = seeds.to(torch.int64)
    lo, hi = s & _M32, (s >> 32) & _M32
    h = _mix32(lo ^ _mix32(hi ^ _mix32(torch.full_like(s, salt & _M32))))
    return h.to(torch.float64) / 2.0**32


class SampleDropPath(nn.Module):
    """Stochastic depth (drop a residual branch per sample, scale kept ones by 1/keep) with per-sample seeds."""

    def __init__(self, drop_prob: float, salt: int) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.salt = int(salt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        seeds = _SEEDS.get()
        if seeds is None:  # no seeds in scope: the process's RNG, as timm's DropPath
            u = torch.rand(x.shape[0], dtype=torch.float64, device=x.device)
        else:
            if seeds.shape != (x.shape[0],):
                raise ValueError(f"SampleDropPath: {tuple(seeds.shape)} sample seeds in scope for a batch of "
                                 f"{x.shape[0]}")
            u = uniform(seeds.to(x.device), self.salt)
        keep = (u < keep_prob).to(x.dtype) / keep_prob
        return x * keep.view(-1, *([1] * (x.ndim - 1)))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, salt={self.salt}"


def seed_drop_paths(vit: nn.Module) -> int:
    """Replace the drop-paths of a timm ViT's blocks by :class:`SampleDropPath` with the same rates; the
    salt of block i's branches is 2i and 2i+1. Returns how many were replaced. Dropout with a rate
    above 0 would still draw per rank: refused (no configuration here uses it)."""
    from timm.layers import DropPath

    replaced = 0
    blocks = getattr(vit, "blocks", [])
    for i, blk in enumerate(blocks):
        for j, name in enumerate(("drop_path1", "drop_path2")):
            old = getattr(blk, name, None)
            if isinstance(old, DropPath):
                setattr(blk, name, SampleDropPath(old.drop_prob, salt=2 * i + j))
                replaced += 1
    for name, m in vit.named_modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            raise ValueError(f"{name}: dropout p={m.p} draws its masks per rank; only stochastic depth is "
                             "seeded per sample (set the backbone's dropout rates to 0)")
    return replaced
