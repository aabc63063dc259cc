"""Benchmark: blocked exact ranking (``evaluate_features``) vs torchreid's evaluation as its users run it.

Baseline, :func:`torchreid_market1501`: a restatement of torchreid's ``metrics.rank.eval_market1501``
(the pure-numpy evaluator): the whole ``q × g`` float32 distance matrix, ``np.argsort`` of all of it
at once (numpy's default quicksort: the order of equal distances is unspecified), the ``q × g`` match
matrix, then per query: drop the gallery items with the query's pid and camera, CMC from the cumulated
matches, AP as the mean precision at each match. Its matrix is built by ``pairwise_distance`` with
our blocks, so both sides rank the very same float32 values; the two can disagree only where a true
match and another kept gallery item have *equal* distances (we break such ties by gallery index,
argsort by its own unspecified rule). Each query whose AP differs is checked for such a tie.

Every variant runs in a fresh subprocess on identical synthetic data (identity centroid + camera
bias + noise, with distractor identities in the gallery), and reports wall time and the increase of
peak RSS over the RSS once the features exist (Linux: the VmHWM mark is reset through
``/proc/self/clear_refs`` right before the timed part; elsewhere ``ru_maxrss``).

    python bench/eval.py --quick             # small sizes, a smoke run (seconds)
    python bench/eval.py                     # Market-1501 (3,368 × 15,913) and MSMT17 (11,659 × 82,161), d=768
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.cli import Parser, positive_int, run_cli
from bench.memory import mark, working_memory

SIZES = {  # name: (queries, gallery, identities, cameras)
    "quick": (600, 3000, 150, 6),
    "market": (3368, 15913, 750, 6),
    "msmt": (11659, 82161, 3060, 15),
}
# Per-query AP of the two sides may differ by float64 summation order (~m·1e-16 for m matches) without
# a tie; a tie that moves one of m matches by one place moves AP by >= 1/(m·g²) (5e-12 at m = 30, MSMT17's g).
AP_TOL = 1e-13
THRASH_FAULTS = 1000  # major page faults in a timed part beyond which its time is not trusted


@dataclass
class Case:
    name: str
    num_q: int
    num_g: int
    num_ids: int
    num_cams: int
    dim: int
    noise: float
    seed: int
    max_rank: int


def make_data(case: Case) -> tuple[Any, ...]:
    """Clustered features generated in chunks (no large temporaries), plus ids."""
    import torch

    g = torch.Generator().manual_seed(case.seed)
    centers = torch.randn(case.num_ids, case.dim, generator=g)
    cam_bias = 0.6 * torch.randn(case.num_cams, case.dim, generator=g)
    q_pids = torch.randint(0, case.num_ids, (case.num_q,), generator=g)
    # 20% of the gallery belongs to distractor identities that no query has.
    num_distractor_ids = max(1, case.num_ids // 4)
    g_pids = torch.randint(0, case.num_ids, (case.num_g,), generator=g)
    distract = torch.rand(case.num_g, generator=g) < 0.2
    g_pids[distract] = case.num_ids + torch.randint(0, num_distractor_ids, (int(distract.sum()),), generator=g)
    all_centers = torch.cat([centers, torch.randn(num_distractor_ids, case.dim, generator=g)])
    q_cams = torch.randint(0, case.num_cams, (case.num_q,), generator=g)
    g_cams = torch.randint(0, case.num_cams, (case.num_g,), generator=g)

    def feats(pids: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        out = torch.empty(pids.numel(), case.dim)
        for s in range(0, pids.numel(), 4096):
            e = min(s + 4096, pids.numel())
            noise = case.noise * torch.randn(e - s, case.dim, generator=g)
            out[s:e] = all_centers[pids[s:e]] + cam_bias[cams[s:e]] + noise
        return out

    return feats(q_pids, q_cams), feats(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


def torchreid_market1501(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                         g_camids: np.ndarray, max_rank: int,
                         laps: dict[str, float] | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """torchreid's ``eval_market1501`` (its numpy path), restated: ``(cmc, mAP, AP per query)``.

    The same arrays, dtypes and order of operations: one ``argsort`` of the whole matrix, the int32
    ``q × g`` match matrix, float32 CMC rows summed and divided by the number of valid queries. The
    one liberty: the precision list torchreid builds with a Python comprehension is one numpy
    division here (the same float64 values, faster), so the baseline is if anything flattered.
    The AP array (NaN for skipped queries) and ``laps`` (seconds of the argsort, the match matrix and
    the loop) are bookkeeping for the comparison, not part of torchreid.
    """
    t0 = time.perf_counter()
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1)
    t1 = time.perf_counter()
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    t2 = time.perf_counter()
    all_cmc, all_ap = [], []
    ap_per_query = np.full(num_q, np.nan)
    for q in range(num_q):
        order = indices[q]
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        raw_cmc = matches[q][keep]
        if not np.any(raw_cmc):
            continue  # no true match in another camera: the query does not count
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        cum = raw_cmc.cumsum()
        precision = cum / (np.arange(cum.size) + 1.0) * raw_cmc
        ap = precision.sum() / raw_cmc.sum()
        all_ap.append(ap)
        ap_per_query[q] = ap
    if not all_ap:
        raise ValueError("no query has a true match in the gallery")
    cmc_curve = np.asarray(all_cmc).astype(np.float32).sum(0) / len(all_ap)
    if laps is not None:
        laps.update(argsort=t1 - t0, matches=t2 - t1, loop=time.perf_counter() - t2)
    return cmc_curve, float(np.mean(all_ap)), ap_per_query


def tie_at_a_match(dist_row: np.ndarray, g_pids: np.ndarray, g_camids: np.ndarray, q_pid: int, q_camid: int) -> bool:
    """Does a true match share its exact distance with another kept gallery item of this query?"""
    same = g_pids == q_pid
    kept = ~(same & (g_camids == q_camid))
    return bool(np.isin(dist_row[same & kept], dist_row[kept & ~same]).any())


def _volunteer_for_oom() -> None:
    """On a shared machine a baseline near the RAM limit should be the process the kernel ends."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def child(variant: str, case: Case, device: str, block_size: int | None) -> dict:
    import gc

    import torch

    from trainer.evaluation.rank import evaluate, evaluate_features, pairwise_distance

    qf, gf, qp, gp, qc, gcam = make_data(case)
    # Warm-up on a slice (first-call costs of kernels and dispatch), equally for both variants.
    if variant == "ours":
        evaluate_features(qf[:32], gf[:256], qp[:32], gp[:256], qc[:32], gcam[:256], device=device)
    else:
        _volunteer_for_oom()
        pairwise_distance(qf[:32], gf[:256], device=device)
    gc.collect()
    m = mark()  # bench/memory.py: the peak of what follows only, freed heap handed back first
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    t0 = time.perf_counter()
    out: dict[str, Any] = {"variant": variant}
    if variant == "ours":
        res = evaluate_features(qf, gf, qp, gp, qc, gcam, case.max_rank, block_size=block_size, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = working_memory(m) / 2**20
        # Untimed above: the distance blocks alone (same blocks), to split matmul from ranking time.
        dist_seconds = _distance_only_seconds(qf, gf, block_size, device)
        out.update(mAP=res["mAP"], cmc=np.asarray(res["cmc"]).tolist(), mINP=res["mINP"])
    else:
        distmat = pairwise_distance(qf, gf, block_size=block_size, device=device).cpu().numpy()
        dist_seconds = time.perf_counter() - t0
        pids = [t.numpy().astype(np.int64) for t in (qp, gp, qc, gcam)]  # torchreid's ids: int64 numpy
        laps: dict[str, float] = {}
        cmc, m_ap, ap_q = torchreid_market1501(distmat, pids[0], pids[1], pids[2], pids[3], case.max_rank, laps)
        seconds = time.perf_counter() - t0
        peak = working_memory(m) / 2**20
        out.update(mAP=m_ap, cmc=cmc.tolist(), laps=laps,
                   **_compare_on_matrix(distmat, pids, ap_q, case.max_rank, evaluate))
    # Page faults that read from disk: a run near the RAM limit of a shared machine thrashes (its
    # libraries' code pages are evicted and read back), and its time then measures the disk, not the code.
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults0
    return {**out, "seconds": seconds, "distance_seconds": dist_seconds, "ranking_seconds": seconds - dist_seconds,
            "peak_rss_increase_mb": peak, "torch_threads": torch.get_num_threads(), "major_faults": faults}


def _compare_on_matrix(distmat: np.ndarray, pids: list[np.ndarray], ap_q: np.ndarray, max_rank: int,
                       evaluate: Any) -> dict:
    """Untimed: our ``evaluate`` on the baseline's own matrix, query by query, with each difference explained."""
    q_pids, g_pids, q_camids, g_camids = pids
    ref = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, return_per_query=True)
    skipped_alike = bool(np.array_equal(np.isnan(ref["AP"]), np.isnan(ap_q)))
    diff = np.abs(np.nan_to_num(ref["AP"]) - np.nan_to_num(ap_q))
    differ = np.flatnonzero(diff > AP_TOL)
    tied = [q for q in differ if tie_at_a_match(distmat[q], g_pids, g_camids, int(q_pids[q]), int(q_camids[q]))]
    return {"ours_on_matrix_mAP": ref["mAP"], "ours_on_matrix_cmc": np.asarray(ref["cmc"]).tolist(),
            "skipped_alike": skipped_alike, "queries_ap_differ": int(differ.size),
            "queries_ap_differ_with_tie": len(tied), "max_query_ap_diff": float(diff.max(initial=0.0))}


