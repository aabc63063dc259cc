"""Clustering step: scalable ``trainer.cluster.pipeline.jaccard_dbscan`` vs the dense official restatement.

    python bench/cluster.py            # N = 8k, 16k, 32,621 (both) and 100k, 200k (ours only)
    python bench/cluster.py --quick    # N = 2k, 4k (both) and 10k (ours only)

Features: synthetic ReID-like unit vectors, d = 384: ~N/30 identities, each seen by 2-5 of 15
cameras; feature = identity centre + camera bias + (identity, camera) offset + per-image noise.
Each variant runs in a fresh subprocess on the same saved features: time of the clustering call
only; memory = the process's ``ru_maxrss`` ("peak", includes ~0.5 GB of torch/sklearn imports and
the feature matrix) and that peak minus the RSS just before the call ("work"). Labels are compared
raw (identical) and by adjusted Rand index. Threads: ``--threads`` (default: all cores).
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

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script

from bench.cli import Parser, positive_int, run_cli  # noqa: E402


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


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(variant: str, feats: str, out: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, ROOT)
    import sklearn.cluster  # noqa: F401  (imports outside the timed region, for both variants)

    from trainer.cluster.pipeline import jaccard_dbscan
    from trainer.cluster.reference import reference_jaccard_dbscan

    x = np.load(feats)
    base = _rss()  # interpreter + torch/sklearn imports + the feature matrix
    stats: dict = {}
    t0 = time.perf_counter()
    if variant == "ours":
        labels = jaccard_dbscan(x, 20, 6, 0.5, 4, stats=stats)
    else:
        labels = reference_jaccard_dbscan(x, 20, 6, 0.5, 4)
    seconds = time.perf_counter() - t0
    np.save(out + ".npy", labels)
    with open(out + ".json", "w") as f:
        json.dump({"seconds": seconds, "peak_bytes": _rss(), "base_bytes": base, "stats": stats.get("times", {})}, f)


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


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli("bench/cluster.py", lambda: _main(argv))


def _main(argv: list[str] | None) -> None:
    p = Parser(prog="bench/cluster.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    p.add_argument("--sizes", type=positive_int, nargs="*", help="sizes run with both variants")
    p.add_argument("--ours-only", type=positive_int, nargs="*", help="sizes run with ours only")
    p.add_argument("--d", type=positive_int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    p.add_argument("--feats", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.feats, args.out, args.threads)
        return
    from sklearn.metrics import adjusted_rand_score

    both = args.sizes if args.sizes is not None else ([2000, 4000] if args.quick else [8000, 16000, 32621])
    alone = args.ours_only if args.ours_only is not None else ([10000] if args.quick else [100000, 200000])
    print(f"d={args.d}, k1=20, k2=6, eps=0.5, min_samples=4, threads={args.threads}")
    mb = 2.0**20
    print("peak = ru_maxrss of the process; work = peak minus the RSS before the call (imports + features)")
    print("| N | dense ref s | ours s | speed-up | ref peak / work MB | ours peak / work MB | peak ratio | work ratio "
          "| labels | ARI | clusters | outliers |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in both:
            ours, lo = run("ours", n, args, tmp)
            ref, lr = run("ref", n, args, tmp)
            same = "identical" if np.array_equal(lo, lr) else f"{int((lo != lr).sum())} differ"
            ow, rw = ours["peak_bytes"] - ours["base_bytes"], ref["peak_bytes"] - ref["base_bytes"]
            print(f"| {n:,} | {ref['seconds']:.2f} | {ours['seconds']:.2f} | {ref['seconds'] / ours['seconds']:.1f}x "
                  f"| {ref['peak_bytes'] / mb:.0f} / {rw / mb:.0f} | {ours['peak_bytes'] / mb:.0f} / {ow / mb:.0f} "
                  f"| {ref['peak_bytes'] / ours['peak_bytes']:.1f}x | {rw / max(ow, 1):.1f}x | {same} "
                  f"| {adjusted_rand_score(lr, lo):.4f} | {lo.max() + 1} | {int((lo == -1).sum())} |", flush=True)
            print(f"  ours stages (s): {json.dumps({k: round(v, 2) for k, v in ours['stats'].items()})}", flush=True)
        for n in alone:
            ours, lo = run("ours", n, args, tmp)
            ow = ours["peak_bytes"] - ours["base_bytes"]
            print(f"| {n:,} | - | {ours['seconds']:.2f} | - | - | {ours['peak_bytes'] / mb:.0f} / {ow / mb:.0f} "
                  f"| - | - | - | - | {lo.max() + 1} | {int((lo == -1).sum())} |", flush=True)
            print(f"  ours stages (s): {json.dumps({k: round(v, 2) for k, v in ours['stats'].items()})}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
