"""Check a packed dataset against its manifest.

    python -m shards.verify DIR [--no-decode]

Checks that every listed shard exists with the listed size and sha256, that the shard list covers
each split with contiguous indices, and reads every shard as the stores do (:mod:`shards.reader`:
header checksums, the end-of-archive marker — a truncated tar is an error even when its hash was
updated —, exactly one image and one ``json`` member per sample with the expected key, split and
index); cameras must lie inside the split's range, and the per-split counts, #pids and #cams must
match the manifest. With ``decode`` every image is decoded with Pillow, which catches corrupt image
bytes that a correct hash cannot (the CLI decodes by default; the function does not, so the
loader's check at start-up stays I/O bound).

Every failure is a :class:`VerifyError`: one line naming the shard and, where it applies, the key,
ending with what to do (pack again). The files ``pack --skip-bad`` left out are listed in the
output: they are not in the pack, which is not an error.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shards.errors import CliParser, run_cli
from shards.pack import summary
from shards.reader import REPACK, ShardError, ShardSample, read_samples
from shards.records import IMAGE_MEMBERS, MANIFEST, SPLITS, Manifest, ShardInfo, read_manifest


class VerifyError(ShardError):
    """A pack does not match its manifest (or its images do not decode)."""


@dataclass
class _SplitStats:
    count: int = 0
    pids: set[int] = field(default_factory=set)
    max_cam: int = -1


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


def _check_image(where: str, ext: str, data: bytes | memoryview) -> None:
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


def check_shard(path: Path, data: bytes, shard: ShardInfo, num_cams: int, decode: bool) -> list[ShardSample]:
    """The samples of one shard (its bytes ``data``, whose size and sha256 match), read as the stores
    read them; besides, cameras must lie in the split's range and, with ``decode``, images decode."""
    buf = memoryview(data)
    samples = []
    for sample in read_samples(path, buf, shard):
        where = f"{path}: sample {sample.key}"
        if sample.meta.camid >= num_cams:
            raise VerifyError(f"{where}: camid={sample.meta.camid!r}; expected an int in 0..{num_cams - 1}")
        if decode:
            _check_image(where, sample.image_ext, sample.image.data(buf))
        samples.append(sample)
    return samples


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
    except ShardError as exc:  # VerifyError included
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
        data = path.read_bytes()  # one shard in RAM at a time, as the stores read it
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise VerifyError(f"{path}: sha256 {digest[:16]}… does not match manifest.json's {shard.sha256[:16]}…")
        samples = check_shard(path, data, shard, manifest.splits[shard.split].num_cams, decode)
        st = stats[shard.split]
        st.count += len(samples)
        st.pids.update(s.meta.pid for s in samples)
        st.max_cam = max([st.max_cam] + [s.meta.camid for s in samples])
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
