"""The decoded store (``data.pipeline=decoded``) and the device-decode store (``data.pipeline=gpu_decode``).

Decode + resize to the training size is the deterministic part of every training transform and most
of its cost (a bicubic upscale of Market's 128×64 JPEGs to 256×128). The decoded store does it once per
pack, split and size, and keeps the result as one uint8 array per source, ``N × 3 × H × W`` (channels
first: the layout the batched augmentation and the model read), in a ``.npy`` file next to the shards:

    <pack>/decoded/<split>-<H>x<W>-<key>.npy       N·3·H·W bytes + a 128-byte header

``key`` hashes the split's shard digests, the size, the Pillow version (which decodes and resizes) and
:data:`FORMAT`: a repacked dataset or another Pillow makes a new file (the old one is removed) instead
of serving stale pixels. The file is built on first use by one process under a lock, written
sequentially to a temporary name, fsynced and renamed into place (a reader sees the whole file or
none), or ahead of time with ``python -m trainer.data.decoded``. Every process of a node maps it
read-only: the page cache holds one copy per node, shared by its ranks and DataLoader workers.

Each image is exactly what the per-image path hands its random ops: ``Resize(size)(decode(bytes))``,
the same functions; batches of them go through :class:`~trainer.data.augment.BatchAugment`.

The device-decode store keeps no pixels: batches carry the JPEG bytes, decoded on the training device
in one ``torchvision.io.decode_jpeg`` call per batch (nvJPEG on a GPU), resized there, then augmented
by the same :class:`~trainer.data.augment.BatchAugment`. For sets too large to keep decoded.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from torch.utils.data import Dataset

from shards.atomic import fsync_dir
from shards.errors import UserError, run_cli
from shards.reader import ShardError
from shards.records import read_manifest
from trainer import dist
from trainer.data.augment import BatchAugment, shared_empty
from trainer.data.catalogue import SampleIndex, SourceInfo, as_roots
from trainer.data.dataset import decode
from trainer.data.store import ShardFile, open_split
from trainer.data.transforms import Resize

FORMAT = 1
"""Version of the file layout and of the decode + resize recipe; part of the cache key."""
DECODED_DIR = "decoded"
"""Sub-folder of a pack holding its decoded arrays."""
_HEADER = 128
"""Bytes before the pixels in a ``.npy`` file of version 1.0 (numpy pads the header to 64-byte blocks)."""
_INDEX = ("split", "relabel", "sources", "pid_orig", "camid_orig", "domain", "split_index", "index", "relpath",
          "ext_code", "camid", "pid")
"""The catalogue attributes of :class:`~trainer.data.catalogue.SampleIndex` a wrapping store shares with its base."""


class DecodedStoreError(UserError):
    """The decoded store cannot be built or read here (no space, no write access, a damaged file)."""


def decoded_nbytes(count: int, size: Sequence[int]) -> int:
    """Bytes of one decoded array file: ``count · 3 · H · W`` pixels + the header."""
    return int(count) * 3 * int(size[0]) * int(size[1]) + _HEADER


def _gib(n: float) -> str:
    """A byte count for people: GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cache_key(root: Path, split: str, size: Sequence[int]) -> str:
    """What the decoded pixels depend on, hashed: the split's shards (by digest), the size, Pillow, :data:`FORMAT`."""
    shards = sorted((s.name, s.sha256) for s in read_manifest(root).shards_of(split))
    blob = json.dumps({"format": FORMAT, "size": [int(s) for s in size], "pillow": PIL.__version__,
                       "shards": shards}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def decoded_path(root: str | os.PathLike[str], split: str, size: Sequence[int]) -> Path:
    """Where the decoded array of ``split`` of the pack ``root`` at ``size`` (H, W) lives."""
    h, w = (int(s) for s in size)
    return Path(root) / DECODED_DIR / f"{split}-{h}x{w}-{cache_key(Path(root), split, size)}.npy"


# --------------------------------------------------------------------------------------------
# Build


def _check_space(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need + (64 << 20):  # a margin for the filesystem's own use
        raise DecodedStoreError(
            f"data.pipeline=decoded: {what} needs {_gib(need)} in {folder}, {_gib(free)} free; free some space, "
            f"build it elsewhere and link {folder} there, or use data.pipeline=per_image (no decoded copy) or "
            f"gpu_decode")


def _writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise DecodedStoreError(
            f"data.pipeline=decoded: cannot write the decoded cache in {folder} ({exc.strerror}); make the pack "
            f"folder writable, build the cache once with `python -m trainer.data.decoded --size H W "
            f"{folder.parent}` as a user who can, or use data.pipeline=per_image") from None


def _pixels(base: SampleIndex, size: tuple[int, int]) -> Callable[[int], bytes]:
    """Global sample ``i`` → its ``3 × H × W`` uint8 pixels: the per-image path's ``Resize(decode(bytes))``."""
    resize = Resize(size)

    def one(i: int) -> bytes:
        try:
            img = resize(decode(base.get_bytes(i)))
        except OSError as exc:
            raise ShardError(f"sample {i} ({base.relpath[i]}): cannot decode image ({exc})") from None
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)).tobytes()

    return one


