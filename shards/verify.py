"""Check a packed dataset against its manifest.

    python -m shards.verify DIR [--no-decode]

Checks that every listed shard exists with the listed size and sha256, that the shard list covers
each split with contiguous indices, that every tar reads to its end-of-archive marker (a truncated
tar is an error even when its hash was updated), and that each sample has exactly one image and one
``json`` member with the expected key, split and index and a camera inside the split's range; the
per-split counts, #pids and #cams must match the manifest. With ``decode`` every image is decoded
with Pillow, which catches corrupt image bytes that a correct hash cannot (the CLI decodes by
default; the function does not, so the loader's check at start-up stays I/O bound).

Every failure is a :class:`VerifyError`: one line naming the shard and, where it applies, the key,
ending with what to do (pack again). The files ``pack --skip-bad`` left out are listed in the
output: they are not in the pack, which is not an error.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from shards.errors import CliParser, UserError, run_cli
from shards.pack import file_sha256, summary
from shards.records import MANIFEST, SPLITS, Manifest, SampleMeta, ShardInfo, read_manifest, sample_key

IMAGE_MEMBERS = {"jpg": "JPEG", "png": "PNG"}
"""Image member extension → the format Pillow must report for it."""
_META_FIELDS = {f.name for f in fields(SampleMeta)}
_BLOCK = 512
REPACK = "pack the dataset again (python -m shards.pack … --overwrite) or copy the pack again"
"""The fix of every mismatch between a pack and its manifest."""


class VerifyError(UserError):
    """A pack does not match its manifest (or its images do not decode)."""


@dataclass
class _SplitStats:
    count: int = 0
    pids: set[int] = field(default_factory=set)
    max_cam: int = -1


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_manifest(manifest: Manifest, where: str) -> None:
    """Structure of the shard list: known splits, contiguous indices, counts adding up."""
    names = [s.name for s in manifest.shards]
    for s in manifest.shards:
        if s.split not in manifest.splits:
            raise VerifyError(f"{where}: shard {s.name} is of split {s.split!r}, which the manifest does not list")
        if os.path.basename(s.name) != s.name or s.name in ("", ".", ".."):
            raise VerifyError(f"{where}: shard name {s.name!r} is not a plain file name")
        if names.count(s.name) > 1:
            raise VerifyError(f"{where}: shard {s.name} is listed twice")
    for split, info in manifest.splits.items():
        if split not in SPLITS:
            raise VerifyError(f"{where}: unknown split {split!r}; expected one of {SPLITS}")
        expected = 0
        for s in manifest.shards_of(split):
            if s.count <= 0 or s.first_index != expected:
                raise VerifyError(
                    f"{where}: shard {s.name} has first_index={s.first_index}, count={s.count}; "
                    f"expected first_index={expected} and count > 0 (contiguous {split} indices)"
                )
            expected += s.count
        if expected != info.count:
            raise VerifyError(f"{where}: the {split} shards hold {expected} samples, the split says count={info.count}")


def _check_image(where: str, ext: str, data: bytes) -> None:
    from PIL import Image  # only here: the structural checks need no Pillow

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # chunk CRCs (PNG); load() alone can miss them
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format
    except Exception as exc:  # Pillow raises many types for bad data; all mean the same here
        raise VerifyError(f"{where}: .{ext} image does not decode ({type(exc).__name__}: {exc})") from None
    if fmt != IMAGE_MEMBERS[ext]:
        raise VerifyError(f"{where}: .{ext} member decodes as {fmt}, expected {IMAGE_MEMBERS[ext]}")


def _check_sample(
    where: str, key: str, members: dict[str, bytes], shard: ShardInfo, index: int, num_cams: int, decode: bool
) -> SampleMeta:
    images = [ext for ext in members if ext in IMAGE_MEMBERS]
    if set(members) - set(IMAGE_MEMBERS) != {"json"} or len(images) != 1:
        raise VerifyError(f"{where}: members {sorted(members)}; expected 'json' and one of {sorted(IMAGE_MEMBERS)}")
    try:
        raw = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerifyError(f"{where}: json member is not JSON ({exc})") from None
    if not isinstance(raw, dict) or set(raw) != _META_FIELDS:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise VerifyError(f"{where}: json has fields {got}; expected {sorted(_META_FIELDS)}")
    meta = SampleMeta(**raw)
    if meta.split != shard.split or meta.index != index:
        raise VerifyError(
            f"{where}: json says split={meta.split!r} index={meta.index!r}; expected {shard.split!r} {index}"
        )
    if not _is_int(meta.pid) or meta.pid < 0:
        raise VerifyError(f"{where}: pid={meta.pid!r}; expected an int >= 0")
    if not _is_int(meta.camid) or not 0 <= meta.camid < num_cams:
        raise VerifyError(f"{where}: camid={meta.camid!r}; expected an int in 0..{num_cams - 1}")
    if not isinstance(meta.relpath, str) or not meta.relpath:
        raise VerifyError(f"{where}: relpath={meta.relpath!r}; expected a non-empty string")
    if decode:
        _check_image(where, images[0], members[images[0]])
    return meta


def check_shard(path: Path, shard: ShardInfo, num_cams: int, decode: bool, stats: _SplitStats) -> None:
    """Read one shard to its end and check every sample; ``path`` already matches size and sha256."""
    samples = 0
    key: str | None = None
    members: dict[str, bytes] = {}

    def finish() -> None:
        nonlocal samples
        index = shard.first_index + samples
        expected = sample_key(shard.split, index)
        where = f"{path}: sample {key}"
        if key != expected:
            raise VerifyError(f"{where}: expected key {expected} (samples must be contiguous, in index order)")
        meta = _check_sample(where, key, members, shard, index, num_cams, decode)
        stats.pids.add(meta.pid)
        stats.max_cam = max(stats.max_cam, meta.camid)
        samples += 1

    last = ""  # the last member read whole: where a truncation is reported
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                where = f"{path}: member {info.name}"
                if not info.isfile():
                    raise VerifyError(f"{where}: not a regular file")
                base, dot, ext = info.name.partition(".")
                if not dot or "/" in info.name or not ext:
                    raise VerifyError(f"{where}: name is not '<key>.<ext>'")
                if base != key:
                    if key is not None:
                        finish()
                    key, members = base, {}
                if ext in members:
                    raise VerifyError(f"{path}: sample {key}: member .{ext} appears twice")
                f = tar.extractfile(info)
                assert f is not None
                members[ext] = f.read()
                last = info.name
            end = tar.offset
    except tarfile.TarError as exc:
        at = f" after member {last}" if last else " at its start"
        raise VerifyError(f"{path}: unreadable tar{at} ({exc}); truncated or corrupt") from None
    if key is not None:
        finish()
    # tarfile stops quietly at a short read or a garbled header between members: insist that only
    # the end-of-archive blocks (zeros, padded to at most one 10 KiB record) follow the last member
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read(1 << 16)
        at_eof = not f.read(1)
    if len(tail) < 2 * _BLOCK or tail.count(0) != len(tail) or not at_eof:
        at = f" after member {last}" if last else ""
        raise VerifyError(f"{path}: no end-of-archive marker{at}; the tar is truncated or corrupt")
    if samples != shard.count:
        raise VerifyError(f"{path}: {samples} samples, manifest.json says count={shard.count}")
    stats.count += samples


def verify(folder: str | os.PathLike[str], decode: bool = False) -> Manifest:
    """Check the pack in ``folder`` (see the module docstring); returns its manifest.

    A missing manifest is ``FileNotFoundError`` (as for every reader of packs); a malformed one and
    every mismatch are :class:`VerifyError`."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)  # FileNotFoundError passes through
    except ValueError as exc:
        raise VerifyError(f"{exc}; {REPACK}") from None
    try:
        _verify_pack(folder, manifest, decode)
    except VerifyError as exc:
        raise VerifyError(f"{exc}; {REPACK}") from None
    except PermissionError as exc:
        raise VerifyError(f"{exc.filename}: cannot read it ({exc.strerror}); fix its permissions") from None
    return manifest


