"""Bad-input table of the shard tools (``shards.pack``, ``shards.verify``, ``shards.synth``).

Each row runs the tool in a fresh process on one user mistake: exit 2, one stderr line naming the
culprit and the fix, and nothing in the scratch folder created, changed or removed (a refused pack
leaves no ``--out``, no temp folder, and an existing pack as it was).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shards.pack import pack
from tests.badinput import BadInput, check
from tests.fixtures_layouts import make_market, write_images

PACK = ["-m", "shards.pack", "--dataset", "market1501", "--root", "{tmp}/m", "--workers", "0"]
TRAIN_IMAGE = "bounding_box_train/0002_c1s1_000451_03.jpg"


def _market(tmp: Path) -> Path:
    return make_market(tmp / "m")


def _truncated(tmp: Path) -> None:
    path = _market(tmp) / TRAIN_IMAGE
    path.write_bytes(path.read_bytes()[:-20])  # the end of the scan and the EOI marker


def _text_as_jpg(tmp: Path) -> None:
    (_market(tmp) / "query" / "0002_c3s1_000301_00.jpg").write_text("id,camera\n2,3\n")


def _bad_name(tmp: Path) -> None:
    write_images(_market(tmp), ["query/person_0002.jpg"])


def _packed(tmp: Path) -> None:
    pack("market1501", _market(tmp), tmp / "out", workers=0)


def _packed_then_truncated_source(tmp: Path) -> None:
    _packed(tmp)
    path = tmp / "m" / TRAIN_IMAGE
    path.write_bytes(path.read_bytes()[:-20])


def _file_in_the_way(tmp: Path) -> None:
    _market(tmp)
    (tmp / "packs").write_text("not a folder\n")


def _empty_folder(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("no pack here\n")


def _truncated_shard(tmp: Path) -> None:
    _packed(tmp)
    shard = tmp / "out" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1500])


def _garbled_manifest(tmp: Path) -> None:
    _packed(tmp)
    (tmp / "out" / "manifest.json").write_text('{"dataset": "market1501", "shards": [')


def _synth_leftovers(tmp: Path) -> None:
    (tmp / "s" / "query").mkdir(parents=True)
    (tmp / "s" / "query" / "old.jpg").write_bytes(b"an earlier run")


ROWS = [
    BadInput(
        id="pack-truncated-jpeg",
        argv=[*PACK, "--out", "{tmp}/packs/m"],
        names=("1 image under", f"/m does not decode: {TRAIN_IMAGE} (image file is truncated"),
        fix=("fix or remove it, or pass --skip-bad to pack the rest",),
        setup=_truncated,
    ),
    BadInput(
        id="pack-text-named-jpg",
        argv=[*PACK, "--out", "{tmp}/packs/m"],
        names=("query/0002_c3s1_000301_00.jpg (file named .jpg holds neither JPEG nor PNG data",),
        fix=("--skip-bad",),
        setup=_text_as_jpg,
    ),
    BadInput(
        id="pack-bad-image-keeps-existing-pack",
        argv=[*PACK, "--out", "{tmp}/out", "--overwrite"],
        names=(TRAIN_IMAGE, "image file is truncated"),
        fix=("--skip-bad",),
        setup=_packed_then_truncated_source,
    ),
    BadInput(
        id="pack-missing-root",
        argv=["-m", "shards.pack", "--dataset", "market1501", "--root", "{tmp}/nowhere", "--out", "{tmp}/out"],
        names=("/nowhere/bounding_box_train: missing folder", "/nowhere does not exist"),
        fix=("pass the market1501 folder holding bounding_box_train/, bounding_box_test/ and query/ as the root",),
    ),
    BadInput(
        id="pack-name-does-not-parse",
        argv=[*PACK, "--out", "{tmp}/out"],
        names=("/m/query/person_0002.jpg: file name does not match market1501's pattern",),
        fix=("rename or remove it",),
        setup=_bad_name,
    ),
    BadInput(
        id="pack-out-holds-a-pack",
        argv=[*PACK, "--out", "{tmp}/out"],
        names=("/out: not empty",),
        fix=("pass --overwrite",),
        setup=_packed,
    ),
    BadInput(
        id="pack-out-not-a-pack",
        argv=[*PACK, "--out", "{tmp}/out", "--overwrite"],
        names=("/out: not empty and holds no manifest.json",),
        fix=("choose another --out",),
        setup=_empty_folder,
    ),
    BadInput(
        id="pack-out-not-writable",
        argv=[*PACK, "--out", "{tmp}/packs/m"],
        names=("/packs: a file where --out needs a folder",),
        fix=("choose another --out",),
        setup=_file_in_the_way,
    ),
    BadInput(
        id="pack-bad-workers",
        argv=[*PACK, "--out", "{tmp}/out", "--workers", "-2"],
        names=("--workers '-2'",),
        fix=("expected an int >= 0",),
        setup=_market,
    ),
    BadInput(
        id="verify-no-manifest",
        argv=["-m", "shards.verify", "{tmp}/out"],
        names=("/out: holds no manifest.json",),
        fix=("pass the --out folder of python -m shards.pack",),
        setup=_empty_folder,
    ),
    BadInput(
        id="verify-truncated-shard",
        argv=["-m", "shards.verify", "{tmp}/out"],
        names=("/out/train-000000.tar: 1500 bytes, manifest.json says 10240",),
        fix=("pack the dataset again",),
        setup=_truncated_shard,
    ),
    BadInput(
        id="verify-garbled-manifest",
        argv=["-m", "shards.verify", "{tmp}/out"],
        names=("/out/manifest.json: not a valid shard manifest",),
        fix=("pack the dataset again",),
        setup=_garbled_manifest,
    ),
    BadInput(
        id="synth-zero-ids",
        argv=["-m", "shards.synth", "--layout", "market1501", "--out", "{tmp}/s", "--ids", "0"],
        names=("--ids=0",),
        fix=("expected >= 1",),
    ),
    BadInput(
        id="synth-out-not-empty",
        argv=["-m", "shards.synth", "--layout", "market1501", "--out", "{tmp}/s", "--ids", "2"],
        names=("/s/query: already exists and is not empty",),
        fix=("choose an empty --out",),
        setup=_synth_leftovers,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row: BadInput, tmp_path: Path) -> None:
    check(row, tmp_path)
