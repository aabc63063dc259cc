"""k-NN search: flat == exact, bf16 candidates give the fp32 lists, IVF lists and recall against naive
float64 restatements, the sharded IVF database equal to one process at W = 2, 3, 4.

Every comparison is exact (integer ids, recall as a ratio of counts): the features are snapped
(``snap_features``), so squared distances are exact in float64 and ties go to the lower index.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trainer.cluster.knn as knn
from bench.cluster import reid_like
from tests.mp import run_distributed
from trainer.cluster.knn import exact_knn, knn_recall, recall_warning, search_knn, snap_features


def _naive_topk(x: np.ndarray, queries: np.ndarray, k: int, among: list[np.ndarray] | None = None) -> np.ndarray:
    """float64 differences, sorted by (squared distance, id); ``among[t]``: restrict query t's database."""
    x64 = x.astype(np.float64)
    out = np.empty((len(queries), k), np.int64)
    for t, i in enumerate(queries):
        cand = np.arange(len(x)) if among is None else np.sort(among[t])
        d = ((x64[cand] - x64[i]) ** 2).sum(1)
        out[t] = cand[np.lexsort((cand, d))[:k]]
    return out


def _data(n: int, d: int, seed: int, dup: int = 0) -> np.ndarray:
    """ReID-like features (the benchmark's generator) with ``dup`` exact duplicates (ties in every list)."""
    x = reid_like(n, d=d, seed=seed)
    if dup:
        rng = np.random.default_rng(seed)
        src = rng.choice(n, dup, replace=False)
        dst = rng.choice(np.setdiff1d(np.arange(n), src), dup, replace=False)
        x[dst] = x[src]
    return snap_features(x)


# --- flat -----------------------------------------------------------------------------------------------------


def test_search_knn_flat_is_exact_knn():
    x = _data(400, 24, 0, dup=20)
    want = _naive_topk(x, np.arange(400), 15)
    for rows in [(0, 400), (37, 211), (399, 400), (5, 5)]:
        got = search_knn(x, 15, rows=rows, index="flat", precision="fp32")
        np.testing.assert_array_equal(got, exact_knn(x, 15, rows=rows, precision="fp32"))
        np.testing.assert_array_equal(got, want[rows[0] : rows[1]])


# --- bf16 candidates ------------------------------------------------------------------------------------------


def test_bf16_bound_holds_on_every_pair():
    # the bound of _bf16_bound against the exact (float64, snapped) scores, folded and not: magnitudes
    # spread over 2**-3..2**3 so the non-folded |x|^2/2 term and the per-row norms both matter
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 96)) * (2.0 ** rng.uniform(-3, 3, (300, 1)))
    x[:40] = x[40:80] + 1e-3 * rng.standard_normal((40, 96))
    x = snap_features(x)
    n, d = x.shape
    nh, ne = knn._bf16_norms(x)
    exact_dot = x.astype(np.float64) @ x.T.astype(np.float64)
    xb = torch.from_numpy(x).to(torch.bfloat16)
    g = knn._gemm(xb, xb).double().numpy()
    norms = knn.exact_norms(x)
    hn32 = torch.from_numpy((norms / 2).astype(np.float32))
    approx = (knn._gemm(xb, xb).float() - hn32).double().numpy()  # the unfolded path's float32 subtraction
    for fold, err in [(True, np.abs(g - exact_dot)), (False, np.abs(approx - (exact_dot - norms / 2)))]:
        bound = knn._bf16_bound(nh, ne, 0, n, d, float(norms.max()) / 2, fold)
        assert np.all(err <= bound[:, None]), float((err / bound[:, None]).max())
        assert err.max() > bound.min() / 50  # the bound is not vacuous: within ~50x of the worst error


