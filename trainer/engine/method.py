"""The contract between the engine and a training method (PAT, TMGF, …).

The engine owns the loop, the process group, the strategy (DDP / DeepSpeed), the optimizer and
scheduler, mixed precision, checkpoints and metrics; a method owns its model, data, losses and any
state outside the model (memory banks, pseudo labels). The engine imports no method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class StepResult:
    """What a training step hands back to the engine."""

    loss: torch.Tensor
    """Scalar to back-propagate (this rank's share; the strategy averages gradients over ranks)."""
    logs: dict[str, float] = field(default_factory=dict)
    """Detached scalars to record (per-term losses, accuracies)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Anything :meth:`Method.after_optimizer_step` needs (e.g. detached features for a memory update)."""


def _no_log(kind: str, **fields: Any) -> None:
    pass


class Method(ABC):
    """A training method. Every hook is called on every rank, in the same order."""

    log_event: Callable[..., None] = staticmethod(_no_log)
    """``log_event(kind, **fields)``: a record of the method's own (e.g. TMGF's ``cluster`` statistics
    per re-clustering) into the run's metrics (metrics.jsonl, console, any other sink); bound by the
    engine (:meth:`bind_metrics`), a no-op outside one. Call it on every rank: only rank 0's sinks write."""

    def bind_metrics(self, log: Callable[..., None]) -> None:
        """Called by the engine with its ``Metrics.log`` before any other hook."""
        self.log_event = log

    @abstractmethod
    def build_model(self) -> nn.Module:
        """Create the model on the CPU (the engine moves it to the device and wraps it)."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups; ``None`` lets the engine build them from its config."""
        return None

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (identical on every rank)."""

    @abstractmethod
    def train_batches(self, epoch: int, start_step: int) -> Iterable[dict[str, torch.Tensor]]:
        """This rank's batches of ``epoch`` from step ``start_step`` on: a pure function of
        (seed, epoch, start_step), which is what makes mid-epoch resume sample-exact. An iterable with a
        ``cursor`` (the sampler's position) is the owner of the position: the engine reads and
        checkpoints it after every step."""

    def on_fit_start(self, model: nn.Module, resumed: bool) -> None:
        """Before the first step (e.g. fill a memory bank when not resumed)."""

    def on_epoch_start(self, model: nn.Module, epoch: int, step_in_epoch: int) -> None:
        """At every epoch start, and on resume in the middle of one (``step_in_epoch > 0``)."""

    @abstractmethod
    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        """Forward and loss for one batch (the engine runs it under autocast)."""

    def after_optimizer_step(self, model: nn.Module, batch: dict[str, torch.Tensor], result: StepResult) -> None:
        """After ``optimizer.step()`` (e.g. momentum-update proxy memories)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Metrics per target, e.g. ``{"dukemtmc": {"mAP": .., "R1": ..}}``. Collective."""

    def state_dict(self) -> dict[str, Any]:
        """Method state outside the model, complete for exact resume (banks, labels, generators)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""

    def export_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors for ``model_final.safetensors`` (default: the model's state dict)."""
        return dict(model.state_dict())
