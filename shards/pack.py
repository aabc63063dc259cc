"""Pack a dataset layout into deterministic webdataset tar shards plus ``manifest.json``.

    python -m shards.pack --dataset market1501 --root DIR --out DIR [--shard-bytes N] [--overwrite]
                          [--workers N] [--skip-bad]

Per split (``train``, ``query``, ``gallery``, in that order) the samples go, in ``relpath`` order,
into ``<split>-000000.tar``, ``<split>-000001.tar``, … Each sample is two tar members, in
webdataset's naming: ``<key>.jpg`` (or ``.png``) holding the original file bytes (never
re-encoded) and ``<key>.json`` holding :class:`~shards.records.SampleMeta` (sorted keys, no spaces),
with ``key = sample_key(split, index)`` and ``index`` the position in the split.

Determinism: the same input gives byte-identical tars and manifest (ustar headers with mtime 0,
uid/gid 0, fixed user/group names and mode 0444; members in a fixed order). The tars have exactly
the layout the standard library's ``tarfile`` (and webdataset's ``TarWriter``) writes: the headers
come from a ``tarfile`` template with only name, size and checksum filled in per member, because
``TarFile.addfile`` costs more than decoding a Market-size image. Importing ``webdataset`` imports
torch whenever torch is installed, and this module must run on a data node with Pillow +
webdataset only (it imports neither).

Every image is decoded in full with Pillow (in ``--workers`` processes while this one writes the
tars) and its content must match its suffix: one that does not decode stops the pack with one error
line listing the bad files, and nothing is written. ``--skip-bad`` packs the rest instead and lists
each skipped file with its reason in the manifest's ``skipped``; the split indices then run over
the packed images only.

Atomicity: everything is written into a temp folder beside ``out`` (same file system), the
manifest last, every file fsynced, then the folder is renamed to ``out``. A crash leaves ``out``
untouched (at worst a ``.<out>.tmp-<pid>`` folder beside it), never a half-written pack. A refused
pack leaves nothing: no temp folder, and no parent folder of ``out`` that it had to create.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from shards.atomic import fsync_dir
from shards.errors import CliParser, UserError, run_cli
from shards.layouts import LAYOUTS, detect_msmt17_variant, parse
from shards.records import (
    IMAGE_MEMBERS,
    MANIFEST,
    SPLITS,
    Manifest,
    Record,
    SampleMeta,
    ShardInfo,
    SkippedFile,
    SplitInfo,
    member_name,
    sample_key,
)

DEFAULT_SHARD_BYTES = 256 * 2**20
"""Target shard size: a shard is closed before a sample that would push it past this (a single
sample larger than the target gets a shard of its own)."""
TAR_MTIME = 0
TAR_MODE = 0o444
TAR_USER = "reid"
_BLOCK = 512
_END_OF_ARCHIVE = 2 * _BLOCK
_RECORD = tarfile.RECORDSIZE
"""``tarfile`` pads a closed archive to whole records of this size."""
_SIZE, _CHKSUM = slice(124, 136), slice(148, 156)
"""ustar header fields filled in per member (besides the name, at its start)."""

_MAGIC = {"jpg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",)}
"""Leading bytes of each stored image type; ``.jpeg`` files are stored under ``jpg``."""
_CHUNK = 64
"""Images per decode task: large enough that the task's round trip is small beside the decoding."""
PARALLEL_MIN = 256
"""Fewer images than this are decoded in this process: starting workers would cost more."""
MAX_LISTED = 20
"""Bad files named in the refusal (the count covers all)."""
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
"""Write failures a user fixes (space, quota, permissions): a one-line error, not a traceback."""


class PackError(UserError):
    """The packer refuses its input or output: bad images, an ``--out`` that is not free, …"""


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


