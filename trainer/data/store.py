"""The sample stores: a split's catalogue (:mod:`trainer.data.catalogue`) plus image bytes by global index.

- :class:`MappedSampleStore` (``data.store=memory``, the default) serves the *encoded* image bytes
  as slices of read-only memory maps of the shard files themselves. The kernel's page cache holds
  one copy of each shard per node, shared by every rank and DataLoader worker that maps it, where a
  private buffer per process would hold one copy per rank (W copies on a node of W ranks).
- :class:`SampleStore` copies the encoded bytes into one private ``uint8`` buffer per process (no
  Python object per sample, so workers forked from the process share its pages). What
  ``data.store=memory`` opened before the mapped store; kept as the reference the others are
  tested against, and for benchmarks.
- :class:`WidsSampleStore` serves the same interface from the tar shards on disk through the
  webdataset project's indexed reader (``wids.ShardListDataset``), for sets beyond RAM.

All read every shard once when built, whole and sequentially, through the pack reader
(:mod:`shards.reader`, which the verifier uses too): size and sha256 against the manifest
(``verify``), then every tar header and sample. :func:`memory_use` says where a process's memory
is (private vs file-backed, and the pages of a store's shard mappings): Linux only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards.reader import REPACK, ShardError, TarMember, read_samples
from shards.records import Manifest, ShardInfo, read_manifest, sample_key
from trainer.data.catalogue import SampleIndex, SourceInfo, SourceMeta, as_roots, merge_sources, shards_of_split

Plan = list[tuple[Path, list[ShardInfo]]]
"""Per source: its folder and the shards of the split, in index order."""
Loader = Callable[[Path, ShardInfo, bool], bytes | mmap.mmap]
"""A shard's bytes, size and sha256 (``verify``) checked against the manifest."""
TakeImage = Callable[[int, TarMember, memoryview], None]
"""Gets each image in index order: the shard's position in the plan (all sources), the image member
and the shard's bytes (a view valid during the call only)."""


def _missing(path: Path) -> ShardError:
    return ShardError(f"{path}: shard listed in the manifest is missing")


def _check_size(path: Path, size: int, info: ShardInfo) -> None:
    if size != info.bytes:
        raise ShardError(f"{path}: {size} bytes, manifest says {info.bytes} (truncated or replaced shard)")


def _check_digest(path: Path, data: bytes | mmap.mmap, info: ShardInfo) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise ShardError(f"{path}: sha256 {digest[:16]}… does not match the manifest's {info.sha256[:16]}…")


def _read_shard(path: Path, info: ShardInfo, verify: bool) -> bytes:
    """One big sequential read of a shard; size and sha256 (``verify``) checked against the manifest.

    ``shards.verify`` checks the same with its own words ("manifest.json says …"), as its users
    read them in docs/errors.md; the tar and the samples are read by the one reader."""
    if not path.is_file():
        raise _missing(path)
    with open(path, "rb") as f:
        data = f.read()
    _check_size(path, len(data), info)
    if verify:
        _check_digest(path, data, info)
    return data


def read_split(plan: Plan, verify: bool, take_image: TakeImage | None = None,
               load: Loader = _read_shard) -> list[SourceMeta]:
    """The metadata of every sample of ``plan``, one shard loaded (by ``load``) at a time."""
    metas: list[SourceMeta] = []
    k = 0
    try:
        for root, shards in plan:
            meta = SourceMeta()
            for info in shards:
                path = root / info.name
                buf = memoryview(load(path, info, verify))
                for sample in read_samples(path, buf, info):
                    if take_image is not None:
                        take_image(k, sample.image, buf)
                    meta.add(sample)
                k += 1
            metas.append(meta)
    except ShardError as exc:
        raise ShardError(f"{exc}; {REPACK}") from None
    return metas


def _plan_split(roots: list[Path], split: str) -> tuple[list[Manifest], Plan]:
    """The sources' manifests and the shards of ``split`` in each."""
    manifests = [read_manifest(r) for r in roots]
    return manifests, [(r, shards_of_split(r, m, split)) for r, m in zip(roots, manifests)]


# --------------------------------------------------------------------------------------------
# Mapped store: the shards in the page cache, one copy per node


@dataclass(frozen=True)
class ShardFile:
    """A mapped shard: its resolved path and the file's identity when the store checked it."""

    path: str
    size: int
    dev: int
    ino: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> ShardFile:
        return cls(path, st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns)


def _map(fd: int, size: int) -> mmap.mmap | bytes:
    """The file read-only mapped (``b""`` if empty: an empty file cannot be mapped, nor is it a shard)."""
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else b""