def _distance_only_seconds(qf: Any, gf: Any, block_size: int | None, device: str) -> float:
    """Time of the distance blocks of ``evaluate_features`` alone (computed and dropped)."""
    import torch

    from trainer.evaluation import rank

    dev = torch.device(device)
    t0 = time.perf_counter()
    qn, g, g_inv = rank._prepare(qf, gf, dev)
    bs = rank._feature_block_size(block_size, g.shape[0], dev)
    for s in range(0, qn.shape[0], bs):
        rank._distance_block(qn[s : s + bs], g, g_inv)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_child(variant: str, case: Case, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--case", json.dumps(asdict(case)),
           "--device", args.device]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} child for {case.name} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_bytes(case: Case) -> int:
    """Peak of torchreid's evaluator: per q × g entry the float32 matrix, the int64 argsort, the int64
    gathered pids and their bool comparison (21 bytes), plus allocator slack: 23.9 measured at MSMT17 size."""
    return 24 * case.num_q * case.num_g


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def verdict(base: dict, ours: dict) -> tuple[bool, float, float, str]:
    """``(identical, |ΔmAP|, max |ΔCMC|, text)``: CMC compared in torchreid's float32."""
    d_map = abs(base["mAP"] - ours["mAP"])
    n = len(base["cmc"])
    d_cmc = float(np.abs(np.asarray(base["cmc"], np.float32) - np.asarray(ours["cmc"][:n], np.float32)).max())
    # ours on the baseline's matrix must be ours on features, bit for bit (same blocks, same values)
    same_path = base["ours_on_matrix_mAP"] == ours["mAP"] and base["ours_on_matrix_cmc"] == ours["cmc"]
    same = d_map <= AP_TOL and d_cmc == 0.0 and base["queries_ap_differ"] == 0 and base["skipped_alike"]
    if same:
        text = f"identical (|ΔmAP| {d_map:.1e}: float64 summation order)" if d_map else "identical"
    else:
        text = (f"differ: |ΔmAP| {d_map:.1e}, max |ΔCMC| {d_cmc:.1e}, {base['queries_ap_differ']} queries' AP "
                f"(max {base['max_query_ap_diff']:.1e}), {base['queries_ap_differ_with_tie']} of them at an exact "
                f"distance tie")
    if not same_path:
        text += " [ours on the baseline's matrix != ours on features]"
    return same, d_map, d_cmc, text


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli("bench/eval.py", lambda: _main(argv))


