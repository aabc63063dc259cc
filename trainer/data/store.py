"""The two sample stores: a split's catalogue (:mod:`trainer.data.catalogue`) plus image bytes by global index.

- :class:`SampleStore` holds the *encoded* image bytes of the split in RAM, in one contiguous
  ``uint8`` buffer plus offsets. ReID sets are small (MSMT17 train ≈ 0.5 GB encoded), and one
  buffer instead of 100k ``bytes`` objects means DataLoader workers forked from the main
  process share its pages: reading a sample touches no Python refcount, so nothing is copied.
- :class:`WidsSampleStore` serves the same interface from the tar shards on disk through the
  webdataset project's indexed reader (``wids.ShardListDataset``), for sets beyond RAM.

Both read every shard once when built, whole and sequentially, through the pack reader
(:mod:`shards.reader`, which the verifier uses too): size and sha256 against the manifest
(``verify``), then every tar header and sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shards.reader import REPACK, ShardError, read_samples
from shards.records import Manifest, ShardInfo, read_manifest, sample_key
from trainer.data.catalogue import SampleIndex, SourceInfo, SourceMeta, as_roots, merge_sources, shards_of_split

Plan = list[tuple[Path, list[ShardInfo]]]
"""Per source: its folder and the shards of the split, in index order."""


def _read_shard(path: Path, info: ShardInfo, verify: bool) -> bytes:
    """One big sequential read of a shard; size and sha256 (``verify``) checked against the manifest.

    ``shards.verify`` checks the same with its own words ("manifest.json says …"), as its users
    read them in docs/errors.md; the tar and the samples are read by the one reader."""
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in the manifest is missing")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != info.bytes:
        raise ShardError(f"{path}: {len(data)} bytes, manifest says {info.bytes} (truncated or replaced shard)")
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise ShardError(f"{path}: sha256 {digest[:16]}… does not match the manifest's {info.sha256[:16]}…")
    return data


def read_split(plan: Plan, verify: bool, take_image: Callable[[memoryview], None] | None = None) -> list[SourceMeta]:
    """The metadata of every sample of ``plan``, one shard in RAM at a time.

    ``take_image`` gets each image's bytes in index order: a view of the shard's bytes, valid during
    the call only."""
    metas: list[SourceMeta] = []
    try:
        for root, shards in plan:
            meta = SourceMeta()
            for info in shards:
                path = root / info.name
                buf = memoryview(_read_shard(path, info, verify))
                for sample in read_samples(path, buf, info):
                    if take_image is not None:
                        take_image(sample.image.data(buf))
                    meta.add(sample)
            metas.append(meta)
    except ShardError as exc:
        raise ShardError(f"{exc}; {REPACK}") from None
    return metas


def _plan_split(roots: list[Path], split: str) -> tuple[list[Manifest], Plan]:
    """The sources' manifests and the shards of ``split`` in each."""
    manifests = [read_manifest(r) for r in roots]
    return manifests, [(r, shards_of_split(r, m, split)) for r, m in zip(roots, manifests)]


# --------------------------------------------------------------------------------------------
# In-memory store


class SampleStore(SampleIndex):
    """Encoded image bytes of a split in one contiguous buffer, with the merged metadata.

    ``get_bytes(i)`` returns the original file bytes of global sample ``i`` (no re-encode).
    """

    def __init__(self, split: str, relabel: bool, sources: list[SourceInfo], metas: list[SourceMeta],
                 buffer: np.ndarray, offsets: np.ndarray) -> None:
        super().__init__(split, relabel, sources, metas)
        if offsets.shape != (len(self) + 1,):
            raise ValueError(f"SampleStore: offsets has shape {offsets.shape}, expected ({len(self) + 1},)")
        self.buffer = buffer
        self.offsets = offsets

    @property
    def nbytes(self) -> int:
        """Bytes of encoded images held."""
        return int(self.buffer.nbytes)

    def get_bytes(self, i: int) -> bytes:
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes()

    @classmethod
    def from_manifests(cls, sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], split: str,
                       relabel: bool, verify: bool = True) -> SampleStore:
        """Read ``split`` of every packed source (folder with ``manifest.json``) into one store.

        Each shard is read with one sequential read, its size and sha256 checked against the
        manifest (``verify``), and its samples checked for key/index contiguity.
        """
        roots = as_roots(sources)
        manifests, plan = _plan_split(roots, split)
        buffer = np.empty(sum(s.bytes for _, shards in plan for s in shards), dtype=np.uint8)  # upper bound
        ends = [0]

        def take_image(image: memoryview) -> None:  # straight from the shard's bytes into the buffer
            start = ends[-1]
            buffer[start : start + len(image)] = np.frombuffer(image, dtype=np.uint8)
            ends.append(start + len(image))

        metas = read_split(plan, verify, take_image)
        buffer.resize(ends[-1], refcheck=False)  # realloc in place: no second copy of the data
        return cls(split, relabel, merge_sources(roots, manifests, metas), metas, buffer, np.array(ends, np.int64))


