"""How the model is replicated across ranks: torch DDP, or DeepSpeed ZeRO (``trainer.engine.zero``).

A strategy builds the wrapped model and the optimizer from the method's parameter groups, runs
backward and the optimizer step, says which module holds the weights, and reads and writes the
model and optimizer state in ONE format whatever the strategy and world size: the full fp32 weights
(a module ``state_dict``) and a torch ``Optimizer.state_dict`` of the unsharded optimizer over the
parameter groups in the method's order. So a checkpoint resumes under either strategy and at any
world size, and the engine and the methods never know which strategy runs.

The optimizer returned by :meth:`Strategy.setup` is always a torch optimizer whose ``param_groups``
the engine's LR schedule writes (under DeepSpeed its groups hold ZeRO's flat partitions; DeepSpeed
steps no scheduler of its own).
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import dist
from trainer.config import OptimConfig, TrainConfig
from trainer.engine.optim import build_optimizer
from trainer.models.sync_bn import convert_sync_bn

# torch 2.14 renamed DDP's per-forward buffer broadcast to ``forward_sync_buffers`` (deprecating
# ``broadcast_buffers``); the new one also syncs buffers once at wrap time, harmless here because every
# rank builds the same model from the same seed and checkpoints load after wrapping.
_NO_FORWARD_BUFFER_SYNC: dict[str, Any] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)

ParamGroups = list[dict[str, Any]]
Setup = tuple[nn.Module, torch.optim.Optimizer]
"""What :meth:`Strategy.setup` returns: the module the training step calls and the torch optimizer."""


class Strategy(ABC):
    """What every strategy does; :class:`DDPStrategy` and ``trainer.engine.zero.DeepSpeedStrategy``."""

    name: str

    def __init__(self, device: torch.device, precision: str = "fp32", sync_bn: bool = False,
                 clip_grad: float = 0.0) -> None:
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision={precision!r}: expected fp32, bf16 or fp16")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("train.precision=fp16 needs CUDA; use bf16 or fp32 on the CPU")
        self.device = device
        self.precision = precision
        self.sync_bn = sync_bn
        self.clip_grad = clip_grad
        self.params: list[list[nn.Parameter]] = []
        """The method's parameter groups as built (the order of the saved optimizer state)."""

    def _place(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if dist.get_world_size() > 1 and self.sync_bn:
            model = convert_sync_bn(model, self.device)
        return model

    @abstractmethod
    def setup(self, model: nn.Module, groups: ParamGroups, optim_cfg: OptimConfig) -> Setup:
        """The module to call in training steps and the torch optimizer the LR schedule writes."""

    @abstractmethod
    def unwrap(self, module: nn.Module) -> nn.Module:
        """The model itself (what the methods evaluate, export and hand to their memory hooks)."""

    def autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @abstractmethod
    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` averaged over the ranks, clipped if asked, one optimizer step."""

    @abstractmethod
    def model_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Collective: the full model in fp32 (the master weights where they differ from the module's)."""

    @abstractmethod
    def load_model_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`model_state_dict` of any strategy and world size."""

    @abstractmethod
    def optimizer_state_dict(self) -> dict[str, Any]:
        """Collective: the unsharded torch optimizer state over :attr:`params`, as ``Optimizer.state_dict``."""

    @abstractmethod
    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        """Load an :meth:`optimizer_state_dict` of any strategy and world size."""

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state (loss scaler), beside its name."""
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (a strategy without state keeps it)
        """Load what :meth:`state_dict` saved."""

    def describe(self) -> dict[str, Any]:
        """What the run dir records about the strategy (DeepSpeed: its resolved config)."""
        return {"strategy": self.name}


class DDPStrategy(Strategy):
    """Single process, or torch DDP when a process group exists."""

    name = "ddp"

    def __init__(self, device: torch.device, precision: str = "fp32", sync_bn: bool = False,
                 clip_grad: float = 0.0) -> None:
        super().__init__(device, precision, sync_bn, clip_grad)
        self.scaler = torch.amp.GradScaler("cuda", init_scale=512) if precision == "fp16" else None
        self.optimizer: torch.optim.Optimizer | None = None

    def setup(self, model: nn.Module, groups: ParamGroups, optim_cfg: OptimConfig) -> Setup:
        self.params = [list(g["params"]) for g in groups]
        model = self._place(model)
        self.optimizer = build_optimizer(groups, optim_cfg)
        if dist.get_world_size() > 1:
            # Buffers are not broadcast every step: with sync_bn every rank computes the same BN running
            # stats itself; without it they are per rank as in plain DDP. Memory banks live outside the model.
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC), self.optimizer
        return model, self.optimizer

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, DistributedDataParallel) else module

    def backward_and_step(self, loss: torch.Tensor) -> None:
        optimizer = self.optimizer
        assert optimizer is not None, "setup() first"
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.clip_grad > 0:
                self.scaler.unscale_(optimizer)
                self._clip()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.clip_grad > 0:
                self._clip()
            optimizer.step()

    def _clip(self) -> None:
        torch.nn.utils.clip_grad_norm_([p for group in self.params for p in group], self.clip_grad)

    def model_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.unwrap(module).state_dict()

    def load_model_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.unwrap(module).load_state_dict(state)

    def optimizer_state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None, "setup() first"
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None, "setup() first"
        self.optimizer.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def resolve_precision(precision: str, device_type: str) -> str:
    """``train.precision`` as it runs: ``auto`` is fp16 autocast on CUDA (the papers'), fp32 elsewhere."""
    if precision == "auto":
        return "fp16" if device_type == "cuda" else "fp32"
    return precision


def json_bytes(config: dict[str, Any]) -> bytes:
    """A config as the run dir stores it (sorted keys: diffable between runs)."""
    return (json.dumps(config, indent=1, sort_keys=True) + "\n").encode()


def build_strategy(cfg: TrainConfig, device: torch.device, precision: str, global_batch: int) -> Strategy:
    """The strategy ``cfg.strategy`` names; ``global_batch`` (images per step over all ranks) sizes
    DeepSpeed's micro-batch."""
    if cfg.strategy == "deepspeed":
        from trainer.engine.zero import DeepSpeedStrategy

        return DeepSpeedStrategy(device, precision, cfg.sync_bn, cfg.clip_grad, zero_stage=cfg.zero_stage,
                                 global_batch=global_batch)
    if cfg.strategy != "ddp":
        raise ValueError(f"train.strategy={cfg.strategy!r}: expected 'ddp' or 'deepspeed'")
    return DDPStrategy(device, precision, cfg.sync_bn, cfg.clip_grad)