def test_augmented_bf16_bound_holds_on_every_pair():
    # the bf16 GEMM of augmented rows [q, 1] . [y, -|y|^2/2] against the exact score <q, y> - |y|^2/2
    # (float64 on snapped values): every error within _augmented_bound, which is within ~50x of the worst
    rng = np.random.default_rng(2)
    q = snap_features(rng.standard_normal((300, 96)) * (2.0 ** rng.uniform(-3, 3, (300, 1))))
    y = knn._snap_like(rng.standard_normal((200, 96)) * (2.0 ** rng.uniform(-3, 3, (200, 1))), q)
    yn = knn.exact_norms(y)
    qa, ya = knn._augmented(q, 1.0), knn._augmented(y, -(yn / 2))
    approx = knn._gemm(torch.from_numpy(qa).to(torch.bfloat16), torch.from_numpy(ya).to(torch.bfloat16))
    exact = q.astype(np.float64) @ y.T.astype(np.float64) - yn / 2
    err = np.abs(approx.double().numpy() - exact)
    hy, ey = knn._bf16_norms(ya)
    bound = knn._augmented_bound(qa, (float(hy.max()), float(ey.max())), float(yn.max()) / 2)
    assert np.all(err <= bound[:, None]), float((err / bound[:, None]).max())
    assert err.max() > bound.min() / 50


@pytest.mark.parametrize("scaled", [False, True])
def test_bf16_lists_identical_to_fp32(scaled):
    x = reid_like(1500, d=48, seed=3)
    if scaled:  # norms from 0.5 to 2: the unfolded path (|x_j|^2/2 subtracted in float32)
        x = x * np.random.default_rng(3).uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)
    x = snap_features(x)
    want = exact_knn(x, 20, precision="fp32")
    np.testing.assert_array_equal(want, _naive_topk(x, np.arange(len(x)), 20))
    for rows, block in [((0, len(x)), 256), ((0, len(x)), 2048), ((300, 1100), 512)]:
        stats: dict = {}
        got = search_knn(x, 20, rows=rows, precision="bf16", stats=stats, backend="torch") if block == 2048 else \
            exact_knn(x, 20, rows=rows, precision="bf16", block=block, stats=stats)
        assert stats["precision"] == "bf16"
        np.testing.assert_array_equal(got, want[rows[0] : rows[1]])


def test_bf16_fallback_on_near_ties():
    # 30 groups of 50 points within 1e-4 of each other: the bf16 scores cannot order a group (its
    # spread is far below the bound) and a group is larger than the k + margin candidates, so no row
    # of a group can be certified and every one must be searched again in fp32
    rng = np.random.default_rng(5)
    base = rng.standard_normal((30, 32))
    x = np.repeat(base, 50, axis=0) + 1e-4 * rng.standard_normal((1500, 32))
    x = np.concatenate([x, rng.standard_normal((200, 32))])  # loners: certified from bf16 alone
    x = snap_features(x / np.linalg.norm(x, axis=1, keepdims=True))
    stats: dict = {}
    got = exact_knn(x, 10, precision="bf16", stats=stats, block=512)
    assert stats["bf16_fallback_rows"] >= 1500, stats
    assert stats["bf16_fallback_rows"] < len(x), stats
    np.testing.assert_array_equal(got, _naive_topk(x, np.arange(len(x)), 10))


