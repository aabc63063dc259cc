"""Packed shards → a random-access view of one split of one or more sources, by global index.

Two stores share one catalogue (the per-sample metadata and the multi-source merge):

- :class:`SampleStore` holds the *encoded* image bytes of the split in RAM, in one contiguous
  ``uint8`` buffer plus offsets. ReID sets are small (MSMT17 train ≈ 0.5 GB encoded), and one
  buffer instead of 100k ``bytes`` objects means DataLoader workers forked from the main
  process share its pages: reading a sample touches no Python refcount, so nothing is copied.
- :class:`WidsSampleStore` serves the same interface from the tar shards on disk through the
  webdataset project's indexed reader (``wids.ShardListDataset``), for sets beyond RAM.

Merge rules (the batch contract): the global index is the concatenation of the sources in the
given order; ``domain`` is the source position; for training (``relabel=True``) pids become
``0..C-1`` over all sources (each source's sorted original pids, sources in order); camids are
shifted by the number of cameras of the sources before, so cameras of different sources differ.
Original pids and camids stay available as ``pid_orig``/``camid_orig``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from shards.errors import UserError
from shards.records import Manifest, ShardInfo, read_manifest, sample_key

IMAGE_MEMBERS = ("jpg", "jpeg", "png")
"""Member extensions that hold the image bytes of a sample (exactly one per sample)."""


class ShardError(UserError):
    """A shard that does not match its manifest: missing, truncated, corrupt or out of order."""


@dataclass(frozen=True)
class SourceInfo:
    """One merged source: where it came from and where its samples sit in the merged view."""

    root: str
    """Folder holding ``manifest.json`` and the shards."""
    dataset: str
    """The manifest's dataset name (``market1501``, ``msmt17``, …)."""
    start: int
    """Global index of the source's first sample."""
    count: int
    """Number of samples of the split in this source."""
    pid_offset: int
    """Added to the source-local label (relabel) — the first class id of this source."""
    num_pids: int
    """Distinct pids of the source's split."""
    cam_offset: int
    """Added to the source's camids."""
    num_cams: int
    """Camera slots reserved for the source (max of the manifest's per-split ``num_cams`` and max camid + 1)."""


@dataclass
class _SourceMeta:
    """Per-sample metadata of one source's split, in split-index order (before merging)."""

    pid: np.ndarray
    camid: np.ndarray
    relpath: list[str]
    ext: list[str]


# --------------------------------------------------------------------------------------------
# Shard reading and validation


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key/extension rule: the key ends at the first dot of the file's base name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _shards_of_split(root: Path, manifest: Manifest, split: str) -> list[ShardInfo]:
    """The split's shards, checked to be contiguous in index order and to add up to the split count."""
    if split not in manifest.splits:
        raise ShardError(f"{root / 'manifest.json'}: no split {split!r} (has {sorted(manifest.splits)})")
    shards = sorted(manifest.shards_of(split), key=lambda s: s.first_index)
    expected = 0
    for s in shards:
        if s.first_index != expected:
            raise ShardError(
                f"{root / s.name}: first_index={s.first_index}, expected {expected} (shards of split "
                f"{split!r} must be contiguous)"
            )
        expected += s.count
    if expected != manifest.splits[split].count:
        raise ShardError(
            f"{root / 'manifest.json'}: shards of split {split!r} hold {expected} samples, "
            f"splits.{split}.count says {manifest.splits[split].count}"
        )
    return shards


