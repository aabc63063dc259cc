"""Benchmark: where training images come from and how fast one CPU core turns them into batches.

A synthetic Market-1501-style folder (N train JPEGs of Market's 128×64 size) is packed, then the same
images are served four ways, all with the full PAT train transform (resize to 256×128, flip, pad 10 +
crop, LGT 0.5, normalisation) and the batch contract:

- ``folder``: ``ReIDDataset`` over the JPEG files, one ``open`` per image (page cache warm, or cold:
  each file's pages dropped with ``posix_fadvise(DONTNEED)`` before the pass);
- ``store`` (today's store, ``data.pipeline=per_image``): ``ReIDDataset`` over the memory-mapped shards
  (``data.store=memory``): decode + resize + augment image by image with PIL;
- ``decoded`` (``data.pipeline=decoded``): the decoded store (decode + resize once, uint8 arrays
  memory-mapped) and the batched augmentation on the CPU;
- with CUDA: ``decoded+gpu`` (the same store, augmentation on the GPU) and ``gpu_decode`` (JPEG bytes
  decoded by nvJPEG, resized and augmented on the GPU).

Reported:

- one-off costs (pack, store build, decoded build) and byte fetch rates;
- ``pipeline``: images/s through a DataLoader of ``--workers`` workers (the whole machine);
- ``per core``: images per CPU-second of one process doing all the work (DataLoader without workers,
  torch at 1 thread; CPU time of the process, so other load on the machine inflates it little);
- what one GPU at 40 % utilisation consumes for the PAT (ViT-B/16, 256×128) and TMGF (ViT-S/16,
  384×128) shapes: training FLOPs per image counted with ``torch.utils.flop_counter`` (3 × forward, as
  ``trainer.engine.flops``) against ``--peak-tflops`` (default: H100 SXM bf16 dense), and the cores per
  GPU each path needs to keep up;
- the share of a training step spent waiting for data: ViT-B/ViT-S shapes on that GPU fed by
  ``--cores-per-gpu`` cores, and pat_smoke's model (ViT depth 2, width 64, at 256×128) on this CPU
  with the data loaded in the training process (pat_smoke's ``num_workers=0``).

The last line is ``decoded store vs today's store: R× images/s per core`` (per-core rates, measured
side by side, variants interleaved, best of ``--repeats``).

    python bench/data.py --quick     # 1,500 images, a smoke run
    python bench/data.py             # 12,936 images (Market-1501 train size)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bench.cli import Parser, non_negative_int, positive_int, run_cli
from shards.pack import pack
from trainer.data.augment import BatchAugment
from trainer.data.catalogue import SampleIndex
from trainer.data.dataset import ReIDDataset
from trainer.data.decoded import (
    DecodedBatches,
    DecodedSampleStore,
    DeviceDecodeStore,
    JpegBatches,
    as_batch,
    finish,
    open_pipeline_split,
)
from trainer.data.store import WidsSampleStore
from trainer.data.transforms import TransformConfig, build_transforms
from trainer.engine.flops import BACKWARD_FACTOR, GPU_PEAKS

SIZE = (256, 128)
PAT_TRANSFORM = TransformConfig(size=SIZE, lgt_p=0.5)
"""The full PAT train transform (pat_market): resize, flip, pad 10 + crop, LGT 0.5, 0.5/0.5 normalisation."""
TMGF_TRANSFORM = TransformConfig(size=(384, 128), erasing_p=0.5, norm="luperson")
"""TMGF's (tmgf_market): resize to 384×128, flip, pad 10 + crop, LUPerson normalisation, RandomErasing 0.5."""
UTILISATION = 0.4
H100_BF16 = next(p for pat, name, p in GPU_PEAKS if name == "H100 SXM")["bf16"]


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
        keep = ("split", "relabel", "sources", "pid_orig", "camid_orig", "domain", "split_index", "index", "relpath",
                "ext_code", "camid", "pid")
        self.__dict__.update({k: store.__dict__[k] for k in keep})
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
    for i in order.tolist():
        store.get_bytes(i)
    return len(order) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Loaders of each path (random order, per-sample seeds as the training loader gives them)


def make_loader(store: SampleIndex, order: np.ndarray, workers: int, batch: int, defer: bool = False,
                transform: TransformConfig = PAT_TRANSFORM) -> DataLoader:
    """A DataLoader over ``order`` with ``transform``: per image for a plain store, batched for a decoded one."""
    tf = build_transforms(transform, train=True)
    items = list(zip(order.tolist(), (order.astype(np.int64) * 7919 + 12345).tolist()))
    dataset: Any
    if isinstance(store, DecodedSampleStore):
        dataset = DecodedBatches(store, BatchAugment.from_pipeline(tf), defer=defer)
    elif isinstance(store, DeviceDecodeStore):
        dataset = JpegBatches(store, BatchAugment.from_pipeline(tf))
    else:
        dataset = ReIDDataset(store, tf)
    return DataLoader(dataset, batch_size=batch, sampler=items, num_workers=workers, persistent_workers=False,
                      pin_memory=False, collate_fn=None if isinstance(dataset, ReIDDataset) else as_batch)


