"""Exact-once distributed feature extraction: world=2 equals world=1; errors on missing/duplicate rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from tests.mp import run_distributed
from trainer import dist
from trainer.evaluation.extract import extract, extract_features


class TinySet(Dataset):
    """Deterministic 3×8×4 images; pid/camid derived from the index."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.imgs = torch.randn(n, 3, 8, 4, generator=g)

    def __len__(self) -> int:
        return len(self.imgs)

    def __getitem__(self, i: int) -> dict:
        return {"img": self.imgs[i], "index": i, "pid": 100 + i // 2, "camid": i % 3}


class ShardSampler(Sampler):
    """Rank r's contiguous slice ``dist.shard_range(n)`` (what the exact-once sampler must give)."""

    def __init__(self, n: int, extra: tuple[int, ...] = ()):
        self.n, self.extra = n, extra

    def __iter__(self):
        yield from range(*dist.shard_range(self.n))
        yield from self.extra

    def __len__(self) -> int:
        start, stop = dist.shard_range(self.n)
        return stop - start + len(self.extra)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(96, 5), nn.Dropout(0.5))  # dropout: eval mode matters


def _loader(n: int, batch_size: int = 3, extra: tuple[int, ...] = ()) -> DataLoader:
    return DataLoader(TinySet(n), batch_size=batch_size, sampler=ShardSampler(n, extra))


def _extract_body(rank: int, world_size: int, n: int) -> dict:
    model = make_model()
    model.train()
    out = extract(model, _loader(n), n, "cpu", keys=("pid", "camid"))
    assert model.training  # restored
    return out


@pytest.mark.parametrize("world_size,n", [(2, 7), (3, 2)])  # uneven split; (3, 2): one rank has no rows
def test_world_equals_single(world_size, n):
    single = extract(make_model(), _loader(n, batch_size=4), n, "cpu", keys=("pid", "camid"))
    results = run_distributed(_extract_body, world_size, n)
    model = make_model().eval()
    with torch.no_grad():
        direct = model(TinySet(n).imgs)
    # float32 features of magnitude ~2 computed in batches of other sizes: the CPU's GEMM kernels
    # differ per shape by a few ulp (~2e-7 here, measured up to 3.5); 1e-5 relative is ~50 ulp above
    # that, while a wrong row, sample or rank slice differs by O(1).
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single["features"], direct, **tol)
    for out in results:
        assert out["features"].shape == (n, 5)
        torch.testing.assert_close(out["features"], single["features"], **tol)
        assert torch.equal(out["pid"], 100 + torch.arange(n) // 2)
        assert torch.equal(out["camid"], torch.arange(n) % 3)
    assert torch.equal(results[0]["features"], results[-1]["features"])  # identical on every rank


def test_elementwise_model_is_bit_exact_and_placed_by_index():
    n = 10
    # Loader in scrambled order: placement must follow `index`, not arrival order.
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
    loader = DataLoader(TinySet(n), batch_size=4, sampler=order)
    feats = extract_features(lambda x: x.flatten(1)[:, :6] * 2.0, loader, n, "cpu")
    assert torch.equal(feats, TinySet(n).imgs.flatten(1)[:, :6] * 2.0)


def test_duplicate_and_missing_indices_raise():
    n = 6
    with pytest.raises(RuntimeError, match=r"1 duplicated \(e.g. \[2\]\)"):
        extract_features(make_model(), _loader(n, extra=(2,)), n, "cpu")
    short = DataLoader(TinySet(n), batch_size=4, sampler=range(5))
    with pytest.raises(RuntimeError, match=r"1 missing \(e.g. \[5\]\)"):
        extract_features(make_model(), short, n, "cpu")
    with pytest.raises(RuntimeError, match="outside"):
        extract_features(make_model(), _loader(n), n - 1, "cpu")


def test_bad_batches():
    with pytest.raises(KeyError, match="'index'"):
        extract_features(lambda x: x, [{"img": torch.zeros(2, 3, 8, 4)}], 2, "cpu")
    with pytest.raises(ValueError, match="B×D"):
        extract_features(lambda x: x, [{"img": torch.zeros(2, 3, 8, 4), "index": torch.arange(2)}], 2, "cpu")


def _padded_body(rank: int, world_size: int, n: int) -> None:
    # A DistributedSampler-like padding (rank 1 repeats index 0) must fail on every rank.
    extra = (0,) if rank == 1 else ()
    extract_features(make_model(), _loader(n, extra=extra), n, "cpu")


def test_padding_sampler_fails_distributed():
    with pytest.raises(RuntimeError, match="not exact-once"):
        run_distributed(_padded_body, 2, 5)


def _own_rows_body(rank: int, world_size: int, n: int) -> dict:
    return extract(make_model(), _loader(n), n, "cpu", keys=("pid",), gather=False)


@pytest.mark.parametrize("world_size,n", [(2, 7), (3, 2)])  # uneven split; (3, 2): one rank has no rows
def test_gather_false_keeps_each_ranks_own_rows(world_size, n):
    single = extract(make_model(), _loader(n, batch_size=4), n, "cpu", keys=("pid",))
    results = run_distributed(_own_rows_body, world_size, n)
    for rank, out in enumerate(results):
        start, stop = dist.shard_range(n, rank, world_size)
        assert out["features"].shape == (stop - start, 5)
        # float32 GEMM in other batch shapes: the tolerance of test_world_equals_single
        torch.testing.assert_close(out["features"], single["features"][start:stop], rtol=1e-5, atol=1e-5)
        assert torch.equal(out["pid"], single["pid"][start:stop])


def test_gather_false_places_by_index_in_one_process():
    n = 10
    loader = DataLoader(TinySet(n), batch_size=4, sampler=[7, 2, 9, 0, 5, 1, 8, 3, 6, 4])
    feats = extract_features(lambda x: x.flatten(1)[:, :6] * 2.0, loader, n, "cpu", gather=False)
    assert torch.equal(feats, TinySet(n).imgs.flatten(1)[:, :6] * 2.0)


def _swapped_body(rank: int, world_size: int, n: int) -> str:
    # Exact-once over the ranks, but rank 0 holds rank 1's rows and rank 1 rank 0's.
    rows = range(*dist.shard_range(n, world_size - 1 - rank, world_size))
    loader = DataLoader(TinySet(n), batch_size=4, sampler=rows)
    try:
        extract_features(make_model(), loader, n, "cpu", gather=False)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_gather_false_refuses_rows_of_another_rank_on_every_rank():
    messages = run_distributed(_swapped_body, 2, 6)
    assert all("rank(s) [0, 1] did not get their own contiguous rows" in m for m in messages), messages