def _check_sample(path: Path, split: str, expected_index: int, key: str, members: dict[str, Any]) -> tuple[dict, str]:
    """Validate one grouped sample; returns (parsed json, image extension)."""
    want = sample_key(split, expected_index)
    if key != want:
        raise ShardError(f"{path}: key {key!r} where {want!r} was expected (samples out of order or missing)")
    if "json" not in members:
        raise ShardError(f"{path}: sample {key!r} has no json member (has {sorted(members)})")
    images = [e for e in IMAGE_MEMBERS if e in members]
    if len(images) != 1:
        raise ShardError(
            f"{path}: sample {key!r} needs exactly one image member of {IMAGE_MEMBERS}, has {sorted(members)}"
        )
    try:
        meta = json.loads(bytes(members["json"]))
        pid, camid, index = int(meta["pid"]), int(meta["camid"]), int(meta["index"])
        relpath, msplit = str(meta["relpath"]), meta["split"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{path}: sample {key!r}: bad json member ({exc!r})") from None
    if index != expected_index or msplit != split:
        raise ShardError(
            f"{path}: sample {key!r}: json says split={msplit!r} index={index}, expected split={split!r} "
            f"index={expected_index}"
        )
    return {"pid": pid, "camid": camid, "relpath": relpath}, images[0]


_ZERO_BLOCK = bytes(512)
_EXTENDED = (b"x", b"g", b"L", b"K")  # pax and GNU long-name headers: left to tarfile


class _NeedTarfile(Exception):
    """A header type the fast reader does not handle (pax / GNU extensions)."""


def _octal(field: bytes) -> int:
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _ustar_members(path: Path, buf: memoryview) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular member of an in-memory ustar archive.

    tarfile parses a header in ~100 µs of Python; the packer writes plain ustar, whose
    fixed-offset fields parse in a few µs. Header checksums are checked; a pax/GNU extension
    header raises :class:`_NeedTarfile` and the caller falls back to tarfile.
    """
    out: list[tuple[str, int, int]] = []
    n, off = len(buf), 0
    while off + 512 <= n:
        hdr = bytes(buf[off : off + 512])
        if hdr == _ZERO_BLOCK:
            return out  # end-of-archive marker
        try:
            chk = _octal(hdr[148:156])
            size = _octal(hdr[124:136])
        except ValueError:
            raise ShardError(f"{path}: corrupt tar header at byte {off}") from None
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ShardError(f"{path}: corrupt tar header at byte {off} (checksum mismatch)")
        flag = hdr[156:157]
        if flag in _EXTENDED:
            raise _NeedTarfile
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}" if prefix else name
        start = off + 512
        if start + size > n:
            raise ShardError(f"{path}: truncated inside member {name!r} (needs {start + size} bytes, has {n})")
        if flag in (b"0", b"\0", b"7"):
            out.append((name, start, size))
        off = start + -(-size // 512) * 512
    if off != n:  # a partial header, or a last member cut inside its block padding
        where = "a header" if off < n else "the last member's data/padding"
        raise ShardError(f"{path}: truncated tar: ends at byte {n} inside {where}")
    return out  # all members complete; only the end-of-archive marker is missing


def _tarfile_members(path: Path, buf: memoryview) -> list[tuple[str, int, int]]:
    """The same as :func:`_ustar_members` through tarfile (any tar format; slower)."""
    out: list[tuple[str, int, int]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    if m.offset_data + m.size > len(buf):
                        raise ShardError(f"{path}: truncated inside member {m.name!r}")
                    out.append((m.name, m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise ShardError(f"{path}: truncated or corrupt tar ({exc})") from None
    return out


def _scan_shard(path: Path, info: ShardInfo, split: str, buf: memoryview) -> Iterator[tuple[dict, str, memoryview]]:
    """Validated samples of one shard: (json meta, image extension, image bytes view), in index order.

    Members are grouped by key (webdataset's rule); keys must be ``sample_key(split, index)`` for
    consecutive indices from the shard's ``first_index``, and the count must match the manifest.
    """
    try:
        members = _ustar_members(path, buf)
    except _NeedTarfile:
        members = _tarfile_members(path, buf)
    groups: list[tuple[str, dict[str, memoryview]]] = []
    for name, start, size in members:
        k, ext = _split_name(name)
        if not groups or groups[-1][0] != k:
            groups.append((k, {}))
        groups[-1][1][ext] = buf[start : start + size]
    if len(groups) != info.count:
        last = groups[-1][0] if groups else None
        raise ShardError(f"{path}: {len(groups)} samples (last key {last!r}), manifest says count={info.count} "
                         f"(truncated shard?)")
    for n, (key, group) in enumerate(groups):
        meta, ext = _check_sample(path, split, info.first_index + n, key, group)
        yield meta, ext, group[ext]


def _read_shard_bytes(path: Path, info: ShardInfo, verify: bool) -> bytes:
    """One big sequential read of a shard; size and sha256 checked against the manifest."""
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


# --------------------------------------------------------------------------------------------
# The catalogue: merged metadata, shared by both stores


class SampleIndex:
    """Per-sample metadata of one split of one or more merged sources, addressed by global index.

    Arrays (length ``len(self)``): ``pid`` (relabelled for training, else original), ``pid_orig``,
    ``camid`` (offset per source), ``camid_orig``, ``domain`` (source position), ``index``
    (global, ``arange``), ``split_index`` (position in the source split), ``relpath`` (fixed-width
    numpy strings: no per-item Python objects), ``ext_code`` (into :attr:`exts`).
    Subclasses provide :meth:`get_bytes`.
    """

    exts: tuple[str, ...] = IMAGE_MEMBERS

    def __init__(self, split: str, relabel: bool, sources: list[SourceInfo], metas: list[_SourceMeta]) -> None:
        self.split = split
        self.relabel = relabel
        self.sources = sources
        self.pid_orig = np.concatenate([m.pid for m in metas]).astype(np.int64)
        self.camid_orig = np.concatenate([m.camid for m in metas]).astype(np.int64)
        counts = [len(m.pid) for m in metas]
        self.domain = np.repeat(np.arange(len(metas), dtype=np.int64), counts)
        self.split_index = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
        self.index = np.arange(len(self.pid_orig), dtype=np.int64)
        self.relpath = np.array([p for m in metas for p in m.relpath], dtype=str)
        self.ext_code = np.array([self.exts.index(e) for m in metas for e in m.ext], dtype=np.uint8)
        self.camid = self.camid_orig + np.repeat([s.cam_offset for s in sources], counts).astype(np.int64)
        if relabel:
            # label = source's pid offset + rank of the original pid among the source's sorted pids
            labels = []
            for s, m in zip(sources, metas):
                uniq, inv = np.unique(m.pid, return_inverse=True)
                labels.append(inv.astype(np.int64) + s.pid_offset)
            self.pid = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        else:
            self.pid = self.pid_orig.copy()

    # -- sizes and lookups ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_classes(self) -> int:
        """Number of training classes C (relabelled pids); distinct original (domain, pid) otherwise."""
        return int(sum(s.num_pids for s in self.sources))

    @property
    def num_cams(self) -> int:
        """Camera slots over all sources (offset camids are < this)."""
        return int(sum(s.num_cams for s in self.sources))

    @property
    def num_domains(self) -> int:
        return len(self.sources)

    def class_table(self) -> np.ndarray:
        """``(C, 2)`` int64: (domain, original pid) of each relabelled class id (relabel=True only)."""
        if not self.relabel:
            raise ValueError("class_table(): the store was built with relabel=False (pids are original)")
        table = np.zeros((self.num_classes, 2), dtype=np.int64)
        table[self.pid, 0] = self.domain
        table[self.pid, 1] = self.pid_orig
        return table

    def meta(self, i: int) -> dict[str, Any]:
        """Metadata of global sample ``i`` (the batch contract's integer fields + provenance)."""
        return {
            "pid": int(self.pid[i]), "camid": int(self.camid[i]), "domain": int(self.domain[i]),
            "index": int(self.index[i]), "pid_orig": int(self.pid_orig[i]), "camid_orig": int(self.camid_orig[i]),
            "split_index": int(self.split_index[i]), "relpath": str(self.relpath[i]),
            "ext": self.exts[int(self.ext_code[i])],
        }

    def get_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def __repr__(self) -> str:
        names = ",".join(s.dataset for s in self.sources)
        return (f"{type(self).__name__}(split={self.split!r}, sources=[{names}], n={len(self)}, "
                f"classes={self.num_classes}, cams={self.num_cams})")


def _source_info(root: Path, manifest: Manifest, split: str, start: int, meta: _SourceMeta,
                 pid_offset: int, cam_offset: int) -> SourceInfo:
    num_pids = int(len(np.unique(meta.pid)))
    max_cam = int(meta.camid.max()) + 1 if len(meta.camid) else 0
    if len(meta.camid) and int(meta.camid.min()) < 0:
        raise ShardError(f"{root}: split {split!r} has camid {int(meta.camid.min())} (expected 0-based cameras)")
    num_cams = max([max_cam] + [s.num_cams for s in manifest.splits.values()])
    return SourceInfo(str(root), manifest.dataset, start, len(meta.pid), pid_offset, num_pids, cam_offset, num_cams)


def _merge_infos(roots: list[Path], manifests: list[Manifest], split: str,
                 metas: list[_SourceMeta]) -> list[SourceInfo]:
    infos: list[SourceInfo] = []
    start = pid_offset = cam_offset = 0
    for root, man, meta in zip(roots, manifests, metas):
        info = _source_info(root, man, split, start, meta, pid_offset, cam_offset)
        infos.append(info)
        start += info.count
        pid_offset += info.num_pids
        cam_offset += info.num_cams
    return infos


def _as_roots(sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    roots = [Path(s) for s in sources]
    if not roots:
        raise ValueError("from_manifests: no sources given (expected at least one packed dataset folder)")
    return roots


# --------------------------------------------------------------------------------------------
# In-memory store


class SampleStore(SampleIndex):
    """Encoded image bytes of a split in one contiguous buffer, with the merged metadata.

    ``get_bytes(i)`` returns the original file bytes of global sample ``i`` (no re-encode).
    """

    def __init__(self, split: str, relabel: bool, sources: list[SourceInfo], metas: list[_SourceMeta],
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
                       relabel: bool, verify: bool = True) -> "SampleStore":
        """Read ``split`` of every packed source (folder with ``manifest.json``) into one store.

        Each shard is read with one sequential read, its size and sha256 checked against the
        manifest (``verify``), and its samples checked for key/index contiguity.
        """
        roots = _as_roots(sources)
        manifests = [read_manifest(r) for r in roots]
        plans = [(r, m, _shards_of_split(r, m, split)) for r, m in zip(roots, manifests)]
        capacity = sum(s.bytes for _, _, shards in plans for s in shards)
        buffer = np.empty(capacity, dtype=np.uint8)  # upper bound: the tar bytes; trimmed below
        total = sum(m.splits[split].count for m in manifests)
        offsets = np.zeros(total + 1, dtype=np.int64)
        pos = 0  # write position in buffer
        g = 0  # global sample index
        metas: list[_SourceMeta] = []
        for root, _man, shards in plans:
            pids: list[int] = []
            cams: list[int] = []
            relpaths: list[str] = []
            exts: list[str] = []
            for info in shards:
                path = root / info.name
                data = _read_shard_bytes(path, info, verify)
                for meta, ext, img in _scan_shard(path, info, split, memoryview(data)):
                    buffer[pos : pos + len(img)] = np.frombuffer(img, dtype=np.uint8)
                    pos += len(img)
                    g += 1
                    offsets[g] = pos
                    pids.append(meta["pid"])
                    cams.append(meta["camid"])
                    relpaths.append(meta["relpath"])
                    exts.append(ext)
            metas.append(_SourceMeta(np.array(pids, np.int64), np.array(cams, np.int64), relpaths, exts))
        buffer.resize(pos, refcheck=False)  # realloc in place: no second copy of the data
        infos = _merge_infos(roots, manifests, split, metas)
        return cls(split, relabel, infos, metas, buffer, offsets)


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
    read once from the ``json`` members (tar headers are seeked over, images are not read).
    With ``copy=False`` the cache folder holds symlinks to the shards (read in place, page cache
    does the caching); with ``copy=True`` wids copies each shard into the cache folder on first
    use (a node-local cache of a shared filesystem). The wids reader is opened lazily in each
    process, so the store pickles into DataLoader workers.
    """

    def __init__(self, split: str, relabel: bool, sources: list[SourceInfo], metas: list[_SourceMeta],
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
        ext = "." + self.exts[int(self.ext_code[i])]
        return sample[ext].getvalue()

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None

    @classmethod
    def from_manifests(cls, sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], split: str,
                       relabel: bool, verify: bool = True, cache_dir: str | os.PathLike[str] | None = None,
                       copy: bool = False, lru_size: int = 10) -> "WidsSampleStore":
        """Index ``split`` of every source without loading image bytes (see the class docstring).

        Each shard is read once, sequentially (one shard in RAM at a time), for its json members
        and its size + sha256 (``verify``). ``cache_dir`` defaults to a fresh temporary folder.
        """
        roots = _as_roots(sources)
        manifests = [read_manifest(r) for r in roots]
        cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="reid-wids-"))
        cache.mkdir(parents=True, exist_ok=True)
        metas: list[_SourceMeta] = []
        shard_list: list[dict[str, Any]] = []
        for s_idx, (root, man) in enumerate(zip(roots, manifests)):
            pids: list[int] = []
            cams: list[int] = []
            relpaths: list[str] = []
            exts: list[str] = []
            for info in _shards_of_split(root, man, split):
                path = (root / info.name).resolve()
                data = _read_shard_bytes(path, info, verify)  # one shard in RAM at a time, then dropped
                for meta, ext, _img in _scan_shard(path, info, split, memoryview(data)):
                    pids.append(meta["pid"])
                    cams.append(meta["camid"])
                    relpaths.append(meta["relpath"])
                    exts.append(ext)
                del data
                local = cache / f"{s_idx:03d}-{man.dataset}-{info.name.replace('/', '_')}"
                if not copy and not local.exists():
                    os.symlink(path, local)
                shard_list.append({"url": str(path), "nsamples": info.count, "local": str(local)})
            metas.append(_SourceMeta(np.array(pids, np.int64), np.array(cams, np.int64), relpaths, exts))
        infos = _merge_infos(roots, manifests, split, metas)
        return cls(split, relabel, infos, metas, shard_list, str(cache), copy, lru_size)


__all__ = ["SampleIndex", "SampleStore", "WidsSampleStore", "SourceInfo", "ShardError", "IMAGE_MEMBERS"]
