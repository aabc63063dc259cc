"""CSL (Cross-ID Similarity Learning, PAT §3.2) on the sharded part memory bank.

For part ``p`` and batch sample ``i`` with bank row ``idx_i`` (the official ``Pedal``)::

    d_ij   = ||f_i^p − M_j^p||²                       squared L2; gradient only through f_i
    V_i    = { j : row j filled, j ≠ idx_i }           self and never-written rows excluded
    T_i    = the k rows of V_i with the smallest d_ij  (any identity)
    ℓ_i^p  = −( logsumexp_{j∈T_i}(−s·d_ij) − logsumexp_{j∈V_i}(−s·d_ij) )
    L      = mean over parts and samples of ℓ_i^p     (k = 10, s = 0.02)

``ℓ_i^p = 0`` when ``V_i`` is empty, and ``T_i = V_i`` when ``|V_i| ≤ k`` (so ℓ = 0 too).

That is the official code (``form="official"``). The paper's Eq. 6 writes the logit as ``f_i·M_j / τ``
instead of ``−s·d_ij``: ``form="paper"`` (``τ = tau``) uses that logit everywhere above, for the
choice of ``T_i`` too (the k rows most similar by it). ``part_reduction="sum"`` sums ℓ over the parts
as Eq. 10 does (P times the code's mean).

Sharded computation. Rank r owns rows ``[start_r, stop_r)``:

1. the local batch features are all-gathered with autograd (``B = W·b`` samples);
2. each rank computes, for the whole global batch against its own rows only, the partial
   ``logsumexp`` over its slice (streamed in row chunks: O(chunk) memory, a custom backward that
   needs only the softmax-weighted mean row ``μ``: ``∂lse/∂f = −2s·(f − μ)``) and its local top-k
   (values + global row ids);
3. partial LSEs (``B×P`` per rank) and candidates (``B×P×k`` per rank) are all-gathered with
   autograd; each rank keeps its own samples' entries, log-add-exps the partials and takes the
   global top-k out of the ``W·k`` candidates.

Communication per step is O(B·P·D + W·B·P·k), independent of N (see :func:`communication_bytes`).

Gradient convention (what DDP needs). ``csl_loss`` returns the mean over *this rank's* ``b``
samples. Backward routes every gradient back to the rank that owns the sample, so
``∂(returned loss)/∂f_i = (1/b)·∂ℓ_i/∂f_i`` for the rank's own ``f_i`` — ``W`` times the gradient
the single-process loss over the global batch ``B = W·b`` gives. DDP averages parameter gradients
over ranks (÷W), so the parameters receive exactly the gradient of the single-process mean loss,
and the mean over ranks of the returned losses equals the single-process loss. Every rank must call
backward (the gathers have collective backwards), with equal local batch sizes.

Numerics: fp32 with autocast off whatever the model's precision; log-sum-exp throughout (the
official plain exp/sum/log underflows to NaN for far neighbours; its per-part NaN→0 guard is
available as ``nan_to_zero``). Exactly tied distances may order neighbours differently across
world sizes (``topk`` tie order); the loss is unaffected.

Order with the bank update: the official code updates the memory with the current batch *before*
computing the loss. :func:`csl_step` does exactly that by default (``update="before"``),
sharing one all-gather between the update and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from trainer import dist
from trainer.memory.bank import PartMemoryBank

_CHUNK_ELEMS = 1 << 24  # logits per streamed row chunk (P·B·chunk): 64 MiB in fp32
_MIN_CHUNK_ROWS = 1024  # floor, so a huge global batch still streams in sizeable chunks


@dataclass(frozen=True)
class CSLOutput:
    """Result of the CSL loss for this rank's samples."""

    loss: torch.Tensor
    """Scalar: mean of ``ℓ_i^p`` over this rank's samples, then mean (or sum) over the parts."""
    neighbour_indices: torch.Tensor
    """``b×P×k`` int64 global bank rows of the k nearest neighbours (nearest first); −1 = none."""
    per_sample: torch.Tensor
    """``b×P`` values of ``ℓ_i^p``."""


