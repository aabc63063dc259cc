"""Pack a dataset layout into deterministic webdataset tar shards plus ``manifest.json``.

    python -m shards.pack --dataset market1501 --root DIR --out DIR [--shard-bytes N] [--overwrite]

Per split (``train``, ``query``, ``gallery``, in that order) the samples go, in ``relpath`` order,
into ``<split>-000000.tar``, ``<split>-000001.tar``, … Each sample is two tar members, in
webdataset's naming: ``<key>.jpg`` (or ``.png``) holding the original file bytes (never
re-encoded) and ``<key>.json`` holding :class:`~shards.records.SampleMeta` (sorted keys, no spaces),
with ``key = sample_key(split, index)`` and ``index`` the position in the split.

Determinism: the same input gives byte-identical tars and manifest (ustar headers with mtime 0,
uid/gid 0, fixed user/group names and mode 0444; members in a fixed order). The tars are written
with the standard library's ``tarfile`` in exactly the layout webdataset's ``TarWriter`` produces,
because importing ``webdataset`` imports torch whenever torch is installed, and this module must run
on a data node with Pillow + webdataset only (it imports neither).

Atomicity: everything is written into a temp folder beside ``out`` (same file system), the
manifest last, every file fsynced, then the folder is renamed to ``out``. A crash leaves ``out``
untouched (at worst a ``.<out>.tmp-<pid>`` folder beside it), never a half-written pack.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

from shards.layouts import LAYOUTS, detect_msmt17_variant, parse
from shards.records import (
    MANIFEST, SPLITS, Manifest, Record, SampleMeta, ShardInfo, SplitInfo, fsync_dir, sample_key,
)

DEFAULT_SHARD_BYTES = 256 * 2**20
"""Target shard size: a shard is closed before a sample that would push it past this (a single
sample larger than the target gets a shard of its own)."""
TAR_MTIME = 0
TAR_MODE = 0o444
TAR_USER = "reid"
_BLOCK = 512
_END_OF_ARCHIVE = 2 * _BLOCK

_MAGIC = {"jpg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",)}
"""Leading bytes of each stored image type; ``.jpeg`` files are stored under ``jpg``."""


def image_ext(path: str | os.PathLike[str], data: bytes) -> str:
    """The member extension for an image file (``jpg`` or ``png``), checked against its content."""
    suffix = os.path.splitext(str(path))[1].lower().lstrip(".")
    ext = "jpg" if suffix in ("jpg", "jpeg") else suffix
    if ext not in _MAGIC:
        raise ValueError(f"{path}: unsupported image type {suffix!r}; expected .jpg, .jpeg or .png")
    if not data.startswith(_MAGIC[ext]):
        actual = next((e for e, magics in _MAGIC.items() if data.startswith(magics)), None)
        what = f"{actual.upper()} data" if actual else "neither JPEG nor PNG data"
        raise ValueError(f"{path}: file named .{suffix} holds {what}; expected a {ext.upper()} image")
    return ext


def meta_json(meta: SampleMeta) -> bytes:
    """The ``json`` member: sorted keys, no spaces, so equal metadata gives equal bytes."""
    return json.dumps(asdict(meta), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _member_bytes(size: int) -> int:
    """Bytes a member takes in a tar: one header block plus the data padded to whole blocks."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = TAR_USER
    tar.addfile(info, io.BytesIO(data))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_split(folder: Path, root: Path, split: str, records: list[Record], shard_bytes: int) -> list[ShardInfo]:
    """Write one split's shards into ``folder``; returns their descriptions in index order."""
    shards: list[ShardInfo] = []
    tar: tarfile.TarFile | None = None
    first = 0

    def close(upto: int) -> None:
        assert tar is not None
        tar.close()
        path = folder / shards_name(split, len(shards))
        _fsync_file(path)
        shards.append(ShardInfo(path.name, split, first, upto - first, path.stat().st_size, file_sha256(path)))

    for index, rec in enumerate(records):
        src = root / rec.relpath
        data = src.read_bytes()
        ext = image_ext(src, data)
        key = sample_key(split, index)
        meta = meta_json(SampleMeta(rec.pid, rec.camid, split, index, rec.relpath))
        members = sorted([(f"{key}.{ext}", data), (f"{key}.json", meta)])  # TarWriter's order
        size = sum(_member_bytes(len(b)) for _, b in members)
        if tar is not None and index > first and tar.offset + size + _END_OF_ARCHIVE > shard_bytes:
            close(index)
            tar = None
        if tar is None:
            first = index
            tar = tarfile.open(folder / shards_name(split, len(shards)), "w", format=tarfile.USTAR_FORMAT)
        for name, blob in members:
            _add_member(tar, name, blob)
    if tar is not None:
        close(len(records))
    return shards


