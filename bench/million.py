"""Clustering at a million images: ``jaccard_dbscan`` sharded over W local gloo ranks, exact and IVF k-NN.

    python bench/million.py --quick     # N = 4,000 (exact and IVF) and 12,000 (IVF): a smoke run
    python bench/million.py             # N = 200,000 (exact and IVF) and 1,000,000 (IVF), W = 1 and 4

Features: ``bench.cluster.reid_like`` (synthetic ReID-like unit vectors, d = 384, ~N/30 identities
seen by 2-5 of 15 cameras), snapped once (``trainer.cluster.pipeline.snapped``) and saved; every rank
maps the file and touches it before the call, so the features count before the call, as the
trainer's extracted features would. Clustering: k1 = 20, k2 = 6, eps = 0.5, min_samples = 4 (TMGF),
``distributed=True`` (at W = 1 the same code runs without a process group).

For each (N, index, W), per rank: wall seconds of the call, working memory = peak RSS during the
call minus the RSS just before it (Linux: the peak is reset through ``/proc/self/clear_refs``
before the call, so the earlier history of the process does not hide it; elsewhere ``ru_maxrss``
as ``bench/cluster.py`` measures it). The table shows the largest rank's. With IVF: recall@20 of
the k-NN lists against exact search on 1,000 sampled queries (``jaccard_dbscan``'s own measure). Every
rank's labels are compared with rank 0's and with W = 1's; at the sizes run with both indexes, the
IVF labels against exact search's: adjusted Rand index and whether the partitions are the same.
Exact search at N = 1,000,000 is a GPU job; its CPU time is projected from the largest exact run
(k-NN time × (N / N_exact)², the rest × N / N_exact). Threads per rank: ``--threads`` (default:
the CPUs divided by W). Then the per-rank bytes of TMGF's proxy memory, replicated vs sharded over the
largest W, at 10^4, 10^5 and 10^6 proxies (``bench/proxy_memory.py``'s measurement). At the largest
exact size, the exact k-NN of all rows from bf16 candidates and from fp32 ones in one process: whether
the lists are identical, and the speed-up. Then the whole run's wall time. The last two lines
are ``clustering N=1,000,000 W=4: T s, working memory per rank X GiB, recall@20 R`` and
``proxy memory per rank, sharded W=4 vs replicated: F×``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from bench.cli import Parser, int_list, positive_int, run_cli
from bench.cluster import EPS, K1, K2, MIN_SAMPLES, points_in_other_clusters, reid_like
from bench.memory import mark, working_memory
from bench.proxy_memory import measure as proxy_measure
from bench.proxy_memory import report as proxy_report

PROG = "bench/million.py"
GIB = 2.0**30


# -- one clustering per rank ----------------------------------------------------------------------

def make_features(path: str, n: int, d: int, seed: int) -> None:
    """Snapped ReID-like features saved as ``.npy`` (the generator of ``bench/cluster.py``)."""
    from trainer.cluster.pipeline import snapped

    np.save(path, snapped(reid_like(n, d, seed)))


def cluster_rank(rank: int, world: int, feats: str, kw: dict[str, Any], threads: int) -> dict[str, Any]:
    """One rank of a clustering run (``bench.scaling.spawn``): its seconds, working memory and labels."""
    import faiss
    import torch

    from trainer.cluster.knn import exact_knn
    from trainer.cluster.pipeline import jaccard_dbscan

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    x = np.load(feats, mmap_mode="c")  # the page cache holds one copy for all ranks (copy-on-write: writable)
    for a in range(0, len(x), 1 << 16):  # touch it: the features count before the call
        np.asarray(x[a : a + (1 << 16)]).max()
    warm = min(len(x), 4096)  # first-call costs of the kernels and collectives, untimed
    jaccard_dbscan(np.ascontiguousarray(x[:warm]), K1, K2, EPS, MIN_SAMPLES, distributed=True,
                   **(kw | {"recall_sample": 64}))
    # a search this small takes the fp32 pass; the bf16 GEMM's first-call state (kernels, caches) would
    # otherwise count as working memory of a large search that takes the bf16 pass
    exact_knn(np.ascontiguousarray(x[:warm]), K1, rows=(0, min(warm, 256)), precision="bf16")
    stats: dict[str, Any] = {}
    m = mark()  # bench/memory.py: this call's peak only, freed heap handed back first
    t = time.perf_counter()
    labels = jaccard_dbscan(x, K1, K2, EPS, MIN_SAMPLES, distributed=True, stats=stats, **kw)
    seconds = time.perf_counter() - t
    work = working_memory(m)
    return {"seconds": seconds, "work": work, "recall": stats.get("recall"), "times": stats["times"],
            "bytes_sent": stats["bytes_sent"], "digest": hashlib.sha256(labels.tobytes()).hexdigest(),
            "labels": labels if rank == 0 else None}


def bf16_vs_fp32(feats: str) -> str:
    """Exact k-NN of all rows (one process, all threads) from bf16 candidates and from fp32 ones: whether
    the lists are identical, and the two wall times. Run where the CPU multiplies bf16 natively
    (``knn.cpu_has_fast_bf16``), where ``precision="auto"`` picks the bf16 pass."""
    from trainer.cluster.knn import cpu_has_fast_bf16, exact_knn

    x = np.load(feats)
    n = len(x)
    t = time.perf_counter()
    fp32 = exact_knn(x, K1, precision="fp32")
    t_fp32 = time.perf_counter() - t
    stats: dict[str, Any] = {}
    t = time.perf_counter()
    bf16 = exact_knn(x, K1, precision="bf16", stats=stats)
    t_bf16 = time.perf_counter() - t
    same = "identical" if np.array_equal(fp32, bf16) else f"DIFFERENT in {int((fp32 != bf16).any(1).sum()):,} rows"
    native = "native bf16" if cpu_has_fast_bf16() else "no native bf16 on this CPU: emulated"
    return (f"exact k-NN N={n:,} W=1 ({native}): bf16-candidate lists {same} to fp32, {t_bf16:.1f} s vs "
            f"{t_fp32:.1f} s fp32: {t_fp32 / t_bf16:.2f}x ({stats.get('bf16_fallback_rows', 0):,} rows searched "
            f"again in fp32)")


def run(feats: str, world: int, kw: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """Cluster ``feats`` on ``world`` local gloo ranks; the largest rank's figures and rank 0's labels."""
    from bench.scaling import spawn

    per_rank = threads or max(1, (os.cpu_count() or 1) // world)
    res = spawn(cluster_rank, world, feats, kw, per_rank)
    times = res[0]["times"]
    return {"seconds": max(r["seconds"] for r in res), "work": max(r["work"] for r in res),
            "recall": res[0]["recall"], "knn_seconds": max(r["times"].get("knn", 0.0) for r in res),
            "times": times, "labels": res[0]["labels"], "threads": per_rank,
            "ranks_agree": len({r["digest"] for r in res}) == 1,
            "sent_mib": max(r["bytes_sent"] for r in res) / 2**20}


# -- driver ---------------------------------------------------------------------------------------

def _sizes(text: str) -> list[int]:
    """Comma-separated sizes, or ``none`` (argparse type)."""
    return [] if text.strip().lower() == "none" else int_list(text)


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from sklearn.metrics import adjusted_rand_score

    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--exact-sizes", type=_sizes, help="sizes clustered with exact and IVF k-NN ('none': skip)")
    p.add_argument("--ivf-sizes", type=int_list, help="sizes clustered with IVF k-NN only")
    p.add_argument("--worlds", type=int_list, default=[1, 4], help="world sizes, e.g. 1,4")
    p.add_argument("--nprobe", type=positive_int, default=96,
                   help="IVF lists probed per query (96: recall@20 >= 0.99 at N = 10^6, docs/knn.md)")
    p.add_argument("--d", type=positive_int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="threads per rank (default: CPUs / W)")
    p.add_argument("--proxies", type=int_list, help="proxy counts of the proxy-memory rows (default 10^4,10^5,10^6)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    exact_sizes = args.exact_sizes if args.exact_sizes is not None else ([4000] if args.quick else [200_000])
    ivf_sizes = args.ivf_sizes or ([12_000] if args.quick else [1_000_000])
    worlds = list(args.worlds)
    args.proxies = args.proxies or ([1000, 10_000] if args.quick else [10_000, 100_000, 1_000_000])
    print(f"# {PROG}: d={args.d}, k1={K1}, k2={K2}, eps={EPS}, min_samples={MIN_SAMPLES}, nprobe={args.nprobe}, "
          f"W={worlds}, {os.cpu_count()} CPUs, gloo")
    print("| N | k-NN | W | threads/rank | seconds | k-NN s | working memory per rank | vs W=1 | recall@20 "
          "| ranks agree, = W=1 | vs exact: ARI, same partition | clusters | sent per rank |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    summary = ""
    projection = ""
    bf16_line = ""
    exact_ref: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(n, "flat") for n in exact_sizes] + [(n, "ivf") for n in sorted(set(exact_sizes) | set(ivf_sizes))]
        for n in sorted({n for n, _ in jobs}):
            feats = os.path.join(tmp, f"x-{n}.npy")
            make_features(feats, n, args.d, args.seed)
            if n == max(exact_sizes, default=0):
                bf16_line = bf16_vs_fp32(feats)
            for index in ("flat", "ivf"):
                if (n, index) not in jobs:
                    continue
                kw: dict[str, Any] = {"knn_index": index, "nprobe": args.nprobe}
                base: dict[str, Any] | None = None
                for w in worlds:
                    r = run(feats, w, kw, args.threads)
                    base = base or r
                    lab = r["labels"]
                    same_w1 = "yes" if np.array_equal(lab, base["labels"]) else "NO"
                    vs_exact = "-"
                    if index == "flat" and w == worlds[0]:
                        exact_ref[n] = r
                    elif index == "ivf" and n in exact_ref:
                        ref = exact_ref[n]["labels"]
                        moved = points_in_other_clusters(ref, lab)
                        vs_exact = (f"{adjusted_rand_score(ref, lab):.6f}, "
                                    + ("yes" if moved == 0 else f"no ({moved:,} points elsewhere)"))
                    recall = "-" if r["recall"] is None else f"{r['recall']:.4f}"
                    print(f"| {n:,} | {index} | {w} | {r['threads']} | {r['seconds']:.1f} | {r['knn_seconds']:.1f} "
                          f"| {r['work'] / GIB:.3f} GiB | {r['work'] / max(base['work'], 1):.2f} | {recall} "
                          f"| {'yes' if r['ranks_agree'] else 'NO'}, {same_w1} | {vs_exact} | {int(lab.max()) + 1:,} "
                          f"| {r['sent_mib']:.0f} MiB |", flush=True)
                    if index == "ivf" and n == max(ivf_sizes) and w == max(worlds):
                        summary = (f"clustering N={n:,} W={w}: {r['seconds']:.0f} s, working memory per rank "
                                   f"{r['work'] / GIB:.2f} GiB, recall@20 {recall}")
                    if index == "flat" and w == worlds[0] and n == max(exact_sizes, default=0):
                        rest = r["seconds"] - r["knn_seconds"]
                        for big in ivf_sizes:
                            if big > n:
                                f = big / n
                                projection = (f"exact k-NN at N={big:,}, W={w} (not run, a GPU job), projected from "
                                              f"N={n:,}: k-NN {r['knn_seconds'] * f * f:,.0f} s + the rest "
                                              f"{rest * f:,.0f} s")
            os.remove(feats)
    if projection:
        print(projection)
    if bf16_line:
        print(bf16_line)
    # the proxy memory at 10^4..10^6 proxies (bench/proxy_memory.py), sharded over the largest W
    world = max(worlds)
    table, proxy_line = proxy_report(proxy_measure(list(args.proxies), world), world, 6, 384, 1.0)
    print("\n".join(table))
    print(f"{PROG} total: {time.perf_counter() - start:.0f} s")
    print(summary)
    print(proxy_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
