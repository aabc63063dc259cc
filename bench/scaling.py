"""Benchmark: what each rank does and holds at W = 1, 2, 4 (gloo ranks on this machine).

Three measurements, each per rank and against W = 1:

- **evaluation**: CPU seconds (one thread per rank, so W ranks on fewer cores still measure each
  rank's own work) to rank this rank's share of the queries against the whole gallery
  (``trainer.evaluation.rank.rank_queries`` on ``query_rows``; the gather of per-query results is
  excluded: it is 24 bytes per query). Goal: ≈ 1/W.
- **clustering**: the Python-heap peak (tracemalloc: numpy and scipy arrays) of the distributed
  ``jaccard_dbscan`` on each rank, and its seconds. The goal of issue 11 is ≤ 40 % of W = 1 at W = 4
  for N = 32,621; today the k-NN lists, V/V' rows and edges are all-gathered (same labels as one
  process), so the figure shows how far that is.
- **images**: the proportional set size (Pss) of the mapped shard files in W processes that opened
  the same pack with ``data.store=memory`` (``trainer.data.store.memory_use``; Linux): the node
  holds one copy when the W Pss values add up to one pack.

    python bench/scaling.py --quick           # small sizes, seconds
    python bench/scaling.py                   # queries 11,659 x gallery 82,161 (MSMT17), N = 32,621
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.cli import Parser, int_list, positive_int, run_cli

PROG = "bench/scaling.py"


def spawn(fn: Any, world: int, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; each rank's return value."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, _free_port(), out, fn, args), nprocs=world, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, out: str, fn: Any, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from trainer import dist

    dist.init(backend="gloo")
    try:
        torch.save(fn(rank, world, *args), os.path.join(out, f"{rank}.pt"))
    except BaseException:
        dist.shutdown()
        raise
    dist.shutdown(sync=True)


# -- evaluation ---------------------------------------------------------------------------------

def _eval_rank(rank: int, world: int, q: int, g: int, d: int, repeats: int) -> dict[str, float]:
    from trainer.evaluation.rank import query_rows, rank_queries

    rng = np.random.default_rng(0)
    ids = rng.integers(0, max(2, g // 20), g)
    gf = torch.from_numpy(rng.standard_normal((g, d)).astype(np.float32))
    qp = rng.integers(0, max(2, g // 20), q)
    qf = torch.from_numpy(rng.standard_normal((q, d)).astype(np.float32))
    gp, gc, qc = torch.from_numpy(ids), torch.from_numpy(rng.integers(0, 6, g)), torch.from_numpy(rng.integers(0, 6, q))
    qpt = torch.from_numpy(qp)
    a, b = query_rows(q, rank, world)
    times = []
    for _ in range(repeats):  # CPU seconds of this rank (1 thread): its work, even when W ranks share fewer cores
        t = time.process_time()
        rank_queries(qf[a:b], gf, qpt[a:b], gp, qc[a:b], gc)
        times.append(time.process_time() - t)
    return {"rows": b - a, "seconds": min(times)}


# -- clustering ---------------------------------------------------------------------------------

def _cluster_rank(rank: int, world: int, n: int, d: int) -> dict[str, float]:
    from trainer.cluster.pipeline import jaccard_dbscan

    rng = np.random.default_rng(1)
    ids = n // 30
    centers = rng.standard_normal((ids, d)).astype(np.float32)
    x = centers[rng.integers(0, ids, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tracemalloc.start()
    t = time.perf_counter()
    labels = jaccard_dbscan(x, k1=30, k2=6, eps=0.6, min_samples=4, distributed=True)
    seconds = time.perf_counter() - t  # wall: the ranks exchange rows, so CPU time alone would hide waits
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"peak_mb": peak / 2**20, "seconds": seconds, "clusters": int(labels.max()) + 1}


# -- images -------------------------------------------------------------------------------------

def _image_rank(rank: int, world: int, pack: str) -> dict[str, float]:
    from trainer import dist
    from trainer.data.store import memory_use, open_split

    store = open_split("memory", [pack], "train", relabel=True)
    for i in range(len(store)):  # touch every image, as an epoch does
        store.get_bytes(i)
    dist.barrier()  # every rank maps the pack before any measures
    use = memory_use(store)
    dist.barrier()
    return {"maps_rss_mb": use.shards_rss / 2**20, "maps_pss_mb": use.shards_pss / 2**20,
            "private_mb": use.anon / 2**20}


def _make_pack(root: Path, n: int) -> Path:
    from bench.data import synth_folder
    from shards.pack import pack

    synth_folder(root / "raw", n, ids=max(2, n // 20))
    pack("market1501", root / "raw", root / "pack")
    return root / "pack"


# -- driver -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--worlds", type=int_list, default=[1, 2, 4], help="world sizes, e.g. 1,2,4")
    p.add_argument("--queries", type=positive_int, default=11_659)
    p.add_argument("--gallery", type=positive_int, default=82_161)
    p.add_argument("--dim", type=positive_int, default=768)
    p.add_argument("--cluster-n", type=positive_int, default=32_621)
    p.add_argument("--images", type=positive_int, default=3_000)
    p.add_argument("--repeats", type=positive_int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.gallery, args.dim, args.cluster_n, args.images = 600, 3_000, 128, 2_000, 400
    worlds = list(args.worlds)
    print(f"# {PROG}: W = {worlds}, 1 torch thread per rank, gloo; {os.cpu_count()} CPUs here")

    print(f"\n## evaluation: {args.queries} queries x {args.gallery} gallery x {args.dim}, this rank's share")
    base = None
    for w in worlds:
        res = spawn(_eval_rank, w, args.queries, args.gallery, args.dim, args.repeats)
        worst = max(r["seconds"] for r in res)
        base = base or worst
        print(f"W={w}: rows per rank {[r['rows'] for r in res]}, busiest rank {worst:.3f} CPU s, "
              f"{worst / base:.3f} of W=1 (ideal {1 / w:.3f})")

    print(f"\n## clustering: N = {args.cluster_n}, distributed jaccard_dbscan, Python-heap peak per rank")
    base = None
    for w in worlds:
        res = spawn(_cluster_rank, w, args.cluster_n, 64)
        peak = max(r["peak_mb"] for r in res)
        base = base or peak
        print(f"W={w}: peak {peak:.1f} MB per rank ({peak / base:.2f} of W=1; goal at W=4: <= 0.40), "
              f"{statistics.mean(r['seconds'] for r in res):.2f} s, {res[0]['clusters']} clusters")

    print(f"\n## images: {args.images} synthetic JPEGs packed, data.store=memory in W processes")
    with tempfile.TemporaryDirectory() as tmp:
        pack = _make_pack(Path(tmp), args.images)
        size = sum(f.stat().st_size for f in pack.glob("train-*.tar")) / 2**20
        for w in worlds:
            res = spawn(_image_rank, w, str(pack))
            pss = sum(r["maps_pss_mb"] for r in res)
            print(f"W={w}: shard maps Pss summed over ranks {pss:.1f} MB for a {size:.1f} MB train split "
                  f"({pss / size:.2f} copies per node); private per rank "
                  f"{max(r['private_mb'] for r in res):.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
