"""Batch-hard triplet loss as in PAT/TransReID.

Distances are Euclidean ``sqrt(clamp(||a − b||², 1e-12))`` on the un-normalised features. Per
anchor: hardest positive = the largest distance to a same-ID sample, the anchor itself included
(its distance ≈ 0 never wins unless it is the only one), hardest negative = the smallest distance
to another ID. Soft margin (PAT, ``NO_MARGIN=True``): ``mean log(1 + exp(−(d_an − d_ap)))``
(``nn.SoftMarginLoss`` with target 1); hard margin: ``mean max(0, d_ap − d_an + margin)``.
An anchor without any negative contributes ``d_an = +inf`` (zero loss, zero gradient).

``squared=True`` uses the squared distances ``clamp(||a − b||², 1e-12)`` of the paper's Eq. 9 in
place of their square roots; the mined pairs are the same (the root is monotonic), only the values
entering the margin change.

Under DDP (``global_batch=True``, the default) each rank's anchors are mined against the whole
global batch, all-gathered with autograd, so the hardest negative is the one a single process would
find; the rank returns the mean over its own anchors and DDP's gradient averaging yields exactly
the single-process gradient (the convention of ``trainer/losses/csl.py``). Every rank must call it
with the same local batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer import dist


def euclidean_dist(x: torch.Tensor, y: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Pairwise ``sqrt(clamp(||x_i||² + ||y_j||² − 2 x_i·y_j, 1e-12))`` (the TransReID expansion);
    without the square root when ``squared``."""
    d2 = ((x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * x @ y.t()).clamp(min=1e-12)
    return d2 if squared else d2.sqrt()


def hard_example_mining(dist: torch.Tensor, labels: torch.Tensor,
                        cand_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive (max, self included) and hardest negative (min) distance per anchor (row);
    columns are the candidates (``cand_labels``; the anchors themselves when None)."""
    same = labels[:, None] == (labels if cand_labels is None else cand_labels)[None, :]
    d_ap = torch.where(same, dist, torch.full_like(dist, float("-inf"))).amax(1)
    d_an = torch.where(~same, dist, torch.full_like(dist, float("inf"))).amin(1)
    return d_ap, d_an


def triplet_loss(feats: torch.Tensor, labels: torch.Tensor, margin: float | None = None,
                 global_batch: bool = True, squared: bool = False,
                 all_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-hard triplet on ``feats`` ``B×D``; ``margin=None`` → soft margin (PAT's setting).

    ``global_batch``: under DDP, mine against the all-gathered batch of every rank (collective).
    ``squared``: squared Euclidean distances (Eq. 9) instead of Euclidean ones (the code).
    ``all_labels``: the global batch's labels in rank order when the caller gathered them already
    (:class:`trainer.memory.GlobalBatch`, shared with the memory write); gathered here when None."""
    if feats.dim() != 2 or labels.shape != (feats.shape[0],):
        raise ValueError(
            f"triplet_loss: feats {tuple(feats.shape)} / labels {tuple(labels.shape)}: expected (B, D), (B,)"
        )
    if margin is not None and margin < 0:
        raise ValueError(f"triplet_loss margin={margin}: expected >= 0 or None (soft margin)")
    f = feats if feats.dtype == torch.float64 else feats.float()
    if global_batch and dist.get_world_size() > 1:
        all_f = dist.all_gather_autograd(f)
        if all_labels is None:
            all_labels = dist.all_gather(labels)
        elif all_labels.shape != (all_f.shape[0],):
            raise ValueError(f"triplet_loss: all_labels {tuple(all_labels.shape)}: expected ({all_f.shape[0]},), "
                             "the gathered batch's labels")
        d_ap, d_an = hard_example_mining(euclidean_dist(f, all_f, squared), labels, all_labels)
    else:
        d_ap, d_an = hard_example_mining(euclidean_dist(f, f, squared), labels)
    diff = d_an - d_ap
    if margin is None:
        return F.softplus(-diff).mean()  # log(1 + exp(−diff)) = SoftMarginLoss(diff, 1)
    return F.relu(margin - diff).mean()


__all__ = ["euclidean_dist", "hard_example_mining", "triplet_loss"]
