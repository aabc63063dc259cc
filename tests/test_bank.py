"""Sharded part memory bank: write rule vs a naive loop, world=2 equals world=1, checkpoints."""

from __future__ import annotations

import pytest
import torch

from tests.mp import run_distributed
from trainer import dist
from trainer.losses import communication_bytes, csl_step
from trainer.memory import PartMemoryBank

N, P, D, K, SCALE = 37, 3, 8, 4, 0.1  # N odd: the two shards differ in size
B_GLOBAL, STEPS, INIT_BATCH = 12, 3, 5  # 12 splits over 2, 3, 4 ranks; init batches of 5: uneven shards


def naive_write(feats, filled, indices, new, momentum):
    """docs/methods/pat.md §Memory bank / Eq. 5 as a python loop over the pairs in order (float64)."""
    feats, filled = feats.double().clone(), filled.clone()
    for t in range(indices.shape[0]):
        j = int(indices[t])
        if filled[j]:
            feats[:, j] = (1 - momentum) * feats[:, j] + momentum * new[t].double()
        else:
            feats[:, j] = new[t].double()
            filled[j] = True
    return feats, filled


def test_update_matches_naive_loop_with_duplicates_and_first_writes():
    g = torch.Generator().manual_seed(0)
    bank = PartMemoryBank(11, 2, 5, momentum=0.1, device="cpu")
    want_f, want_m = bank.feats.double().clone(), bank.filled.clone()
    want_labels = [-1] * 11
    for _ in range(4):
        idx = torch.randint(0, 9, (9,), generator=g)  # duplicates within a batch; rows 9, 10 never written
        new = torch.randn(9, 2, 5, generator=g) * 3
        labels = torch.randint(0, 50, (9,), generator=g)
        bank.update(idx, new, labels)
        want_f, want_m = naive_write(want_f, want_m, idx, new, 0.1)
        for t in range(9):  # sequential: the last write of a row sets its label
            want_labels[int(idx[t])] = int(labels[t])
    torch.testing.assert_close(bank.feats.double(), want_f, rtol=1e-6, atol=1e-6)
    assert torch.equal(bank.filled, want_m)
    assert bank.labels.tolist() == want_labels
    # the cached squared norms followed the written rows, and a direct edit of feats invalidates them
    torch.testing.assert_close(bank.sqnorms(), (bank.feats * bank.feats).sum(-1))
    bank.feats[:, 3].mul_(2.0)
    torch.testing.assert_close(bank.sqnorms(), (bank.feats * bank.feats).sum(-1))
    assert not bank.filled.all()  # some rows were never written and stay excluded


def test_write_order_is_the_order_of_first_writes():
    """Each row's rank in the order of first writes (the official bank's row order), kept by checkpoints."""
    g = torch.Generator().manual_seed(3)
    bank = PartMemoryBank(11, 2, 5, momentum=0.1, device="cpu")
    seen: list[int] = []
    for _ in range(4):
        idx = torch.randint(0, 9, (6,), generator=g)  # duplicates within a batch; rows 9, 10 never written
        bank.update(idx, torch.randn(6, 2, 5, generator=g))
        for r in idx.tolist():
            if r not in seen:
                seen.append(r)
    want = torch.full((11,), -1)
    want[torch.tensor(seen)] = torch.arange(len(seen))
    assert torch.equal(bank.write_order, want)
    bank.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, 5))  # an empty-handed rank's call
    assert torch.equal(bank.write_order, want)
    copy = PartMemoryBank(11, 2, 5, momentum=0.1, device="cpu")
    copy.load_full_state_dict(bank.full_state_dict())
    assert torch.equal(copy.write_order, want)
    old = {k: v for k, v in bank.full_state_dict().items() if k != "write_order"}  # saved before the order was kept
    copy.load_full_state_dict(old)
    assert torch.equal(copy.write_order, torch.where(bank.filled, torch.cumsum(bank.filled.long(), 0) - 1, -1))
    bank.reset()
    assert (bank.write_order == -1).all()


def test_momentum_one_replaces_and_bad_input_is_rejected():
    bank = PartMemoryBank(4, 1, 2, momentum=1.0, device="cpu")
    bank.update(torch.tensor([1, 1]), torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]]))
    assert bank.feats[0, 1].tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="outside"):
        bank.update(torch.tensor([4]), torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="expected"):
        bank.update(torch.tensor([0]), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="momentum"):
        PartMemoryBank(4, 1, 2, momentum=0.0)


