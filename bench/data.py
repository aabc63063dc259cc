"""Benchmark: packed shards → in-memory SampleStore vs the same JPEG folder read file by file.

Both sides run the *same* dataset code (``ReIDDataset``: decode with PIL, the PAT train transform,
the batch contract) and the same DataLoader settings; the only difference is where the encoded
bytes come from: ``SampleStore.get_bytes`` (a slice of one in-memory buffer) or
``open(root/relpath, 'rb').read()`` per item. Reported separately:

- ``pack``: writing the tar shards (once per dataset, not per run);
- ``store build``: ``SampleStore.from_manifests`` (per run and rank: sequential shard reads + sha256);
- ``fetch``: bytes only, one process, random order (also the wids on-disk store);
- ``pipeline``: images/s through the DataLoader (decode + transform + collate), random order.

The folder is measured twice: *warm* (the files were just written, so they come from the page
cache: the most favourable case for the folder) and *cold* (each file's cached pages dropped with
``posix_fadvise(DONTNEED)`` before the pass: no root needed, local disk). Neither is a cluster's
shared filesystem, where each ``open`` is a metadata round trip to a server: there the win of
packing is mainly tens of files per dataset instead of 10^5 opens per epoch.

    python bench/data.py --quick     # 1,500 images, a smoke run (under a minute)
    python bench/data.py             # 12,936 images (Market-1501 train size)
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.cli import Parser, non_negative_int, positive_int, run_cli
from shards.pack import pack
from trainer.data.catalogue import SampleIndex
from trainer.data.dataset import ReIDDataset
from trainer.data.store import SampleStore, WidsSampleStore
from trainer.data.transforms import TransformConfig, build_transforms


def synth_folder(root: Path, n: int, ids: int, size: tuple[int, int] = (128, 64), seed: int = 0) -> None:
    """A Market-1501 layout with ``n`` train JPEGs of Market's size (128×64, ~4–6 kB each)."""
    rng = np.random.default_rng(seed)
    h, w = size
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir(parents=True, exist_ok=True)

    def write(folder: str, pid: int, cam: int, k: int) -> None:
        blocks = rng.integers(0, 256, size=(8, 4, 3)).astype(np.uint8)
        arr = np.kron(blocks, np.ones((h // 8, w // 4, 1), dtype=np.uint8)).astype(np.int16)
        arr += rng.integers(-25, 26, size=arr.shape, dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        (root / folder / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg").write_bytes(buf.getvalue())

    for k in range(n):
        write("bounding_box_train", 1 + k % ids, 1 + k % 6, k)
    for k in range(max(2, n // 50)):
        write("query", 1 + k % ids, 1, k)
        write("bounding_box_test", 1 + k % ids, 2, k)


class FolderStore(SampleIndex):
    """The store's metadata with bytes read from the original files, one ``open`` per item."""

    def __init__(self, store: SampleIndex, root: Path) -> None:
        self.__dict__.update({k: v for k, v in store.__dict__.items() if k not in ("buffer", "offsets", "_ds")})
        self.root = str(root)

    def get_bytes(self, i: int) -> bytes:
        with open(os.path.join(self.root, str(self.relpath[i])), "rb") as f:
            return f.read()


def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files' clean pages from the page cache (per file, no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fetch_rate(store: SampleIndex, order: np.ndarray) -> float:
    t0 = time.perf_counter()
    total = 0
    for i in order.tolist():
        total += len(store.get_bytes(i))
    return len(order) / (time.perf_counter() - t0)


def pipeline_rate(store: SampleIndex, order: np.ndarray, workers: int, batch: int, warmup: int = 2) -> float:
    from torch.utils.data import DataLoader

    tf = build_transforms(TransformConfig(size=(256, 128), lgt_p=0.5), train=True)
    seeds = np.arange(len(order), dtype=np.int64) + 12345
    items = list(zip(order.tolist(), seeds.tolist()))
    loader = DataLoader(ReIDDataset(store, tf), batch_size=batch, sampler=items, num_workers=workers,
                        persistent_workers=False, pin_memory=False)
    it = iter(loader)
    n = 0
    for _ in range(warmup):  # worker start-up and first batches are not the steady state
        n += len(next(it)["index"])
    t0 = time.perf_counter()
    m = 0
    for b in it:
        m += len(b["index"])
    dt = time.perf_counter() - t0
    del it
    return m / dt


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli("bench/data.py", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    ap = Parser(prog="bench/data.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small size: 1,500 images")
    ap.add_argument("--images", type=positive_int, default=None, help="train images (default 12,936; quick 1,500)")
    ap.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                    help="DataLoader workers")
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=None,
                    help="timed rounds, variants interleaved, best kept (default 3; quick 1)")
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        ap.error(f"--json {args.json}: its folder does not exist; create it or pass another path")
    n = args.images or (1500 if args.quick else 12936)
    repeats = args.repeats or (1 if args.quick else 3)
    res: dict[str, object] = {"images": n, "workers": args.workers, "batch": args.batch, "quick": args.quick,
                              "cpus": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        raw, packed = Path(tmp) / "raw", Path(tmp) / "pack"
        t0 = time.perf_counter()
        synth_folder(raw, n, ids=max(1, n // 17))
        res["synth_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        man = pack("market1501", raw, packed)
        res["pack_s"] = time.perf_counter() - t0
        res["shards_train"] = len(man.shards_of("train"))
        shard_files = [packed / sh.name for sh in man.shards]
        image_files = sorted(raw.rglob("*.jpg"))
        os.sync()  # written pages must be clean before they can be dropped

        def timed_build(cold: bool) -> tuple[float, SampleStore]:
            if cold:
                drop_page_cache(shard_files)
            t0 = time.perf_counter()
            st = SampleStore.from_manifests([packed], "train", relabel=True)
            return time.perf_counter() - t0, st

        res["store_build_cold_s"] = min(timed_build(True)[0] for _ in range(repeats))
        builds = [timed_build(False) for _ in range(repeats + 1)]
        res["store_build_s"], store = min(builds, key=lambda b: b[0])
        res["store_mb"] = store.nbytes / 2**20
        res["store_build_mb_s"] = res["store_mb"] / res["store_build_s"]
        t0 = time.perf_counter()
        wds = WidsSampleStore.from_manifests([packed], "train", relabel=True, cache_dir=Path(tmp) / "wids")
        res["wids_index_s"] = time.perf_counter() - t0
        folder = FolderStore(store, raw)
        order = np.random.default_rng(0).permutation(len(store))

        def best_of(variants: dict[str, tuple[object, bool]]) -> dict[str, float]:
            """Best rate per variant over ``repeats`` rounds, variants interleaved so load drifts hit all alike."""
            rates: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(repeats):
                for name, (fn, cold) in variants.items():
                    if cold:
                        drop_page_cache(image_files)
                    rates[name].append(fn())  # type: ignore[operator]
            return {k: max(v) for k, v in rates.items()}

        fetch = best_of({
            "store": (lambda: fetch_rate(store, order), False),
            "folder_warm": (lambda: fetch_rate(folder, order), False),
            "folder_cold": (lambda: fetch_rate(folder, order), True),
            "wids": (lambda: fetch_rate(wds, order), False),
        })
        res["fetch_img_s"] = fetch
        pipe = best_of({
            "store": (lambda: pipeline_rate(store, order, args.workers, args.batch), False),
            "folder_warm": (lambda: pipeline_rate(folder, order, args.workers, args.batch), False),
            "folder_cold": (lambda: pipeline_rate(folder, order, args.workers, args.batch), True),
        })
        res["pipeline_img_s"] = pipe
        wds.close()
    for stage, rates in (("fetch", fetch), ("pipeline", pipe)):
        for kind in ("warm", "cold"):
            res[f"{stage}_ratio_store_vs_folder_{kind}"] = rates["store"] / rates[f"folder_{kind}"]
    tag = "  [quick]" if args.quick else ""
    print(f"images {n} ({res['shards_train']} train shards, {res['store_mb']:.1f} MiB), workers {args.workers}, "
          f"batch {args.batch}{tag}")
    print(f"pack (once per dataset)      {res['pack_s']:8.2f} s")
    print(f"store build (per run), warm  {res['store_build_s']:8.3f} s  "
          f"({res['store_build_mb_s']:.0f} MiB/s incl. sha256)")
    print(f"store build (per run), cold  {res['store_build_cold_s']:8.3f} s")
    print(f"wids index build             {res['wids_index_s']:8.3f} s")
    stages = (("fetch", fetch, "bytes only, 1 process"), ("pipeline", pipe, "decode + PAT aug, DataLoader"))
    for stage, rates, what in stages:
        line = "  ".join(f"{k} {v:9.0f}" for k, v in rates.items())
        print(f"{stage:<9}({what}) img/s: {line}")
        print(f"{'':<9}ratio store/folder: warm {res[f'{stage}_ratio_store_vs_folder_warm']:.2f}x  "
              f"cold {res[f'{stage}_ratio_store_vs_folder_cold']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