def _main(argv: list[str] | None) -> None:
    p = Parser(prog="bench/eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small size only (smoke run)")
    p.add_argument("--sizes", nargs="+", default=None, choices=sorted(SIZES), help="default: market msmt")
    p.add_argument("--dim", type=positive_int, default=768)
    p.add_argument("--noise", type=float, default=2.0, help="per-dimension noise around identity centroids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rank", type=positive_int, default=50)
    p.add_argument("--device", default="cpu", help="device of both variants: cpu (default), cuda or cuda:N")
    p.add_argument("--block-size", type=positive_int, default=None, help="query rows per block (default: automatic)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device != "cpu":
        import torch

        try:
            usable = torch.device(args.device).type == "cuda" and torch.cuda.is_available()
        except RuntimeError:
            usable = False
        if not usable:
            p.error(f"--device {args.device}: not a usable device here; use --device cpu (or cuda on a GPU machine)")

    if args.child:
        print(json.dumps(child(args.child, Case(**json.loads(args.case)), args.device, args.block_size)))
        return

    sizes = args.sizes or (["quick"] if args.quick else ["market", "msmt"])
    print(f"# {_cpu_model()}, {os.cpu_count()} CPUs, python {platform.python_version()}, numpy {np.__version__}")
    rows = []
    for name in sizes:
        nq, ng, nid, ncam = SIZES[name]
        case = Case(name, nq, ng, nid, ncam, args.dim, args.noise, args.seed, args.max_rank)
        need, avail = baseline_bytes(case), _available_bytes()
        if avail is not None and need > avail:  # it would thrash (or be killed) on this machine as it is now
            ours = run_child("ours", case, args)
            print(f"{name}: torchreid not run: its evaluator needs ≈ {need / 2**30:.1f} GiB (24 bytes per query × "
                  f"gallery entry), {avail / 2**30:.1f} GiB available | ours "
                  f"{ours['seconds']:.2f}s (distances {ours['distance_seconds']:.2f}s) "
                  f"+{ours['peak_rss_increase_mb']:.0f}MB | mAP {ours['mAP']:.4f} R1 {ours['cmc'][0]:.4f}", flush=True)
            continue
        base = run_child("baseline", case, args)
        ours = run_child("ours", case, args)
        same, d_map, d_cmc, text = verdict(base, ours)
        print(f"{name}: torchreid {base['seconds']:.2f}s (distances {base['distance_seconds']:.2f}s) "
              f"+{base['peak_rss_increase_mb']:.0f}MB | ours {ours['seconds']:.2f}s (distances "
              f"{ours['distance_seconds']:.2f}s) +{ours['peak_rss_increase_mb']:.0f}MB | speed-up "
              f"{base['seconds'] / ours['seconds']:.2f}x, memory "
              f"1/{base['peak_rss_increase_mb'] / max(ours['peak_rss_increase_mb'], 1e-3):.1f} | mAP "
              f"{ours['mAP']:.4f} R1 {ours['cmc'][0]:.4f} mINP {ours['mINP']:.4f} | {text}", flush=True)
        print("  torchreid ranking (s): " + ", ".join(f"{k} {v:.2f}" for k, v in base["laps"].items())
              + f"; major page faults: torchreid {base['major_faults']}, ours {ours['major_faults']}", flush=True)
        for r in (base, ours):
            if r["major_faults"] > THRASH_FAULTS:
                print(f"  WARNING: the {r['variant']} run read {r['major_faults']} pages back from disk (memory "
                      "pressure from other processes): its time is not the code's; rerun on a quieter machine")
        rows.append((name, case, base, ours, same))

    print()
    print("| size | q × g × d | variant | time (s) | of which distances (s) | ranking (s) | peak RSS increase (MB) "
          "| speed-up | ranking speed-up | memory ratio | mAP | R1 | same metrics |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, case, base, ours, same in rows:
        shape = f"{case.num_q:,} × {case.num_g:,} × {case.dim}"
        for r in (base, ours):
            is_ours = r is ours
            speed = f"{base['seconds'] / ours['seconds']:.2f}×" if is_ours else "1×"
            rspeed = (f"{base['ranking_seconds'] / max(ours['ranking_seconds'], 1e-3):.1f}×" if is_ours else "1×")
            mem = f"1/{base['peak_rss_increase_mb'] / max(ours['peak_rss_increase_mb'], 1e-3):.1f}" if is_ours else "1"
            label = "evaluate_features" if is_ours else "torchreid eval_market1501 (argsort of the matrix)"
            print(f"| {name} | {shape} | {label} | {r['seconds']:.2f} | {r['distance_seconds']:.2f} | "
                  f"{r['ranking_seconds']:.2f} | {r['peak_rss_increase_mb']:.0f} | {speed} | {rspeed} | "
                  f"{mem} | {r['mAP']:.6f} | {r['cmc'][0]:.4f} | {'yes' if same else 'no'} |")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
