"""Clustering step: ``trainer.cluster.pipeline.jaccard_dbscan`` vs the ClusterContrast pipeline as its users run it.

    python bench/cluster.py            # N = 8,000 and 32,621 (all three) and 200,000 (ours only)
    python bench/cluster.py --quick    # N = 2,000 (all three): seconds

Three variants, each in a fresh subprocess on the same saved features (k1 = 20, k2 = 6, eps = 0.5,
min_samples = 4):

* **ClusterContrast** (the baseline), :func:`clustercontrast_jaccard`: a restatement of
  ClusterContrast's ``compute_jaccard_distance`` on its CPU path (``search_option=3``,
  ``use_float16=False``): faiss ``IndexFlatL2`` k-NN on the float32 features, k-reciprocal expansion,
  dense N×N float32 ``V`` rows from torch's float32 softmax, query expansion, the inverted-index
  Jaccard loop, then ``sklearn.cluster.DBSCAN(metric="precomputed")``, as its training script calls it;
* **ours**: ``jaccard_dbscan`` (exact k-NN and float64 softmax on snapped features, O(N k) memory);
* **exact**: ``trainer.cluster.reference.reference_jaccard_dbscan``, the dense restatement with
  ours' exact arithmetic (for sizes up to ``--exact-max``): ours must equal it label for label.

Ours differs from ClusterContrast only by rounding, of two kinds, which the baseline's process
measures untimed (:func:`compare`): faiss's float32 search may order two neighbours at near-equal
distance otherwise than the exact order, which changes expansion sets and query expansion and so some
Jaccard values by far more than rounding; and with the same k-NN lists (our exact arithmetic run on
ClusterContrast's own lists) the float32 softmax on raw features moves Jaccard values by ~1e-6, which
can decide only pairs that close to eps. For each cause it reports the eps-edges (pairs with
J <= eps) present on one side only and how far their Jaccard values lie from eps in float32 ulps.
DBSCAN labels are a function of the eps-edges (checked: our DBSCAN on the baseline's edges gives
sklearn's labels), so identical edges mean identical labels.

Features: synthetic ReID-like unit vectors, d = 384: ~N/30 identities, each seen by 2-5 of 15
cameras; feature = identity centre + camera bias + (identity, camera) offset + per-image noise.
Time: the clustering call only. Memory: ``ru_maxrss`` of the process at the end of the call ("peak",
includes ~0.6 GB of torch/faiss/sklearn imports and the features) and that peak minus the RSS just
before the call ("work"). Threads: ``--threads`` (default: all cores) for torch, faiss and sklearn,
except ClusterContrast's torch calls, which get one thread (its fastest setting, see :func:`worker`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from bench.cli import Parser, positive_int, run_cli

K1, K2, EPS, MIN_SAMPLES = 20, 6, 0.5, 4


def reid_like(n: int, d: int = 384, seed: int = 0, per_id: int = 30, cams: int = 15,
              chunk: int = 16384) -> np.ndarray:
    """Clustered unit vectors resembling ReID features (identities split into camera sub-clusters)."""
    rng = np.random.default_rng(seed)
    ids = max(2, n // per_id)
    s = 1.0 / np.sqrt(d)
    center = (rng.standard_normal((ids, d)) * s).astype(np.float32)
    cam_bias = (rng.standard_normal((cams, d)) * s).astype(np.float32)
    n_cams = rng.integers(2, 6, ids)
    id_cams = np.argsort(rng.random((ids, cams)), axis=1)[:, :5]  # each identity's cameras
    pid = rng.integers(0, ids, n)
    cam = id_cams[pid, (rng.random(n) * n_cams[pid]).astype(np.int64)]
    pair, inv = np.unique(pid * cams + cam, return_inverse=True)
    offset = (rng.standard_normal((len(pair), d)) * s).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for a in range(0, n, chunk):  # chunks keep the float64 temporaries small at 200k
        b = min(n, a + chunk)
        noise = rng.standard_normal((b - a, d)).astype(np.float32) * np.float32(s)
        x[a:b] = center[pid[a:b]] + 0.5 * cam_bias[cam[a:b]] + 0.35 * offset[inv[a:b]] + 0.45 * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# --- the baseline: ClusterContrast's compute_jaccard_distance (CPU path), restated ---------------------------


def _k_reciprocal(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """The first k+1 neighbours of i that also have i among their first k+1."""
    forward = initial_rank[i, : k + 1]
    backward = initial_rank[forward, : k + 1]
    return forward[np.where(backward == i)[0]]


def clustercontrast_jaccard(features: Any, k1: int, k2: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Jaccard N×N float32, k-NN list)`` as ClusterContrast computes them on CPU, from torch float32 features."""
    import faiss
    import torch
    import torch.nn.functional as F

    n = features.size(0)
    index = faiss.IndexFlatL2(features.size(-1))
    index.add(features.cpu().numpy())
    _, initial_rank = index.search(features.cpu().numpy(), k1)

    nn_k1 = [_k_reciprocal(initial_rank, i, k1) for i in range(n)]
    nn_k1_half = [_k_reciprocal(initial_rank, i, int(np.around(k1 / 2))) for i in range(n)]
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        recip = nn_k1[i]
        expansion = recip
        for cand in recip:
            cand_recip = nn_k1_half[cand]
            if len(np.intersect1d(cand_recip, recip)) > 2 / 3 * len(cand_recip):
                expansion = np.append(expansion, cand_recip)
        expansion = np.unique(expansion)
        dist = 2 - 2 * torch.mm(features[i].unsqueeze(0).contiguous(), features[expansion].t())
        v[i, expansion] = F.softmax(-dist, dim=1).view(-1).cpu().numpy()
    del nn_k1, nn_k1_half

    if k2 != 1:
        v_qe = np.zeros_like(v, dtype=np.float32)
        for i in range(n):
            v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
        del v_qe

    inv_index = [np.where(v[:, c] != 0)[0] for c in range(n)]
    jac = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        m = np.zeros((1, n), dtype=np.float32)
        cols = np.where(v[i, :] != 0)[0]
        rows = [inv_index[c] for c in cols]
        for t in range(len(cols)):
            m[0, rows[t]] = m[0, rows[t]] + np.minimum(v[i, cols[t]], v[rows[t], cols[t]])
        jac[i] = 1 - m / (2 - m)
    del inv_index, v
    jac[jac < 0] = 0.0
    return jac, initial_rank