def _masked_logsumexp(x: torch.Tensor, valid: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over ``valid`` entries; ``−inf`` (with zero, not NaN, gradients) where none is valid."""
    anyv = valid.any(dim)
    m = torch.where(valid, x, float("-inf")).amax(dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(torch.where(valid, x - m, float("-inf"))).sum(dim)
    lse = m.squeeze(dim) + torch.log(torch.where(anyv, s, torch.ones_like(s)))
    return torch.where(anyv, lse, torch.full_like(lse, float("-inf"))), anyv


class _SliceLSE(torch.autograd.Function):
    """Partial logsumexp of ``−s·d`` over a bank slice, plus its top-k rows (validity + local column).

    Streams the slice in row chunks with an online max/sum/weighted-mean, so memory is
    O(P·B·chunk + P·B·D) whatever the slice size; backward is ``g·(−2s)·(f − μ)`` for the official
    logit ``−s·||f − M_j||²`` and ``g·μ/τ`` for the paper's ``f·M_j/τ`` (``tau`` set).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        gp: torch.Tensor,  # P×B×D
        bank: torch.Tensor,  # P×n×D
        sqnorm: torch.Tensor,  # P×n: ||M_j||²
        filled: torch.Tensor,  # n
        self_col: torch.Tensor,  # B: local row of the sample itself, −1 if not in this slice
        scale: float,
        k: int,
        tau: float | None,  # None: the official logit; a number: the paper's f·M/τ
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_parts, batch, dim = gp.shape
        n = bank.shape[1]
        dev = gp.device
        run_m = torch.full((num_parts, batch), float("-inf"), device=dev)
        run_s = torch.zeros(num_parts, batch, device=dev)
        run_mu = torch.zeros(num_parts, batch, dim, device=dev)
        top_v = torch.full((num_parts, batch, 0), float("-inf"), device=dev)
        top_c = torch.zeros(num_parts, batch, 0, dtype=torch.long, device=dev)
        g2 = (gp * gp).sum(-1)
        chunk = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMS // max(1, num_parts * batch))
        has_self = self_col >= 0
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            mc = bank[:, c0:c1]
            if tau is None:
                logits = torch.baddbmm((g2[:, :, None] + sqnorm[:, None, c0:c1]), gp, mc.transpose(1, 2),
                                       beta=1.0, alpha=-2.0).mul_(-scale)
            else:
                logits = torch.bmm(gp, mc.transpose(1, 2)).div_(tau)
            logits.masked_fill_(~filled[c0:c1][None, None, :], float("-inf"))
            # Mask each sample's own row without a host sync: rewrite one column per sample, −inf
            # where it is the sample itself, its old value otherwise.
            in_chunk = has_self & (self_col >= c0) & (self_col < c1)
            col = (self_col - c0).clamp(0, c1 - c0 - 1)[None, :, None].expand(num_parts, -1, 1)
            logits.scatter_(2, col, torch.where(in_chunk[None, :, None], float("-inf"), logits.gather(2, col)))
            new_m = torch.maximum(run_m, logits.amax(-1))
            safe_m = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
            alpha = torch.exp(run_m - safe_m)
            w = torch.exp(logits - safe_m[:, :, None])
            run_s = run_s * alpha + w.sum(-1)
            run_mu = torch.baddbmm(run_mu * alpha[:, :, None], w, mc)
            run_m = new_m
            kk = min(k, c1 - c0)
            cv, ci = logits.topk(kk, dim=-1)
            top_v, pick = torch.cat([top_v, cv], -1).topk(min(k, top_v.shape[-1] + kk), dim=-1)
            top_c = torch.cat([top_c, ci + c0], -1).gather(-1, pick)
        # Validity from the masks, not from the values: NaN features must propagate, not vanish.
        count = filled.sum() - (has_self & filled[self_col.clamp(min=0)]).long() if n else self_col.new_zeros(batch)
        anyv = (count > 0)[None, :].expand(num_parts, batch)
        safe_s = torch.where(anyv, run_s, torch.ones_like(run_s))
        lse = torch.where(anyv, run_m + torch.log(safe_s), torch.full_like(run_m, float("-inf")))
        empty = gp if tau is None else torch.zeros_like(gp)  # a zero gradient where no row is valid
        mu = torch.where(anyv[:, :, None], run_mu / safe_s[:, :, None], empty)
        slot_ok = (torch.arange(top_v.shape[-1], device=dev)[None, :] < count[:, None])[None]
        slot_ok = slot_ok.expand_as(top_v).contiguous()  # the first min(k, count) slots are real rows
        ctx.save_for_backward(gp, mu)
        ctx.scale = scale
        ctx.tau = tau
        ctx.mark_non_differentiable(slot_ok, top_c)
        return lse, slot_ok, top_c

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_lse: torch.Tensor, _gv: torch.Tensor, _gc: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        gp, mu = ctx.saved_tensors
        if ctx.tau is None:
            grad = g_lse[:, :, None] * (-2.0 * ctx.scale) * (gp - mu)
        else:
            grad = g_lse[:, :, None] * mu / ctx.tau
        return grad, None, None, None, None, None, None, None


CSLForm = Literal["official", "paper"]
PartReduction = Literal["mean", "sum"]


def _tau_of(form: str, tau: float, part_reduction: str) -> float | None:
    """The paper form's temperature, or None for the official logit; refuses any other form or
    reduction before any collective runs."""
    if part_reduction not in ("mean", "sum"):
        raise ValueError(f"csl: part_reduction={part_reduction!r}: expected 'mean' or 'sum'")
    if form == "official":
        return None
    if form == "paper":
        if not tau > 0:
            raise ValueError(f"csl: tau={tau}: expected > 0")
        return float(tau)
    raise ValueError(f"csl: form={form!r}: expected 'official' or 'paper'")


def _check_inputs(feats: torch.Tensor, indices: torch.Tensor, num_parts: int, dim: int, k: int) -> None:
    if feats.dim() != 3 or feats.shape[1:] != (num_parts, dim) or indices.shape != (feats.shape[0],):
        raise ValueError(
            f"csl: feats {tuple(feats.shape)} / indices {tuple(indices.shape)}: expected (b, {num_parts}, {dim}) "
            "and (b,)"
        )
    if k < 1:
        raise ValueError(f"csl: k={k}: expected k >= 1")


def _finish(per: torch.Tensor, nan_to_zero: bool, part_reduction: str = "mean") -> torch.Tensor:
    """Mean over samples of ``per`` (P×b), then mean (the code) or sum (Eq. 10) over the parts;
    optional official NaN→0 guard per part."""
    part = per.mean(1)
    if nan_to_zero:
        part = torch.where(torch.isfinite(part), part, torch.zeros_like(part))
    return part.sum() if part_reduction == "sum" else part.mean()


def csl_from_gathered(
    gfeats: torch.Tensor,
    gindices: torch.Tensor,
    bank: PartMemoryBank,
    k: int = 10,
    scale: float = 0.02,
    nan_to_zero: bool = False,
    form: CSLForm = "official",
    tau: float = 0.02,
    part_reduction: PartReduction = "mean",
) -> CSLOutput:
    """CSL for this rank's samples, given the global batch already gathered (rank order).

    ``gfeats`` must come from ``dist.all_gather_autograd`` of equally sized local batches (or be the
    batch itself in one process); ``gindices`` from ``dist.all_gather``. Collective: every rank
    must call it.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    _check_inputs(gfeats, gindices, bank.num_parts, bank.dim, k)
    t = _tau_of(form, tau, part_reduction)
    if gfeats.shape[0] % world:
        raise ValueError(f"csl: gathered batch {gfeats.shape[0]} not divisible by world size {world}")
    b = gfeats.shape[0] // world
    dev = bank.device
    with torch.autocast(device_type=dev.type, enabled=False):
        gp = gfeats.to(dev, torch.float32).transpose(0, 1).contiguous()  # P×B×D
        gidx = gindices.to(dev, torch.long)
        own = (gidx >= bank.start) & (gidx < bank.stop)
        self_col = torch.where(own, gidx - bank.start, torch.full_like(gidx, -1))
        sqnorm = bank.sqnorms()
        lse, valid, top_c = _SliceLSE.apply(gp, bank.feats, sqnorm, bank.filled, self_col, float(scale), int(k), t)
        # Candidate logits again, now differentiable in f (the same expansion as in the slice pass).
        kk = top_c.shape[-1]
        cols = torch.where(valid, top_c, torch.zeros_like(top_c))
        if kk:
            flat = cols.reshape(bank.num_parts, -1)
            rows = torch.gather(bank.feats, 1, flat[:, :, None].expand(-1, -1, bank.dim))
            rows = rows.reshape(bank.num_parts, -1, kk, bank.dim)
            if t is None:
                m2 = torch.gather(sqnorm, 1, flat).reshape(cols.shape)
                cand = -scale * ((gp * gp).sum(-1)[:, :, None] + m2 - 2.0 * torch.einsum("pbd,pbkd->pbk", gp, rows))
            else:
                cand = torch.einsum("pbd,pbkd->pbk", gp, rows) / t
        else:
            cand = gp.new_zeros(bank.num_parts, gp.shape[1], 0)
        ids = torch.where(valid, top_c + bank.start, torch.full_like(top_c, -1))
        if kk < k:  # a slice with fewer than k rows: pad with empty candidates
            pad = k - kk
            cand = torch.cat([cand, cand.new_zeros(*cand.shape[:2], pad)], -1)
            ids = torch.cat([ids, ids.new_full((*ids.shape[:2], pad), -1)], -1)
        # Combine the slices: W×P×B partial LSEs and W×P×B×k candidates.
        lse_all = dist.all_gather_autograd(lse[None])
        cand_all = dist.all_gather_autograd(cand[None])
        ids_all = dist.all_gather(ids[None])
        mine = slice(rank * b, (rank + 1) * b)
        lse_mine = lse_all[:, :, mine]
        den, _ = _masked_logsumexp(lse_mine, lse_mine != float("-inf"), dim=0)  # P×b (NaN propagates)
        cand_mine = cand_all[:, :, mine].permute(1, 2, 0, 3).reshape(bank.num_parts, b, world * k)
        ids_mine = ids_all[:, :, mine].permute(1, 2, 0, 3).reshape(bank.num_parts, b, world * k)
        ok = ids_mine >= 0
        score = torch.where(ok, cand_mine.detach(), torch.full_like(cand_mine, float("-inf")))
        _, pick = score.topk(k, dim=-1)
        top_logits = cand_mine.gather(-1, pick)
        top_ok = ok.gather(-1, pick)
        top_ids = torch.where(top_ok, ids_mine.gather(-1, pick), torch.full_like(pick, -1))
        num, num_any = _masked_logsumexp(top_logits, top_ok, dim=-1)
        per = torch.where(num_any, den - num, torch.zeros_like(den))  # P×b
        loss = _finish(per, nan_to_zero, part_reduction)
    return CSLOutput(loss=loss, neighbour_indices=top_ids.permute(1, 0, 2).contiguous(), per_sample=per.t())


def csl_loss(
    feats: torch.Tensor,
    indices: torch.Tensor,
    bank: PartMemoryBank,
    k: int = 10,
    scale: float = 0.02,
    nan_to_zero: bool = False,
    form: CSLForm = "official",
    tau: float = 0.02,
    part_reduction: PartReduction = "mean",
) -> CSLOutput:
    """CSL of this rank's batch (``feats`` ``b×P×D`` with grad, ``indices`` ``b`` global rows).

    Does not touch the bank: call ``bank.update`` first for the official order, or use
    :func:`csl_step`, which gathers once for both. Collective.
    """
    _check_inputs(feats, indices, bank.num_parts, bank.dim, k)
    gfeats = dist.all_gather_autograd(feats.to(bank.device))
    gidx = dist.all_gather(indices.to(bank.device, torch.long))
    return csl_from_gathered(gfeats, gidx, bank, k=k, scale=scale, nan_to_zero=nan_to_zero, form=form, tau=tau,
                             part_reduction=part_reduction)


def csl_step(
    feats: torch.Tensor,
    indices: torch.Tensor,
    bank: PartMemoryBank,
    labels: torch.Tensor | None = None,
    k: int = 10,
    scale: float = 0.02,
    update: Literal["before", "after", "none"] = "before",
    nan_to_zero: bool = False,
    form: CSLForm = "official",
    tau: float = 0.02,
    part_reduction: PartReduction = "mean",
) -> CSLOutput:
    """One training step's CSL with the bank update, sharing one all-gather between them.

    ``update="before"`` (default, the official order): momentum-update the bank with the detached
    batch, then compute the loss against the updated bank. ``"after"``: loss first, then update.
    ``labels`` (optional, ``b`` int64) are recorded as the rows' identities for PSD. The one-call
    form for tests and benchmarks; training writes the bank in the method's memory hook and calls
    :func:`csl_from_gathered` through ``pat_total``, so no loss of a run writes the bank.
    """
    if update not in ("before", "after", "none"):
        raise ValueError(f"csl_step update={update!r}: expected 'before', 'after' or 'none'")
    _check_inputs(feats, indices, bank.num_parts, bank.dim, k)
    _tau_of(form, tau, part_reduction)  # refuse bad options before the bank is written
    gfeats = dist.all_gather_autograd(feats.to(bank.device))
    gidx = dist.all_gather(indices.to(bank.device, torch.long))
    glabels = None if labels is None else dist.all_gather(labels.to(bank.device, torch.long))
    if update == "before":
        bank.write_gathered(gidx, gfeats.detach(), glabels)
    out = csl_from_gathered(gfeats, gidx, bank, k=k, scale=scale, nan_to_zero=nan_to_zero, form=form, tau=tau,
                            part_reduction=part_reduction)
    if update == "after":
        bank.write_gathered(gidx, gfeats.detach(), glabels)
    return out


def csl_loss_reference(
    feats: torch.Tensor,
    indices: torch.Tensor,
    bank_feats: torch.Tensor,
    filled: torch.Tensor | None = None,
    k: int = 10,
    scale: float = 0.02,
    nan_to_zero: bool = False,
    form: CSLForm = "official",
    tau: float = 0.02,
    part_reduction: PartReduction = "mean",
) -> CSLOutput:
    """Single-process CSL against a full bank ``P×N×D`` (explicit differences; any float dtype).

    The straightforward statement of the formula, for tests and small runs.
    """
    num_parts, n, dim = bank_feats.shape
    _check_inputs(feats, indices, num_parts, dim, k)
    t = _tau_of(form, tau, part_reduction)
    filled = torch.ones(n, dtype=torch.bool, device=bank_feats.device) if filled is None else filled.bool()
    fp = feats.transpose(0, 1)  # P×B×D
    if t is None:
        d = ((fp[:, :, None, :] - bank_feats[:, None, :, :].detach()) ** 2).sum(-1)  # P×B×N
        logits = -scale * d
    else:
        logits = torch.einsum("pbd,pnd->pbn", fp, bank_feats.detach()) / t
    valid = filled[None, None, :].expand_as(logits).clone()
    valid[:, torch.arange(feats.shape[0]), indices] = False
    den, _ = _masked_logsumexp(logits, valid, dim=-1)
    masked = torch.where(valid, logits.detach(), torch.full_like(logits, float("-inf")))
    kk = min(k, n)
    _, pick = masked.topk(kk, dim=-1)
    top_ok = valid.gather(-1, pick)
    num, num_any = _masked_logsumexp(logits.gather(-1, pick), top_ok, dim=-1)
    per = torch.where(num_any, den - num, torch.zeros_like(den))
    ids = torch.where(top_ok, pick, torch.full_like(pick, -1))
    if kk < k:
        ids = torch.cat([ids, ids.new_full((*ids.shape[:2], k - kk), -1)], -1)
    return CSLOutput(loss=_finish(per, nan_to_zero, part_reduction),
                     neighbour_indices=ids.permute(1, 0, 2).contiguous(), per_sample=per.t())


def communication_bytes(
    local_batch: int, world_size: int, num_parts: int, dim: int, k: int, feat_bytes: int = 4
) -> dict[str, int]:
    """Bytes each rank RECEIVES per training step (:func:`csl_step`, forward + backward), by collective.

    Analytic from the tensor sizes of the collectives above (an all-gather of a tensor of ``x``
    bytes per rank delivers ``W·x``; the backward reduce-scatter of a gathered tensor moves the same
    amount). Independent of the bank size N.
    """
    w, b = world_size, local_batch
    big_b = w * b
    out = {
        "gather_feats": w * b * num_parts * dim * feat_bytes,
        "gather_indices": w * b * 8,
        "gather_labels": w * b * 8,
        "gather_partial_lse": w * num_parts * big_b * 4,
        "gather_candidates": w * num_parts * big_b * k * 4,
        "gather_candidate_ids": w * num_parts * big_b * k * 8,
    }
    # Backward: reduce-scatter of the gradients of every autograd gather.
    out["backward_feats"] = out["gather_feats"]
    out["backward_partial_lse"] = out["gather_partial_lse"]
    out["backward_candidates"] = out["gather_candidates"]
    if w == 1:
        out = {key: 0 for key in out}
    out["total"] = sum(out.values())
    return out


__all__ = ["CSLOutput", "csl_loss", "csl_step", "csl_from_gathered", "csl_loss_reference", "communication_bytes"]