def check_image(path: str | os.PathLike[str]) -> tuple[bytes | None, str]:
    """Read and fully decode one image file: ``(bytes, member extension)`` or ``(None, reason)``.

    The reason is one line without the path, the same for every run (it goes into the manifest)."""
    from PIL import Image, UnidentifiedImageError  # here: importing the packer must not need Pillow

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, f"cannot read it ({exc.strerror or type(exc).__name__})"
    try:
        ext = image_ext(path, data)
    except ValueError as exc:
        return None, str(exc).removeprefix(f"{path}: ")
    try:
        if ext == "png":  # chunk CRCs, which load() does not check (verify() needs an image of its own)
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                im.verify()
        with Image.open(io.BytesIO(data), formats=[IMAGE_MEMBERS[ext]]) as im:
            im.load()
    except UnidentifiedImageError:  # its message holds a memory address: not reproducible
        return None, f"not a readable {IMAGE_MEMBERS[ext]} image"
    except Exception as exc:  # Pillow raises many types for bad data; all mean the same here
        return None, " ".join(str(exc).split()) or type(exc).__name__
    return data, ext


def _check_chunk(root: str, relpaths: list[str]) -> list[tuple[bytes | None, str]]:
    """Worker task: :func:`check_image` of each ``root/relpath``, in order."""
    return [check_image(os.path.join(root, rel)) for rel in relpaths]


def default_workers() -> int:
    """The CPUs this process may run on (a SLURM job's share, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where there is one: a worker starts in milliseconds with the packer already imported,
    whereas spawn would re-import the caller's main module in every worker (the trainer's, torch
    and all, when its data preparation packs). The workers only read files and run Pillow."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else methods[0])


def checked_images(root: Path, records: list[Record], workers: int) -> Iterator[tuple[Record, bytes | None, str]]:
    """``(record, bytes, ext)`` or ``(record, None, reason)`` for each record, in order.

    With ``workers`` >= 1 (and enough images) the reading and decoding run in that many worker
    processes, a bounded number of chunks ahead, while the caller consumes the results in order."""
    if workers < 1 or len(records) < PARALLEL_MIN:
        for rec in records:
            yield (rec, *check_image(root / rec.relpath))
        return
    chunks = iter([records[i : i + _CHUNK] for i in range(0, len(records), _CHUNK)])
    pool = ProcessPoolExecutor(workers, mp_context=_pool_context())
    pending: deque[tuple[list[Record], Future[list[tuple[bytes | None, str]]]]] = deque()

    def submit() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append((chunk, pool.submit(_check_chunk, str(root), [r.relpath for r in chunk])))

    try:
        for _ in range(4 * workers):  # enough queued to keep every worker busy, bounded memory
            submit()
        while pending:
            chunk, future = pending.popleft()
            results = future.result()
            submit()
            for rec, (data, what) in zip(chunk, results):
                yield rec, data, what
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def meta_json(meta: SampleMeta) -> bytes:
    """The ``json`` member: sorted keys, no spaces, so equal metadata gives equal bytes."""
    # vars(), not asdict(): the fields are scalars, and asdict's deep copy costs 3x the dump
    return json.dumps(vars(meta), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _member_bytes(size: int) -> int:
    """Bytes a member takes in a tar: one header block plus the data padded to whole blocks."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = TAR_USER
    return info


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member with ``tarfile`` itself (the reference :func:`ustar_header` must match)."""
    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def _header_template() -> bytes:
    header = bytearray(_tar_info("", 0).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
    header[_CHKSUM] = b" " * 8  # the checksum is the byte sum with its own field as spaces
    return bytes(header)


_HEADER = _header_template()


def ustar_header(name: str, size: int) -> bytes:
    """The header ``tarfile`` writes for a member of ours (see :func:`_tar_info`), built faster."""
    raw = name.encode("ascii")
    if len(raw) > 100 or size >= 8**11:  # a long name takes ustar's prefix field; 8 GiB: no octal room
        raise ValueError(f"tar member {name!r} of {size} bytes: longer than a plain ustar header holds")
    header = bytearray(_HEADER)
    header[: len(raw)] = raw
    header[_SIZE] = b"%011o\0" % size
    header[_CHKSUM] = b"%06o\0 " % sum(header)
    return bytes(header)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _ShardWriter:
    """Writes one split's samples, in index order, into ``<split>-NNNNNN.tar`` files of ``folder``."""

    def __init__(self, folder: Path, split: str, shard_bytes: int) -> None:
        self.folder, self.split, self.shard_bytes = folder, split, shard_bytes
        self.shards: list[ShardInfo] = []
        self.records: list[Record] = []
        self._file: io.BufferedWriter | None = None
        self._sha = hashlib.sha256()
        self._offset = 0
        self._first = 0

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._sha.update(data)
        self._offset += len(data)

    def add(self, rec: Record, data: bytes, ext: str) -> None:
        index = len(self.records)  # over the packed images: skipped ones leave no gap
        key = sample_key(self.split, index)
        meta = meta_json(SampleMeta(rec.pid, rec.camid, self.split, index, rec.relpath))
        members = sorted([(member_name(key, ext), data), (member_name(key, "json"), meta)])  # TarWriter's order
        size = sum(_member_bytes(len(b)) for _, b in members)
        if self._file is not None and index > self._first and self._offset + size + _END_OF_ARCHIVE > self.shard_bytes:
            self._close()
        if self._file is None:
            self._first = index
            self._file = open(self.folder / shards_name(self.split, len(self.shards)), "wb")
        for name, blob in members:
            self._write(ustar_header(name, len(blob)))
            self._write(blob)
            self._write(bytes(-len(blob) % _BLOCK))
        self.records.append(rec)

    def _close(self) -> None:
        """End the archive as ``TarFile.close`` does: two zero blocks, then zeros to a whole record."""
        assert self._file is not None
        self._write(bytes(_END_OF_ARCHIVE))
        self._write(bytes(-self._offset % _RECORD))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shards_name(self.split, len(self.shards))
        count = len(self.records) - self._first
        self.shards.append(ShardInfo(name, self.split, self._first, count, self._offset, self._sha.hexdigest()))
        self._file, self._sha, self._offset = None, hashlib.sha256(), 0

    def finish(self) -> list[ShardInfo]:
        if self._file is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()


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
        raise PackError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PackError(f"{out}: not empty; pass --overwrite to replace the pack there")
        if not (out / MANIFEST).is_file():
            raise PackError(
                f"{out}: not empty and holds no {MANIFEST}; refusing to replace a folder that is not a pack; "
                "choose another --out"
            )


