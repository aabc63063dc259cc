"""Batch-hard triplet loss as in PAT/TransReID (pat.md §4).

Distances are Euclidean ``sqrt(clamp(||a − b||², 1e-12))`` on the un-normalised features. Per
anchor: hardest positive = the largest distance to a same-ID sample, the anchor itself included
(its distance ≈ 0 never wins unless it is the only one), hardest negative = the smallest distance
to another ID. Soft margin (PAT, ``NO_MARGIN=True``): ``mean log(1 + exp(−(d_an − d_ap)))``
(``nn.SoftMarginLoss`` with target 1); hard margin: ``mean max(0, d_ap − d_an + margin)``.
An anchor without any negative contributes ``d_an = +inf`` (zero loss, zero gradient).

Under DDP it is computed on each rank's local batch (the identity sampler gives every rank whole
identities, so positives are local); DDP's gradient averaging then yields the mean over ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise ``sqrt(clamp(||x_i||² + ||y_j||² − 2 x_i·y_j, 1e-12))`` (the TransReID expansion)."""
    d2 = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * x @ y.t()
    return d2.clamp(min=1e-12).sqrt()


def hard_example_mining(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive (max, self included) and hardest negative (min) distance per anchor."""
    same = labels[:, None] == labels[None, :]
    d_ap = torch.where(same, dist, torch.full_like(dist, float("-inf"))).amax(1)
    d_an = torch.where(~same, dist, torch.full_like(dist, float("inf"))).amin(1)
    return d_ap, d_an


def triplet_loss(feats: torch.Tensor, labels: torch.Tensor, margin: float | None = None) -> torch.Tensor:
    """Batch-hard triplet on ``feats`` ``B×D``; ``margin=None`` → soft margin (PAT's setting)."""
    if feats.dim() != 2 or labels.shape != (feats.shape[0],):
        raise ValueError(
            f"triplet_loss: feats {tuple(feats.shape)} / labels {tuple(labels.shape)}: expected (B, D), (B,)"
        )
    if margin is not None and margin < 0:
        raise ValueError(f"triplet_loss margin={margin}: expected >= 0 or None (soft margin)")
    f = feats if feats.dtype == torch.float64 else feats.float()
    d_ap, d_an = hard_example_mining(euclidean_dist(f, f), labels)
    diff = d_an - d_ap
    if margin is None:
        return F.softplus(-diff).mean()  # log(1 + exp(−diff)) = SoftMarginLoss(diff, 1)
    return F.relu(margin - diff).mean()


__all__ = ["euclidean_dist", "hard_example_mining", "triplet_loss"]
