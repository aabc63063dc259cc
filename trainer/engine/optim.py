"""Optimizers and learning-rate schedules the papers use."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """One group for weights and one for biases (LR × ``bias_lr_factor``); frozen tensors excluded."""
    weights: list[nn.Parameter] = []
    biases: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (biases if name.endswith("bias") else weights).append(p)
    groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if biases:
        groups.append({"params": biases, "lr": cfg.lr * cfg.bias_lr_factor, "weight_decay": cfg.weight_decay})
    return groups


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optim.name={cfg.name!r}: expected 'sgd' or 'adam'")


class EpochLR:
    """Per-epoch LR schedule behind one interface: ``set_epoch(e)`` with 0-based epochs.

    ``cosine`` is timm's CosineLRScheduler configured as the PAT repo does (stepped with epochs
    1..E, t_in_epochs, warm-up from ``warmup_factor·lr``). ``multistep`` is the TMGF/O2CAP
    WarmupMultiStepLR. ``paper`` is PAT §4.2 (:func:`paper_lr_factor`). All are functions of the
    epoch, so resume needs only the epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
        if cfg.schedule not in ("cosine", "multistep", "paper"):
            raise ValueError(f"train.optim.schedule={cfg.schedule!r}: expected 'cosine', 'multistep' or 'paper'")
        self.optimizer = optimizer
        self.cfg = cfg
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self._timm = None
        if cfg.schedule == "cosine":
            from timm.scheduler import CosineLRScheduler

            self._timm = CosineLRScheduler(
                optimizer, t_initial=cfg.cosine_t_initial, lr_min=cfg.cosine_lr_min_factor * cfg.lr,
                warmup_t=cfg.warmup_epochs, warmup_lr_init=cfg.warmup_factor * cfg.lr, cycle_limit=1,
                t_in_epochs=True,
            )

    def multistep_lr(self, base: float, epoch: int) -> float:
        c = self.cfg
        w = 1.0
        if epoch < c.warmup_epochs:
            alpha = epoch / c.warmup_epochs
            w = c.warmup_factor * (1 - alpha) + alpha
        return base * w * c.gamma ** sum(1 for m in c.milestones if m <= epoch)

    def set_epoch(self, epoch: int) -> None:
        if self._timm is not None:
            self._timm.step(epoch + 1)  # the official loop calls scheduler.step(epoch) with epoch = 1..E
            return
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            if self.cfg.schedule == "paper":
                g["lr"] = base * paper_lr_factor(self.cfg, epoch)
            else:
                g["lr"] = self.multistep_lr(base, epoch)


def paper_lr_factor(cfg: OptimConfig, epoch: int) -> float:
    """PAT §4.2's schedule as a factor of each group's base LR, for the 0-based ``epoch``.

    "The learning rate increases linearly from 0 to 1e-3 in the first 10 epochs then it decays in the
    following 50 epochs": with ``t = epoch + 1`` (as the official loop counts), W = ``warmup_epochs``
    and D = ``decay_epochs``, the factor is ``t/W`` for t <= W (1 at the W-th epoch), then a half
    cosine from 1 at t = W to the floor ``m = cosine_lr_min_factor`` at t = W + D, and m after. The
    paper does not say how it decays; the half cosine is the shape of the official code's schedule.
    """
    t, w, d, m = epoch + 1, cfg.warmup_epochs, cfg.decay_epochs, cfg.cosine_lr_min_factor
    if t <= w:
        return t / w
    progress = min(1.0, (t - w) / d)
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))