def _make_parents(out: Path) -> list[Path]:
    """Create the missing folders above ``out``; returns them, deepest first, for a clean refusal."""
    missing = [p for p in out.parents if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(missing)
        blocker = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise PackError(f"{blocker}: a file where --out needs a folder; choose another --out") from None
        raise PackError(f"{out.parent}: cannot create it ({exc.strerror}); choose another --out") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


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


def refusal(root: Path, bad: list[SkippedFile]) -> str:
    """The one-line refusal: how many images do not decode, the first ones, and what to do."""
    n = len(bad)
    head = f"{n} images under {root} do not decode: " if n > 1 else f"1 image under {root} does not decode: "
    tail = f"; fix or remove {'them' if n > 1 else 'it'}, or pass --skip-bad to pack the rest"
    listed = [f"{b.relpath} ({b.reason if len(b.reason) <= 100 else b.reason[:99] + '…'})" for b in bad[:MAX_LISTED]]
    more = f", … ({n - len(listed)} more)" if len(listed) < n else ""
    return head + ", ".join(listed) + more + tail


def _write_splits(
    tmp: Path, root: Path, splits: dict[str, list[Record]], shard_bytes: int, workers: int, skip_bad: bool
) -> tuple[list[ShardInfo], dict[str, list[Record]], list[SkippedFile]]:
    """Decode every image (in workers) and write the good ones; once an image fails without
    ``skip_bad`` writing stops, but decoding goes on so that the refusal names every bad file."""
    writers = {split: _ShardWriter(tmp, split, shard_bytes) for split in SPLITS}
    bad: list[SkippedFile] = []
    try:
        for rec, data, what in checked_images(root, [r for split in SPLITS for r in splits[split]], workers):
            if data is None:
                bad.append(SkippedFile(rec.relpath, rec.split, what))
            elif skip_bad or not bad:
                writers[rec.split].add(rec, data, what)
        if bad and not skip_bad:
            raise PackError(refusal(root, bad))
        shards = [s for split in SPLITS for s in writers[split].finish()]
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return shards, {split: writers[split].records for split in SPLITS}, bad


def pack(
    dataset: str,
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    *,
    workers: int | None = None,
    skip_bad: bool = False,
    **options: object,
) -> Manifest:
    """Parse ``dataset`` at ``root`` (``options`` go to its parser) and write the pack to ``out``.

    ``workers``: decoding processes (None: :func:`default_workers`; 0: decode in this process).
    ``skip_bad``: pack the images that decode and list the others in the manifest's ``skipped``,
    instead of refusing the whole pack."""
    if shard_bytes <= 0:
        raise PackError(f"--shard-bytes {shard_bytes}: expected a positive number of bytes")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise PackError(f"--workers {workers}: expected 0 (decode in this process) or more")
    root, out = Path(root), Path(out).absolute()  # absolute: "." still has a parent to write beside
    _check_out(out, overwrite)
    splits = parse(dataset, root, **options)
    provenance: dict[str, object] = dict(sorted(options.items()))
    if dataset == "msmt17":
        provenance["variant"] = detect_msmt17_variant(root)
    created = _make_parents(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        shards, packed, skipped = _write_splits(tmp, root, splits, shard_bytes, workers, skip_bad)
        for split in SPLITS:
            if not packed[split]:
                raise PackError(
                    f"{root}: none of the {split} images decodes, so --skip-bad would leave the split empty; "
                    "fix or replace them"
                )
        manifest = Manifest(
            dataset=dataset,
            splits={split: split_info(packed[split]) for split in SPLITS},
            shards=shards,
            options=provenance,
            skipped=skipped,
        )
        (tmp / MANIFEST).write_text(manifest.to_json())  # last: a folder without it is no pack
        _fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)
        _publish(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
            raise PackError(
                f"{out}: cannot write the pack ({exc.strerror}); free space or choose another --out"
            ) from exc
        raise
    return manifest


def summary(manifest: Manifest, folder: str | os.PathLike[str], show_skipped: int = 5) -> str:
    """A few lines describing a pack (used by the pack and verify CLIs), skipped files included."""
    total = sum(s.bytes for s in manifest.shards)
    lines = [f"{folder}: {manifest.dataset}, {len(manifest.shards)} shards, {total / 2**20:.1f} MiB"]
    order = [s for s in SPLITS if s in manifest.splits] + sorted(set(manifest.splits) - set(SPLITS))
    for split in order:
        info, n = manifest.splits[split], len(manifest.shards_of(split))
        lines.append(f"  {split:<8}{info.count:>8} images {info.num_pids:>6} ids {info.num_cams:>3} cams {n:>4} shards")
    if manifest.skipped:
        lines.append(f"  skipped at pack time: {len(manifest.skipped)} files (see {MANIFEST})")
        lines += [f"    {s.relpath} ({s.split}): {s.reason}" for s in manifest.skipped[:show_skipped]]
        if len(manifest.skipped) > show_skipped:
            lines.append(f"    … {len(manifest.skipped) - show_skipped} more")
    return "\n".join(lines)


def _workers_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected an int >= 0 (0: decode in this process)")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = CliParser("pack", prog="python -m shards.pack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, choices=sorted(LAYOUTS), help="layout of the root")
    ap.add_argument("--root", required=True, help="dataset folder as distributed (e.g. Market-1501-v15.09.15/)")
    ap.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    ap.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="target shard size in bytes")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing pack in --out")
    ap.add_argument(
        "--workers", type=_workers_arg, default=None,
        help="processes decoding the images (default: the CPUs available; 0: decode in this process)",
    )
    ap.add_argument(
        "--skip-bad", action="store_true",
        help="pack the images that decode and list the others in manifest.json, instead of refusing",
    )
    ap.add_argument(
        "--msmt17-train-only", action="store_true", help="msmt17: train on list_train.txt only (no list_val.txt)"
    )
    args = ap.parse_args(argv)
    options: dict[str, object] = {}
    if args.msmt17_train_only:
        if args.dataset != "msmt17":
            ap.error("--msmt17-train-only applies to --dataset msmt17 only")
        options["train_only"] = True

    def body() -> int:
        start = time.perf_counter()
        manifest = pack(
            args.dataset, args.root, args.out, args.shard_bytes, args.overwrite,
            workers=args.workers, skip_bad=args.skip_bad, **options,
        )
        print(summary(manifest, args.out))
        print(f"packed in {time.perf_counter() - start:.1f} s")
        return 0

    return run_cli("pack", body)


if __name__ == "__main__":
    sys.exit(main())
