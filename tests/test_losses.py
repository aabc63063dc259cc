"""PAT losses against naive float64 restatements (python loops over samples, parts and rows)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import PATConfig
from trainer.losses import csl as csl_mod
from trainer.losses import (
    csl_loss,
    csl_loss_reference,
    csl_step,
    label_smooth_ce,
    neighbour_labels,
    pat_total,
    psd_loss,
    triplet_loss,
)
from trainer.memory import PartMemoryBank


# ---------------------------------------------------------------------------------------------- naive
def naive_csl(feats, indices, bank, filled, k, scale):
    """Loop restatement of docs/methods/pat.md §CSL in float64 torch scalars (differentiable in ``feats``)."""
    b, num_parts, _ = feats.shape
    n = bank.shape[1]
    total = feats.new_zeros(())
    nbrs = []
    for i in range(b):
        row = []
        for p in range(num_parts):
            cands = []
            for j in range(n):
                if not bool(filled[j]) or j == int(indices[i]):
                    continue
                cands.append((((feats[i, p] - bank[p, j]) ** 2).sum(), j))
            cands.sort(key=lambda t: float(t[0].detach()))
            top = cands[:k]
            row.append([j for _, j in top] + [-1] * (k - len(top)))
            if not cands:
                continue
            den = sum(torch.exp(-scale * d) for d, _ in cands)
            num = sum(torch.exp(-scale * d) for d, _ in top)
            total = total + (-(torch.log(num) - torch.log(den)))
        nbrs.append(row)
    return total / (b * num_parts), torch.tensor(nbrs)


def naive_ls_ce(logits, targets, eps):
    b, c = logits.shape
    out = 0.0
    for i in range(b):
        z = [float(v) for v in logits[i]]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        for cl in range(c):
            t = (1 - eps) * (cl == int(targets[i])) + eps / c
            out += -t * (z[cl] - lse)
    return out / b


def naive_psd(logits, targets, nbr_labels, eps, lam, w):
    b, c = logits.shape
    hard = soft = 0.0
    for i in range(b):
        z = [float(v) for v in logits[i]]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        flat = [int(v) for v in nbr_labels[i].reshape(-1)]
        for cl in range(c):
            logp = z[cl] - lse
            onehot = float(cl == int(targets[i]))
            hard += -((1 - eps) * onehot + eps / c) * logp
            soft += -((1 - lam) * onehot + lam * flat.count(cl) / len(flat)) * logp
    return (1 - w) * hard / b + w * soft / b


def naive_triplet(feats, labels, margin):
    b = feats.shape[0]
    out = 0.0
    for a in range(b):
        ap, an = -math.inf, math.inf
        for j in range(b):
            d = math.sqrt(max(sum((float(x) - float(y)) ** 2 for x, y in zip(feats[a], feats[j])), 1e-12))
            if int(labels[j]) == int(labels[a]):
                ap = max(ap, d)
            else:
                an = min(an, d)
        out += math.log1p(math.exp(-(an - ap))) if margin is None else max(0.0, ap - an + margin)
    return out / b


def _bank(n, num_parts, dim, seed, unfilled=()):
    g = torch.Generator().manual_seed(seed)
    bank = PartMemoryBank(n, num_parts, dim, device="cpu")
    bank.feats.copy_(torch.randn(num_parts, n, dim, generator=g))
    bank.filled[:] = True
    bank.filled[list(unfilled)] = False
    bank.write_order.copy_(torch.where(bank.filled, torch.cumsum(bank.filled.long(), 0) - 1, -1))  # dataset order
    return bank


# ---------------------------------------------------------------------------------------------- CSL
@pytest.mark.parametrize("chunked", [False, True])
def test_csl_matches_naive_loop_value_neighbours_and_grads(chunked, monkeypatch):
    if chunked:  # stream the bank in 4-row chunks (< k) to exercise the online LSE / top-k merge
        monkeypatch.setattr(csl_mod, "_CHUNK_ELEMS", 1)
        monkeypatch.setattr(csl_mod, "_MIN_CHUNK_ROWS", 4)
    n, num_parts, dim, b, k, scale = 23, 3, 5, 5, 4, 0.3
    bank = _bank(n, num_parts, dim, seed=1, unfilled=(2, 9, 17))
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(b, num_parts, dim, generator=g)
    indices = torch.tensor([0, 9, 4, 22, 13])  # includes an unfilled row as a sample's own index

    f32 = feats.clone().requires_grad_()
    out = csl_loss(f32, indices, bank, k=k, scale=scale)
    out.loss.backward()

    f64 = feats.double().requires_grad_()
    want, want_ids = naive_csl(f64, indices, bank.feats.double(), bank.filled, k, scale)
    want.backward()

    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert torch.equal(out.neighbour_indices, want_ids)
    torch.testing.assert_close(f32.grad.double(), f64.grad, rtol=1e-4, atol=1e-6)
    # self and unfilled rows never appear among the neighbours
    for i in range(b):
        assert int(indices[i]) not in out.neighbour_indices[i].tolist()
    assert not set(out.neighbour_indices.flatten().tolist()) & {2, 9, 17}

    r64 = feats.double().requires_grad_()
    ref64 = csl_loss_reference(r64, indices, bank.feats.double(), bank.filled, k=k, scale=scale)
    ref64.loss.backward()
    assert ref64.loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert torch.equal(ref64.neighbour_indices, want_ids)
    torch.testing.assert_close(r64.grad, f64.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f32.grad.double(), r64.grad, rtol=1e-4, atol=1e-6)


def test_csl_reference_gradient_is_autograd_of_float64_formula():
    n, num_parts, dim, b = 17, 2, 4, 3
    bank = _bank(n, num_parts, dim, seed=3, unfilled=(1,))
    feats = torch.randn(b, num_parts, dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    feats.requires_grad_()
    indices = torch.tensor([3, 8, 16])
    assert torch.autograd.gradcheck(
        lambda f: csl_loss_reference(f, indices, bank.feats.double(), bank.filled, k=3, scale=0.5).loss, (feats,)
    )


def test_csl_fewer_rows_than_k_and_empty_rows():
    num_parts, dim = 2, 3
    bank = _bank(6, num_parts, dim, seed=5, unfilled=(1, 2, 3, 4, 5))  # only row 0 filled
    feats = torch.randn(2, num_parts, dim, requires_grad=True)
    indices = torch.tensor([0, 3])  # sample 0 has no candidate at all, sample 1 has exactly one
    out = csl_loss(feats, indices, bank, k=4, scale=0.1)
    out.loss.backward()
    assert out.loss.item() == 0.0  # nothing to pull when every valid row is a neighbour
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().max() < 1e-7
    assert out.neighbour_indices[0].eq(-1).all()
    assert out.neighbour_indices[1, :, 0].eq(0).all() and out.neighbour_indices[1, :, 1:].eq(-1).all()


def test_csl_nan_guard_zeroes_only_the_broken_part():
    bank = _bank(12, 3, 4, seed=6)
    feats = torch.randn(4, 3, 4)
    feats[1, 2, 0] = float("nan")
    idx = torch.arange(4)
    assert math.isnan(csl_loss(feats, idx, bank, k=3).loss.item())
    guarded = csl_loss(feats, idx, bank, k=3, nan_to_zero=True)
    clean = csl_loss_reference(feats.double(), idx, bank.feats.double(), k=3)
    parts = clean.per_sample.mean(0)
    assert guarded.loss.item() == pytest.approx((parts[0] + parts[1]).item() / 3, rel=1e-5)


def test_csl_step_updates_before_the_loss_by_default():
    bank_a, bank_b, bank_c = (_bank(15, 3, 4, seed=7, unfilled=(5,)) for _ in range(3))
    feats = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(8))
    idx = torch.tensor([5, 2, 2, 11])
    labels = torch.tensor([0, 1, 1, 3])
    out = csl_step(feats, idx, bank_a, labels=labels, k=3)
    bank_b.update(idx, feats, labels)
    manual = csl_loss(feats, idx, bank_b, k=3)
    assert out.loss.item() == pytest.approx(manual.loss.item(), rel=1e-6)
    assert torch.equal(bank_a.feats, bank_b.feats) and torch.equal(bank_a.labels, bank_b.labels)
    after = csl_step(feats, idx, bank_c, k=3, update="after")
    assert after.loss.item() == pytest.approx(csl_loss_reference(
        feats.double(), idx, _bank(15, 3, 4, seed=7).feats.double(), _bank(15, 3, 4, seed=7, unfilled=(5,)).filled,
        k=3).loss.item(), rel=1e-5)
    assert torch.equal(bank_c.feats, bank_a.feats)


# ---------------------------------------------------------------------------------------------- ID / PSD
def test_label_smooth_ce_matches_naive():
    g = torch.Generator().manual_seed(9)
    logits, targets = torch.randn(7, 5, generator=g) * 3, torch.randint(0, 5, (7,), generator=g)
    assert label_smooth_ce(logits, targets, 0.1).item() == pytest.approx(naive_ls_ce(logits, targets, 0.1), rel=1e-6)
    assert label_smooth_ce(logits, targets, 0.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    with pytest.raises(ValueError, match="target range"):
        label_smooth_ce(logits, torch.full((7,), 5))


def test_psd_matches_naive_with_repeats_and_own_id():
    g = torch.Generator().manual_seed(10)
    b, c, num_parts, k = 6, 8, 3, 4
    logits = torch.randn(b, c, generator=g) * 2
    targets = torch.randint(0, c, (b,), generator=g)
    nbr = torch.randint(0, c, (b, num_parts, k), generator=g)
    nbr[0] = targets[0]  # every neighbour of sample 0 has its own identity
    nbr[1, :, :2] = targets[1]
    nbr[2] = 3  # one identity repeated over all parts
    got = psd_loss(logits, targets, nbr, epsilon=0.1, soft_lambda=0.5, soft_weight=0.5)
    assert got.item() == pytest.approx(naive_psd(logits, targets, nbr, 0.1, 0.5, 0.5), rel=1e-6)
    got2 = psd_loss(logits, targets, nbr, epsilon=0.2, soft_lambda=0.3, soft_weight=0.7)
    assert got2.item() == pytest.approx(naive_psd(logits, targets, nbr, 0.2, 0.3, 0.7), rel=1e-6)
    # HEAD mode: PSD off = plain LS-CE; soft_weight 0 = LS-CE too
    assert psd_loss(logits, targets, None, enabled=False).item() == pytest.approx(naive_ls_ce(logits, targets, 0.1),
                                                                                     rel=1e-6)
    assert psd_loss(logits, targets, nbr, soft_weight=0.0).item() == pytest.approx(
        naive_ls_ce(logits, targets, 0.1), rel=1e-6)


def test_psd_missing_neighbours_are_left_out():
    logits = torch.randn(2, 4)
    targets = torch.tensor([1, 2])
    nbr = torch.tensor([[[3, -1], [0, -1]], [[-1, -1], [-1, -1]]])
    got = psd_loss(logits, targets, nbr, epsilon=0.1)
    # sample 0 → neighbours {3, 0}; sample 1 → none → soft target = one-hot
    want = naive_psd(logits[:1], targets[:1], torch.tensor([[3, 0]]), 0.1, 0.5, 0.5) / 2
    want += naive_psd(logits[1:], targets[1:], torch.tensor([[2]]), 0.1, 0.5, 0.5) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_neighbour_labels_and_repo_off_by_one():
    row_labels = torch.tensor([10, 11, 12, 13, 14, 15])
    nbr = torch.tensor([[[0, 4, 5], [3, 2, -1]], [[1, 2, 0], [5, 4, 3]]])
    self_idx = torch.tensor([3, 1])
    assert torch.equal(neighbour_labels(row_labels, nbr), torch.tensor(
        [[[10, 14, 15], [13, 12, -1]], [[11, 12, 10], [15, 14, 13]]]))
    buggy = neighbour_labels(row_labels, nbr, self_idx, repo_index_bug=True)
    want = torch.empty_like(nbr)
    for i in range(2):  # the official lookup: index into the self-removed list, read from the full one
        for p in range(2):
            for j in range(3):
                full = int(nbr[i, p, j])
                removed = full - 1 if full > int(self_idx[i]) else full
                want[i, p, j] = -1 if full < 0 else int(row_labels[removed])
    assert torch.equal(buggy, want)


# ---------------------------------------------------------------------------------------------- triplet
@pytest.mark.parametrize("margin", [None, 0.3])
def test_triplet_matches_naive(margin):
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(8, 6, generator=g) * 2
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])  # id 3 has no positive but itself
    got = triplet_loss(feats, labels, margin)
    assert got.item() == pytest.approx(naive_triplet(feats, labels, margin), rel=1e-5)


def test_triplet_gradient_and_single_identity():
    feats = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda f: triplet_loss(f, labels).double(), (feats,))
    lone = torch.randn(3, 3, requires_grad=True)
    loss = triplet_loss(lone, torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(lone.grad).all()


# ---------------------------------------------------------------------------------------------- total
def test_pat_total_composes_the_terms():
    g = torch.Generator().manual_seed(12)
    n, num_parts, dim, c, b = 20, 3, 6, 5, 8
    bank = _bank(n, num_parts, dim, seed=13)
    bank.set_labels(torch.randint(0, c, (n,), generator=g))
    copy = _bank(n, num_parts, dim, seed=13)
    copy.set_labels(bank.labels.clone())
    logits = torch.randn(b, c, generator=g)
    cls = torch.randn(b, dim, generator=g)
    parts = torch.randn(b, num_parts, dim, generator=g)
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    idx = torch.randperm(n, generator=g)[:b]
    cfg = PATConfig(csl_k=3, repo_index_bug=True, csl_weight=0.7)
    bank.update(idx, parts, targets)  # the official order: the step's write (the method's memory hook) first
    out = pat_total(logits, cls, parts, targets, idx, bank, cfg)

    copy.update(idx, parts, targets)
    csl = csl_loss(parts, idx, copy, k=3)
    nbr = neighbour_labels(copy.labels, csl.neighbour_indices, idx, repo_index_bug=True, write_order=copy.write_order)
    want = psd_loss(logits, targets, nbr) + triplet_loss(cls, targets) + 0.7 * csl.loss
    assert out.total.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(out.neighbour_indices, csl.neighbour_indices)
    head = pat_total(logits, cls, parts, targets, idx, _bank(n, num_parts, dim, seed=13),
                     PATConfig(csl_k=3, psd=False))
    assert head.id.item() == pytest.approx(naive_ls_ce(logits, targets, 0.1), rel=1e-6)
