"""Evaluation whose work divides by W: each rank ranks its share of the queries, the per-query results
are gathered once, and the numbers equal one process's at W = 1, 2, 3, 4 (gloo).

Exactness: a query's AP/INP/first-match position are computed from integer gallery positions by the
same float64 arithmetic whatever rank holds it, and the means are taken over the gathered per-query
array in query order, as one process does. Given a query's distances, its results are therefore
bit-identical. From features, a distance row may move by ~1 ulp with the number of rows ranked
together (the CPU GEMM picks kernels by shape: 2.4e-7 at 2.0 in float32); the feature cases assert
that every true match lies at least 1e-5 (40 ulp) from every other distance of its query, so such a
move cannot reorder the gallery and the comparison is exact too.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from shards.pack import pack
from tests.mp import run_distributed
from tests.test_rank import clustered_features, naive_market, random_case
from trainer import dist
from trainer.data import SampleStore, TransformConfig, build_transforms
from trainer.evaluation import rank as rank_mod
from trainer.evaluation.rank import evaluate, evaluate_features, query_rows
from trainer.methods.common import Target, evaluate_targets, extract

MAX_RANK = 12
DISTANCE_CASES = ((0, None), (1, 0.1), (2, 0.05))  # quantized: many exact ties
FEATURE_CASES = (0, 1)
FEW = 3
"""Queries of the case with fewer queries than ranks."""
GAP = 1e-5
"""Least distance between a true match and any other gallery item of its query (see the docstring)."""


def distance_case(seed: int, quantize: float | None) -> tuple[np.ndarray, ...]:
    """23 queries × 61 gallery items (split unevenly by 2, 3, 4): distractors (pid -1 and pids no query
    has), a query whose pid the gallery lacks and one whose only matches share its camera."""
    d, qp, gp, qc, gc = random_case(seed, num_q=23, num_g=61, quantize=quantize)
    qp[5] = 50  # absent from the gallery
    qp[11], gp[[3, 40]], gc[[3, 40]] = 60, 60, qc[11]  # same-camera matches only: skipped
    return d.astype(np.float32), qp, gp, qc, gc


def feature_case(seed: int) -> tuple[torch.Tensor, ...]:
    """37 queries × 90 gallery items from 12 identity centres, plus a query without a valid match."""
    qf, gf, qp, gp, qc, gc = clustered_features(seed, num_q=37, num_g=90)
    qp[20] = 99
    return qf, gf, qp, gp, qc, gc


def least_gap_at_matches(qf: torch.Tensor, gf: torch.Tensor, qp: torch.Tensor, gp: torch.Tensor) -> float:
    """Smallest float64 distance between a query's true match and any other of its gallery items."""
    qn = nn.functional.normalize(qf.double(), dim=1)
    gn = nn.functional.normalize(gf.double(), dim=1)
    d = 2 - 2 * qn @ gn.t()
    gaps = (d[:, :, None] - d[:, None, :]).abs()
    gaps += torch.eye(d.shape[1], dtype=d.dtype) * 10  # an item against itself
    return float(gaps[qp[:, None] == gp[None, :]].min())


def _same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["mAP"] == want["mAP"] and got["mINP"] == want["mINP"]
    assert got["num_valid_queries"] == want["num_valid_queries"]
    np.testing.assert_array_equal(got["cmc"], want["cmc"])
    np.testing.assert_array_equal(got["AP"], want["AP"])  # NaN (skipped queries) equal NaN
    np.testing.assert_array_equal(got["INP"], want["INP"])


# ---------------------------------------------------------------- one run per world size

# (pid, camera 1-based, images) per split. Query pid 8's gallery views share its camera (skipped),
# pid 9 has none; pid 0 and pids 20/21 are distractors. 13 queries, 31 gallery images.
LAYOUT = {
    "bounding_box_train": [(40, 1, 2), (41, 2, 2)],
    "query": [(1, 1, 2), (2, 2, 1), (3, 3, 2), (4, 1, 1), (5, 2, 1), (6, 3, 2), (7, 1, 1), (8, 2, 2), (9, 3, 1)],
    "bounding_box_test": [(1, 2, 3), (1, 1, 1), (2, 1, 2), (3, 1, 2), (3, 2, 1), (4, 3, 2), (5, 1, 2), (6, 2, 2),
                          (7, 3, 2), (8, 2, 3), (0, 1, 4), (20, 2, 3), (21, 3, 4)],
}


