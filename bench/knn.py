"""k-NN search of the clustering step: fp32 vs bf16-candidate exact search, and the IVF index's time and recall.

    python bench/knn.py --n 60000 --nprobe 32,64,128 --scan lists,faiss   # IVF: list-major scan vs faiss's
    python bench/knn.py --flat both --skip-ivf                            # N = 200,000: fp32 vs bf16 exact
    python bench/knn.py --n 1000000 --estimate --nprobe 64,128,256        # IVF recall and scan work, no scan
    python bench/knn.py --n 20000                                         # a smoke run

On the same snapped synthetic ReID-like features (``bench.cluster.reid_like``, the one generator):

* **flat** (``--flat``): ``exact_knn(precision="fp32")``, the float32 candidate pass + exact resolution,
  and/or ``precision="bf16"``: bf16 GEMM candidates re-scored exactly, the rows its bound cannot settle
  searched again in fp32. With both, the lists must be equal (asserted) and the speed-up is printed
  beside the number of fallback rows;
* **IVF**: ``search_knn(index="ivf")`` at each ``--nprobe`` (``nlist`` default ``knn.default_nlist``: N // 20), with
  each ``--scan`` of the inverted lists: ``faiss`` (``IndexIVFFlat.search_preassigned``, query-major),
  ``lists`` (the list-major float32 GEMM scan of ``trainer.cluster.knn._IVFShard``), ``auto`` (what
  ``search_knn`` picks here: faiss-gpu where faiss sees a GPU, else lists). The scans' lists must be
  equal (asserted: each is the exact top-k of the points in the probed lists). ``--rows M`` lets every
  scan, ``--faiss-rows M`` faiss only, search only the first M query rows (the k-means and the homes of
  all N points are still computed; the scan's time is then also printed scaled by N/M: a scan's time is
  linear in the queries, and recall is printed only for full runs). Recall@k is against the exact lists
  on every row when a flat search ran, and ``knn_recall``'s estimate from ``--sample`` rows (what the
  pipeline logs);
* **estimate** (``--estimate``, instead of the searches): the IVF quantizer as ``search_knn`` trains it,
  every point's home list (its nearest centroid) and, for ``--sample`` seeded rows, their exact top-k and
  probes. A row's IVF list is the exact top-k of the points in its probed lists, so it holds exactly
  those of its true neighbours whose home is probed: the recall follows without a scan (and equals
  ``knn_recall``'s on the same rows and seed). Printed beside it, the scan's work: the mean number of
  points per probed list ``m``, so that a full scan costs ``N · nprobe · m · d`` multiply-adds.

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
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.cli import Parser, int_list, positive_int, run_cli

SCANS = ("auto", "faiss", "lists")


def _scan_list(text: str) -> list[str]:
    """Comma-separated IVF scans (argparse type)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in SCANS]
    if not parts or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated scans among {', '.join(SCANS)}")
    return parts


