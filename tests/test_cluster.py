"""Clustering step: the sparse pipeline gives the dense official pipeline's labels, exactly."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import DBSCAN

from trainer.cluster.dbscan import dbscan_edges
from trainer.cluster.jaccard import encode, expansion_sets, jaccard_edges, jaccard_pairs, query_expansion
from trainer.cluster.knn import exact_knn, snap_features
from trainer.cluster.pipeline import jaccard_dbscan
from trainer.cluster.reference import reference_jaccard, reference_jaccard_dbscan


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blobs(n: int, d: int, seed: int, per_id: int = 25, noise: float = 0.8) -> np.ndarray:
    """Identities of varying density (per-id noise scale) plus a few uniform outliers."""
    rng = np.random.default_rng(seed)
    ids = max(2, n // per_id)
    centers = rng.standard_normal((ids, d))
    scale = noise * rng.uniform(0.5, 1.5, ids)
    lab = rng.integers(0, ids, n)
    x = centers[lab] + scale[lab, None] * rng.standard_normal((n, d))
    x[: n // 20] = rng.standard_normal((n // 20, d)) * 3  # outliers
    return _unit(x)


def chains(n: int, d: int, seed: int) -> np.ndarray:
    """Random walks: elongated clusters whose ends touch other chains (many border points)."""
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((n, d)) * 0.15
    starts = rng.standard_normal((n // 50 + 1, d))
    walk = np.cumsum(steps, axis=0)
    x = walk + np.repeat(starts, 50, axis=0)[:n]
    return _unit(x)


def camera_clusters(n: int, d: int, seed: int) -> np.ndarray:
    """ReID-like: identities x cameras, a shared camera bias and near-duplicate frames."""
    rng = np.random.default_rng(seed)
    ids, cams = max(2, n // 30), 6
    pid = rng.integers(0, ids, n)
    cam = rng.integers(0, cams, n)
    x = rng.standard_normal((ids, d))[pid] + 0.6 * rng.standard_normal((cams, d))[cam]
    x += 0.5 * rng.standard_normal((ids, cams, d))[pid, cam] + 0.4 * rng.standard_normal((n, d))
    dup = rng.choice(n, 2 * (n // 20), replace=False)
    x[dup[: len(dup) // 2]] = x[dup[len(dup) // 2 :]]  # exact duplicates (ties in every k-NN list)
    return _unit(x)


CASES = [
    ("blobs", lambda s: blobs(500, 32, s), dict()),
    ("blobs-dense", lambda s: blobs(700, 16, s, per_id=60, noise=1.2), dict(eps=0.6, min_samples=5)),
    ("chains", lambda s: chains(400, 24, s), dict(k1=10, k2=3, eps=0.6, min_samples=3)),
    ("cameras", lambda s: camera_clusters(600, 64, s), dict()),
    ("cameras-odd-k", lambda s: camera_clusters(450, 32, s), dict(k1=7, k2=1, eps=0.4, min_samples=2)),
]


@pytest.mark.parametrize("name,make,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_labels_identical_to_dense_reference(name, make, kw, seed):
    x = make(seed)
    params = dict(k1=20, k2=6, eps=0.5, min_samples=4) | kw
    ours = jaccard_dbscan(x, **params)
    ref = reference_jaccard_dbscan(x, **params)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref)
    assert ref.max() >= 1  # the case really has clusters


def test_labels_identical_with_faiss_backend():
    x = camera_clusters(500, 32, 3)
    np.testing.assert_array_equal(jaccard_dbscan(x, knn_backend="faiss"), reference_jaccard_dbscan(x))


@pytest.mark.parametrize("k1,k2", [(20, 6), (9, 4), (5, 1)])
def test_jaccard_values_bit_identical(k1, k2):
    x = camera_clusters(400, 24, 7)
    xs = snap_features(x)
    n = len(x)
    r = exact_knn(xs, k1)
    indptr, indices = expansion_sets(r, k1)
    v = sp.csr_matrix((encode(xs, indptr, indices), indices, indptr), shape=(n, n))
    v.eliminate_zeros()
    vq = query_expansion(v, r, k2)
    i, j, jac = jaccard_pairs(vq)
    dense = reference_jaccard(x, k1, k2)
    np.testing.assert_array_equal(jac, dense[i, j])  # bit-for-bit, float32
    np.testing.assert_array_equal(dense, dense.T)
    mask = np.ones((n, n), bool)
    mask[i, j] = mask[j, i] = False
    assert np.all(dense[mask] == 1.0)  # every pair without shared support is exactly 1
    # eps exactly on a Jaccard value, or just below it in float64 (it rounds to it in float32, as in
    # sklearn's ``D <= eps`` with a Python float): the boundary pair is a neighbour in both
    for eps in (float(np.sort(jac)[len(jac) // 2]), float(np.sort(jac)[len(jac) // 2]) - 1e-12):
        ei, ej = jaccard_edges(vq, eps)
        want_i, want_j = np.nonzero(np.triu(dense <= eps))
        assert sorted(zip(ei.tolist(), ej.tolist())) == sorted(zip(want_i.tolist(), want_j.tolist()))
    # the split into row blocks (distributed shards, small accumulators) changes nothing
    parts = [jaccard_pairs(vq, None, (a, b), block=40, max_triples=500)
             for a, b in [(0, 150), (150, 151), (151, n)]]
    pi, pj, pv = (np.concatenate([p[t] for p in parts]) for t in range(3))
    assert len(pi) == len(i)
    np.testing.assert_array_equal(pv, dense[pi, pj])


def _brute_knn(x: np.ndarray, k: int) -> np.ndarray:
    x = x.astype(np.float64)
    out = np.empty((len(x), k), np.int64)
    for a in range(len(x)):  # naive: float64 differences, ties by index
        d = ((x - x[a]) ** 2).sum(1)
        out[a] = sorted(range(len(x)), key=lambda b: (d[b], b))[:k]
    return out


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_exact_with_ties(backend):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((150, 12))
    # near-ties: tiny perturbations of the same points, exact ties: duplicates and mirrored points
    x = np.concatenate([base, base[:40] + 1e-7 * rng.standard_normal((40, 12)), base[40:70], -base[:20]])
    x = snap_features(x)
    want = _brute_knn(x, 15)
    np.testing.assert_array_equal(exact_knn(x, 15, backend=backend), want)
    np.testing.assert_array_equal(exact_knn(x, 15, backend=backend, extra=1, block=37), want)
    np.testing.assert_array_equal(exact_knn(x, 15, rows=(33, 101), backend=backend), want[33:101])


def test_auto_backend_is_faiss_gpu_only_where_faiss_sees_a_gpu(monkeypatch):
    import trainer.cluster.knn as knn

    chosen = []
    real = knn._approx_faiss
    monkeypatch.setattr(knn, "_approx_faiss", lambda *a: chosen.append("faiss") or real(*a[:-1], False))
    x = snap_features(np.random.default_rng(3).standard_normal((60, 8)))
    for gpu in (False, True):  # faiss-gpu is emulated by the CPU index here: the choice is what is tested
        monkeypatch.setattr(knn, "faiss_has_gpu", lambda gpu=gpu: gpu)
        chosen.clear()
        np.testing.assert_array_equal(exact_knn(x, 5, backend="auto"), _brute_knn(x, 5))
        assert chosen == (["faiss"] if gpu else [])


@pytest.mark.cuda
def test_faiss_gpu_knn_is_exact_on_this_ranks_device():
    import faiss
    import torch

    from trainer.cluster.knn import faiss_has_gpu

    if not faiss_has_gpu():
        pytest.skip("faiss here is the CPU build (install faiss-gpu-cu12 for this test)")
    torch.cuda.set_device(torch.cuda.device_count() - 1)  # not GPU 0: the index must follow the rank's device
    rng = np.random.default_rng(0)
    x = snap_features(rng.standard_normal((3000, 64)))
    np.testing.assert_array_equal(exact_knn(x, 20, backend="faiss"), exact_knn(x, 20, backend="torch"))
    assert faiss.get_num_gpus() >= 1


def test_knn_overflow_path_is_exact():
    # points on a lattice: huge groups of exactly equal distances overflow any candidate budget
    g = np.stack(np.meshgrid(np.arange(6), np.arange(6), np.arange(6)), -1).reshape(-1, 3).astype(np.float32)
    x = snap_features(g)
    np.testing.assert_array_equal(exact_knn(x, 10, extra=2), _brute_knn(x, 10))


def test_snap_makes_dots_exact():
    rng = np.random.default_rng(1)
    raw = _unit(rng.standard_normal((64, 384)))
    x = snap_features(raw)
    assert 0 < np.abs(x - raw).max() < 1e-6  # a tiny move, below float32 GEMM noise
    x64 = x.astype(np.float64)
    g1 = x64 @ x64.T  # BLAS order
    g2 = np.array([[sum(float(p) for p in (a * b)[::-1]) for b in x64[:8]] for a in x64[:8]])  # reversed
    np.testing.assert_array_equal(g1[:8, :8], g2)  # any order of summation: same bits
    assert np.abs(snap_features(x) - x).max() == 0  # idempotent


def _random_graph(n: int, seed: int, eps: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = np.ones((n, n), np.float32)
    e = rng.integers(0, n, (n * 3, 2))
    vals = rng.choice(np.array([0.1, 0.3, eps, 0.7], np.float32), len(e))  # includes float32(eps) itself
    dense[e[:, 0], e[:, 1]] = vals
    dense = np.minimum(dense, dense.T)
    np.fill_diagonal(dense, 0)
    return dense


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps,min_samples", [(0.5, 4), (0.6, 3), (0.3, 2)])
def test_dbscan_edges_matches_sklearn(seed, eps, min_samples):
    dense = _random_graph(300, seed, eps)
    i, j = np.nonzero(np.triu(dense <= eps))
    want = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)
    np.testing.assert_array_equal(dbscan_edges(300, i, j, min_samples), want)


def test_dbscan_border_point_shared_by_two_clusters():
    # cores 0-3 (cluster A, found second: its smallest core is 5) and 4-7; border 8 touches both
    n = 12
    dense = np.ones((n, n), np.float32)
    np.fill_diagonal(dense, 0)

    def link(a, b):
        dense[a, b] = dense[b, a] = 0.2

    for grp in ([5, 6, 7, 9], [1, 2, 3, 4]):
        for a in grp:
            for b in grp:
                if a != b:
                    link(a, b)
    link(8, 9)
    link(8, 4)  # 8: self + two cores = 3 < 4 neighbours, a border point of both clusters
    link(0, 9)  # 0 is a border point with a smaller index than every core
    i, j = np.nonzero(np.triu(dense <= 0.5))
    want = DBSCAN(eps=0.5, min_samples=4, metric="precomputed").fit_predict(dense)
    got = dbscan_edges(n, i, j, 4)
    np.testing.assert_array_equal(got, want)
    # clusters are numbered by their smallest core (1, then 5), not by their smallest member (0);
    # the border point 8 goes to the first cluster that reaches it in sklearn's scan order
    assert got[4] == 0 and got[9] == 1 and got[0] == 1 and got[8] == 0


def test_bad_inputs_fail_clearly():
    x = blobs(30, 8, 0)
    with pytest.raises(ValueError, match="k1=40"):
        jaccard_dbscan(x, k1=40)
    with pytest.raises(ValueError, match="eps"):
        jaccard_dbscan(x, k1=5, k2=3, eps=1.0)
    with pytest.raises(ValueError, match="eps"):
        jaccard_dbscan(x, k1=5, k2=3, eps=0.99999999)  # rounds to 1.0 in float32
    with pytest.raises(ValueError, match="k2"):
        jaccard_dbscan(x, k1=5, k2=6)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        jaccard_dbscan(bad, k1=5, k2=3)


def test_tiny_and_duplicate_inputs():
    x = np.repeat(blobs(6, 8, 1), 5, axis=0)  # 30 points, each repeated 5 times
    params = dict(k1=7, k2=3, eps=0.5, min_samples=4)
    np.testing.assert_array_equal(jaccard_dbscan(x, **params), reference_jaccard_dbscan(x, **params))
    x = blobs(20, 8, 2)
    params = dict(k1=20, k2=6, eps=0.5, min_samples=4)  # N == k1
    np.testing.assert_array_equal(jaccard_dbscan(x, **params), reference_jaccard_dbscan(x, **params))


def test_memory_stays_linear():
    n = 10000
    x = blobs(n, 16, 5)
    tracemalloc.start()
    jaccard_dbscan(x, k1=20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * n * 4 / 4, (
        f"peak {peak / 2**20:.0f} MiB: an N x N float32 array would be {n * n * 4 / 2**20:.0f} MiB")
