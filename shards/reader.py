"""The one reader of the pack format: a shard's bytes → its checked samples, with byte offsets.

A shard (written by :mod:`shards.pack`) is a tar of members named ``<key>.<ext>``
(:func:`~shards.records.split_member_name`), two per sample: ``json`` (a
:class:`~shards.records.SampleMeta`) and one image (an extension of
:data:`~shards.records.IMAGE_MEMBERS`); the keys are ``sample_key(split, index)`` for consecutive
indices from the shard's ``first_index``, and the end-of-archive marker closes the tar. The verifier,
the in-memory store and the on-disk (wids) store all read shards through here, so they accept and
refuse the same files and group members into the same samples.

Why not webdataset's or wids' readers: both packages import torch when it is installed, and
``shards`` runs on a data node without it; webdataset's tar iterator streams through ``tarfile``,
which gives no byte offsets and stops quietly at a garbled header; wids' ``MMIndexedTar`` gives
offsets but checks no header checksum, serves a member cut short by a truncation and never looks for
the end-of-archive marker. The in-memory store copies each image into its buffer straight from the
shard's bytes (so it needs offsets into them), and the verifier must catch every corruption. The
on-disk store still serves samples through wids; this reader builds its index and checks its shards.

Every failure is a :class:`ShardError`: one line naming the shard and, where it applies, the member
or the sample key. Callers add what to do (:data:`REPACK`).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple, NoReturn

from shards.errors import UserError
from shards.records import IMAGE_MEMBERS, SampleMeta, ShardInfo, sample_key, split_member_name

REPACK = "pack the dataset again (python -m shards.pack … --overwrite) or copy the pack again"
"""The fix of every mismatch between a pack and its manifest."""
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_END_OF_ARCHIVE = 2 * _BLOCK
_REGULAR = (b"0", b"\0", b"7")
"""Type flags of a regular file (``7``: contiguous), as ``tarfile`` counts them."""
_EXTENDED = (b"x", b"g", b"L", b"K")
"""pax and GNU long-name headers: such a tar is read by ``tarfile``."""
_META_FIELDS = frozenset(f.name for f in fields(SampleMeta))


class ShardError(UserError):
    """A shard that does not match its manifest: missing, truncated, corrupt or out of order."""


class TarMember(NamedTuple):
    """A regular file of a shard: its name and where its data lies in the shard's bytes."""

    name: str
    offset: int
    """First data byte (after the member's header)."""
    size: int

    def data(self, buf: memoryview) -> memoryview:
        """The member's bytes in the shard's ``buf``: a view, no copy."""
        return buf[self.offset : self.offset + self.size]


class ShardSample(NamedTuple):
    """One checked sample of a shard."""

    key: str
    meta: SampleMeta
    image_ext: str
    """Extension of the image member (a key of ``IMAGE_MEMBERS``)."""
    members: dict[str, TarMember]
    """By extension: ``json`` and the image."""

    @property
    def image(self) -> TarMember:
        return self.members[self.image_ext]


def read_samples(path: Path, buf: memoryview, shard: ShardInfo) -> Iterator[ShardSample]:
    """The samples of ``shard`` (its bytes ``buf``, read from ``path``), in index order.

    The tar is checked whole first (header checksums, no truncation, the end-of-archive marker),
    each sample as it is yielded (key, members, json), and the number of samples at the end."""
    n = 0
    for key, members in _group(path, tar_members(path, buf)):
        yield _check_sample(path, buf, shard.split, shard.first_index + n, key, members)
        n += 1
    if n != shard.count:
        raise ShardError(f"{path}: {n} samples, manifest.json says count={shard.count}")


def tar_members(path: Path, buf: memoryview) -> list[TarMember]:
    """The members of the tar in ``buf``, in order; only regular files, then the end-of-archive marker."""
    try:
        members, end = _ustar_members(path, buf)
    except _NeedTarfile:
        members, end = _tarfile_members(path, buf)
    tail = buf[end:]
    # tarfile stops quietly at a garbled header or a short read: insist that only the end-of-archive
    # blocks (zeros, padded to a whole record) follow the last member
    if len(tail) < _END_OF_ARCHIVE or bytes(tail) != bytes(len(tail)):
        raise ShardError(f"{path}: no end-of-archive marker{_after(members)}; the tar is truncated or corrupt")
    return members


def _after(members: list[TarMember]) -> str:
    """Where in the tar a failure is: after the last member read whole."""
    return f" after member {members[-1].name}" if members else ""


class _NeedTarfile(Exception):
    """A header type the fast reader leaves to ``tarfile`` (pax / GNU extensions, base-256 sizes)."""


def _octal(field: bytes) -> int:
    field = field.split(b"\0", 1)[0].strip()
    if field and not field.isdigit():  # int() would take a sign or underscores
        raise ValueError(field)
    return int(field, 8) if field else 0


def _checksum(hdr: bytes) -> int:
    """The header's checksum as ustar defines it: the sum of its bytes, unsigned."""
    return sum(hdr) - sum(hdr[148:156]) + 8 * 32  # the checksum field itself counts as spaces


def _signed_checksum(hdr: bytes) -> int:
    """The checksum some old writers compute (signed bytes); tarfile accepts it too."""
    return _checksum(hdr) - 256 * sum(1 for b in hdr[:148] + hdr[156:] if b >= 128)


