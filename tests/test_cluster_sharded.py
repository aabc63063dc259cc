"""The clustering sharded by rows at every stage gives one process's labels, at W = 2, 3 and 4.

One gloo job of 4 ranks checks W = 4, then re-forms its process group with the first 3 ranks and
then the first 2 (``_regroup``): one spawn instead of three, where starting a rank costs seconds.
At every W, with N not divisible by W:

* the whole pipeline (``jaccard_dbscan(distributed=True)``, exact and IVF k-NN) equals W = 1 label for
  label on every rank; W = 1 itself equals the dense official restatement (``tests/test_cluster.py``);
* each sharded stage, run with small rounds (so ranks run empty rounds and ask across rounds), gives
  the rows of the one-process stage: expansion sets, V' (bit for bit), Jaccard pairs (bit for bit);
* the sharded DBSCAN equals scikit-learn on random eps-graphs, on a long chain whose ids are
  shuffled over the ranks (many FastSV rounds) and on border points between clusters on other ranks;
* the row exchanges answer in request order.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp

from tests.mp import free_port, run_distributed
from trainer.cluster.jaccard import (
    column_table,
    encode,
    expansion_sets,
    expansion_sets_sharded,
    jaccard_pairs,
    jaccard_pairs_sharded,
    query_expansion,
    query_expansion_sharded,
)
from trainer.cluster.knn import exact_knn, snap_features
from trainer.cluster.pipeline import jaccard_dbscan

WORLDS = (4, 3, 2)


def _cases() -> list[tuple[str, np.ndarray, dict]]:
    """(name, features, parameters): ReID-like, border-heavy chains, k2 = 1 with exact duplicates. The
    generators are imported here, in the parent only: the spawned ranks skip sklearn's import."""
    from bench.cluster import reid_like
    from tests.test_cluster import camera_clusters, chains

    return [("reid", reid_like(601, d=32, seed=3), dict()),
            ("chains", chains(403, 24, 1), dict(k1=10, k2=3, eps=0.6, min_samples=3)),
            ("cameras-k2=1", camera_clusters(450, 32, 2), dict(k1=7, k2=1, eps=0.4, min_samples=2)),
            ("stages", camera_clusters(301, 16, 5), dict())]