def _jpeg(seed: int) -> bytes:
    r = np.random.default_rng(seed)
    arr = np.kron(r.integers(0, 256, size=(4, 2, 3), dtype=np.uint8), np.ones((16, 16, 1), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    k = 0
    for folder, entries in LAYOUT.items():
        (root / folder).mkdir()
        for pid, cam, n in entries:
            for j in range(n):
                (root / folder / f"{pid:04d}_c{cam}s1_{1000 * cam + j:06d}_00.jpg").write_bytes(_jpeg(k))
                k += 1
    out = tmp_path_factory.mktemp("pack") / "market"
    pack("market1501", root, out, workers=0)
    return out


def pooled_model() -> nn.Module:
    # Per-sample arithmetic only: the features do not depend on how the samples were batched.
    return nn.Sequential(nn.AdaptiveAvgPool2d((4, 2)), nn.Flatten())


def _ranking(out: dict[str, Any]) -> None:
    """Every case ranked by this rank's share of the queries (distances, then features)."""
    out["distances"], out["features"] = [], []
    for seed, quantize in DISTANCE_CASES:
        d, qp, gp, qc, gc = distance_case(seed, quantize)
        start, stop = query_rows(len(qp))
        out["distances"].append(evaluate(d[start:stop], qp, gp, qc, gc, MAX_RANK, block_size=4,
                                         return_per_query=True, sharded=True))
    for seed in FEATURE_CASES:
        qf, gf, qp, gp, qc, gc = feature_case(seed)
        start, stop = query_rows(len(qp))
        out["features"].append(evaluate_features(qf[start:stop], gf, qp, gp, qc, gc, MAX_RANK, block_size=5,
                                                 device="cpu", return_per_query=True, sharded=True))
    qf, gf, qp, gp, qc, gc = feature_case(0)
    start, stop = query_rows(FEW)  # at W = 4 the last rank has no query to rank
    out["few"] = evaluate_features(qf[start:stop], gf, qp[:FEW], gp, qc[:FEW], gc, MAX_RANK, device="cpu",
                                   return_per_query=True, sharded=True)


def _targets(out: dict[str, Any], pack_dir: Path) -> None:
    """``evaluate_targets`` on the packed target, counting the query rows this rank ranks."""
    target = Target("t", SampleStore.from_manifests([pack_dir], "query", relabel=False),
                    SampleStore.from_manifests([pack_dir], "gallery", relabel=False))
    tf = build_transforms(TransformConfig(size=(64, 32)), train=False)
    ranked: list[int] = []
    rank_queries = rank_mod.rank_queries

    def counted(qf: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        ranked.append(int(qf.shape[0]))
        return rank_queries(qf, *args, **kwargs)

    rank_mod.rank_queries = counted  # this worker process only
    try:
        out["plain"] = evaluate_targets(pooled_model(), [target], tf, 3, 0, max_rank=MAX_RANK)["t"]
    finally:
        rank_mod.rank_queries = rank_queries
    out["ranked"] = ranked
    out["rerank"] = evaluate_targets(pooled_model(), [target], tf, 3, 0, max_rank=MAX_RANK, rerank=True)["t"]
    if dist.get_world_size() == 1:  # the whole-matrix path on the same features, for the W = 1 checks
        qf, gf = (extract(pooled_model(), s, tf, 3, 0) for s in (target.query, target.gallery))
        ids = (target.query.pid, target.gallery.pid, target.query.camid, target.gallery.camid)
        out["whole"] = evaluate_features(qf, gf, *ids, MAX_RANK, device="cpu")
        out["gap"] = least_gap_at_matches(qf, gf, torch.as_tensor(ids[0]), torch.as_tensor(ids[1]))


def _errors(out: dict[str, Any]) -> None:
    """A NaN in the last rank's share, then a share one row too long on rank 0: every rank raises."""
    qf, gf, qp, gp, qc, gc = feature_case(0)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    start, stop = query_rows(len(qp))
    own = qf[start:stop].clone()
    if rank == world_size - 1:
        own[0, 0] = float("nan")
    out["errors"] = []
    for qf_own in (own, qf[start : stop + (rank == 0)]):
        try:
            evaluate_features(qf_own, gf, qp, gp, qc, gc, MAX_RANK, device="cpu", sharded=True)
            out["errors"].append("no error")
        except (ValueError, RuntimeError) as exc:
            out["errors"].append(f"{type(exc).__name__}: {exc}")


def _body(rank: int, world_size: int, pack_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _ranking(out)
    _targets(out, pack_dir)
    if world_size > 1:
        _errors(out)
    return out


@pytest.fixture(scope="module")
def runs(packed: Path) -> Callable[[int], list[dict[str, Any]]]:
    """Every rank's results at a world size, run once per module (spawning ranks is the slow part)."""
    cache: dict[int, list[dict[str, Any]]] = {}

    def at(world_size: int) -> list[dict[str, Any]]:
        if world_size not in cache:
            cache[world_size] = run_distributed(_body, world_size, packed)
        return cache[world_size]

    return at


# ---------------------------------------------------------------- the checks

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sharded_ranking_equals_one_process(world_size: int, runs: Callable[[int], list[dict[str, Any]]]) -> None:
    results = runs(world_size)
    for i, (seed, quantize) in enumerate(DISTANCE_CASES):
        d, qp, gp, qc, gc = distance_case(seed, quantize)
        single = evaluate(d, qp, gp, qc, gc, MAX_RANK, return_per_query=True)
        assert np.isnan(single["AP"][[5, 11]]).all()  # the skipped queries are there
        # the float64 restatement of the protocol (its means sum in another order: 1e-12)
        want = naive_market(d, qp, gp, qc, gc, MAX_RANK)
        assert abs(single["mAP"] - want["mAP"]) <= 1e-12 and abs(single["mINP"] - want["mINP"]) <= 1e-12
        np.testing.assert_array_equal(single["cmc"], want["cmc"])
        for r in results:  # every rank holds the numbers of all queries, bit for bit
            _same(r["distances"][i], single)
    for i, seed in enumerate(FEATURE_CASES):
        qf, gf, qp, gp, qc, gc = feature_case(seed)
        assert least_gap_at_matches(qf, gf, qp, gp) > GAP
        single = evaluate_features(qf, gf, qp, gp, qc, gc, MAX_RANK, device="cpu", return_per_query=True)
        assert np.isnan(single["AP"][20])
        for r in results:
            _same(r["features"][i], single)
    qf, gf, qp, gp, qc, gc = feature_case(0)
    single = evaluate_features(qf[:FEW], gf, qp[:FEW], gp, qc[:FEW], gc, MAX_RANK, device="cpu",
                               return_per_query=True)
    for r in results:
        _same(r["few"], single)


def test_query_rows_divide_the_work() -> None:
    for n in (0, 1, 7, 3368, 11659):
        for w in (1, 2, 3, 4, 8):
            shares = [query_rows(n, r, w) for r in range(w)]
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # contiguous, in rank order
            sizes = [b - a for a, b in shares]
            assert max(sizes) - min(sizes) <= 1 and max(sizes) == -(-n // w)


def test_a_failing_rank_fails_every_rank(runs: Callable[[int], list[dict[str, Any]]]) -> None:
    # A rank that cannot rank its share must not leave the others waiting in the gather.
    nan, share = zip(*(r["errors"] for r in runs(3)))
    assert nan[2].startswith("ValueError: qf: features contain NaN")
    assert all(m.startswith("RuntimeError: sharded evaluation: ranking failed on rank 2: ValueError: qf")
               for m in nan[:2])
    assert share[0].startswith("ValueError: sharded evaluation: rank 0 holds 14 query rows, expected its share "
                               "[0, 13) of the 37 queries")
    assert all("ranking failed on rank 0" in m for m in share[1:])


def test_rerank_needs_every_query() -> None:
    qf, gf, qp, gp, qc, gc = feature_case(0)
    with pytest.raises(ValueError, match="re-ranking needs every query"):
        evaluate_features(qf, gf, qp, gp, qc, gc, rerank=True, sharded=True, device="cpu")


def test_targets_at_one_process(runs: Callable[[int], list[dict[str, Any]]]) -> None:
    (one,) = runs(1)
    m, whole = one["plain"], one["whole"]
    assert set(m) == {"mAP", "R1", "R5", "R10", "mINP", "cmc"}
    assert len(m["cmc"]) == MAX_RANK and all(type(c) is float for c in m["cmc"])  # JSON/weights_only-safe
    assert (m["R1"], m["R5"], m["R10"]) == (m["cmc"][0], m["cmc"][4], m["cmc"][9])
    assert m["cmc"] == whole["cmc"].tolist() and (m["mAP"], m["mINP"]) == (whole["mAP"], whole["mINP"])
    assert whole["num_valid_queries"] == 10  # pid 8 (2 queries: same-camera views only), pid 9 (none)
    assert one["ranked"] == [13]
    assert one["gap"] > GAP  # the premise of the exact comparisons at W ranks (module docstring)
    assert 0 < one["rerank"]["mAP"] <= 1 and one["rerank"] != m


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_targets_at_w_ranks_equal_one_process(world_size: int, runs: Callable[[int], list[dict[str, Any]]]) -> None:
    results, (one,) = runs(world_size), runs(1)
    # each rank ranked only its share: 13 queries → ⌈13/W⌉ or ⌊13/W⌋ rows
    assert [r["ranked"] for r in results] == [[b - a] for a, b in (query_rows(13, k, world_size)
                                                                   for k in range(world_size))]
    for r in results:
        assert r["plain"] == one["plain"]  # exact: the floats and the whole CMC list
        assert r["rerank"] == one["rerank"]  # the whole-matrix path, every rank alike