def _ustar_members(path: Path, buf: memoryview) -> tuple[list[TarMember], int]:
    """Members of a plain ustar archive and the offset of its end-of-archive marker.

    The packer writes plain ustar, whose fixed-offset fields parse in a few µs where ``tarfile``
    spends ~30 µs of Python per header. A pax/GNU extension header raises :class:`_NeedTarfile`."""
    out: list[TarMember] = []
    n, off = len(buf), 0
    while off + _BLOCK <= n:
        hdr = bytes(buf[off : off + _BLOCK])
        if hdr == _ZERO_BLOCK:
            return out, off
        flag = hdr[156:157]
        if flag in _EXTENDED or hdr[124] & 0x80:  # 0x80: a base-256 size (over 8 GiB)
            raise _NeedTarfile
        try:
            size, chk = _octal(hdr[124:136]), _octal(hdr[148:156])
        except ValueError:
            _corrupt_header(path, off, "unreadable number", out)
        if chk != _checksum(hdr) and chk != _signed_checksum(hdr):
            _corrupt_header(path, off, "checksum mismatch", out)
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}" if prefix else name
        if flag not in _REGULAR:
            raise ShardError(f"{path}: member {name}: not a regular file")
        start = off + _BLOCK
        if start + size > n:
            need = f"needs {start + size} bytes, has {n}"
            raise ShardError(f"{path}: truncated inside member {name!r}{_after(out)} ({need})")
        out.append(TarMember(name, start, size))
        off = start + -(-size // _BLOCK) * _BLOCK
    if off < n and any(buf[off:]):  # (zeros: the end-of-archive marker cut short)
        raise ShardError(f"{path}: truncated inside a tar header at byte {off}{_after(out)}")
    raise ShardError(f"{path}: no end-of-archive marker{_after(out)}; the tar is truncated or corrupt")


def _corrupt_header(path: Path, off: int, fault: str, members: list[TarMember]) -> NoReturn:
    if not members:
        raise ShardError(f"{path}: corrupt tar header at byte {off} ({fault}); not a tar, or its start is corrupt")
    raise ShardError(
        f"{path}: corrupt tar header at byte {off} ({fault}): no further member and no end-of-archive "
        f"marker{_after(members)}; the tar is truncated or corrupt"
    )


def _tarfile_members(path: Path, buf: memoryview) -> tuple[list[TarMember], int]:
    """The same as :func:`_ustar_members` through ``tarfile`` (any tar format; slower)."""
    out: list[TarMember] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    raise ShardError(f"{path}: member {m.name}: not a regular file")
                if m.offset_data + m.size > len(buf):
                    raise ShardError(f"{path}: truncated inside member {m.name!r}{_after(out)}")
                out.append(TarMember(m.name, m.offset_data, m.size))
            end = tar.offset
    except tarfile.TarError as exc:
        raise ShardError(f"{path}: unreadable tar{_after(out)} ({exc}); the tar is truncated or corrupt") from None
    return out, end


def _group(path: Path, members: list[TarMember]) -> Iterator[tuple[str, dict[str, TarMember]]]:
    """Consecutive members with the same key, by extension: a sample as webdataset groups it."""
    key: str | None = None
    group: dict[str, TarMember] = {}
    for m in members:
        try:
            k, ext = split_member_name(m.name)
        except ValueError as exc:
            raise ShardError(f"{path}: {exc}") from None
        if k != key:
            if key is not None:
                yield key, group
            key, group = k, {}
        if ext in group:
            raise ShardError(f"{path}: sample {key}: member .{ext} appears twice")
        group[ext] = m
    if key is not None:
        yield key, group


def _check_sample(
    path: Path, buf: memoryview, split: str, index: int, key: str, members: dict[str, TarMember]
) -> ShardSample:
    try:
        return _sample(buf, split, index, key, members)
    except _Fault as exc:
        raise ShardError(f"{path}: sample {key}: {exc}") from None


class _Fault(Exception):
    """What is wrong with a sample; :func:`_check_sample` adds where (formatted only on failure)."""


def _sample(buf: memoryview, split: str, index: int, key: str, members: dict[str, TarMember]) -> ShardSample:
    expected = sample_key(split, index)
    if key != expected:
        raise _Fault(f"expected key {expected} (samples must be contiguous, in index order)")
    image_ext = ""
    if len(members) == 2 and "json" in members:
        first, second = members
        image_ext = second if first == "json" else first
    if image_ext not in IMAGE_MEMBERS:
        raise _Fault(f"members {sorted(members)}; expected 'json' and one of {sorted(IMAGE_MEMBERS)}")
    meta = _parse_meta(members["json"].data(buf))
    if meta.split != split or meta.index != index:
        raise _Fault(f"json says split={meta.split!r} index={meta.index!r}; expected {split!r} {index}")
    return ShardSample(key, meta, image_ext, members)


def _is_int(x: object) -> bool:
    return type(x) is int  # JSON numbers parse to int exactly; a bool is no id


def _parse_meta(data: memoryview) -> SampleMeta:
    """The ``json`` member, held to :class:`SampleMeta`'s fields and types."""
    try:
        raw = json.loads(str(data, "utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Fault(f"json member is not JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.keys() != _META_FIELDS:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise _Fault(f"json has fields {got}; expected {sorted(_META_FIELDS)}")
    meta = SampleMeta(**raw)
    if not _is_int(meta.pid) or meta.pid < 0:
        raise _Fault(f"pid={meta.pid!r}; expected an int >= 0")
    if not _is_int(meta.camid) or meta.camid < 0:
        raise _Fault(f"camid={meta.camid!r}; expected an int >= 0")
    if not isinstance(meta.relpath, str) or not meta.relpath:
        raise _Fault(f"relpath={meta.relpath!r}; expected a non-empty string")
    return meta