def shards_name(split: str, number: int) -> str:
    """File name of a split's ``number``-th shard."""
    return f"{split}-{number:06d}.tar"


def split_info(records: list[Record]) -> SplitInfo:
    """Counts for the manifest; ``num_cams`` is 1 + the largest camera (cameras span 0..num_cams-1)."""
    return SplitInfo(
        count=len(records),
        num_pids=len({r.pid for r in records}),
        num_cams=1 + max((r.camid for r in records), default=-1),
    )


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out}: not empty; pass --overwrite to replace the pack there")
        if not (out / MANIFEST).is_file():
            raise ValueError(
                f"{out}: not empty and holds no {MANIFEST}; refusing to replace a folder that is not a pack"
            )


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished temp folder to ``out``, replacing an old pack (already checked) if any."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        else:
            out.rmdir()
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)


def pack(
    dataset: str,
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    **options: object,
) -> Manifest:
    """Parse ``dataset`` at ``root`` (``options`` go to its parser) and write the pack to ``out``."""
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes={shard_bytes}: expected a positive number of bytes")
    root, out = Path(root), Path(out).absolute()  # absolute: "." still has a parent to write beside
    _check_out(out, overwrite)
    splits = parse(dataset, root, **options)
    provenance: dict[str, object] = dict(sorted(options.items()))
    if dataset == "msmt17":
        provenance["variant"] = detect_msmt17_variant(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shards: list[ShardInfo] = []
        for split in SPLITS:
            shards += _write_split(tmp, root, split, splits[split], shard_bytes)
        manifest = Manifest(
            dataset=dataset,
            splits={split: split_info(splits[split]) for split in SPLITS},
            shards=shards,
            options=provenance,
        )
        (tmp / MANIFEST).write_text(manifest.to_json())  # last: a folder without it is no pack
        _fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def summary(manifest: Manifest, folder: str | os.PathLike[str]) -> str:
    """A few lines describing a pack (used by the pack and verify CLIs)."""
    total = sum(s.bytes for s in manifest.shards)
    lines = [f"{folder}: {manifest.dataset}, {len(manifest.shards)} shards, {total / 2**20:.1f} MiB"]
    order = [s for s in SPLITS if s in manifest.splits] + sorted(set(manifest.splits) - set(SPLITS))
    for split in order:
        info, n = manifest.splits[split], len(manifest.shards_of(split))
        lines.append(f"  {split:<8}{info.count:>8} images {info.num_pids:>6} ids {info.num_cams:>3} cams {n:>4} shards")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shards.pack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, choices=sorted(LAYOUTS), help="layout of the root")
    ap.add_argument("--root", required=True, help="dataset folder as distributed (e.g. Market-1501-v15.09.15/)")
    ap.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    ap.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="target shard size in bytes")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing pack in --out")
    ap.add_argument(
        "--msmt17-train-only", action="store_true", help="msmt17: train on list_train.txt only (no list_val.txt)"
    )
    args = ap.parse_args(argv)
    options: dict[str, object] = {}
    if args.msmt17_train_only:
        if args.dataset != "msmt17":
            ap.error("--msmt17-train-only applies to --dataset msmt17 only")
        options["train_only"] = True
    start = time.perf_counter()
    try:
        manifest = pack(args.dataset, args.root, args.out, args.shard_bytes, args.overwrite, **options)
    except (ValueError, OSError) as exc:
        print(f"pack: error: {exc}", file=sys.stderr)
        return 1
    print(summary(manifest, args.out))
    print(f"packed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