# --------------------------------------------------------------------------------------------
# On-disk store through wids


class _LocalNames:
    """Picklable wids ``localname``: shard path → a unique file name in the cache folder."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def __call__(self, url: str) -> str:
        return self.names[url]


class WidsSampleStore(SampleIndex):
    """The :class:`SampleStore` interface over the tar shards on disk, read by ``wids``.

    The manifests' shard lists become one ``wids.ShardListDataset`` (``url`` + ``nsamples`` per
    shard, sources concatenated in order), whose index is exactly the global index. Metadata is
    read once from the ``json`` members by the pack reader, which groups members into samples as
    wids does. With ``copy=False`` the cache folder holds symlinks to the shards (read in place,
    page cache does the caching); with ``copy=True`` wids copies each shard into the cache folder
    on first use (a node-local cache of a shared filesystem). The wids reader is opened lazily in
    each process, so the store pickles into DataLoader workers.
    """

    def __init__(self, split: str, relabel: bool, sources: list[SourceInfo], metas: list[SourceMeta],
                 shards: list[dict[str, Any]], cache_dir: str, copy: bool, lru_size: int) -> None:
        super().__init__(split, relabel, sources, metas)
        self.shards = shards
        self.cache_dir = cache_dir
        self.copy = copy
        self.lru_size = lru_size
        self._ds: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ds"] = None  # open mmaps do not pickle; every process opens its own reader
        return state

    def _dataset(self) -> Any:
        if self._ds is None:
            import wids

            names = {s["url"]: s["local"] for s in self.shards}
            with contextlib.redirect_stderr(io.StringIO()):  # wids prints a banner on construction
                self._ds = wids.ShardListDataset(
                    [{"url": s["url"], "nsamples": s["nsamples"]} for s in self.shards],
                    localname=_LocalNames(names), transformations=[], lru_size=self.lru_size,
                )
        return self._ds

    def get_bytes(self, i: int) -> bytes:
        sample = self._dataset()[int(i)]
        want = sample_key(self.split, int(self.split_index[i]))
        if sample["__key__"] != want:
            raise ShardError(f"{sample['__shard__']}: key {sample['__key__']!r} at index {i}, expected {want!r}")
        ext = "." + self.exts[int(self.ext_code[i])]  # wids keeps the dot of the extension
        return sample[ext].getvalue()

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None

    @classmethod
    def from_manifests(cls, sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], split: str,
                       relabel: bool, verify: bool = True, cache_dir: str | os.PathLike[str] | None = None,
                       copy: bool = False, lru_size: int = 10) -> WidsSampleStore:
        """Index ``split`` of every source without keeping image bytes (see the class docstring).

        Each shard is read once, sequentially (one shard in RAM at a time), for its json members
        and its size + sha256 (``verify``). ``cache_dir`` defaults to a fresh temporary folder.
        """
        roots = as_roots(sources)
        manifests, plan = _plan_split(roots, split)
        metas = read_split(plan, verify)
        cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="reid-wids-"))
        cache.mkdir(parents=True, exist_ok=True)
        shard_list: list[dict[str, Any]] = []
        for s_idx, ((root, shards), manifest) in enumerate(zip(plan, manifests)):
            for info in shards:
                path = (root / info.name).resolve()  # wids' url: the file itself
                local = cache / f"{s_idx:03d}-{manifest.dataset}-{info.name.replace('/', '_')}"
                if not copy and not local.exists():
                    os.symlink(path, local)
                shard_list.append({"url": str(path), "nsamples": info.count, "local": str(local)})
        return cls(split, relabel, merge_sources(roots, manifests, metas), metas, shard_list, str(cache), copy,
                   lru_size)
