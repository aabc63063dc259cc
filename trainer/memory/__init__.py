"""Memories kept outside the model (fp32; DeepSpeed would cast module buffers): PAT's per-image part
bank (sharded by rows across ranks) and TMGF's camera-aware proxy memory (replicated)."""

from __future__ import annotations

from trainer.memory.bank import PartMemoryBank
from trainer.memory.proxy import ProxyMemory, sequential_momentum_update

__all__ = ["PartMemoryBank", "ProxyMemory", "sequential_momentum_update"]
