"""PSD (Part-guided Self-Distillation, PAT §3.3) and the PAT total loss (paper Eq. 10, code weights).

From the identities of the ``P·k`` part neighbours found by CSL, in the paper's symbols (α of Eq. 7,
λ of Eq. 8; ``pat.psd_alpha``, ``pat.psd_lambda_weight``; the official code calls them
``SOFT_LAMBDA`` and ``SOFT_WEIGHT``, which :func:`psd_loss` keeps as ``soft_lambda``/``soft_weight``)::

    c_i[y] = #{ neighbours of i over all parts with label y } / (P·k)
    q_i    = (1 − α)·onehot(y_i) + α·c_i                    soft target (α = 0.5)
    t_i    = (1 − ε)·onehot(y_i) + ε/C                      label smoothing, hard branch only (ε = 0.1)
    L_ID   = (1 − λ)·mean_i(−Σ t_i·log p_i) + λ·mean_i(−Σ q_i·log p_i)      (λ = 0.5)

Neighbours are neither deduplicated nor distance-weighted; the anchor's own identity among them
adds to ``q_i[y_i]``; they are constants (no gradient). A neighbour slot without a row (−1: the
bank had fewer than k other filled rows) or whose row has no label (−1) is left out and ``c_i``
is normalised by the number of neighbours that remain (= P·k in every normal step); with none left
``c_i = onehot(y_i)``. ``enabled=False`` is the repo HEAD (PSD silently off): plain LS-CE.

The official code looks the neighbours' labels up with indices into the self-removed array: a
neighbour stored after the anchor in the official bank gets the label of the row stored just before
it (an indexing bug). :func:`neighbour_labels` with ``repo_index_bug=True`` reproduces that
lookup. The official bank holds its rows in the order images were first written (the PK sampler's
order of the init pass, then images first met in training), not in dataset order, so the emulation
needs that order (``write_order``); without it, it assumes rows were first written in dataset order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F

from trainer.config import PATConfig
from trainer.losses.csl import csl_from_gathered
from trainer.losses.id import _check, label_smooth_ce
from trainer.losses.triplet import triplet_loss
from trainer.memory.bank import PartMemoryBank
from trainer.memory.batch import GlobalBatch, gather_batch

# The default hyperparameters, built once (as a call in the signature would be): read, never mutated.
_DEFAULT_PAT = PATConfig()


def neighbour_labels(
    row_labels: torch.Tensor,
    neighbour_indices: torch.Tensor,
    self_indices: torch.Tensor | None = None,
    repo_index_bug: bool = False,
    write_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Labels of the CSL neighbours (``b×P×k`` global rows → ``b×P×k`` labels; −1 stays −1).

    ``repo_index_bug=True`` reproduces the official lookup: with ``pos(j)`` the position of row ``j``
    in the official bank, a neighbour ``j`` with ``pos(j) > pos(anchor)`` is given the label of the
    row at position ``pos(j) − 1``. ``write_order`` (``N`` int64: each row's rank in the order of
    first writes, −1 for never-written rows) gives ``pos``; ``None`` means dataset order
    (``pos(j) = j``), exact only when the rows were first written in that order.
    """
    if neighbour_indices.dim() != 3:
        raise ValueError(f"neighbour_labels: neighbour_indices {tuple(neighbour_indices.shape)}: expected (b, P, k)")
    ids = neighbour_indices.to(row_labels.device, torch.long)
    if repo_index_bug:
        if self_indices is None or self_indices.shape != (ids.shape[0],):
            raise ValueError("neighbour_labels(repo_index_bug=True): self_indices of shape (b,) is required")
        anchor = self_indices.to(ids.device, torch.long)
        ids = torch.where(ids >= 0, _repo_lookup_rows(ids, anchor, write_order), ids)
    ok = ids >= 0
    labels = row_labels[ids.clamp(min=0)]
    return torch.where(ok, labels, torch.full_like(labels, -1))


def _repo_lookup_rows(ids: torch.Tensor, anchor: torch.Tensor, write_order: torch.Tensor | None) -> torch.Tensor:
    """The row whose label the official code reads for each neighbour row in ``ids`` (``b×P×k``, ≥ 0 where used)."""
    if write_order is None:
        return torch.where(ids > anchor[:, None, None], ids - 1, ids)
    order = write_order.to(ids.device, torch.long)
    written = torch.nonzero(order >= 0).flatten()
    row_at = torch.full((order.numel(),), -1, dtype=torch.long, device=ids.device)
    row_at[order[written]] = written  # position -> row (positions are 0..n_written-1)
    pos = order[ids.clamp(min=0)]
    apos = order[anchor][:, None, None]
    if bool((pos[ids >= 0] < 0).any()) or bool((apos < 0).any()):
        raise ValueError("neighbour_labels: a neighbour or anchor row has no write_order entry (never written)")
    return row_at[torch.where(pos > apos, pos - 1, pos).clamp(min=0)]


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
    """``L_ID`` with PSD (``logits`` ``b×C``, ``targets`` ``b``, ``nbr_labels`` ``b×P×k`` or ``b×(P·k)``).

    ``soft_lambda`` is the paper's α (Eq. 7), ``soft_weight`` its λ (Eq. 8): the official code's names."""
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


