"""How the model is replicated across ranks: the seam where DeepSpeed ZeRO plugs in beside DDP.

A strategy wraps the model, runs backward and the optimizer step, and says which module holds the
weights. The engine talks only to this interface, so a ZeRO strategy needs no change in the loop.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import dist
from trainer.models.sync_bn import convert_sync_bn


class Strategy:
    """Single process, or DDP when a process group exists."""

    name = "ddp"

    def __init__(self, device: torch.device, precision: str = "fp32", sync_bn: bool = False) -> None:
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision={precision!r}: expected fp32, bf16 or fp16")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("train.precision=fp16 needs CUDA; use bf16 or fp32 on the CPU")
        self.device = device
        self.precision = precision
        self.sync_bn = sync_bn
        self.scaler = torch.amp.GradScaler("cuda", init_scale=512) if precision == "fp16" else None

    def wrap(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if dist.get_world_size() > 1:
            if self.sync_bn:
                model = convert_sync_bn(model, self.device)
            # Buffers are not broadcast every step: with sync_bn every rank computes the same BN running
            # stats itself; without it they are per rank as in plain DDP. Memory banks live outside the model.
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