def _consume(batches: Iterable[dict[str, Any]], warmup: int, post: Callable[[dict[str, Any]], Any] | None,
             clock: Callable[[], float], sync: Callable[[], None]) -> float:
    """Images per unit of ``clock`` after ``warmup`` batches (worker start-up, first faults excluded)."""
    it = iter(batches)
    for _ in range(warmup):
        b = next(it)
        if post is not None:
            post(b)
    sync()
    t0, m = clock(), 0
    for b in it:
        if post is not None:
            b = post(b)
        m += len(b["index"])
    sync()
    return m / (clock() - t0)


def pipeline_rate(store: SampleIndex, order: np.ndarray, workers: int, batch: int) -> float:
    """Images/s (wall) through a DataLoader of ``workers`` workers."""
    return _consume(make_loader(store, order, workers, batch), 2, None, time.perf_counter, lambda: None)


def per_core_rate(store: SampleIndex, order: np.ndarray, batch: int, device: torch.device | None = None,
                  transform: TransformConfig = PAT_TRANSFORM) -> float:
    """Images per CPU-second of this process doing all the work (no workers, torch at 1 thread).

    ``device``: the batches are finished there (a decoded store's augmentation, a device-decode store's
    decode + augmentation); the CPU time then counts what the host spends (reading, drawing, launching)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = make_loader(store, order, 0, batch, defer=device is not None, transform=transform)
        post = None
        sync: Callable[[], None] = lambda: None  # noqa: E731
        if device is not None:
            augment = loader.dataset.augment  # type: ignore[attr-defined]

            def post(b: dict[str, Any]) -> dict[str, Any]:
                return finish(b, augment, device)

            def sync() -> None:
                torch.cuda.synchronize(device)
        return _consume(loader, 2, post, time.process_time, sync)
    finally:
        torch.set_num_threads(threads)


def gpu_rate(store: SampleIndex, order: np.ndarray, batch: int, device: torch.device) -> float:
    """Images/s (wall) the device path delivers from one process, GPU work included."""
    loader = make_loader(store, order, 0, batch, defer=True)
    augment = loader.dataset.augment  # type: ignore[attr-defined]
    return _consume(loader, 2, lambda b: finish(b, augment, device), time.perf_counter,
                    lambda: torch.cuda.synchronize(device))


def best_of(variants: dict[str, Callable[[], float]], repeats: int, before: dict[str, Callable[[], None]]) -> dict[
        str, float]:
    """Best rate per variant over ``repeats`` rounds, variants interleaved so load drifts hit all alike."""
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            if name in before:
                before[name]()
            rates[name].append(fn())
    return {k: max(v) for k, v in rates.items()}


# --------------------------------------------------------------------------------------------
# Model side: FLOPs per training image, CPU step time of pat_smoke's model


def training_gflop(exp: str) -> tuple[str, float]:
    """(description, training GFLOP per image) of ``exp``'s model at its input size, counted on one forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.config import compose
    from trainer.models import build_model

    cfg = compose([f"exp={exp}", "model.pretrained="]).model
    if cfg.name == "tmgf":
        cfg = dataclasses.replace(cfg, num_cams=6)
    model = build_model(cfg, num_classes=0 if cfg.name == "tmgf" else 751).train()
    h, w = cfg.img_size
    x = torch.zeros(2, 3, h, w)  # 2: the BN necks need more than one sample in train mode
    args = (x, torch.zeros(2, dtype=torch.long)) if cfg.name == "tmgf" else (x,)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    return f"{cfg.name} {cfg.backbone} {h}x{w}", counter.get_total_flops() / 2 * BACKWARD_FACTOR / 1e9