def clustercontrast_labels(jac: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed", n_jobs=-1).fit_predict(jac)


# --- where the two differ (untimed) -------------------------------------------------------------------------


def _jaccard_on(xs: np.ndarray, r: np.ndarray, k2: int) -> tuple[np.ndarray, np.ndarray]:
    """Our Jaccard stages on a given k-NN list: sorted keys ``i * N + j`` (i <= j, shared support) and J."""
    import scipy.sparse as sp

    from trainer.cluster.jaccard import encode, expansion_sets, jaccard_pairs, query_expansion

    n, k1 = r.shape
    indptr, indices = expansion_sets(r, k1)
    v = sp.csr_matrix((encode(xs, indptr, indices), indices, indptr), shape=(n, n))
    v.eliminate_zeros()
    i, j, jac = jaccard_pairs(query_expansion(v, r, k2))  # every other pair has J = 1
    key = i.astype(np.int64) * n + j
    order = np.argsort(key)
    return key[order], jac[order]


def _dense_edges(jac: np.ndarray, eps: float, chunk: int = 2048) -> tuple[np.ndarray, int]:
    """Sorted keys ``i * N + j`` (i <= j) of the pairs with ``J <= eps``, and how many pairs are asymmetric."""
    n = len(jac)
    keys, asym = [], 0
    for s in range(0, n, chunk):
        i, j = np.nonzero(jac[s : s + chunk] <= eps)
        i += s
        asym += int(np.count_nonzero(jac[j, i] > eps))
        up = i <= j
        keys.append(i[up].astype(np.int64) * n + j[up])
    return np.sort(np.concatenate(keys)), asym


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, missing: float) -> np.ndarray:
    pos = np.clip(np.searchsorted(keys, query), 0, max(len(keys) - 1, 0))
    hit = (keys[pos] == query) if len(keys) else np.zeros(len(query), bool)
    return np.where(hit, values[pos] if len(keys) else missing, missing)


