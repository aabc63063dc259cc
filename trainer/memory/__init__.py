"""Memories kept outside the model (fp32; DeepSpeed would cast module buffers): PAT's per-image part
bank (sharded by rows across ranks) and TMGF's camera-aware proxy memory (replicated, or sharded by
proxies: ``tmgf.memory_layout``), and the global batch of a step that a memory write and the losses
share (gathered once)."""

from __future__ import annotations

from trainer.memory.bank import PartMemoryBank
from trainer.memory.batch import GlobalBatch, gather_batch
from trainer.memory.proxy import ProxyMemory, sequential_momentum_update

__all__ = ["GlobalBatch", "PartMemoryBank", "gather_batch", "ProxyMemory", "sequential_momentum_update"]