def _verify_pack(folder: Path, manifest: Manifest, decode: bool) -> None:
    where = str(folder / MANIFEST)
    check_manifest(manifest, where)
    stats = {split: _SplitStats() for split in manifest.splits}
    for shard in manifest.shards:
        path = folder / shard.name
        if not path.is_file():
            raise VerifyError(f"{path}: shard listed in manifest.json is missing")
        size = path.stat().st_size
        if size != shard.bytes:
            raise VerifyError(f"{path}: {size} bytes, manifest.json says {shard.bytes} (truncated or replaced?)")
        digest = file_sha256(path)
        if digest != shard.sha256:
            raise VerifyError(f"{path}: sha256 {digest[:16]}… does not match manifest.json's {shard.sha256[:16]}…")
        check_shard(path, shard, manifest.splits[shard.split].num_cams, decode, stats[shard.split])
    for split, info in manifest.splits.items():
        st = stats[split]
        got = (st.count, len(st.pids), st.max_cam + 1)
        if got != (info.count, info.num_pids, info.num_cams):
            raise VerifyError(
                f"{where}: split {split} holds {got[0]} samples, {got[1]} pids, {got[2]} cams; "
                f"the manifest says {info.count}, {info.num_pids}, {info.num_cams}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = CliParser("verify", prog="python -m shards.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="folder holding manifest.json and the shards")
    ap.add_argument(
        "--decode", action=argparse.BooleanOptionalAction, default=True,
        help="decode every image with Pillow (default: on; --no-decode checks structure and hashes only)",
    )
    args = ap.parse_args(argv)
    return run_cli("verify", lambda: _report(Path(args.folder), args.decode))


def _report(folder: Path, decode: bool) -> int:
    start = time.perf_counter()
    if not (folder / MANIFEST).is_file():  # checked here: verify() keeps the readers' FileNotFoundError
        what = "does not exist" if not folder.exists() else f"holds no {MANIFEST}"
        raise VerifyError(f"{folder}: {what}; pass the --out folder of python -m shards.pack")
    manifest = verify(folder, decode=decode)
    n = sum(info.count for info in manifest.splits.values())
    print(summary(manifest, folder))
    what = "sha256, structure and image decoding" if decode else "sha256 and structure (images not decoded)"
    print(f"ok: {n} samples, {what} checked in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