def _reopen(shard: ShardFile) -> mmap.mmap | bytes:
    """Map the shard again in this process (a spawned DataLoader worker, an unpickled store).

    The file must be the one checked when the store was built: a pack replaced since (``shards.pack
    --overwrite`` renames a new folder in place) would serve other bytes under the same index."""
    try:
        with open(shard.path, "rb") as f:
            st = os.fstat(f.fileno())
            if ShardFile.of(shard.path, st) != shard:
                raise ShardError(f"{shard.path}: shard replaced or changed since the store was opened; "
                                 "restart the run (a pack must not change under a running job)")
            return _map(f.fileno(), st.st_size)
    except FileNotFoundError:
        raise ShardError(f"{shard.path}: shard removed since the store was opened; restart the run") from None


class MappedSampleStore(SampleIndex):
    """Encoded image bytes served from read-only memory maps of the shard files, with the merged metadata.

    ``get_bytes(i)`` returns the original file bytes of global sample ``i``: a slice of shard
    ``shard[i]`` at ``start[i]`` (the image member's data, as the pack reader located it), ``size[i]``
    bytes. The pages belong to the page cache, not to the process: every process mapping a shard
    shares one copy of it (Linux counts them as ``Shared_Clean`` file pages, each process's ``Pss``
    a share of them). Under memory pressure the kernel may drop pages and read them from the file
    again, where a private buffer would push the node out of memory.

    The maps are opened per process: workers forked from the process use its maps, an unpickled
    store (spawned workers) maps each shard again on first use, checking that the file is still the
    one checked at open (:class:`ShardFile`). A shard rewritten in place while mapped (``cp`` over
    a pack in use) may change the bytes served or end the process with ``SIGBUS``; ``shards.pack``
    replaces a pack by renaming a new folder, which leaves mapped files intact.
    """

    def __init__(self, split: str, relabel: bool, sources: list[SourceInfo], metas: list[SourceMeta],
                 files: list[ShardFile], shard: np.ndarray, start: np.ndarray, size: np.ndarray,
                 maps: list[mmap.mmap | bytes | None] | None = None) -> None:
        super().__init__(split, relabel, sources, metas)
        n = len(self)
        for name, a in (("shard", shard), ("start", start), ("size", size)):
            if a.shape != (n,):
                raise ValueError(f"MappedSampleStore: {name} has shape {a.shape}, expected ({n},)")
        self.files = files
        self.shard = shard
        self.start = start
        self.size = size
        self._maps: list[mmap.mmap | bytes | None] = list(maps) if maps is not None else [None] * len(files)

    @property
    def nbytes(self) -> int:
        """Bytes of encoded images served (what :class:`SampleStore` would hold privately)."""
        return int(self.size.sum())

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the shard files mapped (images, json members and tar headers)."""
        return sum(f.size for f in self.files)

    def _mapping(self, k: int) -> mmap.mmap | bytes:
        m = self._maps[k]
        if m is None:
            m = self._maps[k] = _reopen(self.files[k])
        return m

    def get_bytes(self, i: int) -> bytes:
        start = int(self.start[i])
        return self._mapping(int(self.shard[i]))[start : start + int(self.size[i])]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self.files)  # a map does not pickle; the receiver maps on first use
        return state

    def close(self) -> None:
        """Drop this process's maps (unmapped once no slice of them is alive); they reopen on use."""
        self._maps = [None] * len(self.files)

    @classmethod
    def from_manifests(cls, sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], split: str,
                       relabel: bool, verify: bool = True) -> MappedSampleStore:
        """Map ``split`` of every packed source (folder with ``manifest.json``) into one store.

        Each shard is mapped, its size and sha256 (``verify``, a sequential pass over the map that
        also brings the shard into the page cache) checked against the manifest, and its samples
        checked for key/index contiguity by the pack reader, which gives each image's offset.
        """
        roots = as_roots(sources)
        manifests, plan = _plan_split(roots, split)
        files: list[ShardFile] = []
        maps: list[mmap.mmap | bytes | None] = []
        where: list[tuple[int, int, int]] = []

        def load(path: Path, info: ShardInfo, verify: bool) -> mmap.mmap | bytes:
            if not path.is_file():
                raise _missing(path)
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                _check_size(path, st.st_size, info)
                data = _map(f.fileno(), st.st_size)
            if verify:
                _check_digest(path, data, info)
            files.append(ShardFile.of(str(path.resolve()), st))
            maps.append(data)
            return data

        def take_image(k: int, image: TarMember, buf: memoryview) -> None:
            where.append((k, image.offset, image.size))

        metas = read_split(plan, verify, take_image, load)
        table = np.array(where, dtype=np.int64).reshape(-1, 3)
        return cls(split, relabel, merge_sources(roots, manifests, metas), metas, files,
                   table[:, 0].astype(np.int32), table[:, 1].copy(), table[:, 2].copy(), maps)