def _write(path: Path, base: SampleIndex, source: SourceInfo, size: tuple[int, int], threads: int) -> None:
    """Decode the source's samples into ``path``: a temporary file written in order, fsynced, renamed."""
    h, w = size
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pixels = _pixels(base, size)
    try:
        with open(tmp, "wb") as f, ThreadPoolExecutor(threads) as pool:  # Pillow releases the GIL
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (source.count, 3, h, w)})
            if f.tell() != _HEADER:
                raise RuntimeError(f"{tmp}: npy header of {f.tell()} bytes, expected {_HEADER}")
            chunk = 64 * threads  # bounded memory in flight
            for lo in range(source.start, source.start + source.count, chunk):
                hi = min(lo + chunk, source.start + source.count)
                for data in pool.map(pixels, range(lo, hi)):
                    f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ensure_decoded(base: SampleIndex, k: int, size: tuple[int, int], threads: int | None = None) -> tuple[Path, float]:
    """The decoded array of source ``k`` of ``base`` at ``size``, built if missing; (path, seconds spent building).

    One process builds, under a lock file next to it; the others wait, then find it. Older arrays of
    the same split and size (another key: a repack, another Pillow) are removed once the new one is in
    place (a process still mapping one keeps its pages)."""
    source = base.sources[k]
    path = decoded_path(source.root, base.split, size)
    if path.is_file():
        return path, 0.0
    _writable_dir(path.parent)
    t0 = time.perf_counter()
    with open(path.parent / f".{base.split}-{size[0]}x{size[1]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():  # another process built it while this one waited
            return path, 0.0
        _check_space(path.parent, decoded_nbytes(source.count, size),
                     f"the decoded {source.dataset}/{base.split} at {size[0]}x{size[1]}")
        n = threads or len(os.sched_getaffinity(0))
        _write(path, base, source, size, n)
        for old in path.parent.glob(f"{base.split}-{size[0]}x{size[1]}-*.npy"):
            if old != path:
                old.unlink(missing_ok=True)
    return path, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Stores


def _map_array(path: str, count: int, size: tuple[int, int], expect: ShardFile | None) -> tuple[np.ndarray, ShardFile]:
    """Map a decoded file read-only as ``(count, 3, H, W)`` uint8, checking its header (and identity: ``expect``)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            ident = ShardFile.of(path, st)
            if expect is not None and ident != expect:
                raise DecodedStoreError(f"{path}: decoded array replaced or changed since the store was opened; "
                                        "restart the run")
            try:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f) if version == (1, 0) else ((), 1, None)
            except ValueError:  # not an .npy header at all
                shape, fortran, dtype = (), 1, None
            want = (count, 3, size[0], size[1])
            if (shape != want or fortran or dtype != np.uint8 or f.tell() != _HEADER
                    or st.st_size != decoded_nbytes(count, size)):
                raise DecodedStoreError(f"{path}: not the decoded array expected ({want} uint8, "
                                        f"{decoded_nbytes(count, size)} bytes); remove it and run again "
                                        "(it is rebuilt)")
            return np.memmap(f, dtype=np.uint8, mode="r", offset=_HEADER, shape=want), ident
    except FileNotFoundError:
        raise DecodedStoreError(f"{path}: decoded array removed since the store was opened; restart the run") from None


def _adopt_index(dst: SampleIndex, base: SampleIndex) -> None:
    """``dst`` shares ``base``'s catalogue (the same arrays, not copies)."""
    for name in _INDEX:
        setattr(dst, name, getattr(base, name))


class DecodedSampleStore(SampleIndex):
    """``base``'s samples plus their decoded pixels, one read-only memory map per source (see the module docstring).

    ``images(idx)`` returns the ``B × 3 × H × W`` uint8 pixels of global samples ``idx`` (a copy out of
    the page cache), ``get_bytes(i)`` the encoded bytes (from ``base``: the per-image path still works on
    this store). Maps are per process: forked workers use the parent's, an unpickled store (a spawned
    worker) maps again on first use, refusing a file replaced since (:class:`~trainer.data.store.ShardFile`).
    """

    def __init__(self, base: SampleIndex, size: tuple[int, int], paths: list[str]) -> None:
        _adopt_index(self, base)
        self.base = base
        self.size = (int(size[0]), int(size[1]))
        self.paths = paths
        self.starts = np.array([s.start for s in self.sources], dtype=np.int64)
        self._maps: list[np.ndarray | None] = []
        self.files: list[ShardFile] = []
        for path, s in zip(paths, self.sources):
            mm, ident = _map_array(path, s.count, self.size, None)
            self._maps.append(mm)
            self.files.append(ident)

    @property
    def nbytes(self) -> int:
        """Bytes of decoded pixels served (every file's size less its header)."""
        return sum(f.size - _HEADER for f in self.files)

    @property
    def mapped_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def _array(self, k: int) -> np.ndarray:
        m = self._maps[k]
        if m is None:
            m, _ = _map_array(self.paths[k], self.sources[k].count, self.size, self.files[k])
            self._maps[k] = m
        return m

    def images(self, idx: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(B, 3, H, W)`` uint8 pixels of global samples ``idx`` (written into ``out`` when given)."""
        idx = np.asarray(idx, dtype=np.int64)
        if out is None:
            out = np.empty((len(idx), 3, *self.size), dtype=np.uint8)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"DecodedSampleStore: index outside 0..{len(self) - 1}")
        src = np.searchsorted(self.starts, idx, side="right") - 1
        if len(self.sources) == 1:  # mode "clip": bounds checked above, and "raise" would buffer the output
            np.take(self._array(0), idx, axis=0, out=out, mode="clip")
        else:
            for k in np.unique(src).tolist():
                sel = np.flatnonzero(src == k)
                out[sel] = self._array(k)[idx[sel] - self.starts[k]]
        return out

    def get_bytes(self, i: int) -> bytes:
        return self.base.get_bytes(i)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self.paths)  # a memmap would pickle its pixels; the receiver maps on use
        return state

    def close(self) -> None:
        self._maps = [None] * len(self.paths)
        close = getattr(self.base, "close", None)
        if close is not None:
            close()


class DeviceDecodeStore(SampleIndex):
    """``base``'s samples for ``data.pipeline=gpu_decode``: batches carry JPEG bytes, decoded on the device."""

    def __init__(self, base: SampleIndex, size: tuple[int, int]) -> None:
        _adopt_index(self, base)
        self.base = base
        self.size = (int(size[0]), int(size[1]))
        not_jpeg = sorted({self.exts[c] for c in np.unique(self.ext_code).tolist()} - {"jpg"})
        if not_jpeg:
            raise UserError(f"data.pipeline=gpu_decode: the {self.split} split holds {', '.join(not_jpeg)} images "
                            "(the device decoder reads JPEG only); use data.pipeline=decoded")

    def get_bytes(self, i: int) -> bytes:
        return self.base.get_bytes(i)

    def close(self) -> None:
        close = getattr(self.base, "close", None)
        if close is not None:
            close()


PIPELINES = ("per_image", "decoded", "gpu_decode")
"""``data.pipeline`` choices (``trainer.config.DATA_PIPELINES``)."""


def _report(base: SampleIndex, k: int, size: tuple[int, int], path: Path, built_s: float) -> str:
    s = base.sources[k]
    n = path.stat().st_size
    how = f"built in {built_s:.1f} s" if built_s else "cached"
    line = (f"[data] decoded store {s.dataset}/{base.split}: {s.count} images x 3x{size[0]}x{size[1]} uint8 = "
            f"{_gib(n)} ({how}) {path}")
    avail = _mem_available()
    if avail is not None and n > avail:
        line += f"; more than the {_gib(avail)} of RAM available: pages will be read from disk again"
    return line


def _mem_available() -> int | None:
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            return 1024 * int(next(line for line in f if line.startswith("MemAvailable:")).split()[1])
    return None


def open_pipeline_split(store: str, sources: Sequence[str | os.PathLike[str]], split: str, relabel: bool,
                        pipeline: str, size: Sequence[int], verify: bool = True,
                        log: Callable[[str], None] | None = None) -> SampleIndex:
    """``split`` of ``sources`` for ``data.pipeline``: the plain store (``per_image``), decoded or device-decode.

    ``log`` gets one line per source of a decoded store (its size and file; default: printed on the main
    rank)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"data.pipeline={pipeline!r}: expected one of {PIPELINES}")
    if pipeline == "gpu_decode" and not torch.cuda.is_available():
        raise UserError("data.pipeline=gpu_decode: no CUDA device here (it decodes on the GPU); use "
                        "data.pipeline=decoded or per_image")
    base = open_split(store, sources, split, relabel=relabel, verify=verify)
    hw = (int(size[0]), int(size[1]))
    if pipeline == "per_image":
        return base
    if pipeline == "gpu_decode":
        return DeviceDecodeStore(base, hw)
    paths = []
    for k in range(len(base.sources)):
        path, built_s = ensure_decoded(base, k, hw)
        paths.append(str(path.resolve()))
        line = _report(base, k, hw, path, built_s)
        if log is not None:
            log(line)
        elif dist.is_main():
            print(line, flush=True)
    return DecodedSampleStore(base, hw, paths)


# --------------------------------------------------------------------------------------------
# Batches: the batch contract from a whole list of (index, seed) at once


def _seeds(items: Sequence[Any], random: bool) -> tuple[np.ndarray, list[int] | None]:
    """``items`` of ``(index, seed)`` or plain indices → (indices, seeds or None), as ``ReIDDataset`` reads them."""
    if items and isinstance(items[0], tuple):
        return np.array([int(i) for i, _ in items], dtype=np.int64), [int(s) for _, s in items]
    idx = np.array([int(i) for i in items], dtype=np.int64)
    if not random:
        return idx, None
    return idx, torch.randint(0, 1 << 62, (len(idx),)).tolist()  # what ReIDDataset draws per sample, batched


def _meta(store: SampleIndex, idx: np.ndarray, seeds: list[int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {k: torch.from_numpy(getattr(store, k)[idx].astype(np.int64))
                           for k in ("pid", "camid", "domain", "index")}
    if seeds is not None:
        out["seed"] = torch.tensor([s & ((1 << 63) - 1) for s in seeds], dtype=torch.int64)
    return out


def as_batch(batch: Any) -> Any:
    """``collate_fn`` of the batched datasets: their ``__getitems__`` already returns the batch."""
    return batch


class DecodedBatches(Dataset):
    """Batches of a :class:`DecodedSampleStore`: ``__getitems__([(i, seed), …])`` → the batch contract.

    The augmentation parameters are drawn here, from each sample's seed. With ``defer=False`` the
    batch is augmented here too (CPU, in the DataLoader worker) and ``img`` is the float32 batch; with
    ``defer=True`` ``img`` stays uint8 and ``aug`` carries the parameters, for :func:`finish` on the
    training device."""

    def __init__(self, store: DecodedSampleStore, augment: BatchAugment, defer: bool = False) -> None:
        if tuple(store.size) != tuple(augment.size):
            raise ValueError(f"decoded store at {store.size}, transform at {augment.size}: they must agree")
        self.store = store
        self.augment = augment
        self.defer = defer
        self._pixels: torch.Tensor | None = None
        """Where a batch's pixels are read before augmenting here: kept between batches (no fresh pages)."""

    def __len__(self) -> int:
        return len(self.store)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pixels": None}

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([item])

    def __getitems__(self, items: Sequence[Any]) -> dict[str, Any]:
        idx, seeds = _seeds(items, self.augment.random)
        h, w = self.store.size
        shape = (len(idx), 3, h, w)
        if self.defer:  # handed over as it is
            pixels = shared_empty(shape, torch.uint8)
        else:
            if self._pixels is None or self._pixels.shape != shape:
                self._pixels = torch.empty(shape, dtype=torch.uint8)
            pixels = self._pixels
        self.store.images(idx, out=pixels.numpy())
        params = self.augment.draw(seeds) if self.augment.random and seeds is not None else None
        batch = _meta(self.store, idx, seeds)
        if self.defer:
            batch["img"] = pixels
            if params is not None:
                batch["aug"] = params
        else:
            batch["img"] = self.augment(pixels, params, out=shared_empty((len(idx), 3, h, w), torch.float32))
        return batch


class JpegBatches(Dataset):
    """Batches of a :class:`DeviceDecodeStore`: ``jpeg`` (a list of uint8 byte tensors) and ``aug``, for
    :func:`finish` to decode and augment on the device."""

    def __init__(self, store: DeviceDecodeStore, augment: BatchAugment) -> None:
        if tuple(store.size) != tuple(augment.size):
            raise ValueError(f"store at {store.size}, transform at {augment.size}: they must agree")
        self.store = store
        self.augment = augment

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([item])

    def __getitems__(self, items: Sequence[Any]) -> dict[str, Any]:
        idx, seeds = _seeds(items, self.augment.random)
        batch = _meta(self.store, idx, seeds)
        batch["jpeg"] = [torch.frombuffer(bytearray(self.store.get_bytes(int(i))), dtype=torch.uint8)
                         for i in idx.tolist()]
        if self.augment.random and seeds is not None:
            batch["aug"] = self.augment.draw(seeds)
        return batch


def decode_on_device(jpegs: list[torch.Tensor], size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """JPEG bytes → ``B × 3 × H × W`` uint8 on ``device``: one batched ``decode_jpeg`` (nvJPEG on a GPU), then
    a bicubic antialiased resize per distinct source size (images already at ``size`` are kept as decoded,
    as ``Resize`` keeps them)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; decode_jpeg is still its nvJPEG path
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    h, w = size
    out = torch.empty(len(decoded), 3, h, w, dtype=torch.uint8, device=device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, img in enumerate(decoded):
        groups.setdefault(tuple(img.shape), []).append(k)
    for shape, ks in groups.items():
        same = torch.stack([decoded[k] for k in ks])
        if shape[1:] != (h, w):
            same = resize(same, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)
        out[torch.tensor(ks, device=device)] = same
    return out


def finish(batch: dict[str, Any], augment: BatchAugment, device: torch.device) -> dict[str, Any]:
    """A deferred batch (``DecodedBatches(defer=True)``, :class:`JpegBatches`) made the batch contract on ``device``."""
    if "jpeg" in batch:
        pixels = decode_on_device(batch.pop("jpeg"), augment.size, device)
    else:
        pixels = batch["img"].to(device, non_blocking=True)
    params = batch.pop("aug", None)
    batch["img"] = augment(pixels, params)
    return batch


class Finished:
    """An iterable of deferred batches (a DataLoader) yielding them finished on ``device`` (keeps ``len``)."""

    def __init__(self, loader: Any, augment: BatchAugment, device: torch.device) -> None:
        self.loader = loader
        self.augment = augment
        self.device = device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield finish(batch, self.augment, self.device)

    def __len__(self) -> int:
        return len(self.loader)


# --------------------------------------------------------------------------------------------
# Ahead of time: python -m trainer.data.decoded


def main(argv: list[str] | None = None) -> int:
    return run_cli("trainer.data.decoded", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.data.decoded",
                                 description="Build the decoded store of packed datasets (what data.pipeline=decoded "
                                             "builds on first use) and print its size.")
    ap.add_argument("packs", nargs="+", help="packed dataset folders (holding manifest.json)")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), required=True,
                    help="the training size: model.img_size (256 128 for PAT, 384 128 for TMGF)")
    ap.add_argument("--split", default="train", help="split to decode (default train)")
    args = ap.parse_args(argv)
    if min(args.size) <= 0:
        raise UserError(f"--size {args.size[0]} {args.size[1]}: expected two positive integers (H W)")
    for root in as_roots(args.packs):
        open_pipeline_split("memory", [root], args.split, relabel=False, pipeline="decoded", size=args.size,
                            log=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["PIPELINES", "DecodedSampleStore", "DeviceDecodeStore", "DecodedStoreError", "DecodedBatches",
           "JpegBatches", "Finished", "as_batch", "decode_on_device", "decoded_nbytes", "decoded_path",
           "ensure_decoded", "finish", "open_pipeline_split"]