def _naive_vs(q: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Top-k of each query against y by float64 squared distance, ties by lower index."""
    q64, y64 = q.astype(np.float64), y.astype(np.float64)
    return np.stack([np.lexsort((np.arange(len(y)), ((y64 - p) ** 2).sum(1)))[:k] for p in q64])


@pytest.mark.parametrize("k", [1, 16])
def test_bf16_queries_against_a_database_equal_naive(k):
    # queries vs a database of unequal norms (centroid-like means of 3-8 points, the IVF quantizer's
    # case: the unfolded path) with a block of near-duplicate database rows that the bf16 scores cannot
    # order, so that some rows must fall back to fp32; the lists equal a float64 restatement
    rng = np.random.default_rng(11)
    x = reid_like(900, d=48, seed=4)
    groups = [rng.choice(900, rng.integers(3, 9), replace=False) for _ in range(160)]
    y = np.stack([x[g].mean(0) for g in groups])
    y[100:140] = y[5] + 1e-5 * rng.standard_normal((40, 48))
    x = snap_features(x)
    y = knn._snap_like(y.astype(np.float32), x)
    yn = knn.exact_norms(y)
    q = np.concatenate([x[:300], y[100:110]])  # the last queries sit in the near-duplicate block
    want = _naive_vs(q, y, k)
    np.testing.assert_array_equal(knn._exact_vs(q, y, yn, k, precision="fp32"), want)
    stats: dict = {}
    got = knn._exact_vs(q, y, yn, k, precision="bf16", block=64, stats=stats)
    np.testing.assert_array_equal(got, want)
    assert stats["bf16_rows"] == len(q) and 1 <= stats["bf16_fallback_rows"] < len(q), stats


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(knn, "cpu_has_fast_bf16", lambda: True)
    assert knn._use_bf16("auto", "torch", torch.device("cpu"), 1 << 30)
    assert not knn._use_bf16("auto", "torch", torch.device("cpu"), 1000)  # too small to pay
    assert not knn._use_bf16("auto", "faiss", torch.device("cpu"), 1 << 30)
    monkeypatch.setattr(knn, "cpu_has_fast_bf16", lambda: False)
    assert not knn._use_bf16("auto", "torch", torch.device("cpu"), 1 << 30)
    assert knn._use_bf16("bf16", "torch", torch.device("cpu"), 10)  # forced: any CPU
    with pytest.raises(ValueError, match="torch backend"):
        knn._use_bf16("bf16", "faiss", torch.device("cpu"), 10)


# --- IVF ------------------------------------------------------------------------------------------------------


def _naive_ivf(x: np.ndarray, k: int, nlist: int, nprobe: int) -> np.ndarray:
    """The IVF lists by definition: each point's probes are its nprobe nearest centroids (float64, ties by
    centroid id), it lives in the first; a query's list is the exact top-k of the points living in its
    probed lists, or of all points when those hold fewer than k."""
    cent = knn._snap_like(knn._train_centroids(x, nlist), x)
    c64, x64 = cent.astype(np.float64), x.astype(np.float64)
    probes = np.stack([np.lexsort((np.arange(nlist), ((c64 - p) ** 2).sum(1)))[:nprobe] for p in x64])
    home = probes[:, 0]
    among = [np.flatnonzero(np.isin(home, probes[i])) for i in range(len(x))]
    among = [a if len(a) >= k else np.arange(len(x)) for a in among]
    return _naive_topk(x, np.arange(len(x)), k, among)


@pytest.mark.parametrize("nlist,nprobe", [(12, 1), (12, 3), (None, 16)])
def test_ivf_lists_are_exact_within_the_probed_lists(nlist, nprobe):
    x = _data(500, 16, 7, dup=40)
    stats: dict = {}
    got = search_knn(x, 10, rows=(0, 500), index="ivf", nlist=nlist, nprobe=nprobe, stats=stats)
    nl = stats["nlist"]
    assert nl == (nlist or knn.default_nlist(500))
    np.testing.assert_array_equal(got, _naive_ivf(x, 10, nl, min(nprobe, nl)))
    part = search_knn(x, 10, rows=(123, 321), index="ivf", nlist=nlist, nprobe=nprobe)
    np.testing.assert_array_equal(part, got[123:321])


def test_ivf_recall_is_reported_correctly():
    x = _data(600, 16, 11)
    lists = search_knn(x, 10, rows=(0, 600), index="ivf", nlist=15, nprobe=2)
    exact = _naive_topk(x, np.arange(600), 10)
    naive = np.mean([len(set(lists[i]) & set(exact[i])) / 10 for i in range(600)])
    assert 0.5 < naive < 1.0  # the case has misses to count
    assert knn_recall(x, lists, (0, 600), 10, sample=600) == pytest.approx(naive, abs=1e-12)
    # a sample: the seeded rows of the slice (float64 restatement of the choice)
    part = lists[100:400]
    pick = np.sort(np.random.default_rng(4).choice(300, 120, replace=False))
    want = np.mean([len(set(part[p]) & set(exact[100 + p])) / 10 for p in pick])
    assert knn_recall(x, part, (100, 400), 10, sample=120, seed=4) == pytest.approx(want, abs=1e-12)
    assert knn_recall(x, exact, (0, 600), 10) == 1.0


def test_recall_warning_names_the_fix():
    assert recall_warning(0.995, 0.99, 20, 16) is None
    msg = recall_warning(0.95, 0.99, 20, 16)
    assert msg is not None and "\n" not in msg and "tmgf.knn_nprobe" in msg and "0.9500" in msg


_ROW_BYTES = {"faiss": 4 * 16 + 8, "lists": 4 * 16 + 12}  # index bytes per row at d = 16


def _ivf_body(rank, world_size, x, k, nlist, nprobe):
    from trainer import dist

    stats: dict = {}
    rows = dist.shard_range(len(x), rank, world_size)
    lists = search_knn(x, k, rows=rows, index="ivf", nlist=nlist, nprobe=nprobe, distributed=True, stats=stats,
                       chunk=37)
    return lists, stats


def _sharded_ivf_data() -> np.ndarray:
    """301 points (not divisible by W = 2, 3, 4), small lists and one point repeated 25 times: rows that
    are certified, re-scanned over their probed lists and searched exhaustively."""
    x = _data(301, 16, 13, dup=30)
    x[200:225] = x[7]
    return x


def test_ivf_distributed_equals_one_process():
    # N not divisible by W; small lists and a point repeated 25 times, so that rows are certified,
    # re-scanned over their probed lists (ties beyond the candidates) and searched exhaustively
    # (probed lists holding fewer than k points)
    x = _sharded_ivf_data()
    k, nlist, nprobe = 12, 24, 1
    stats: dict = {}
    want = search_knn(x, k, rows=(0, 301), index="ivf", nlist=nlist, nprobe=nprobe, stats=stats, chunk=37)
    np.testing.assert_array_equal(want, _naive_ivf(x, k, nlist, nprobe))
    for world in (2, 3, 4):
        got = run_distributed(_ivf_body, world, x, k, nlist, nprobe)
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), want)
        # the database is sharded: each rank indexes only its own rows
        assert [g[1]["index_bytes"] for g in got] == [(b - a) * _ROW_BYTES[g[1]["ivf_scan"]] for g, (a, b) in
                                                      zip(got, (knn.dist.shard_range(301, r, world)
                                                                for r in range(world)), strict=True)]
    assert stats["ivf_exhausted_rows"] > 0 and stats["ivf_rescanned_rows"] > 0, stats


def _naive_kmeans(x: np.ndarray, nlist: int) -> np.ndarray:
    """The IVF quantizer by definition: Lloyd's iterations from faiss's initialisation on the seeded
    sample, each assignment to the nearest centroid snapped onto x's grid (float64, ties by lower id),
    each centroid the float64 mean of its points; an emptied centroid is re-seeded by faiss's rule
    (``reassign_centroids``, splitting a large one), with the same random stream."""
    from faiss.contrib.clustering import reassign_centroids

    sample = np.sort(np.random.default_rng(knn.IVF_SEED).choice(len(x), min(len(x), knn.IVF_TRAIN_PER_LIST * nlist),
                                                                 replace=False))
    xs = x[sample].astype(np.float64)
    rs = np.random.RandomState(knn.IVF_SEED)
    cent = xs[rs.choice(len(xs), nlist, replace=False)]
    for _ in range(knn.IVF_KMEANS_ITERS):
        c = knn._snap_like(cent.astype(np.float32), x).astype(np.float64)
        assign = _naive_vs(xs, c, 1)[:, 0]
        counts = np.bincount(assign, minlength=nlist)
        cent = np.stack([xs[assign == j].sum(0) for j in range(nlist)]) / np.maximum(counts, 1)[:, None]
        reassign_centroids(counts, cent, rs)
    return cent.astype(np.float32)


def _kmeans_body(rank, world_size, x, nlist):
    return knn._train_centroids(x, nlist, distributed=True)


def test_ivf_kmeans_sharded_equals_one_process_and_naive():
    # the quantizer's k-means with the assignment sharded over W ranks: the same centroids, bit for bit,
    # as one process (the sums are exact), and as a float64 restatement of Lloyd's iterations to within
    # float32 rounding of the final division (the restatement divides in float64)
    x = snap_features(reid_like(700, d=24, seed=9))
    nlist = 35  # 8 x 35 = 280 sample rows, not divisible by 3 or 4
    want = knn._train_centroids(x, nlist)
    np.testing.assert_allclose(want, _naive_kmeans(x, nlist), rtol=0, atol=1e-6)
    for world in (2, 3, 4):
        for got in run_distributed(_kmeans_body, world, x, nlist):
            np.testing.assert_array_equal(got, want)


# --- IVF: the list-major CPU scan ------------------------------------------------------------------------------


def _ivf(x: np.ndarray, k: int, nlist: int, nprobe: int, scan: str, rows: tuple[int, int] | None = None,
         distributed: bool = False, chunk: int = 500, stats: dict | None = None) -> np.ndarray:
    """``search_knn(index="ivf")`` with the scan forced (``_search_ivf``'s private ``scan``)."""
    rows = (0, len(x)) if rows is None else rows
    return knn._search_ivf(x, k, rows, nprobe, nlist, 8, 2048, torch.device("cpu"), distributed, chunk, stats,
                           scan)  # type: ignore[arg-type]


def test_list_scan_error_bound_holds_on_every_probed_pair():
    # kp = N: the scan returns every point of each query's probed lists with its approximate distance;
    # each must be within _ivf_delta of the exact (float64, snapped) one. Norms 0.5..2: the |y|^2/2 term
    x = reid_like(700, d=48, seed=19) * np.random.default_rng(19).uniform(0.5, 2.0, (700, 1)).astype(np.float32)
    x = snap_features(x)
    n, nl, npb = len(x), 20, 4
    cent = knn._snap_like(knn._train_centroids(x, nl), x)
    probes = knn._exact_vs(x, cent, knn.exact_norms(cent), npb)
    norms = knn.exact_norms(x)
    shard = knn._IVFShard(cent, x, 0, probes[:, 0], npb, "lists")
    dd, ii = shard.search(x, norms, probes, n)
    for i in range(n):  # the candidates: exactly the points of the probed lists, ascending by distance
        found = ii[i][ii[i] >= 0]
        assert np.array_equal(np.sort(found), np.flatnonzero(np.isin(probes[:, 0], probes[i])))
        assert np.all(np.diff(dd[i][: len(found)]) >= 0) and np.all(np.isinf(dd[i][len(found) :]))
    r, c = np.nonzero(ii >= 0)
    x64 = x.astype(np.float64)
    err = np.abs(dd[r, c] - ((x64[r] - x64[ii[r, c]]) ** 2).sum(1))
    delta = knn._ivf_delta({"lists"}, x.shape[1], norms, 0, n)[r]
    assert np.all(err <= delta), float((err / delta).max())
    assert err.max() > delta.min() / 50  # not vacuous (measured: the worst error is within 8x of it)


@pytest.mark.parametrize("nlist,nprobe", [(40, 6), (100, 2)])
def test_list_scan_equals_naive_and_faiss_scan(nlist, nprobe, monkeypatch):
    # reid_like data with duplicates (ties), nprobe < nlist. (100, 2): lists of ~12 points, so that many
    # rows' probed lists hold fewer than k = 15 points (searched exhaustively) and others do not. Small
    # GEMM blocks and three worker threads: lists split over blocks, queries over workers
    x = _data(1200, 48, 23, dup=60)
    k = 15
    want = _naive_ivf(x, k, nlist, nprobe)
    monkeypatch.setattr(knn, "_SCAN_ROWS", 64)
    monkeypatch.setattr(knn, "_SCAN_BLOCK", 1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for scan in ("faiss", "lists"):
            stats: dict = {}
            got = _ivf(x, k, nlist, nprobe, scan, stats=stats)
            assert stats["ivf_scan"] == scan
            np.testing.assert_array_equal(got, want, err_msg=scan)
            np.testing.assert_array_equal(_ivf(x, k, nlist, nprobe, scan, rows=(211, 987)), want[211:987])
            if nlist == 100:
                assert 0 < stats["ivf_exhausted_rows"] < len(x) - 100, stats
    finally:
        torch.set_num_threads(threads)


def _scan_body(rank, world_size, x, k, nlist, nprobe, scans):
    from trainer import dist

    stats: dict = {}
    lists = _ivf(x, k, nlist, nprobe, scans[rank % len(scans)], rows=dist.shard_range(len(x), rank, world_size),
                 distributed=True, chunk=37, stats=stats)
    return lists, stats


def test_list_scan_distributed_equals_one_process():
    # the list-major scan over a sharded database (W = 2), and beside faiss on another rank (W = 3: the
    # merge then certifies with the larger bound): the lists equal W = 1's and the naive restatement
    # (rows certified, re-scanned over their probed lists and searched exhaustively)
    x = _sharded_ivf_data()
    k, nlist, nprobe = 12, 24, 2
    stats: dict = {}
    want = _ivf(x, k, nlist, nprobe, "lists", chunk=37, stats=stats)
    np.testing.assert_array_equal(want, _naive_ivf(x, k, nlist, nprobe))
    assert stats["ivf_rescanned_rows"] > 0 and stats["ivf_exhausted_rows"] > 0, stats
    for world, scans in [(2, ("lists",)), (3, ("lists", "faiss"))]:
        got = run_distributed(_scan_body, world, x, k, nlist, nprobe, scans)
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), want)
        assert [g[1]["ivf_scan"] for g in got] == [scans[r % len(scans)] for r in range(world)]