# --------------------------------------------------------------------------------------------
# In-memory store: a private copy per process


class SampleStore(SampleIndex):
    """Encoded image bytes of a split in one contiguous private buffer, with the merged metadata.

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

        def take_image(k: int, image: TarMember, buf: memoryview) -> None:  # straight from the shard's bytes
            start = ends[-1]
            buffer[start : start + image.size] = np.frombuffer(image.data(buf), dtype=np.uint8)
            ends.append(start + image.size)

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


# --------------------------------------------------------------------------------------------
# Choice by name


STORES: dict[str, Callable[..., SampleIndex]] = {
    "memory": MappedSampleStore.from_manifests,
    "wids": WidsSampleStore.from_manifests,
}
"""``data.store`` → the store it opens (the choices of ``trainer.config.DATA_STORES``)."""


def open_split(store: str, sources: Sequence[str | os.PathLike[str]], split: str, relabel: bool,
               verify: bool = True) -> SampleIndex:
    """``split`` of ``sources`` in the store named ``store`` (a key of :data:`STORES`)."""
    if store not in STORES:
        raise ValueError(f"data.store={store!r}: expected one of {tuple(STORES)}")
    return STORES[store](sources, split, relabel=relabel, verify=verify)


# --------------------------------------------------------------------------------------------
# Where the memory is (Linux /proc)


@dataclass(frozen=True)
class MemoryUse:
    """A process's resident memory by kind, in bytes, from ``/proc/<pid>/smaps_rollup`` and ``smaps``.

    ``pss`` (proportional set size) divides each page by the number of processes mapping it, so the
    ``pss`` of the processes of a node add up to the node's memory in use; a page cache page mapped
    by W processes counts ``1/W`` in each."""

    rss: int
    pss: int
    anon: int
    """Private memory (heap, a :class:`SampleStore` buffer): ``Pss_Anon`` (``Anonymous`` before Linux 5.x)."""
    file: int
    """File-backed pages mapped (code, shard maps): ``Pss_File`` (``rss - Anonymous`` before Linux 5.x)."""
    shards_rss: int
    """Pages of the store's shard files mapped in this process."""
    shards_pss: int
    """The same, each page divided by the number of processes mapping it."""


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ [0-9a-f]+ \S+ \d+ *(.*)$")


def _kb(line: str) -> tuple[str, int] | None:
    """``Key:   123 kB`` → (key, bytes); None for any other line."""
    key, _, rest = line.partition(":")
    parts = rest.split()
    return (key, 1024 * int(parts[0])) if len(parts) == 2 and parts[1] == "kB" else None


def _kb_fields(lines: Iterable[str]) -> dict[str, int]:
    return {kv[0]: kv[1] for kv in map(_kb, lines) if kv is not None}


def shard_files(store: SampleIndex) -> set[str]:
    """The files the store maps (as ``/proc/*/smaps`` names them: resolved paths); none for :class:`SampleStore`.

    A decoded store (:mod:`trainer.data.decoded`) lists its decoded arrays as :class:`ShardFile` too."""
    files = getattr(store, "files", None)
    if isinstance(files, list) and all(isinstance(f, ShardFile) for f in files):
        return {f.path for f in files}
    if isinstance(store, WidsSampleStore):
        return {os.path.realpath(s["local"]) for s in store.shards}
    return set()


def memory_use(store: SampleIndex | None = None, pid: int | str = "self") -> MemoryUse:
    """Where process ``pid``'s memory is, and how much of it is ``store``'s shard maps. Linux only.

    Reads ``/proc/<pid>/smaps_rollup`` (Linux 4.14+) and, for a store, ``/proc/<pid>/smaps``; the
    other process must be readable by this one (same user)."""
    proc = Path("/proc") / str(pid)
    with open(proc / "smaps_rollup") as f:
        total = _kb_fields(f)
    files = shard_files(store) if store is not None else set()
    shards = {"Rss": 0, "Pss": 0}
    if files:
        inside = False
        with open(proc / "smaps") as f:
            for line in f:
                head = _MAPPING.match(line)
                if head is not None:
                    inside = head.group(1) in files
                elif inside and line.startswith(("Rss:", "Pss:")):
                    key, value = _kb(line) or ("", 0)
                    shards[key] += value
    anon = total.get("Pss_Anon", total.get("Anonymous", 0))
    file = total.get("Pss_File", total["Rss"] - total.get("Anonymous", 0))
    return MemoryUse(total["Rss"], total["Pss"], anon, file, shards["Rss"], shards["Pss"])