def points_in_other_clusters(a: np.ndarray, b: np.ndarray) -> int:
    """Points whose cluster (as a set of points, or noise) is not the same in labelings ``a`` and ``b``."""
    n = len(a)
    pair = (a + 1).astype(np.int64) * (n + 1) + (b + 1)
    _, inv, cnt_pair = np.unique(pair, return_inverse=True, return_counts=True)
    _, inv_a, cnt_a = np.unique(a, return_inverse=True, return_counts=True)
    _, inv_b, cnt_b = np.unique(b, return_inverse=True, return_counts=True)
    same = (cnt_pair[inv] == cnt_a[inv_a]) & (cnt_pair[inv] == cnt_b[inv_b])
    same |= (a == -1) & (b == -1)
    same &= (a == -1) == (b == -1)
    return int(n - same.sum())


def _one_side(edges_a: np.ndarray, edges_b: np.ndarray, ja: Any, jb: Any, eps: float) -> dict:
    """eps-edges present on one side only, and how far their two Jaccard values lie from eps (float32 ulps)."""
    flipped = np.setxor1d(edges_a, edges_b)
    va, vb = ja(flipped).astype(np.float64), jb(flipped).astype(np.float64)
    ulp = float(np.spacing(np.float32(eps)))
    far = np.maximum(np.abs(va - eps), np.abs(vb - eps)) / ulp
    return {"edges_one_side": int(len(flipped)), "max_ulps_from_eps": float(far.max(initial=0.0)),
            "jaccard_pairs": [[round(float(a), 6), round(float(b), 6)] for a, b in zip(va[:4], vb[:4])]}


