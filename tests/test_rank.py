"""rank.evaluate / evaluate_features against a naive float64 python-loop restatement of the protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.evaluation.rank import evaluate, evaluate_features, pairwise_distance


def naive_market(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """The Market-1501 protocol written out with python loops (stable order: ties by gallery index)."""
    aps, inps, cmcs = [], [], []
    num_q, num_g = len(distmat), len(distmat[0])
    for i in range(num_q):
        order = sorted(range(num_g), key=lambda j: (float(distmat[i][j]), j))
        kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        hits = [1 if g_pids[j] == q_pids[i] else 0 for j in kept]
        if sum(hits) == 0:
            continue
        found, precisions, cmc, last = 0, [], [], 0
        for pos, h in enumerate(hits):
            if h:
                found += 1
                precisions.append(found / (pos + 1))
                last = pos
        first = hits.index(1)
        cmc = [1.0 if t >= first else 0.0 for t in range(max_rank)]
        aps.append(sum(precisions) / len(precisions))
        inps.append(found / (last + 1))
        cmcs.append(cmc)
    n = len(aps)
    return {
        "mAP": sum(aps) / n,
        "mINP": sum(inps) / n,
        "cmc": [sum(c[t] for c in cmcs) / n for t in range(max_rank)],
        "num_valid_queries": n,
    }


def random_case(seed: int, num_q: int = 23, num_g: int = 61, num_ids: int = 9, num_cams: int = 3,
                quantize: float | None = None):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(-1, num_ids + 3, num_g)  # -1 and ids >= num_ids: distractors
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    dist = rng.random((num_q, num_g))
    if quantize:  # many exact ties
        dist = np.round(dist / quantize) * quantize
    return dist, q_pids, g_pids, q_camids, g_camids


def assert_same(got, want, exact_cmc: bool = True):
    assert got["num_valid_queries"] == want["num_valid_queries"]
    assert abs(got["mAP"] - want["mAP"]) <= 1e-12
    assert abs(got["mINP"] - want["mINP"]) <= 1e-12
    assert isinstance(got["mAP"], float) and isinstance(got["mINP"], float)
    assert got["cmc"].shape == (len(want["cmc"]),)
    np.testing.assert_allclose(got["cmc"], want["cmc"], rtol=0, atol=0 if exact_cmc else 1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quantize", [None, 0.1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_evaluate_matches_naive(seed, quantize, dtype):
    dist, *ids = random_case(seed, quantize=quantize)
    dist = (dist - 0.3).astype(dtype)  # negative distances too (e.g. negated similarities)
    want = naive_market(dist, *ids, max_rank=10)
    assert_same(evaluate(dist, *ids, max_rank=10), want)
    assert_same(evaluate(dist, *ids, max_rank=10, block_size=4), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_signed_zero_ties_and_half_precision(dtype):
    # -0.0 and +0.0 are equal distances: the tie goes to the lower gallery index.
    dist = torch.tensor([[0.0, -0.0, 1.0], [-0.0, 0.0, -1.0]], dtype=dtype)
    res = evaluate(dist, [5, 6], [9, 5, 6], [0, 0], [1, 1, 1], max_rank=3, return_per_query=True)
    np.testing.assert_array_equal(res["AP"], [0.5, 1.0])


def test_evaluate_torch_inputs_and_float32():
    dist, qp, gp, qc, gc = random_case(11, quantize=0.05)
    d32 = dist.astype(np.float32)
    want = naive_market(d32, qp, gp, qc, gc, max_rank=7)
    got = evaluate(torch.from_numpy(d32), torch.from_numpy(qp), torch.from_numpy(gp), torch.from_numpy(qc),
                   torch.from_numpy(gc), max_rank=7)
    assert_same(got, want)
    assert_same(evaluate(d32, qp, gp, qc, gc, max_rank=7), want)


def test_tie_rule_is_gallery_index():
    # One query, gallery all at the same distance: matches at indices 1 and 3 come 2nd and 4th.
    dist = np.zeros((1, 5))
    res = evaluate(dist, [7], [0, 7, 1, 7, 2], [0], [1, 1, 1, 1, 1], max_rank=5)
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2, abs=1e-15)
    assert res["mINP"] == pytest.approx(2 / 4, abs=1e-15)
    np.testing.assert_array_equal(res["cmc"], [0, 1, 1, 1, 1])


def test_skips_queries_without_valid_match_and_same_camera_only():
    dist = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.2, 0.1, 0.4, 0.3]])
    q_pids, q_cams = [1, 2, 3], [0, 0, 0]
    g_pids, g_cams = [1, 2, 1, 9], [1, 0, 0, 1]
    # query 1 (pid 2): its only match is same-camera → skipped; query 2 (pid 3): no match at all.
    res = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3, return_per_query=True)
    assert res["num_valid_queries"] == 1
    # query 0: order 0(match),1,2(junk: pid 1 cam 0),3 → filtered [0,1,3]: AP = 1.
    assert res["mAP"] == 1.0 and res["mINP"] == 1.0
    assert np.isnan(res["AP"][1]) and np.isnan(res["AP"][2]) and res["AP"][0] == 1.0
    assert_same(res, naive_market(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3))


def test_junk_before_match_shifts_rank():
    # The same-camera view of the query's pid is nearest; it must not count as a position.
    dist = np.array([[0.0, 0.5, 0.7]])
    res = evaluate(dist, [4], [4, 8, 4], [2], [2, 1, 0], max_rank=2)
    assert res["mAP"] == pytest.approx(0.5, abs=1e-15)
    np.testing.assert_array_equal(res["cmc"], [0.0, 1.0])


def test_no_valid_query_raises():
    dist = np.random.default_rng(0).random((3, 4))
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate(dist, [1, 2, 3], [1, 1, 5, 6], [0, 0, 0], [0, 0, 1, 1])


def test_max_rank_larger_than_gallery():
    case = random_case(3, num_q=6, num_g=8, num_ids=3)
    want = naive_market(*case, max_rank=20)
    got = evaluate(*case, max_rank=20)
    assert_same(got, want)
    assert got["cmc"][-1] == 1.0


def test_bad_inputs():
    dist, qp, gp, qc, gc = random_case(0)
    with pytest.raises(ValueError, match="q_pids"):
        evaluate(dist, qp[:-1], gp, qc, gc)
    with pytest.raises(ValueError, match="non-finite"):
        bad = dist.copy()
        bad[3, 4] = np.nan
        evaluate(bad, qp, gp, qc, gc)
    with pytest.raises(ValueError, match="max_rank"):
        evaluate(dist, qp, gp, qc, gc, max_rank=0)
    with pytest.raises(ValueError, match="integer ids"):
        evaluate(dist, qp.astype(float), gp, qc, gc)


def test_many_candidates_split_into_groups(monkeypatch):
    # A budget of a few candidates forces the per-row grouping path; results must not change.
    import trainer.evaluation.rank as rank

    case = random_case(5, num_q=17, num_g=40)
    want = evaluate(*case, max_rank=8, return_per_query=True)
    monkeypatch.setattr(rank, "_MAX_CANDIDATES", 3)
    got = evaluate(*case, max_rank=8, return_per_query=True)
    np.testing.assert_array_equal(got["AP"], want["AP"])
    assert_same(got, naive_market(*case, max_rank=8))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torch_ops_path_matches_naive(monkeypatch, dtype):
    # The CUDA code path (torch ops for the candidate stage), exercised on CPU tensors.
    import trainer.evaluation.rank as rank

    monkeypatch.setattr(rank, "_ops_for", lambda device: rank._TorchOps)
    for seed in range(3):
        dist, *ids = random_case(seed, quantize=0.1)
        dist = dist.astype(dtype)
        assert_same(evaluate(dist, *ids, max_rank=10, block_size=5), naive_market(dist, *ids, max_rank=10))
    monkeypatch.setattr(rank, "_MAX_CANDIDATES", 3)
    dist, *ids = random_case(9, quantize=0.1)
    assert_same(evaluate(dist.astype(dtype), *ids, max_rank=10), naive_market(dist.astype(dtype), *ids, max_rank=10))


def clustered_features(seed: int, num_q: int, num_g: int, dim: int = 16, num_ids: int = 12, noise: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_ids, dim, generator=g)
    q_pids = torch.randint(0, num_ids, (num_q,), generator=g)
    g_pids = torch.randint(0, num_ids, (num_g,), generator=g)
    qf = centers[q_pids] + noise * torch.randn(num_q, dim, generator=g)
    gf = centers[g_pids] + noise * torch.randn(num_g, dim, generator=g)
    q_cams = torch.randint(0, 4, (num_q,), generator=g)
    g_cams = torch.randint(0, 4, (num_g,), generator=g)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_features_equals_dense(seed):
    qf, gf, qp, gp, qc, gc = clustered_features(seed, num_q=37, num_g=150)
    # Dense reference: the distances of normalized features, in float64 → naive loop.
    qn = torch.nn.functional.normalize(qf.double(), dim=1)
    gn = torch.nn.functional.normalize(gf.double(), dim=1)
    d64 = (2 - 2 * qn @ gn.t()).numpy()
    want = naive_market(d64, qp.tolist(), gp.tolist(), qc.tolist(), gc.tolist(), max_rank=12)
    dense = evaluate(pairwise_distance(qf, gf, block_size=37, device="cpu"), qp, gp, qc, gc, max_rank=12,
                     return_per_query=True)
    assert_same(dense, want)  # no near-ties here: float32 and float64 distances rank alike
    for bs in (1, 5, 16, 37, 100):
        got = evaluate_features(qf, gf, qp, gp, qc, gc, max_rank=12, block_size=bs, device="cpu",
                                return_per_query=True)
        np.testing.assert_array_equal(got["AP"], dense["AP"])
        np.testing.assert_array_equal(got["cmc"], dense["cmc"])
        assert got["mAP"] == dense["mAP"] and got["mINP"] == dense["mINP"]
        # Bit-identical to the dense matrix built from the very same blocks.
        same = evaluate(pairwise_distance(qf, gf, block_size=bs, device="cpu"), qp, gp, qc, gc, max_rank=12)
        assert same["mAP"] == got["mAP"] and same["mINP"] == got["mINP"]
        np.testing.assert_array_equal(same["cmc"], got["cmc"])


def test_evaluate_features_numpy_inputs_float64_and_distance_formula():
    qf, gf, qp, gp, qc, gc = clustered_features(7, num_q=9, num_g=30)
    a = evaluate_features(qf.numpy(), gf.numpy(), qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy(), max_rank=5,
                          device="cpu")
    b = evaluate_features(qf, gf, qp, gp, qc, gc, max_rank=5, device="cpu")
    assert a["mAP"] == b["mAP"]
    d = pairwise_distance(qf.double(), gf.double(), device="cpu")
    qn = torch.nn.functional.normalize(qf.double(), dim=1)
    gn = torch.nn.functional.normalize(gf.double(), dim=1)
    torch.testing.assert_close(d, torch.cdist(qn, gn) ** 2, rtol=0, atol=1e-12)
    c = evaluate_features(qf.double(), gf.double(), qp, gp, qc, gc, max_rank=5, device="cpu")
    assert_same(c, naive_market(d.numpy(), qp.tolist(), gp.tolist(), qc.tolist(), gc.tolist(), max_rank=5))
    # Scale invariance: features are normalized inside.
    e = evaluate_features(qf * 3.0, gf * 0.25, qp, gp, qc, gc, max_rank=5, device="cpu")
    assert e["mAP"] == pytest.approx(b["mAP"], abs=1e-12)


def test_evaluate_features_bad_inputs():
    qf, gf, qp, gp, qc, gc = clustered_features(0, num_q=5, num_g=10)
    with pytest.raises(ValueError, match="feature sizes"):
        evaluate_features(qf, gf[:, :3], qp, gp, qc, gc, device="cpu")
    with pytest.raises(ValueError, match="NaN"):
        bad = gf.clone()
        bad[0, 0] = float("nan")
        evaluate_features(qf, bad, qp, gp, qc, gc, device="cpu")
    with pytest.raises(ValueError, match="g_camids"):
        evaluate_features(qf, gf, qp, gp, qc, gc[:-1], device="cpu")


@pytest.mark.cuda
def test_evaluate_features_cuda_equals_cpu():
    qf, gf, qp, gp, qc, gc = clustered_features(1, num_q=64, num_g=500, dim=32)
    cpu = evaluate_features(qf, gf, qp, gp, qc, gc, max_rank=20, device="cpu", block_size=64)
    gpu = evaluate_features(qf, gf, qp, gp, qc, gc, max_rank=20, device="cuda", block_size=16)
    dense = evaluate(pairwise_distance(qf, gf, device="cuda", block_size=16), qp, gp, qc, gc, max_rank=20)
    assert gpu["mAP"] == dense["mAP"] and gpu["mINP"] == dense["mINP"]
    assert abs(gpu["mAP"] - cpu["mAP"]) < 1e-6


# ---------------------------------------------------------------- k-reciprocal re-ranking


def naive_rerank(qf, gf, k1, k2, lam):
    """Zhong et al. 2017 written out with python sets and loops, float64."""
    x = np.concatenate([qf, gf]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n, nq = len(x), len(qf)
    d = np.array([[float(np.sum((x[i] - x[j]) ** 2)) for j in range(n)] for i in range(n)])
    d = d / d.max(axis=1, keepdims=True)
    order = [sorted(range(n), key=lambda j: (d[i][j], j)) for i in range(n)]

    def recip(i, k):
        return {j for j in order[i][: k + 1] if i in order[j][: k + 1]}

    kh = int(round(k1 / 2))
    v = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        expanded = set(r)
        for c in r:
            rc = recip(c, kh)
            if len(rc & r) > 2 / 3 * len(rc):
                expanded |= rc
        weights = {j: np.exp(-d[i][j]) for j in expanded}
        total = sum(weights.values())
        for j, w in weights.items():
            v[i][j] = w / total
    if k2 > 1:
        v = np.array([np.mean([v[j] for j in order[i][:k2]], axis=0) for i in range(n)])
    out = np.zeros((nq, n - nq))
    for i in range(nq):
        for j in range(nq, n):
            inter = sum(min(v[i][k], v[j][k]) for k in range(n))
            union = sum(max(v[i][k], v[j][k]) for k in range(n))
            out[i][j - nq] = (1 - lam) * (1 - inter / union) + lam * d[i][j]
    return out


@pytest.mark.parametrize("k1,k2,lam", [(5, 3, 0.3), (4, 1, 0.5), (20, 6, 0.3)])
def test_re_ranking_matches_naive(k1, k2, lam):
    from trainer.evaluation.rerank import re_ranking

    qf, gf, *_ = clustered_features(4, num_q=7, num_g=23, dim=8, num_ids=5)
    got = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam, device="cpu", chunk=6)
    assert got.shape == (7, 23) and got.dtype == np.float32
    np.testing.assert_allclose(got, naive_rerank(qf.numpy(), gf.numpy(), k1, k2, lam), rtol=0, atol=2e-6)


def test_evaluate_features_rerank_route():
    from trainer.evaluation.rerank import re_ranking

    qf, gf, qp, gp, qc, gc = clustered_features(2, num_q=12, num_g=40)
    got = evaluate_features(qf, gf, qp, gp, qc, gc, max_rank=5, rerank=True, k1=6, k2=3, device="cpu")
    want = evaluate(re_ranking(qf, gf, 6, 3, 0.3, device="cpu"), qp, gp, qc, gc, max_rank=5)
    assert got["mAP"] == want["mAP"]
    np.testing.assert_array_equal(got["cmc"], want["cmc"])