def _main(argv: list[str] | None) -> None:
    p = Parser(prog="bench/knn.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, default=200000)
    p.add_argument("--d", type=positive_int, default=384)
    p.add_argument("--k", type=positive_int, default=20)
    p.add_argument("--nprobe", type=int_list, default=[32, 64, 128], help="IVF lists probed, comma-separated")
    p.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default: N // 20, knn.default_nlist)")
    p.add_argument("--scan", type=_scan_list, default=["auto"], help=f"IVF scans, comma-separated: {', '.join(SCANS)}")
    p.add_argument("--rows", type=positive_int, default=None, help="every scan searches only this many query rows")
    p.add_argument("--faiss-rows", type=positive_int, default=None,
                   help="the faiss scan searches only this many query rows (time scaled to N)")
    p.add_argument("--flat", choices=("auto", "fp32", "bf16", "both", "none"), default="auto",
                   help="exact search: exact_knn's default precision, fp32, bf16, both (compared) or none")
    p.add_argument("--sample", type=positive_int, default=1000, help="rows of knn_recall's estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--skip-ivf", action="store_true", help="no IVF search (flat only)")
    p.add_argument("--estimate", action="store_true", help="IVF recall and scan work from --sample rows, no search")
    args = p.parse_args(argv)

    import faiss
    import torch

    from bench.cluster import reid_like
    from trainer.cluster import knn
    from trainer.cluster.knn import cpu_has_fast_bf16, exact_knn, knn_recall, snap_features

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    x = snap_features(reid_like(args.n, d=args.d, seed=args.seed))
    n, k = args.n, args.k
    print(f"N={n:,}, d={args.d}, k={k}, threads={args.threads}, torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 (avx512_bf16/AMX): {cpu_has_fast_bf16()}",
          flush=True)

    def timed(fn: Callable[..., Any], *a: Any, **kw: Any) -> tuple[Any, float, float]:
        """``(fn(*a, **kw), wall s, process CPU s)``: CPU time is less sensitive than wall time to other jobs."""
        t, c = time.perf_counter(), time.process_time()
        out = fn(*a, **kw)
        return out, time.perf_counter() - t, time.process_time() - c

    if args.estimate:
        _estimate(x, k, args.nprobe, args.nlist, args.sample, args.seed)
        return
    exact = None
    t_exact = {}
    flat = {"both": ["fp32", "bf16"], "none": []}.get(args.flat, [args.flat])
    for prec in flat:
        st: dict = {}
        lists, wall, cpu = timed(exact_knn, x, k, precision=prec, stats=st)
        t_exact[st["precision"]] = (wall, cpu)
        extra = (f"; {st['bf16_candidates']} candidates per row, {st['bf16_fallback_rows']} of {n:,} rows searched "
                 "again in fp32") if st["precision"] == "bf16" else ""
        print(f"{prec} exact search ({st['precision']}): {wall:.1f} s (CPU {cpu:.1f} s{extra})", flush=True)
        if exact is not None:
            differ = int((lists != exact).any(1).sum())
            assert differ == 0, f"{prec} lists differ from fp32 in {differ} rows"
        exact = lists
    if len(t_exact) == 2:
        (w32, c32), (w16, c16) = t_exact["fp32"], t_exact["bf16"]
        print(f"bf16-candidate exact search vs fp32: {w32 / w16:.2f}× (lists identical; CPU time {c32 / c16:.2f}×)")
    if args.skip_ivf:
        return
    for nprobe in args.nprobe:
        ref = None
        for scan in args.scan:
            qrows = args.faiss_rows if scan == "faiss" and args.faiss_rows else args.rows
            rows = (0, min(n, qrows or n))
            st = {}
            lists, wall, cpu = timed(knn._search_ivf, x, k, rows, nprobe, args.nlist, 8, 2048, torch.device("cpu"),
                                     False, 16384, st, scan)
            ti = st["ivf_times"]
            times = {name: round(v, 1) for name, v in ti.items()}
            scan_s = ti["search"] + ti["merge"] + ti["fallback"]  # the part that depends on the scan
            line = (f"IVF nlist={st['nlist']} nprobe={st['nprobe']} scan={scan} ({st['ivf_scan']}, "
                    f"{st['ivf_candidates']} candidates): {wall:.1f} s (CPU {cpu:.1f} s) {times}; rows re-scanned "
                    f"over their probed lists {st['ivf_rescanned_rows']}, searched exhaustively "
                    f"{st['ivf_exhausted_rows']}")
            if rows[1] < n:
                line += (f"; on {rows[1]:,} query rows: search + merge + fallback {scan_s:.1f} s, "
                         f"× N/{rows[1]:,} = {scan_s * n / rows[1]:.1f} s")
            print(line, flush=True)
            if ref is not None:
                m = min(len(ref), len(lists))
                assert np.array_equal(lists[:m], ref[:m]), f"scan {scan}: lists differ from scan {args.scan[0]}"
            if ref is None or len(lists) > len(ref):
                ref = lists
        assert ref is not None
        if len(ref) < n:
            continue
        est, test, _ = timed(knn_recall, x, ref, (0, n), k, sample=args.sample, seed=args.seed)
        line = (f"IVF nprobe={nprobe} recall@{k}: {est:.4f} on {min(args.sample, n)} sampled rows "
                f"(knn_recall, {test:.1f} s)")
        if exact is not None:
            full = float((ref[:, :, None] == exact[:, None, :]).any(2).sum()) / (n * k)
            line += f", {full:.4f} on all rows"
        print(line, flush=True)


def _estimate(x: np.ndarray, k: int, nprobes: list[int], nlist: int | None, sample: int, seed: int) -> None:
    """IVF recall@k and scan work at each nprobe from a row sample, without a scan (module docstring)."""
    from trainer.cluster import knn

    n = len(x)
    nl = knn.default_nlist(n) if nlist is None else nlist
    t = time.perf_counter()
    cent = knn._snap_like(knn._train_centroids(x, nl), x)  # as _search_ivf trains and snaps it
    cn = knn.exact_norms(cent)
    t_train = time.perf_counter() - t
    home = knn._exact_vs(x, cent, cn, 1, precision="auto")[:, 0]  # as _search_ivf finds them
    size = np.bincount(home, minlength=nl)
    pick = np.sort(np.random.default_rng(seed).choice(n, min(n, sample), replace=False))  # knn_recall's rows
    norms = knn.exact_norms(x)
    truth = knn._exact_vs(x[pick], x, norms, k, qn=norms[pick])
    npb_max = min(max(nprobes), nl)
    probes = knn._exact_vs(x[pick], cent, cn, npb_max, precision="auto")
    print(f"estimate: nlist={nl}, k-means {t_train:.1f} s, homes + sample {time.perf_counter() - t - t_train:.1f} s; "
          f"list sizes: mean {n / nl:.1f}, median {np.median(size):.0f}, max {size.max()}", flush=True)
    for nprobe in nprobes:
        pr = probes[:, : min(nprobe, nl)]
        found = (home[truth][:, :, None] == pr[:, None, :]).any(2)
        found[size[pr].sum(1) < k] = True  # probed lists holding fewer than k points: exact search
        m = float(size[pr].mean())
        print(f"estimate nprobe={nprobe}: recall@{k} {found.mean():.4f} on {len(pick)} rows; {m:.0f} points per "
              f"probed list; scan work N·nprobe·m·d = {n * min(nprobe, nl) * m * x.shape[1]:.3g} multiply-adds "
              f"(exact search: N²·d/2 = {n * n * x.shape[1] / 2:.3g})", flush=True)


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli("bench/knn.py", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
