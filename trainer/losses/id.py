"""Label-smoothed cross-entropy (the ID loss of PAT/TransReID, ε = 0.1).

``t = (1 − ε)·onehot(y) + ε/C``, ``L = mean_i(−Σ_c t_ic · log_softmax(z_i)_c)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(logits: torch.Tensor, targets: torch.Tensor, where: str) -> None:
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"{where}: logits {tuple(logits.shape)} / targets {tuple(targets.shape)}: expected (B, C), (B,)"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(
            f"{where}: target range [{int(targets.min())}, {int(targets.max())}] outside [0, {logits.shape[1]})"
        )


def label_smooth_ce(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Mean label-smoothed CE over the batch; computed in fp32 (also under autocast)."""
    _check(logits, targets, "label_smooth_ce")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label_smooth_ce epsilon={epsilon}: expected 0 <= epsilon < 1")
    logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1)
    nll = -logp.gather(1, targets[:, None].long()).squeeze(1)
    uniform = -logp.mean(1)
    return ((1.0 - epsilon) * nll + epsilon * uniform).mean()


__all__ = ["label_smooth_ce"]