def smoke_step_s_per_image(batch: int = 32, steps: int = 3) -> float:
    """CPU seconds per image of a forward + backward of pat_smoke's model (ViT depth 2, width 64) at 256×128,
    one thread (the loss: a sum of the logits; what the step costs beyond the model is not counted)."""
    from trainer.config import compose
    from trainer.models import build_model

    cfg = compose(["exp=pat_smoke", f"model.img_size=[{SIZE[0]},{SIZE[1]}]"]).model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(cfg, num_classes=32).train()
        x = torch.randn(batch, 3, *SIZE)
        best = float("inf")
        for _ in range(steps + 1):
            t0 = time.process_time()
            model(x).logits.sum().backward()
            best = min(best, time.process_time() - t0)
        return best / batch
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli("bench/data.py", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    ap = Parser(prog="bench/data.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small size: 1,500 images")
    ap.add_argument("--images", type=positive_int, default=None, help="train images (default 12,936; quick 1,500)")
    ap.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                    help="DataLoader workers of the pipeline rates")
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--pass-images", type=positive_int, default=4096,
                    help="images per timed pass of the pipeline and per-core rates (at most --images; default 4096)")
    ap.add_argument("--repeats", type=positive_int, default=None,
                    help="timed rounds, variants interleaved, best kept (default 3; quick 1)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16,
                    help=f"peak of one GPU, dense TFLOP/s (default {H100_BF16}: H100 SXM bf16)")
    ap.add_argument("--cores-per-gpu", type=positive_int, default=8,
                    help="CPU cores feeding each GPU in the data-wait estimate (default 8)")
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        ap.error(f"--json {args.json}: its folder does not exist; create it or pass another path")
    if args.peak_tflops <= 0:
        ap.error(f"--peak-tflops {args.peak_tflops}: expected a positive number")
    n = args.images or (1500 if args.quick else 12936)
    repeats = args.repeats or (1 if args.quick else 3)
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    res: dict[str, Any] = {"images": n, "workers": args.workers, "batch": args.batch, "quick": args.quick,
                           "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(cuda) if cuda is not None else None}
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

        def open_store(pipeline: str, size: tuple[int, int] = SIZE) -> Any:
            return open_pipeline_split("memory", [packed], "train", relabel=True, pipeline=pipeline, size=size,
                                       log=lambda line: None)

        def timed(fn: Callable[[], Any], cold: bool = False) -> tuple[float, Any]:
            if cold:
                drop_page_cache(shard_files)
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, out

        res["store_build_cold_s"] = min(timed(lambda: open_store("per_image"), True)[0] for _ in range(repeats))
        res["store_build_s"], store = min((timed(lambda: open_store("per_image")) for _ in range(repeats + 1)),
                                          key=lambda b: b[0])
        res["store_mb"] = store.nbytes / 2**20
        res["store_build_mb_s"] = res["store_mb"] / res["store_build_s"]
        res["decoded_build_s"], decoded = timed(lambda: open_store("decoded"))  # first use: decode + resize + write
        res["decoded_open_s"], decoded = timed(lambda: open_store("decoded"))
        res["decoded_mb"] = decoded.mapped_bytes / 2**20
        tmgf_size = TMGF_TRANSFORM.size
        res["decoded_tmgf_build_s"], decoded_tmgf = timed(lambda: open_store("decoded", tmgf_size))
        t0 = time.perf_counter()
        wds = WidsSampleStore.from_manifests([packed], "train", relabel=True, cache_dir=Path(tmp) / "wids")
        res["wids_index_s"] = time.perf_counter() - t0
        folder = FolderStore(store, raw)
        order = np.random.default_rng(0).permutation(len(store))
        part = order[: min(len(order), args.pass_images)]
        cold = {"folder_cold": lambda: drop_page_cache(image_files)}
        batch = args.batch

        res["fetch_img_s"] = fetch = best_of({
            "store": lambda: fetch_rate(store, order),
            "folder_warm": lambda: fetch_rate(folder, order),
            "folder_cold": lambda: fetch_rate(folder, order),
            "wids": lambda: fetch_rate(wds, order),
        }, repeats, cold)
        res["pipeline_img_s"] = pipe = best_of({
            "folder_warm": lambda: pipeline_rate(folder, part, args.workers, batch),
            "folder_cold": lambda: pipeline_rate(folder, part, args.workers, batch),
            "store": lambda: pipeline_rate(store, part, args.workers, batch),
            "decoded": lambda: pipeline_rate(decoded, part, args.workers, batch),
        }, repeats, cold)
        pat: dict[str, Callable[[], float]] = {
            "folder": lambda: per_core_rate(folder, part, batch),
            "store": lambda: per_core_rate(store, part, batch),
            "decoded": lambda: per_core_rate(decoded, part, batch),
        }
        tmgf: dict[str, Callable[[], float]] = {
            "store": lambda: per_core_rate(store, part, batch, transform=TMGF_TRANSFORM),
            "decoded": lambda: per_core_rate(decoded_tmgf, part, batch, transform=TMGF_TRANSFORM),
        }
        if cuda is not None:
            jpeg = DeviceDecodeStore(store, SIZE)
            pat["decoded+gpu"] = lambda: per_core_rate(decoded, part, batch, cuda)
            pat["gpu_decode"] = lambda: per_core_rate(jpeg, part, batch, cuda)
            res["gpu_img_s"] = best_of({
                "decoded+gpu": lambda: gpu_rate(decoded, part, batch, cuda),
                "gpu_decode": lambda: gpu_rate(jpeg, part, batch, cuda),
            }, repeats, {})
        both = best_of({**{f"pat {k}": v for k, v in pat.items()}, **{f"tmgf {k}": v for k, v in tmgf.items()}},
                       repeats, {})
        core = {k[4:]: v for k, v in both.items() if k.startswith("pat ")}
        core_tmgf = {k[5:]: v for k, v in both.items() if k.startswith("tmgf ")}
        res["per_core_img_s"], res["per_core_tmgf_img_s"] = core, core_tmgf
        wds.close()

    # the model side: what one GPU consumes, what pat_smoke's model costs on this CPU
    peak = args.peak_tflops * 1e12
    shapes = {"PAT": ("pat_market", core), "TMGF": ("tmgf_market", core_tmgf)}
    models: dict[str, dict[str, Any]] = {}
    for name, (exp, rates) in shapes.items():
        what, gflop = training_gflop(exp)
        need = UTILISATION * peak / (gflop * 1e9)
        gpu_s = 1.0 / need  # GPU seconds per image
        data_s = {k: 1.0 / (args.cores_per_gpu * r) for k, r in rates.items()}  # wall s/img from the cores
        models[name] = {"model": what, "train_gflop_per_img": gflop, "gpu_img_s": need,
                        "cores_per_gpu_needed": {k: need / r for k, r in rates.items()},
                        "data_wait_share": {k: max(0.0, d - gpu_s) / max(d, gpu_s) for k, d in data_s.items()}}
    smoke_s = smoke_step_s_per_image()
    models["pat_smoke"] = {"model": f"pat vit_test {SIZE[0]}x{SIZE[1]} (CPU, 1 thread)", "cpu_s_per_img": smoke_s,
                           "data_wait_share": {k: (1 / r) / (1 / r + smoke_s) for k, r in core.items()}}
    res["models"] = models

    # report
    tag = "  [quick]" if args.quick else ""
    print(f"images {n} ({res['shards_train']} train shards, {res['store_mb']:.1f} MiB encoded, "
          f"{res['decoded_mb']:.0f} MiB decoded at {SIZE[0]}x{SIZE[1]}), workers {args.workers}, batch {batch}, "
          f"timed passes of {len(part)} images{tag}")
    print(f"pack (once per dataset)                  {res['pack_s']:8.2f} s")
    print(f"store build (per run), warm / cold       {res['store_build_s']:8.3f} s / {res['store_build_cold_s']:.3f} s"
          f"  ({res['store_build_mb_s']:.0f} MiB/s incl. sha256)")
    print(f"decoded store build (once per pack)      {res['decoded_build_s']:8.2f} s at {SIZE[0]}x{SIZE[1]}, "
          f"{res['decoded_tmgf_build_s']:.2f} s at {tmgf_size[0]}x{tmgf_size[1]}; then {res['decoded_open_s']:.3f} s "
          "to open")
    print(f"wids index build                         {res['wids_index_s']:8.3f} s")

    def row(rates: dict[str, float], fmt: str = "9.0f") -> str:
        return "  ".join(f"{k} {v:{fmt}}" for k, v in rates.items())

    print(f"fetch (bytes only, 1 process), img/s:              {row(fetch)}")
    print(f"pipeline (PAT, {args.workers} DataLoader workers, wall), img/s: {row(pipe)}")
    if "gpu_img_s" in res:
        print(f"GPU paths (1 process + {res['gpu']}, wall), img/s: {row(res['gpu_img_s'])}")
    print(f"per core, TMGF transform {tmgf_size[0]}x{tmgf_size[1]}, img/s/core:   {row(core_tmgf)}")
    print(f"per core, PAT transform {SIZE[0]}x{SIZE[1]}, img/s/core:    {row(core)}")
    print(f"one GPU at {UTILISATION:.0%} of {args.peak_tflops:g} TFLOP/s (training FLOPs = 3 x forward):")
    for name in shapes:
        m = models[name]
        print(f"  {name} {m['model']}: {m['train_gflop_per_img']:.1f} GFLOP/img -> {m['gpu_img_s']:,.0f} img/s; "
              f"cores to feed it: {row(m['cores_per_gpu_needed'], '.1f')}")
    print(f"share of step time waiting for data ({args.cores_per_gpu} cores per GPU):")
    for name in shapes:
        print(f"  {name} {models[name]['model']:<38} {row(models[name]['data_wait_share'], '5.0%')}")
    m = models["pat_smoke"]
    print(f"  pat_smoke's model {SIZE[0]}x{SIZE[1]}, CPU ({smoke_s * 1e3:.2f} ms/img), data in the training process: "
          f"{row(m['data_wait_share'], '5.0%')}")
    ratio = core["decoded"] / core["store"]
    res["decoded_vs_store_per_core"] = ratio
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"decoded store vs today's store: {ratio:.1f}× images/s per core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
