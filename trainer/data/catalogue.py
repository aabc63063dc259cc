"""The source catalogue: per-sample metadata of one split of one or more packed sources, merged.

Both stores (:mod:`trainer.data.store`) are a catalogue plus a way to fetch image bytes.

Merge rules (the batch contract): the global index is the concatenation of the sources in the
given order; ``domain`` is the source position; for training (``relabel=True``) pids become
``0..C-1`` over all sources (each source's sorted original pids, sources in order); camids are
shifted by the number of cameras of the sources before, so cameras of different sources differ.
Original pids and camids stay available as ``pid_orig``/``camid_orig``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shards.reader import ShardError, ShardSample
from shards.records import IMAGE_MEMBERS, MANIFEST, Manifest, ShardInfo


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
class SourceMeta:
    """Per-sample metadata of one source's split, in split-index order (before merging)."""

    pid: list[int] = field(default_factory=list)
    camid: list[int] = field(default_factory=list)
    relpath: list[str] = field(default_factory=list)
    ext: list[str] = field(default_factory=list)

    def add(self, sample: ShardSample) -> None:
        """Append the next sample of the split, as the pack reader checked it."""
        self.pid.append(sample.meta.pid)
        self.camid.append(sample.meta.camid)
        self.relpath.append(sample.meta.relpath)
        self.ext.append(sample.image_ext)


def shards_of_split(root: Path, manifest: Manifest, split: str) -> list[ShardInfo]:
    """The split's shards, checked to be contiguous in index order and to add up to the split count."""
    if split not in manifest.splits:
        raise ShardError(f"{root / MANIFEST}: no split {split!r} (has {sorted(manifest.splits)})")
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
            f"{root / MANIFEST}: shards of split {split!r} hold {expected} samples, "
            f"splits.{split}.count says {manifest.splits[split].count}"
        )
    return shards


def as_roots(sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    """One packed dataset folder or several, as paths."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    roots = [Path(s) for s in sources]
    if not roots:
        raise ValueError("from_manifests: no sources given (expected at least one packed dataset folder)")
    return roots


def merge_sources(roots: list[Path], manifests: list[Manifest], metas: list[SourceMeta]) -> list[SourceInfo]:
    """Each source's place in the merged view: first global index, pid and camera offsets."""
    infos: list[SourceInfo] = []
    start = pid_offset = cam_offset = 0
    for root, manifest, meta in zip(roots, manifests, metas):
        # the manifest's num_cams of every split: query and gallery of a source share its cameras
        num_cams = max([max(meta.camid, default=-1) + 1] + [s.num_cams for s in manifest.splits.values()])
        num_pids = len(set(meta.pid))
        infos.append(SourceInfo(str(root), manifest.dataset, start, len(meta.pid), pid_offset, num_pids,
                                cam_offset, num_cams))
        start += len(meta.pid)
        pid_offset += num_pids
        cam_offset += num_cams
    return infos


class SampleIndex:
    """Per-sample metadata of one split of one or more merged sources, addressed by global index.

    Arrays (length ``len(self)``): ``pid`` (relabelled for training, else original), ``pid_orig``,
    ``camid`` (offset per source), ``camid_orig``, ``domain`` (source position), ``index``
    (global, ``arange``), ``split_index`` (position in the source split), ``relpath`` (fixed-width
    numpy strings: no per-item Python objects), ``ext_code`` (into :attr:`exts`).
    Subclasses provide :meth:`get_bytes`.
    """

    exts: tuple[str, ...] = tuple(IMAGE_MEMBERS)

    def __init__(self, split: str, relabel: bool, sources: list[SourceInfo], metas: list[SourceMeta]) -> None:
        self.split = split
        self.relabel = relabel
        self.sources = sources
        counts = [len(m.pid) for m in metas]
        self.pid_orig = np.array([p for m in metas for p in m.pid], dtype=np.int64)
        self.camid_orig = np.array([c for m in metas for c in m.camid], dtype=np.int64)
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
                _, inv = np.unique(np.asarray(m.pid, dtype=np.int64), return_inverse=True)
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