def _data(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    init_feats = torch.randn(N, P, D, generator=g)
    row_labels = torch.randint(0, 6, (N,), generator=g)
    order = torch.randperm(N, generator=g)[: N - 6]  # 6 rows unfilled after the init pass
    steps = []
    for _ in range(STEPS):
        idx = torch.randint(0, N, (B_GLOBAL,), generator=g)
        idx[6] = idx[1]  # the same row in both ranks' batches: sequential writes in rank order
        steps.append((idx, torch.randn(B_GLOBAL, P, D, generator=g)))
    return init_feats, row_labels, order, steps


def _run(rank: int, world: int, full_from_w1: dict | None = None) -> dict:
    """Init pass + STEPS × (update-then-CSL, backward) on this rank's share of the global batches."""
    init_feats, row_labels, order, steps = _data()
    bank = PartMemoryBank(N, P, D, momentum=0.1, device="cpu")
    # Init pass through an exact-once loader: every rank its slice of each global batch (uneven tail).
    for s in range(0, order.numel(), INIT_BATCH):
        chunk = order[s : s + INIT_BATCH]
        a, e = dist.shard_range(chunk.numel(), rank, world)
        bank.initialize(chunk[a:e], init_feats[chunk[a:e]], row_labels[chunk[a:e]])
    b = B_GLOBAL // world
    losses, nbrs, grads = [], [], []
    for idx, feats in steps:
        mine = slice(rank * b, (rank + 1) * b)
        f = feats[mine].clone().requires_grad_()
        out = csl_step(f, idx[mine], bank, labels=row_labels[idx[mine]], k=K, scale=SCALE)
        out.loss.backward()
        losses.append(out.loss.detach())
        nbrs.append(out.neighbour_indices)
        grads.append(f.grad)
    result = {"losses": losses, "nbrs": nbrs, "grads": grads, "full": bank.full_state_dict(to_all=True),
              "shard": bank.state_dict()}
    if full_from_w1 is not None:
        other = PartMemoryBank(N, P, D, device="cpu")
        other.load_full_state_dict(full_from_w1)
        result["resharded"] = other.state_dict()
    return result


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_equals_world1(world: int):
    """N = 37 rows: shards of 19+18, 13+12+12, 10+9+9+9 rows."""
    one = _run(0, 1)
    two = run_distributed(_run, world, one["full"])
    w = world
    for s in range(STEPS):
        mean_loss = sum(r["losses"][s] for r in two) / w
        torch.testing.assert_close(mean_loss, one["losses"][s], rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.cat([r["nbrs"][s] for r in two]), one["nbrs"][s])
        # DDP averages parameter gradients over ranks: per-sample feature gradients / W must match.
        g2 = torch.cat([r["grads"][s] for r in two]) / w
        torch.testing.assert_close(g2, one["grads"][s], rtol=1e-5, atol=1e-5)
        assert one["grads"][s].abs().max() > 1e-4  # the check is not vacuous
    for r in two:  # banks identical after the steps, on every rank
        torch.testing.assert_close(r["full"]["feats"], one["full"]["feats"], rtol=1e-6, atol=1e-6)
        assert torch.equal(r["full"]["filled"], one["full"]["filled"])
        assert torch.equal(r["full"]["labels"], one["full"]["labels"])
    assert int(one["full"]["filled"].sum()) < N  # rows never written stayed excluded
    # world-size change: a world-1 consolidated bank loads into W uneven shards
    for rank, r in enumerate(two):
        a, e = dist.shard_range(N, rank, world)
        assert (r["resharded"]["start"], r["resharded"]["stop"]) == (a, e)
        assert torch.equal(r["resharded"]["feats"], one["full"]["feats"][:, a:e])
        assert torch.equal(r["resharded"]["filled"], one["full"]["filled"][a:e])
        assert r["shard"]["feats"].shape[1] == e - a  # memory O(N/W)
    # and a world-W consolidated bank loads into one process
    back = PartMemoryBank(N, P, D, device="cpu")
    back.load_full_state_dict(two[0]["full"])
    torch.testing.assert_close(back.feats, one["full"]["feats"], rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip_and_layout_check():
    init_feats, row_labels, _, _ = _data()
    bank = PartMemoryBank(N, P, D, device="cpu")
    bank.initialize(torch.arange(10), init_feats[:10], row_labels[:10])
    copy = PartMemoryBank(N, P, D, device="cpu")
    copy.load_state_dict(bank.state_dict())
    assert torch.equal(copy.feats, bank.feats) and torch.equal(copy.filled, bank.filled)
    assert torch.equal(copy.labels, bank.labels)
    shard = PartMemoryBank(N, P, D, device="cpu", rank=1, world_size=2)
    with pytest.raises(ValueError, match="world size"):
        shard.load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="num_rows"):
        PartMemoryBank(N + 1, P, D, device="cpu").load_full_state_dict(bank.full_state_dict())


def _count_comm(rank: int, world: int) -> dict:
    """Bytes received by the forward all-gathers of one csl_step, for two bank sizes."""
    import torch.distributed as tdist

    received = {"bytes": 0}
    real = tdist.all_gather

    def counting(out_list, tensor, *args, **kwargs):
        received["bytes"] += sum(t.numel() * t.element_size() for t in out_list)
        return real(out_list, tensor, *args, **kwargs)

    tdist.all_gather = counting
    try:
        per_n = {}
        for n in (37, 401):
            bank = PartMemoryBank(n, P, D, device="cpu")
            bank.filled[:] = True
            g = torch.Generator().manual_seed(rank)
            feats = torch.randn(4, P, D, generator=g, requires_grad=True)
            received["bytes"] = 0
            out = csl_step(feats, torch.randint(0, n, (4,), generator=g), bank, labels=torch.zeros(4, dtype=torch.long),
                           k=K, update="none")
            per_n[n] = received["bytes"]
            out.loss.backward()
        return per_n
    finally:
        tdist.all_gather = real


def test_communication_is_independent_of_bank_size_and_matches_the_formula():
    res = run_distributed(_count_comm, 2)
    analytic = communication_bytes(local_batch=4, world_size=2, num_parts=P, dim=D, k=K)
    forward = sum(v for key, v in analytic.items() if key.startswith("gather_"))
    for per_n in res:
        assert per_n[37] == per_n[401] == forward
    assert communication_bytes(4, 1, P, D, K)["total"] == 0
