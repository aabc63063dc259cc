"""k-NN search of the clustering step: fp32 vs bf16-candidate exact search, and the IVF index's time and recall.

    python bench/knn.py               # N = 200,000, d = 384, k = 20 (the issue's figures; ~15 min on 2 cores)
    python bench/knn.py --n 20000     # a smoke run

On the same snapped synthetic ReID-like features (``bench.cluster.reid_like``, the one generator):

* **fp32 exact**: ``exact_knn(precision="fp32")``, the float32 candidate pass + exact resolution;
* **bf16 exact**: ``exact_knn(precision="bf16")``: bf16 GEMM candidates re-scored exactly, the rows its
  bound cannot settle searched again in fp32. Its lists must equal fp32's (asserted); the speed-up is
  printed beside the number of fallback rows;
* **IVF**: ``search_knn(index="ivf")`` (faiss ``IndexIVFFlat``, ``nlist`` default ``round(4 sqrt(N))``,
  ``--nprobe``), its recall@k against the exact lists on every row, and ``knn_recall``'s estimate
  from ``--sample`` rows (what the pipeline logs).

All in one process, one after the other, with ``--threads`` torch and faiss threads; time is wall clock of
the search call only, with the process's CPU seconds beside it (on a shared machine the wall-clock ratio
moves with the other jobs' load; ``--threads 1`` makes the CPU seconds a measure of the work).
Whether this CPU multiplies bf16 natively is printed (``cpu_has_fast_bf16``): on an AVX2-only CPU the
bf16 pass is emulated and slower, which is why ``precision="auto"`` picks it only where the flag is
present.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from bench.cli import Parser, positive_int, run_cli


def _main(argv: list[str] | None) -> None:
    p = Parser(prog="bench/knn.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, default=200000)
    p.add_argument("--d", type=positive_int, default=384)
    p.add_argument("--k", type=positive_int, default=20)
    p.add_argument("--nprobe", type=positive_int, default=16)
    p.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default: round(4 sqrt(N)))")
    p.add_argument("--sample", type=positive_int, default=1000, help="rows of knn_recall's estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--skip-fp32", action="store_true", help="no fp32 / bf16 exact search (IVF only)")
    p.add_argument("--skip-ivf", action="store_true", help="no IVF search (fp32 / bf16 only)")
    args = p.parse_args(argv)

    import faiss
    import torch

    from bench.cluster import reid_like
    from trainer.cluster.knn import cpu_has_fast_bf16, default_nlist, exact_knn, knn_recall, search_knn, snap_features

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    x = snap_features(reid_like(args.n, d=args.d, seed=args.seed))
    n, k = args.n, args.k
    print(f"N={n:,}, d={args.d}, k={k}, threads={args.threads}, torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 (avx512_bf16/AMX): {cpu_has_fast_bf16()}",
          flush=True)

    def timed(fn):  # type: ignore[no-untyped-def]
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        cpu.append(time.process_time() - c)
        return out, time.perf_counter() - t

    cpu: list[float] = []  # process CPU seconds of each timed call: less sensitive than wall time to other jobs

    exact = None
    if not args.skip_fp32:
        exact, t32 = timed(lambda: exact_knn(x, k, precision="fp32"))
        c32 = cpu[-1]
        print(f"fp32 exact search: {t32:.1f} s (CPU {c32:.1f} s)", flush=True)
        st: dict = {}
        low, t16 = timed(lambda: exact_knn(x, k, precision="bf16", stats=st))
        same = np.array_equal(low, exact)
        c16 = cpu[-1]
        print(f"bf16-candidate exact search: {t16:.1f} s (CPU {c16:.1f} s; {st['bf16_candidates']} candidates "
              f"per row, {st['bf16_fallback_rows']} of {n:,} rows searched again in fp32)", flush=True)
        assert same, f"bf16-candidate lists differ from fp32 in {int((low != exact).any(1).sum())} rows"
    if args.skip_ivf:
        if exact is not None:
            print(f"bf16-candidate exact search vs fp32: {t32 / t16:.2f}× (lists identical; CPU time "
                  f"{c32 / c16:.2f}×)")
        return
    st = {}
    ivf, tivf = timed(lambda: search_knn(x, k, rows=(0, n), index="ivf", nprobe=args.nprobe, nlist=args.nlist,
                                         stats=st))
    times = {name: round(v, 1) for name, v in st["ivf_times"].items()}
    print(f"IVF search (nlist={st['nlist']}{' default' if args.nlist is None else ''}, nprobe={st['nprobe']}): "
          f"{tivf:.1f} s {times}; rows re-scanned over their probed lists {st['ivf_rescanned_rows']}, "
          f"searched exhaustively {st['ivf_exhausted_rows']}", flush=True)
    est, test = timed(lambda: knn_recall(x, ivf, (0, n), k, sample=args.sample, seed=args.seed))
    line = f"IVF recall@{k}: {est:.4f} on {min(args.sample, n)} sampled rows (knn_recall, {test:.1f} s)"
    if exact is not None:
        full = float((ivf[:, :, None] == exact[:, None, :]).any(2).sum()) / (n * k)
        line += f", {full:.4f} on all rows"
    print(line)
    assert st["nlist"] == (args.nlist or default_nlist(n))
    if exact is not None:
        print(f"IVF vs fp32 exact search: {t32 / tivf:.1f}× faster")
        print(f"bf16-candidate exact search vs fp32: {t32 / t16:.2f}× (lists identical; CPU time "
              f"{c32 / c16:.2f}×)")


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli("bench/knn.py", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
