"""The data-at-rest schema shared by the layout parsers, the packer, the verifier and the loader.

Kept free of torch so the packer runs on a data node with only Pillow + webdataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
SPLITS = ("train", "query", "gallery")
"""Split names, in packing order."""
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
"""File endings treated as images by parsers and the packer; everything else is ignored."""
IMAGE_MEMBERS = {"jpg": "JPEG", "png": "PNG"}
"""Image member extension of a packed sample → the format its bytes hold (Pillow's name). The packer
writes exactly these (``.jpeg`` files as ``jpg``); every reader of a pack accepts exactly these."""
MANIFEST = "manifest.json"


@dataclass(frozen=True, order=True)
class Record:
    """One image of a dataset split, as parsed from the real layout."""

    relpath: str
    """Path relative to the dataset root, ``/``-separated (e.g. ``bounding_box_train/0002_c1s1_000451_03.jpg``)."""
    pid: int
    """Person id as in the dataset (not relabelled); 0 = Market distractor, kept in the gallery."""
    camid: int
    """Camera, 0-based."""
    split: str
    """``train``, ``query`` or ``gallery``."""


@dataclass(frozen=True)
class SampleMeta:
    """The per-sample ``json`` member of a shard; ``index`` is the position in its split."""

    pid: int
    camid: int
    split: str
    index: int
    """Position of the sample in its split (0..count-1): the key memory banks are indexed by."""
    relpath: str


def sample_key(split: str, index: int) -> str:
    """The webdataset ``__key__`` of a sample (no dots: webdataset splits keys on them)."""
    return f"{split}_{index:08d}"


def member_name(key: str, ext: str) -> str:
    """The tar member holding a sample's ``ext`` part: ``<key>.<ext>``."""
    return f"{key}.{ext}"


def split_member_name(name: str) -> tuple[str, str]:
    """``<key>.<ext>`` → ``(key, ext)``: the key ends at the first dot, where webdataset and wids end
    it too, so all readers group members into the same samples. ``ValueError`` for a name that is not
    of that form (no dot, an empty key or extension, or a folder: packs have none)."""
    key, dot, ext = name.partition(".")
    if not dot or not key or not ext or "/" in name:
        raise ValueError(f"member name {name!r} is not '<key>.<ext>'")
    return key, ext


@dataclass
class ShardInfo:
    """One tar shard of a split."""

    name: str
    """File name, relative to the manifest's folder."""
    split: str
    first_index: int
    """Split index of the shard's first sample; samples are contiguous and in index order."""
    count: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    """Counts of one split."""

    count: int
    """Images in the split."""
    num_pids: int
    """Distinct person ids (distractor pid 0 included where the gallery has it)."""
    num_cams: int
    """1 + the largest 0-based camera id: offsetting the next source's cameras by it never collides."""


@dataclass(frozen=True)
class SkippedFile:
    """An image ``pack --skip-bad`` left out because it does not decode."""

    relpath: str
    split: str
    reason: str


@dataclass
class Manifest:
    """``manifest.json``: what a packed dataset holds and how to check it."""

    dataset: str
    """Registry name of the layout it was packed from (``market1501``, ``msmt17``, …)."""
    splits: dict[str, SplitInfo]
    shards: list[ShardInfo]
    schema_version: int = SCHEMA_VERSION
    options: dict[str, object] = field(default_factory=dict)
    """Parser switches used when packing (e.g. ``msmt17_train_only``), for provenance."""
    skipped: list[SkippedFile] = field(default_factory=list)
    """Images of the layout left out at pack time (``--skip-bad``), in split then ``relpath`` order;
    the split indices run over the packed images only."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        try:
            raw = json.loads(text)
            version = raw.get("schema_version")
            if version != SCHEMA_VERSION:
                raise ValueError(f"schema_version={version!r}, expected {SCHEMA_VERSION}")
            return cls(
                dataset=raw["dataset"],
                splits={k: SplitInfo(**v) for k, v in raw["splits"].items()},
                shards=[ShardInfo(**s) for s in raw["shards"]],
                schema_version=version,
                options=raw.get("options", {}),
                skipped=[SkippedFile(**s) for s in raw.get("skipped", [])],  # absent before --skip-bad
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source}: not a valid shard manifest ({exc})") from exc

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read ``folder/manifest.json``; a missing or malformed file is a one-line error naming it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (pack the dataset with `python -m shards.pack`)")
    return Manifest.from_json(path.read_text(), source=str(path))