def _graphs() -> list[tuple[str, int, np.ndarray, np.ndarray, int]]:
    """eps-graphs ``(name, n, i, j, min_samples)``, pairs ``i <= j`` with self pairs, and sklearn's input."""
    rng = np.random.default_rng(0)
    out = []
    for seed, n, ms in [(0, 301, 4), (1, 250, 3), (2, 207, 2)]:
        r = np.random.default_rng(seed)
        e = r.integers(0, n, (n * 2, 2))
        i, j = np.minimum(e[:, 0], e[:, 1]), np.maximum(e[:, 0], e[:, 1])
        out.append((f"random-{seed}", n, i, j, ms))
    # a chain 0-1-2-...-299 under a random relabelling: its pieces lie on every rank, in any order
    n = 300
    p = rng.permutation(n)
    a, b = p[:-1], p[1:]
    out.append(("chain", n, np.minimum(a, b), np.maximum(a, b), 3))
    # two cliques of cores and border points touching both (smallest label wins), ids interleaved
    n = 40
    ids = rng.permutation(n)
    cl1, cl2, border = ids[:6], ids[6:12], ids[12:20]
    pairs = [(u, v) for c in (cl1, cl2) for u in c for v in c if u < v]
    pairs += [(t, c[0]) for t in border for c in (cl1, cl2)]
    i, j = np.array(pairs).T
    out.append(("borders", n, np.minimum(i, j), np.maximum(i, j), 4))
    for k, (name, n, i, j, ms) in enumerate(out):  # self pairs: every point is its own neighbour
        key = np.unique(np.concatenate([i * n + j, np.arange(n) * (n + 1)]))
        out[k] = (name, n, key // n, key % n, ms)
    return out


def _sklearn(n: int, i: np.ndarray, j: np.ndarray, min_samples: int) -> np.ndarray:
    from sklearn.cluster import DBSCAN

    dense = np.ones((n, n), np.float32)
    dense[i, j] = dense[j, i] = 0.0
    return DBSCAN(eps=0.5, min_samples=min_samples, metric="precomputed").fit_predict(dense)


def _regroup(rank: int, world: int, port: int) -> bool:
    """Replace the process group by one of the first ``world`` ranks (False: this rank is left out)."""
    import torch.distributed as tdist

    from trainer import dist

    tdist.barrier()
    tdist.destroy_process_group()
    if rank >= world:
        return False
    os.environ.update(WORLD_SIZE=str(world), MASTER_PORT=str(port))
    dist.init(backend="gloo")
    return True


def _stages(xs: np.ndarray, k1: int, k2: int, block: int) -> dict[str, object]:
    """This rank's rows of each sharded stage with rounds of ``block`` rows."""
    from trainer.cluster.shard import Shards

    n = len(xs)
    sh = Shards(n, distributed=True)
    r = exact_knn(xs, k1, rows=(sh.lo, sh.hi))
    indptr, indices = expansion_sets_sharded(sh, r, k1, block)
    v = sp.csr_matrix((encode(xs, indptr, indices, row0=sh.lo), indices, indptr), shape=(sh.rows, n))
    v.eliminate_zeros()
    vq = query_expansion_sharded(sh, v, r, k2, block)
    pairs = jaccard_pairs_sharded(sh, vq, sh.lo, column_table(sh, vq, sh.lo), None, block, max_triples=40)
    return {"rows": (sh.lo, sh.hi), "indptr": indptr, "indices": indices, "vq": vq, "pairs": pairs}


def _exchanges(rank: int) -> dict[str, object]:
    """``ask``/``ask_rows``/``send_to_owners`` on ids spread over every rank."""
    from trainer.cluster.shard import Shards

    n = 101
    sh = Shards(n, distributed=True)
    table = np.arange(sh.lo, sh.hi) * 10
    ids = np.random.default_rng(rank).integers(0, n, 57)
    asked = sh.ask(ids, lambda loc, add: table[loc] + add, ids % 7)
    uniq = np.unique(ids)  # rows of length (id % 3), values id*10 repeated
    lens, (flat,) = sh.ask_rows(uniq, lambda loc: (np.arange(sh.lo, sh.hi)[loc] % 3,
                                                   [np.repeat(table[loc], np.arange(sh.lo, sh.hi)[loc] % 3)]))
    got, (payload,) = sh.send_to_owners(ids, ids * 2 + rank)
    return {"asked": asked, "ids": ids, "lens": lens, "flat": flat, "uniq": uniq, "got": got + sh.lo,
            "payload": payload, "range": (sh.lo, sh.hi)}


def _body(rank: int, world: int, ports: list[int], feats: list, stage_x: np.ndarray,
          graphs: list) -> dict[int, dict[str, object]]:
    from trainer.cluster.dbscan import dbscan_sharded
    from trainer.cluster.shard import Shards

    out: dict[int, dict[str, object]] = {}
    for w, port in zip(WORLDS, [0, *ports]):
        if w != world and not _regroup(rank, w, port):
            break
        res: dict[str, object] = {}
        for name, x, kw in feats:
            res[name] = jaccard_dbscan(x, distributed=True, **kw)
        stats: dict = {}
        res["ivf"] = jaccard_dbscan(feats[0][1], distributed=True, knn_index="ivf", nprobe=2, stats=stats)
        res["ivf_recall"] = stats["recall"]
        res["stages"] = _stages(stage_x, 12, 4, block=9)
        for name, n, i, j, ms in graphs:
            sh = Shards(n, distributed=True)
            mine = (i >= sh.lo) & (i < sh.hi)
            res[name] = dbscan_sharded(sh, i[mine], j[mine], ms)
        res["exchanges"] = _exchanges(rank)
        out[w] = res
    return out


def test_sharded_clustering_equals_one_process_at_w_2_3_4():
    *feats, (_, stage_x, _) = _cases()
    stage_x = snap_features(stage_x)
    want = {name: jaccard_dbscan(x, **kw) for name, x, kw in feats}
    stats: dict = {}
    want["ivf"] = jaccard_dbscan(feats[0][1], knn_index="ivf", nprobe=2, stats=stats)
    assert 0.5 < stats["recall"] < 1.0  # an approximate search whose misses the labels absorb or not
    for name, _, _ in feats:
        assert want[name].max() >= 1, name  # the cases really have clusters
    graphs = _graphs()
    for name, n, i, j, ms in graphs:
        want[name] = _sklearn(n, i, j, ms)
    # stages on one process (full matrices), the reference for every rank's rows
    r = exact_knn(stage_x, 12)
    indptr, indices = expansion_sets(r, 12)
    v = sp.csr_matrix((encode(stage_x, indptr, indices), indices, indptr), shape=(301, 301))
    v.eliminate_zeros()
    vq = query_expansion(v, r, 4)
    pi, pj, pv = jaccard_pairs(vq)

    got = run_distributed(_body, WORLDS[0], [free_port(), free_port()], feats, stage_x, graphs)
    for w in WORLDS:
        ranks = [g[w] for g in got[:w]]
        assert all(w not in g for g in got[w:])
        for rank, res in enumerate(ranks):
            for name in [*want]:
                np.testing.assert_array_equal(res[name], want[name], err_msg=f"W={w} rank {rank} {name}")
            assert 0.5 < res["ivf_recall"] <= 1.0
            st = res["stages"]
            a, b = st["rows"]
            np.testing.assert_array_equal(st["indptr"], indptr[a : b + 1] - indptr[a], err_msg=f"W={w} E_i")
            np.testing.assert_array_equal(st["indices"], indices[indptr[a] : indptr[b]], err_msg=f"W={w} E_i")
            assert (st["vq"] != vq[a:b]).nnz == 0 and st["vq"].dtype == np.float32  # bit for bit
            sel = (pi >= a) & (pi < b)
            np.testing.assert_array_equal(st["pairs"][0], pi[sel])
            np.testing.assert_array_equal(st["pairs"][1], pj[sel])
            np.testing.assert_array_equal(st["pairs"][2], pv[sel])  # float32, bit for bit
            ex = res["exchanges"]
            np.testing.assert_array_equal(ex["asked"], ex["ids"] * 10 + ex["ids"] % 7)
            np.testing.assert_array_equal(ex["lens"], ex["uniq"] % 3)
            np.testing.assert_array_equal(ex["flat"], np.repeat(ex["uniq"] * 10, ex["uniq"] % 3))
        # every id sent to its owner arrives there, in source-rank order, with its payload
        for res in ranks:
            ex = res["exchanges"]
            lo, hi = ex["range"]
            sent = [(s, i) for s in range(w) for i in ranks[s]["exchanges"]["ids"] if lo <= i < hi]
            np.testing.assert_array_equal(ex["got"], [i for _, i in sent])
            np.testing.assert_array_equal(ex["payload"], [2 * i + s for s, i in sent])
