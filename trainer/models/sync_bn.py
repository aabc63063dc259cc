"""BatchNorm over the GLOBAL batch under DDP (``train.sync_bn``), on CUDA and on the CPU alike.

Both papers train on one GPU, so their BatchNorms (PAT's BN neck, TMGF's IBN stem and BN necks)
normalise with the statistics of the whole batch. Plain DDP normalises each rank's slice with its own
statistics: with 2 ranks TMGF's necks see 16 images of 4 proxies instead of 32 of 8 — another model.
:func:`convert_sync_bn` makes every BatchNorm use the global batch:

* CUDA: ``torch.nn.SyncBatchNorm`` (fused kernels);
* CPU/gloo (``SyncBatchNorm`` refuses CPU tensors): :class:`GlobalBatchNorm`, which all-reduces the
  per-channel count, sum and sum of squares (float64, differentiable: the backward all-reduces their
  gradients), so that forward, backward and running statistics equal one process on the global batch
  up to float rounding (``tests/test_sync_bn.py``: world = 2 vs world = 1).

Parameters and buffers are moved, not copied (an optimizer built before stays valid; frozen biases
stay frozen). Eval mode and a single process run the ordinary BatchNorm path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainer import dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the incoming gradients (each rank's
    input feeds every rank's output)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        return dist.all_reduce(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return dist.all_reduce(grad.contiguous().clone())


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm1d/2d/3d whose training statistics are those of the batch of all ranks."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected input with >= 2 dims (N, C, ...), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        x64 = x.to(torch.float64)
        local_n = x.numel() // c
        stats = torch.cat([x64.sum(dims), (x64 * x64).sum(dims),
                           torch.full((1,), float(local_n), dtype=torch.float64, device=x.device)])
        comm = dist.comm_device()
        total = _AllReduceSum.apply(stats.to(comm)).to(x.device)
        n = float(total[-1].detach())
        if n <= 1:
            raise ValueError(f"GlobalBatchNorm: {int(n)} value(s) per channel over all ranks; need > 1 in training")
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0.0)  # biased, as BatchNorm normalises with
        if (self.track_running_stats and self.running_mean is not None and self.running_var is not None
                and self.num_batches_tracked is not None):
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x64 - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        y = y.to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _global_bn_like(bn: _BatchNorm) -> GlobalBatchNorm:
    new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias  # the same Parameters (requires_grad kept)
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` normalising over the global batch: ``nn.SyncBatchNorm`` on CUDA,
    :class:`GlobalBatchNorm` elsewhere. Returns the (possibly replaced) module."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        return _global_bn_like(module)
    for name, child in list(module.named_children()):
        new = convert_sync_bn(child, device)
        if new is not child:
            setattr(module, name, new)
    return module


__all__ = ["GlobalBatchNorm", "convert_sync_bn"]