def compare(x: np.ndarray, jac: np.ndarray, rank_b: np.ndarray, labels_b: np.ndarray, eps: float) -> dict:
    """Where ours and ClusterContrast differ, split by cause (k-NN order, arithmetic), and the labels.

    A third run, ours' exact arithmetic on ClusterContrast's own k-NN list, separates the two: against
    ClusterContrast it differs by arithmetic alone (float32 softmax on raw features vs float64 on
    snapped ones), against ours by the k-NN lists alone.
    """
    from trainer.cluster.dbscan import dbscan_edges
    from trainer.cluster.knn import exact_knn, snap_features

    n = len(x)
    xs = snap_features(x)
    r = exact_knn(xs, K1)
    key_o, jac_o = _jaccard_on(xs, r, K2)
    key_f, jac_f = _jaccard_on(xs, rank_b.astype(np.int64), K2)
    edges_b, asym = _dense_edges(jac, eps)
    edges_o, edges_f = key_o[jac_o <= eps], key_f[jac_f <= eps]
    dense = lambda k: jac[k // n, k % n]
    sparse = lambda key, jv: lambda k: _lookup(key, jv, k, 1.0)
    support_b = (sum(int(np.count_nonzero(jac[s : s + 2048] < 1)) for s in range(0, n, 2048)) - n) // 2 + n
    # neighbour order: where the lists differ, how far apart the two neighbours' exact distances are
    rows, cols = np.nonzero(r != rank_b)
    x64 = x.astype(np.float64)
    gap = np.abs(((x64[rows] - x64[rank_b[rows, cols]]) ** 2).sum(1) - ((x64[rows] - x64[r[rows, cols]]) ** 2).sum(1))
    union = np.union1d(key_o, key_f)
    relabel = dbscan_edges(n, edges_b // n, edges_b % n, MIN_SAMPLES)
    return {
        "knn_rows_differ": int(len(np.unique(rows))),
        "knn_sets_differ": int((np.sort(r, 1) != np.sort(rank_b, 1)).any(1).sum()),
        "knn_max_distance_gap": float(gap.max(initial=0.0)),
        "arithmetic": {"same_support": bool(len(key_f) == support_b and np.all(dense(key_f) < 1)),
                       "max_jaccard_diff": float(np.abs(dense(key_f) - jac_f).max(initial=0.0)),
                       **_one_side(edges_b, edges_f, dense, sparse(key_f, jac_f), eps)},
        "knn_order": {"max_jaccard_diff": float(np.abs(sparse(key_f, jac_f)(union) - sparse(key_o, jac_o)(union))
                                                .max(initial=0.0)),
                      **_one_side(edges_f, edges_o, sparse(key_f, jac_f), sparse(key_o, jac_o), eps)},
        "total": {"max_jaccard_diff": float(np.abs(dense(union) - sparse(key_o, jac_o)(union)).max(initial=0.0)),
                  **_one_side(edges_b, edges_o, dense, sparse(key_o, jac_o), eps)},
        "edges_baseline": int(len(edges_b)), "asymmetric_baseline": asym,
        "dbscan_on_baseline_edges_is_sklearn": bool(np.array_equal(relabel, labels_b)),
    }


# --- the three workers ----------------------------------------------------------------------------------------


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(variant: str, feats: str, out: str, threads: int) -> None:
    import faiss
    import sklearn.cluster  # noqa: F401  (imports outside the timed region, for every variant)
    import torch

    from trainer.cluster.pipeline import jaccard_dbscan
    from trainer.cluster.reference import reference_jaccard_dbscan

    # ClusterContrast's torch calls are per-row 1 x d products: threads gain nothing there, and on a busy
    # host every one of those ~N calls waits on an OpenMP barrier (measured 10-25x slower on 2 threads
    # here); one torch thread is its best case. Its k-NN (faiss) keeps every thread.
    torch.set_num_threads(1 if variant == "clustercontrast" else threads)
    faiss.omp_set_num_threads(threads)
    x = np.load(feats)
    xt = torch.from_numpy(x)

    def call(rows: int | None = None) -> tuple[np.ndarray, Any]:
        if variant == "ours":
            return jaccard_dbscan(x[:rows], K1, K2, EPS, MIN_SAMPLES, stats=stats), None
        if variant == "exact":
            return reference_jaccard_dbscan(x[:rows], K1, K2, EPS, MIN_SAMPLES), None
        jac, rank_b = clustercontrast_jaccard(xt[:rows], K1, K2)
        return clustercontrast_labels(jac, EPS, MIN_SAMPLES), (jac, rank_b)

    stats: dict = {}
    extra: dict = {}
    call(min(256, len(x)))  # warm-up, untimed and alike for every variant: first-call costs of the kernels
    base = _rss()  # interpreter + imports + the feature matrix
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    t0 = time.perf_counter()
    labels, kept = call()
    seconds = time.perf_counter() - t0
    peak = _rss()
    # pages read back from disk: memory pressure from other processes, the time then measures the disk
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults0
    if variant == "clustercontrast":
        extra = compare(x, kept[0], kept[1], labels, EPS)
    np.save(out + ".npy", labels)
    with open(out + ".json", "w") as f:
        json.dump({"seconds": seconds, "peak_bytes": peak, "base_bytes": base, "stats": stats.get("times", {}),
                   "compare": extra, "major_faults": faults}, f)


def run(variant: str, n: int, args: argparse.Namespace, tmp: str) -> tuple[dict, np.ndarray]:
    feats = os.path.join(tmp, f"x-{n}.npy")
    if not os.path.exists(feats):
        np.save(feats, reid_like(n, args.d, args.seed))
    out = os.path.join(tmp, f"{variant}-{n}")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--feats", feats, "--out", out,
           "--threads", str(args.threads)]
    subprocess.run(cmd, check=True)
    with open(out + ".json") as f:
        rec = json.load(f)
    return rec, np.load(out + ".npy")


def thrash_warning(*records: dict) -> str:
    """A warning when a timed call read many pages back from disk (its time is then not the code's)."""
    hit = [str(r.get("major_faults")) for r in records if (r.get("major_faults") or 0) > 1000]
    if not hit:
        return ""
    return f" -- WARNING: {', '.join(hit)} pages read back under memory pressure; rerun when memory is free"


def explain(c: dict) -> str:
    """One line: where ClusterContrast and ours differ, by cause."""
    def part(d: dict) -> str:
        return (f"max |ΔJ| {d['max_jaccard_diff']:.1e}, eps-edges on one side only {d['edges_one_side']}"
                + (f" (farthest from eps {d['max_ulps_from_eps']:.0f} float32 ulps; J {d['jaccard_pairs']})"
                   if d["edges_one_side"] else ""))

    return (f"k-NN lists differ in {c['knn_rows_differ']} rows (as sets {c['knn_sets_differ']}; swapped neighbours' "
            f"exact distances differ by <= {c['knn_max_distance_gap']:.1e}) | by k-NN order: {part(c['knn_order'])} "
            f"| by arithmetic: {part(c['arithmetic'])} (same support: {c['arithmetic']['same_support']}) | "
            f"total: {part(c['total'])} of {c['edges_baseline']:,} | our DBSCAN on CC's edges = sklearn's labels: "
            f"{c['dbscan_on_baseline_edges_is_sklearn']} | asymmetric J in CC: {c['asymmetric_baseline']}")


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli("bench/cluster.py", lambda: _main(argv))


def _main(argv: list[str] | None) -> None:
    p = Parser(prog="bench/cluster.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    p.add_argument("--sizes", type=positive_int, nargs="*", help="sizes run against ClusterContrast")
    p.add_argument("--ours-only", type=positive_int, nargs="*", help="sizes run with ours only")
    p.add_argument("--exact-max", type=int, default=32621,
                   help="largest size also checked against the dense exact restatement (0: never)")
    p.add_argument("--d", type=positive_int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--worker", choices=["ours", "clustercontrast", "exact"], help=argparse.SUPPRESS)
    p.add_argument("--feats", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.feats, args.out, args.threads)
        return
    from sklearn.metrics import adjusted_rand_score

    both = args.sizes if args.sizes is not None else ([2000] if args.quick else [8000, 32621])
    alone = args.ours_only if args.ours_only is not None else ([] if args.quick else [200000])
    print(f"d={args.d}, k1={K1}, k2={K2}, eps={EPS}, min_samples={MIN_SAMPLES}, threads={args.threads}")
    mb = 2.0**20
    print("peak = ru_maxrss of the process; work = peak minus the RSS before the call (imports + features)")
    print("| N | ClusterContrast s | ours s | speed-up | CC peak / work MB | ours peak / work MB | peak ratio "
          "| work ratio | vs ClusterContrast | vs exact | clusters | outliers |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in both:
            ours, lo = run("ours", n, args, tmp)
            cc, lc = run("clustercontrast", n, args, tmp)
            exact = "-"
            if n <= args.exact_max:
                _, le = run("exact", n, args, tmp)
                exact = "identical" if np.array_equal(lo, le) else f"{int((lo != le).sum())} labels differ"
            c = cc["compare"]
            moved = points_in_other_clusters(lo, lc)
            vs_cc = ("identical" if np.array_equal(lo, lc) else
                     f"{moved} points in another cluster (ARI {adjusted_rand_score(lc, lo):.6f})")
            ow, cw = ours["peak_bytes"] - ours["base_bytes"], cc["peak_bytes"] - cc["base_bytes"]
            print(f"| {n:,} | {cc['seconds']:.2f} | {ours['seconds']:.2f} | {cc['seconds'] / ours['seconds']:.1f}× "
                  f"| {cc['peak_bytes'] / mb:.0f} / {cw / mb:.0f} | {ours['peak_bytes'] / mb:.0f} / {ow / mb:.0f} "
                  f"| {cc['peak_bytes'] / ours['peak_bytes']:.1f}× | {cw / max(ow, 1):.1f}× | {vs_cc} | {exact} "
                  f"| {lo.max() + 1} | {int((lo == -1).sum())} |", flush=True)
            notes.append(f"N={n:,}: ours stages (s) {json.dumps({k: round(v, 2) for k, v in ours['stats'].items()})}")
            notes.append(f"N={n:,}: {explain(c)}")
            notes.append(f"N={n:,}: major page faults: ClusterContrast {cc.get('major_faults')}, ours "
                         f"{ours.get('major_faults')}" + thrash_warning(cc, ours))
        for n in alone:
            ours, lo = run("ours", n, args, tmp)
            ow = ours["peak_bytes"] - ours["base_bytes"]
            print(f"| {n:,} | - | {ours['seconds']:.2f} | - | - | {ours['peak_bytes'] / mb:.0f} / {ow / mb:.0f} "
                  f"| - | - | - | - | {lo.max() + 1} | {int((lo == -1).sum())} |", flush=True)
            notes.append(f"N={n:,}: ours stages (s) {json.dumps({k: round(v, 2) for k, v in ours['stats'].items()})}"
                         f"; major page faults {ours.get('major_faults')}" + thrash_warning(ours))
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    sys.exit(main())