def self_distillation_loss(final_logits: torch.Tensor, block_logits: torch.Tensor,
                           temperature: float = 3.0) -> torch.Tensor:
    """Conventional self-distillation as SDViT does it (PAT Table 5's "B+SD").

    ``final_logits`` ``b×C`` (the last block's cls through the classifier), ``block_logits``
    ``(L−1)×b×C`` (blocks 1..L−1's cls through the final LayerNorm and the same classifier). With
    ``p = softmax(z_final/T)`` and ``q_l = softmax(z_l/T)``::

        KL_l = T²·Σ_{i,c} p_ic·(log p_ic − log q_l,ic) / (b·C)        (SDViT: summed, ÷ numel)
        L_SD = (1/L)·Σ_{l<L} KL_l

    SDViT draws one block l uniformly from all L at every step (l = L gives KL = 0); ``L_SD`` is that
    draw's expectation, so no random draw has to be checkpointed. Gradients reach both sides (SDViT
    does not detach the final logits). A mean over this rank's samples, as every PAT term."""
    if block_logits.dim() != 3 or block_logits.shape[1:] != final_logits.shape:
        raise ValueError(f"self_distillation_loss: block_logits {tuple(block_logits.shape)} / final_logits "
                         f"{tuple(final_logits.shape)}: expected (L-1, b, C) and (b, C)")
    if not temperature > 0:
        raise ValueError(f"self_distillation_loss: temperature={temperature}: expected > 0")
    z = final_logits if final_logits.dtype == torch.float64 else final_logits.float()
    zb = block_logits.to(z.dtype)
    log_p = F.log_softmax(z / temperature, dim=-1)
    log_q = F.log_softmax(zb / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum((1, 2)) * temperature ** 2 / final_logits.numel()  # per block
    return kl.sum() / (block_logits.shape[0] + 1)


@dataclass(frozen=True)
class PATLossOutput:
    """The PAT total and its parts for this rank's batch."""

    total: torch.Tensor
    id: torch.Tensor
    triplet: torch.Tensor
    csl: torch.Tensor
    neighbour_indices: torch.Tensor
    """``b×P×k`` CSL neighbours (global bank rows)."""
    sd: torch.Tensor | None = None
    """Self-distillation term (``cfg.sd_weight > 0``), else None."""


def pat_total(
    logits: torch.Tensor,
    cls_feat: torch.Tensor,
    part_feats: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor,
    bank: PartMemoryBank,
    cfg: PATConfig = _DEFAULT_PAT,
    block_logits: torch.Tensor | None = None,
    gathered: GlobalBatch | None = None,
) -> PATLossOutput:
    """PAT's objective for one step (Eq. 10 with the code's means and weights; collective).

    ``total = id_weight·L_ID(+PSD) + triplet_weight·L_TRI + csl_weight·L_CSL`` (``+ sd_weight·L_SD``
    with ``block_logits`` when ``cfg.sd_weight > 0``: :func:`self_distillation_loss`). ``logits``
    ``b×C`` (classifier on BN(cls)), ``cls_feat`` ``b×D`` (pre-BN, triplet), ``part_feats``
    ``b×P×D``, ``targets`` ``b`` relabelled pids, ``indices`` ``b`` bank rows.

    The bank is read, never written: the official order writes this step's features into it
    *before* the loss, and that write is the caller's (the method's memory hook; ``bank.update`` in
    a test). ``gathered``: the step's global batch when the caller gathered it already, to share it
    with that write (one gather per step); gathered here from ``part_feats``, ``indices`` and
    ``targets`` otherwise.
    Every term is a mean over this rank's batch, so DDP's gradient averaging gives the gradient of
    the single-process mean over the global batch (see :mod:`trainer.losses.csl`).
    ``cfg.repo_index_bug`` uses the bank's order of first writes, so it reproduces the official
    lookup exactly (see :func:`neighbour_labels`).
    """
    g = gathered if gathered is not None else gather_batch(indices, targets, part_feats, device=bank.device)
    if g.parts is None:
        raise ValueError("pat_total: the gathered batch has no part features (gather_batch(..., parts=...))")
    csl = csl_from_gathered(g.parts, g.indices, bank, k=cfg.csl_k, scale=cfg.csl_scale,
                            nan_to_zero=cfg.csl_nan_to_zero, tau=cfg.csl_tau,
                            # validated against CSL_FORMS / CSL_PART_REDUCTIONS by PATConfig
                            form=cast(Literal["official", "paper"], cfg.csl_form),
                            part_reduction=cast(Literal["mean", "sum"], cfg.csl_part_reduction))
    nbr = None
    if cfg.psd:
        nbr = neighbour_labels(bank.labels, csl.neighbour_indices, indices, cfg.repo_index_bug, bank.write_order)
    l_id = psd_loss(logits, targets, nbr, cfg.id_epsilon, cfg.psd_alpha, cfg.psd_lambda_weight, enabled=cfg.psd)
    l_tri = triplet_loss(cls_feat, targets, cfg.triplet_margin, squared=cfg.triplet_squared, all_labels=g.labels)
    total = cfg.id_weight * l_id + cfg.triplet_weight * l_tri + cfg.csl_weight * csl.loss
    l_sd = None
    if cfg.sd_weight > 0:
        if block_logits is None:
            raise ValueError("pat_total: pat.sd_weight > 0 needs block_logits (the model's ModelOutput.blocks)")
        l_sd = self_distillation_loss(logits, block_logits, cfg.sd_temperature)
        total = total + cfg.sd_weight * l_sd
    return PATLossOutput(total=total, id=l_id, triplet=l_tri, csl=csl.loss, neighbour_indices=csl.neighbour_indices,
                         sd=l_sd)


__all__ = ["neighbour_labels", "neighbour_distribution", "psd_loss", "self_distillation_loss", "PATLossOutput",
           "pat_total"]