def test_bad_inputs_fail_clearly():
    x = _data(50, 8, 0)
    with pytest.raises(ValueError, match="index='hnsw'"):
        search_knn(x, 5, rows=(0, 50), index="hnsw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend='torch' has no IVF"):
        search_knn(x, 5, rows=(0, 50), index="ivf", backend="torch")
    with pytest.raises(ValueError, match="precision='bf16'"):
        search_knn(x, 5, rows=(0, 50), index="ivf", precision="bf16")
    with pytest.raises(ValueError, match="nlist=80"):
        search_knn(x, 5, rows=(0, 50), index="ivf", nlist=80)
    with pytest.raises(ValueError, match="k=60"):
        search_knn(x, 60, rows=(0, 50))


@pytest.mark.cuda
def test_cuda_bf16_and_faiss_gpu_ivf():
    x = _data(3000, 64, 17, dup=50)
    want = exact_knn(x, 20, precision="fp32", backend="torch", device="cpu")
    stats: dict = {}
    np.testing.assert_array_equal(exact_knn(x, 20, backend="torch", device="cuda", stats=stats), want)
    assert stats["precision"] == "bf16"  # tensor cores: bf16 candidates by default
    if not knn.faiss_has_gpu():
        pytest.skip("faiss here is the CPU build (install faiss-gpu-cu12 for the IVF half)")
    torch.cuda.set_device(torch.cuda.device_count() - 1)  # the index must follow the rank's device
    got = search_knn(x, 20, rows=(0, 3000), index="ivf", nlist=40, nprobe=4)
    np.testing.assert_array_equal(got, _naive_ivf(x, 20, 40, 4))
