"""Benchmark: blocked exact ranking (``evaluate_features``) vs the usual dense per-query loop.

Baseline (what fast-reid / TransReID-style evaluators do): compute the whole ``q × g`` float32
distance matrix at once, then for every query ``argsort`` its row, drop same-pid-same-camera items,
cumsum the hits. It uses a *stable* argsort (``--baseline-sort stable``, the default) so that its tie
rule is ours and the numbers can be compared for equality; ``quicksort`` is numpy's default (faster,
but its tie order is unspecified, so its numbers may differ in the last digits on exact ties). Its
distance matrix is built by ``pairwise_distance`` with the same blocks as ours, so both rank the
very same float32 values; the cost of building it is the same matmul either way.

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

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from bench.cli import Parser, positive_int, run_cli  # noqa: E402

SIZES = {  # name: (queries, gallery, identities, cameras)
    "quick": (600, 3000, 150, 6),
    "market": (3368, 15913, 750, 6),
    "msmt": (11659, 82161, 3060, 15),
}


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


def make_data(case: Case):
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


def baseline_loop(distmat: np.ndarray, q_pids, g_pids, q_camids, g_camids, max_rank: int, kind: str) -> dict:
    """The common per-query evaluator over a dense matrix (argsort, filter, cumsum)."""
    aps, inps, cmcs = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind=kind)
        gp, gc = g_pids[order], g_camids[order]
        keep = ~((gp == q_pids[i]) & (gc == q_camids[i]))
        hits = (gp[keep] == q_pids[i]).astype(np.int32)
        if not hits.any():
            continue
        cum = hits.cumsum()
        last = np.flatnonzero(hits)[-1]
        inps.append(cum[last] / (last + 1.0))
        cmc = np.minimum(cum, 1)
        cmcs.append(cmc[:max_rank])
        prec = cum / (np.arange(hits.size) + 1.0) * hits
        aps.append(prec.sum() / hits.sum())
    cmc = np.asarray(cmcs, dtype=np.float64).sum(0) / len(cmcs)
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "cmc": cmc, "num_valid_queries": len(aps)}


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> float:
    """Reset the peak-RSS mark where Linux allows it; return the RSS the increase is measured from."""
    try:  # hand freed heap back first, or later allocations reuse it unseen (glibc)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        rss = _status_mb("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # fallback: high-water mark so far


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(variant: str, case: Case, device: str, block_size: int | None, sort_kind: str) -> dict:
    import gc

    import torch

    from trainer.evaluation.rank import evaluate, evaluate_features, pairwise_distance

    qf, gf, qp, gp, qc, gcam = make_data(case)
    # Warm-up on a slice (first-call costs of kernels and dispatch), equally for both variants.
    if variant == "ours":
        evaluate_features(qf[:32], gf[:256], qp[:32], gp[:256], qc[:32], gcam[:256], device=device)
    else:
        pairwise_distance(qf[:32], gf[:256], device=device)
    gc.collect()
    rss0 = _reset_peak()
    t0 = time.perf_counter()
    if variant == "ours":
        res = evaluate_features(qf, gf, qp, gp, qc, gcam, case.max_rank, block_size=block_size, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = _peak_mb() - rss0
        # Untimed above: the distance blocks alone (same blocks), to split matmul from ranking time.
        dist_seconds = _distance_only_seconds(qf, gf, block_size, device)
        check = None
    else:
        distmat = pairwise_distance(qf, gf, block_size=block_size, device=device).cpu().numpy()
        dist_seconds = time.perf_counter() - t0
        res = baseline_loop(distmat, qp.numpy(), gp.numpy(), qc.numpy(), gcam.numpy(), case.max_rank, sort_kind)
        seconds = time.perf_counter() - t0
        peak = _peak_mb() - rss0
        # Untimed: our evaluate on the baseline's own dense matrix agrees with its loop.
        ref = evaluate(distmat, qp, gp, qc, gcam, case.max_rank)
        loop_cmc = np.pad(res["cmc"], (0, case.max_rank - res["cmc"].size), mode="edge")  # gallery < max_rank
        check = max(abs(ref["mAP"] - res["mAP"]), abs(ref["mINP"] - res["mINP"]),
                    float(np.abs(ref["cmc"] - loop_cmc).max()))
    cmc = np.asarray(res["cmc"])
    return {"variant": variant, "seconds": seconds, "distance_seconds": dist_seconds,
            "ranking_seconds": seconds - dist_seconds, "peak_rss_increase_mb": peak, "mAP": res["mAP"],
            "mINP": res["mINP"], "cmc": cmc.tolist(), "num_valid_queries": res["num_valid_queries"],
            "evaluate_vs_loop_maxdiff": check, "torch_threads": torch.get_num_threads()}


def _distance_only_seconds(qf, gf, block_size: int | None, device: str) -> float:
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
           "--device", args.device, "--baseline-sort", args.baseline_sort]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{variant} child for {case.name} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    p.add_argument("--baseline-sort", default="stable", choices=["stable", "quicksort"])
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
        print(json.dumps(child(args.child, Case(**json.loads(args.case)), args.device, args.block_size,
                               args.baseline_sort)))
        return

    sizes = args.sizes or (["quick"] if args.quick else ["market", "msmt"])
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    rows = []
    for name in sizes:
        nq, ng, nid, ncam = SIZES[name]
        case = Case(name, nq, ng, nid, ncam, args.dim, args.noise, args.seed, args.max_rank)
        base = run_child("baseline", case, args)
        ours = run_child("ours", case, args)
        same = (base["mAP"] == ours["mAP"] or abs(base["mAP"] - ours["mAP"]) <= 1e-12) and \
            abs(base["mINP"] - ours["mINP"]) <= 1e-12 and base["num_valid_queries"] == ours["num_valid_queries"] and \
            np.array_equal(np.asarray(base["cmc"]), np.asarray(ours["cmc"])[: len(base["cmc"])])
        print(f"{name}: baseline {base['seconds']:.2f}s (distances {base['distance_seconds']:.2f}s) "
              f"+{base['peak_rss_increase_mb']:.0f}MB | ours "
              f"{ours['seconds']:.2f}s (distances {ours['distance_seconds']:.2f}s) "
              f"+{ours['peak_rss_increase_mb']:.0f}MB | speedup {base['seconds'] / ours['seconds']:.2f}x, "
              f"memory 1/{base['peak_rss_increase_mb'] / max(ours['peak_rss_increase_mb'], 1e-3):.1f} "
              f"| mAP {ours['mAP']:.4f} mINP {ours['mINP']:.4f} R1 {ours['cmc'][0]:.4f} | identical: {same} "
              f"(baseline loop vs evaluate on its matrix: max diff {base['evaluate_vs_loop_maxdiff']:.1e})")
        rows.append((name, case, base, ours, same))

    print()
    print("| size | q × g × d | variant | time (s) | of which distances (s) | ranking (s) | peak RSS increase (MB) "
          "| speedup | ranking speedup | memory ratio | mAP | R1 | mINP | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, case, base, ours, same in rows:
        shape = f"{case.num_q:,} × {case.num_g:,} × {case.dim}"
        for r in (base, ours):
            is_ours = r is ours
            speed = f"{base['seconds'] / ours['seconds']:.2f}×" if is_ours else "1×"
            rspeed = (f"{base['ranking_seconds'] / max(ours['ranking_seconds'], 1e-3):.1f}×" if is_ours else "1×")
            mem = f"1/{base['peak_rss_increase_mb'] / max(ours['peak_rss_increase_mb'], 1e-3):.1f}" if is_ours else "1"
            label = "evaluate_features" if is_ours else f"dense + per-query argsort ({args.baseline_sort})"
            print(f"| {name} | {shape} | {label} | {r['seconds']:.2f} | {r['distance_seconds']:.2f} | "
                  f"{r['ranking_seconds']:.2f} | {r['peak_rss_increase_mb']:.0f} | {speed} | {rspeed} | "
                  f"{mem} | {r['mAP']:.4f} | {r['cmc'][0]:.4f} | {r['mINP']:.4f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    sys.exit(main())
