"""PSD (Part-guided Self-Distillation, PAT §3.3) and the PAT total loss (paper Eq. 10, code weights).

From the identities of the ``P·k`` part neighbours found by CSL (pat.md §3)::

    c_i[y] = #{ neighbours of i over all parts with label y } / (P·k)
    q_i    = (1 − λ)·onehot(y_i) + λ·c_i                    soft target (λ = 0.5)
    t_i    = (1 − ε)·onehot(y_i) + ε/C                      label smoothing, hard branch only (ε = 0.1)
    L_ID   = (1 − w)·mean_i(−Σ t_i·log p_i) + w·mean_i(−Σ q_i·log p_i)      (w = 0.5)

Neighbours are neither deduplicated nor distance-weighted; the anchor's own identity among them
adds to ``q_i[y_i]``; they are constants (no gradient). A neighbour slot without a row (−1: the
bank had fewer than k other filled rows) or whose row has no label (−1) is left out and ``c_i``
is normalised by the number of neighbours that remain (= P·k in every normal step); with none left
``c_i = onehot(y_i)``. ``enabled=False`` is the repo HEAD (PSD silently off): plain LS-CE.

The official code looks the neighbours' labels up with indices into the self-removed array
(off by one above the anchor's row, pat.md §2.2 [BUG]); :func:`neighbour_labels` with
``repo_index_bug=True`` reproduces that lookup for repo fidelity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.losses.csl import csl_step
from trainer.losses.id import _check, label_smooth_ce
from trainer.config import PATConfig
from trainer.losses.triplet import triplet_loss
from trainer.memory.bank import PartMemoryBank


def neighbour_labels(
    row_labels: torch.Tensor,
    neighbour_indices: torch.Tensor,
    self_indices: torch.Tensor | None = None,
    repo_index_bug: bool = False,
) -> torch.Tensor:
    """Labels of the CSL neighbours (``b×P×k`` global rows → ``b×P×k`` labels; −1 stays −1).

    ``repo_index_bug=True`` reads row ``j − 1`` instead of ``j`` for every neighbour above the
    anchor's own row (``self_indices``, ``b``), as the official code does.
    """
    if neighbour_indices.dim() != 3:
        raise ValueError(f"neighbour_labels: neighbour_indices {tuple(neighbour_indices.shape)}: expected (b, P, k)")
    ids = neighbour_indices.to(row_labels.device, torch.long)
    if repo_index_bug:
        if self_indices is None or self_indices.shape != (ids.shape[0],):
            raise ValueError("neighbour_labels(repo_index_bug=True): self_indices of shape (b,) is required")
        anchor = self_indices.to(ids.device, torch.long)[:, None, None]
        ids = torch.where(ids > anchor, ids - 1, ids)
    ok = ids >= 0
    labels = row_labels[ids.clamp(min=0)]
    return torch.where(ok, labels, torch.full_like(labels, -1))


def neighbour_distribution(targets: torch.Tensor, nbr_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``c_i``: the empirical label distribution of the neighbours (``b×C``, rows sum to 1)."""
    b = targets.shape[0]
    flat = nbr_labels.reshape(b, -1).to(targets.device, torch.long)
    if flat.numel() and int(flat.max()) >= num_classes:
        raise ValueError(f"psd: neighbour label {int(flat.max())} outside [0, {num_classes})")
    ok = flat >= 0
    counts = torch.zeros(b, num_classes, dtype=torch.float32, device=targets.device)
    counts.scatter_add_(1, flat.clamp(min=0), ok.float())
    total = ok.sum(1, keepdim=True).float()
    onehot = F.one_hot(targets.long(), num_classes).float()
    return torch.where(total > 0, counts / total.clamp(min=1.0), onehot)


def psd_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    nbr_labels: torch.Tensor | None,
    epsilon: float = 0.1,
    soft_lambda: float = 0.5,
    soft_weight: float = 0.5,
    enabled: bool = True,
) -> torch.Tensor:
    """``L_ID`` with PSD (``logits`` ``b×C``, ``targets`` ``b``, ``nbr_labels`` ``b×P×k`` or ``b×(P·k)``)."""
    if not enabled:
        return label_smooth_ce(logits, targets, epsilon)
    _check(logits, targets, "psd_loss")
    if nbr_labels is None or nbr_labels.shape[0] != targets.shape[0]:
        raise ValueError("psd_loss(enabled=True): nbr_labels with one row per sample is required")
    if not (0.0 <= soft_lambda <= 1.0 and 0.0 <= soft_weight <= 1.0):
        raise ValueError(f"psd_loss: soft_lambda={soft_lambda}, soft_weight={soft_weight}: expected values in [0, 1]")
    hard = label_smooth_ce(logits, targets, epsilon)
    c = neighbour_distribution(targets, nbr_labels, logits.shape[1])
    q = (1.0 - soft_lambda) * F.one_hot(targets.long(), logits.shape[1]).float() + soft_lambda * c
    soft = -(q * F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1)).sum(1).mean()
    return (1.0 - soft_weight) * hard + soft_weight * soft


@dataclass(frozen=True)
class PATLossOutput:
    """The PAT total and its parts for this rank's batch."""

    total: torch.Tensor
    id: torch.Tensor
    triplet: torch.Tensor
    csl: torch.Tensor
    neighbour_indices: torch.Tensor
    """``b×P×k`` CSL neighbours (global bank rows)."""


def pat_total(
    logits: torch.Tensor,
    cls_feat: torch.Tensor,
    part_feats: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor,
    bank: PartMemoryBank,
    cfg: PATConfig = PATConfig(),
) -> PATLossOutput:
    """PAT's objective for one step (Eq. 10 with the code's means and weights; collective).

    ``total = id_weight·L_ID(+PSD) + triplet_weight·L_TRI + csl_weight·L_CSL``. The bank is
    updated with the (detached) batch inside, before the CSL loss unless ``update_before_loss`` is
    False. ``logits`` ``b×C`` (classifier on BN(cls)), ``cls_feat`` ``b×D`` (pre-BN, triplet),
    ``part_feats`` ``b×P×D``, ``targets`` ``b`` relabelled pids, ``indices`` ``b`` bank rows.
    Every term is a mean over this rank's batch, so DDP's gradient averaging gives the gradient of
    the single-process mean over the global batch (see :mod:`trainer.losses.csl`).
    """
    csl = csl_step(part_feats, indices, bank, labels=targets, k=cfg.csl_k, scale=cfg.csl_scale,
                   update="before" if cfg.update_before_loss else "after", nan_to_zero=cfg.csl_nan_to_zero)
    nbr = None
    if cfg.psd:
        nbr = neighbour_labels(bank.labels, csl.neighbour_indices, indices, cfg.repo_index_bug)
    l_id = psd_loss(logits, targets, nbr, cfg.id_epsilon, cfg.psd_lambda, cfg.psd_weight, enabled=cfg.psd)
    l_tri = triplet_loss(cls_feat, targets, cfg.triplet_margin)
    total = cfg.id_weight * l_id + cfg.triplet_weight * l_tri + cfg.csl_weight * csl.loss
    return PATLossOutput(total=total, id=l_id, triplet=l_tri, csl=csl.loss, neighbour_indices=csl.neighbour_indices)


__all__ = ["neighbour_labels", "neighbour_distribution", "psd_loss", "PATLossOutput", "pat_total"]
