"""Benchmark: what each rank does and holds at W = 1, 2, 4 (gloo ranks on this machine).

Three measurements, each per rank and against W = 1:

- **evaluation**: CPU seconds (one thread per rank, so W ranks on fewer cores still measure each
  rank's own work) to rank this rank's share of the queries against the whole gallery
  (``trainer.evaluation.rank.rank_queries`` on ``query_rows``; the gather of per-query results is
  excluded: it is 24 bytes per query). Goal: ≈ 1/W.
- **clustering**: the working memory of the distributed ``jaccard_dbscan`` on each rank (peak RSS
  during the call minus the RSS before it, everything counted: k-NN blocks, exchanged rows,
  scipy/numpy arrays; ``bench/million.py``'s measurement, whose rank function this runs), its
  seconds, and whether every rank's labels equal W = 1's. Every stage is sharded by rows. The goal of
  issue 11 is ≤ 40 % of W = 1 at W = 4 for N = 32,621 (d = 384, TMGF's clustering parameters).
- **images**: the proportional set size (Pss) of the mapped shard files in W processes that opened
  the same pack with ``data.store=memory`` (``trainer.data.store.memory_use``; Linux): the node
  holds one copy when the W Pss values add up to one pack.

    python bench/scaling.py --quick           # small sizes, seconds
    python bench/scaling.py                   # queries 11,659 x gallery 82,161 (MSMT17), N = 32,621
"""

from __future__ import annotations

import os
import tempfile
import time
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


# -- clustering: bench/million.py's rank function (working memory = peak RSS minus RSS before the call)

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
    p.add_argument("--cluster-dim", type=positive_int, default=384)
    p.add_argument("--knn-precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the clustering's exact k-NN candidate pass (jaccard_dbscan knn_precision)")
    p.add_argument("--images", type=positive_int, default=3_000)
    p.add_argument("--repeats", type=positive_int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.gallery, args.dim, args.cluster_n, args.images = 600, 3_000, 128, 4_000, 400
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

    print(f"\n## clustering: N = {args.cluster_n}, d = {args.cluster_dim}, distributed jaccard_dbscan (exact k-NN, "
          f"precision {args.knn_precision}), working memory per rank = peak RSS minus RSS before the call")
    from bench.million import make_features, run

    with tempfile.TemporaryDirectory() as tmp:
        feats = os.path.join(tmp, "x.npy")
        make_features(feats, args.cluster_n, args.cluster_dim, 0)
        first: dict[str, Any] | None = None
        for w in worlds:
            r = run(feats, w, {"knn_precision": args.knn_precision}, 1)
            first = first or r
            ratio = r["work"] / max(first["work"], 1)
            equal = np.array_equal(r["labels"], first["labels"]) and r["ranks_agree"]
            same = "identical to" if equal else "DIFFER from"
            print(f"W={w}: working memory {r['work'] / 2**20:.1f} MiB per rank ({ratio:.2f} of W=1; goal at W=4: "
                  f"<= 0.40), {r['seconds']:.2f} s (k-NN {r['knn_seconds']:.2f} s), sent {r['sent_mib']:.1f} MiB "
                  f"per rank, {int(r['labels'].max()) + 1} clusters, labels {same} W=1")

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
