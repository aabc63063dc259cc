"""Packer and verifier: round trip, determinism, sharding, atomic output, and every failure verify catches."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from shards import pack as packmod
from shards import verify as verifymod
from shards.layouts import parse
from shards.pack import pack
from shards.reader import ShardError, ShardSample, read_samples
from shards.records import (
    MANIFEST,
    SPLITS,
    Manifest,
    SampleMeta,
    member_name,
    read_manifest,
    sample_key,
    split_member_name,
)
from shards.verify import VerifyError, verify
from tests.fixtures_layouts import MARKET_FILES, make_cuhk03np, make_market, make_msmt_lists, write_images

Members = list[tuple[str, bytes]]


def read_members(path: Path) -> Members:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def rewrite_shard(folder: Path, name: str, edit: Callable[[Members], Members], update_manifest: bool = True) -> None:
    """Re-write a shard with edited members (same tar conventions) and, by default, a manifest whose
    size and sha256 match the new file, so only the deeper checks can catch the edit."""
    path = folder / name
    members = edit(read_members(path))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            packmod._add_member(tar, member, data)
    if update_manifest:
        refresh_manifest(folder, name)


def refresh_manifest(folder: Path, name: str) -> None:
    m = read_manifest(folder)
    path = folder / name
    m.shards = [
        dataclasses.replace(s, bytes=path.stat().st_size, sha256=packmod.file_sha256(path)) if s.name == name else s
        for s in m.shards
    ]
    (folder / MANIFEST).write_text(m.to_json())


def edit_manifest(folder: Path, fn: Callable[[Manifest], None]) -> None:
    m = read_manifest(folder)
    fn(m)
    (folder / MANIFEST).write_text(m.to_json())


def many_market(root: Path, n: int = 12) -> Path:
    files = {k: list(v) for k, v in MARKET_FILES.items()}
    files["bounding_box_train"] += [f"{100 + i // 3:04d}_c{1 + i % 6}s1_{i:06d}_00.jpg" for i in range(n)]
    return make_market(root, files)


@pytest.fixture
def market_pack(tmp_path: Path) -> tuple[Path, Path]:
    root = make_market(tmp_path / "Market-1501-v15.09.15")
    out = tmp_path / "packs" / "market1501"
    pack("market1501", root, out)
    return root, out


def test_round_trip(market_pack: tuple[Path, Path]) -> None:
    root, out = market_pack
    manifest = verify(out, decode=True)
    assert manifest == read_manifest(out)
    assert manifest.dataset == "market1501" and manifest.options == {}
    got = {s: (i.count, i.num_pids, i.num_cams) for s, i in manifest.splits.items()}
    assert got == {"train": (3, 2, 6), "query": (2, 2, 5), "gallery": (3, 3, 4)}
    assert sorted(os.listdir(out)) == ["gallery-000000.tar", MANIFEST, "query-000000.tar", "train-000000.tar"]
    records = parse("market1501", root)
    for split in SPLITS:
        (shard,) = manifest.shards_of(split)
        members = read_members(out / shard.name)
        assert len(members) == 2 * len(records[split])
        for index, rec in enumerate(records[split]):
            key = sample_key(split, index)
            assert members[2 * index] == (f"{key}.jpg", (root / rec.relpath).read_bytes())  # original bytes
            name, meta = members[2 * index + 1]
            assert name == f"{key}.json"
            assert SampleMeta(**json.loads(meta)) == SampleMeta(rec.pid, rec.camid, split, index, rec.relpath)
            assert meta == json.dumps(json.loads(meta), sort_keys=True, separators=(",", ":")).encode()
    with tarfile.open(out / "train-000000.tar") as tar:
        info = tar.getmembers()[0]
        assert (info.mtime, info.mode, info.uid, info.uname) == (0, 0o444, 0, "reid")


def test_webdataset_and_wids_read_the_shards(market_pack: tuple[Path, Path]) -> None:
    import webdataset as wds
    import wids

    root, out = market_pack
    manifest = read_manifest(out)
    records = parse("market1501", root)
    urls = [str(out / s.name) for s in manifest.shards_of("gallery")]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [sample_key("gallery", i) for i in range(3)]
    assert [s["jpg"] for s in samples] == [(root / r.relpath).read_bytes() for r in records["gallery"]]
    # the manifest's shard list is a wids index: random access by split index
    index = [{"url": str(out / s.name), "nsamples": s.count} for s in manifest.shards_of("train")]
    ds = wids.ShardListDataset(index, localname=lambda url: url, transformations=[])
    for i in (2, 0, 1):
        sample = ds[i]
        assert sample["__key__"] == sample_key("train", i)
        assert sample[".jpg"].getvalue() == (root / records["train"][i].relpath).read_bytes()


def test_png_and_jpeg_suffixes(tmp_path: Path) -> None:
    root = make_cuhk03np(tmp_path / "cuhk03-np")
    out = tmp_path / "cuhk"
    manifest = pack("cuhk03np_labeled", root, out)
    names = [n for n, _ in read_members(out / manifest.shards_of("query")[0].name)]
    assert names == ["query_00000000.json", "query_00000000.png"]  # webdataset's sorted member order
    verify(out, decode=True)
    market = make_market(tmp_path / "m")
    write_images(market, ["query/0009_c2s1_000001_00.jpeg"], seed=3)
    manifest = pack("market1501", market, tmp_path / "m_out")
    members = dict(read_members(tmp_path / "m_out" / "query-000000.tar"))
    assert members["query_00000002.jpg"] == (market / "query/0009_c2s1_000001_00.jpeg").read_bytes()
    verify(tmp_path / "m_out", decode=True)


def test_image_content_must_match_suffix(tmp_path: Path) -> None:
    root = make_market(tmp_path / "m")
    bad = root / "query" / "0009_c2s1_000001_00.jpg"
    bad.write_bytes((root / "query" / "0002_c3s1_000301_00.jpg").read_bytes()[:0] + b"\x89PNG\r\n\x1a\n rest")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="holds PNG data") as exc:
        pack("market1501", root, out)
    msg = str(exc.value)
    assert str(root) in msg and bad.relative_to(root).as_posix() in msg and "\n" not in msg
    # nothing published, no temp folder left beside out
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["m"]
    bad.write_text("not an image at all")
    with pytest.raises(ValueError, match="neither JPEG nor PNG"):
        pack("market1501", root, out)


def test_deterministic(tmp_path: Path) -> None:
    root = many_market(tmp_path / "m")
    a, b = tmp_path / "a", tmp_path / "b"
    pack("market1501", root, a, shard_bytes=4096)
    for p in root.rglob("*.jpg"):  # file times and packing time must not leak into the tars
        os.utime(p, (1e9, 1e9))
    pack("market1501", root, b, shard_bytes=4096)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and len(names) > 4
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_small_shards(tmp_path: Path) -> None:
    root = many_market(tmp_path / "m", n=12)
    out = tmp_path / "out"
    target = 6000
    manifest = pack("market1501", root, out, shard_bytes=target)
    train = manifest.shards_of("train")
    assert len(train) >= 3
    assert [s.name for s in train] == [f"train-{i:06d}.tar" for i in range(len(train))]
    firsts = [s.first_index for s in train]
    assert firsts == [sum(s.count for s in train[:i]) for i in range(len(train))]
    assert sum(s.count for s in train) == manifest.splits["train"].count == 15
    for s in train:
        members = read_members(out / s.name)
        assert [n for n, _ in members][::2] == [f"{sample_key('train', s.first_index + i)}.jpg" for i in range(s.count)]
        used = sum(512 + -(-len(d) // 512) * 512 for _, d in members) + 1024
        assert s.count == 1 or used <= target  # a sample only overflows a shard of its own
    assert verify(out, decode=True) == manifest


def test_out_folder_rules(tmp_path: Path) -> None:
    root = make_market(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    pack("market1501", root, out)  # an empty folder is fine
    first = read_manifest(out)
    with pytest.raises(ValueError, match="not empty; pass --overwrite") as exc:
        pack("market1501", root, out)
    assert str(out) in str(exc.value)
    write_images(root, ["query/0009_c2s1_000001_00.jpg"], seed=4)
    second = pack("market1501", root, out, overwrite=True)
    assert second.splits["query"].count == first.splits["query"].count + 1 == read_manifest(out).splits["query"].count
    verify(out)
    assert sorted(os.listdir(tmp_path)) == ["m", "out"]  # no temp or old folders left
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a pack"):
        pack("market1501", root, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "precious"


def test_pack_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_msmt_lists(tmp_path / "MSMT17_V1")
    out = tmp_path / "msmt"
    rc = packmod.main(["--dataset", "msmt17", "--root", str(root), "--out", str(out), "--msmt17-train-only"])
    assert rc == 0
    assert "train" in capsys.readouterr().out
    manifest = verify(out, decode=True)
    assert manifest.options == {"train_only": True, "variant": "v1"}
    assert manifest.splits["train"].count == 2 and manifest.splits["gallery"].count == 2
    rc = packmod.main(["--dataset", "market1501", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "missing folder" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------ verify failures


def _fails(out: Path, pattern: str, *names: str, decode: bool = False) -> str:
    with pytest.raises(VerifyError, match=pattern) as exc:
        verify(out, decode=decode)
    msg = str(exc.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, msg
    return msg


def test_missing_shard(market_pack: tuple[Path, Path]) -> None:
    _, out = market_pack
    (out / "query-000000.tar").unlink()
    _fails(out, "missing", str(out / "query-000000.tar"))


def test_missing_manifest(market_pack: tuple[Path, Path]) -> None:
    _, out = market_pack
    (out / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        verify(out)


def test_sha256_mismatch(market_pack: tuple[Path, Path]) -> None:
    _, out = market_pack
    path = out / "gallery-000000.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0x01  # inside the first image: same size, different hash
    path.write_bytes(bytes(data))
    _fails(out, "sha256", str(path))


def test_truncated_tar_with_stale_manifest(market_pack: tuple[Path, Path]) -> None:
    _, out = market_pack
    path = out / "train-000000.tar"
    path.write_bytes(path.read_bytes()[:1500])
    _fails(out, "1500 bytes, manifest.json says 10240", str(path))


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_tar_with_matching_manifest(market_pack: tuple[Path, Path], cut: str) -> None:
    _, out = market_pack
    path = out / "train-000000.tar"
    data = path.read_bytes()
    members = read_members(path)
    whole = sum(512 + -(-len(d) // 512) * 512 for _, d in members[:2])  # first sample, both members
    path.write_bytes(data[: whole + 700] if cut == "mid_member" else data[:whole])
    refresh_manifest(out, path.name)
    _fails(out, "truncated", str(path), f"after member {sample_key('train', 0)}.json")  # the last one read whole


def test_corrupt_jpeg_caught_only_by_decode(market_pack: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, out = market_pack

    def corrupt(members: Members) -> Members:
        name, data = members[2]  # sample 1's image
        at = data.index(b"\xff\xc4") + 5  # inside a Huffman table: the decoder must reject it
        bad = data[:at] + bytes(b ^ 0xFF for b in data[at : at + 8]) + data[at + 8 :]
        return members[:2] + [(name, bad)] + members[3:]

    rewrite_shard(out, "gallery-000000.tar", corrupt)
    verify(out)  # hashes and structure are fine
    _fails(out, "does not decode", str(out / "gallery-000000.tar"), sample_key("gallery", 1), decode=True)
    assert verifymod.main([str(out), "--no-decode"]) == 0
    assert verifymod.main([str(out)]) == 2  # the CLI decodes by default
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gallery_00000001" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["pixels", "idat_crc"])
def test_corrupt_png_caught_only_by_decode(tmp_path: Path, where: str) -> None:
    out = tmp_path / "cuhk"
    pack("cuhk03np_detected", make_cuhk03np(tmp_path / "cuhk03-np"), out)

    def corrupt(members: Members) -> Members:
        name, data = members[1]
        # the middle of the compressed pixels, or the CRC of the last IDAT chunk (Pillow's load()
        # does not check it: only verify() does)
        at = len(data) // 2 if where == "pixels" else data.index(b"IEND") - 8
        return [members[0], (name, data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])] + members[2:]

    rewrite_shard(out, "query-000000.tar", corrupt)
    verify(out)
    _fails(out, "does not decode", "query-000000.tar", sample_key("query", 0), decode=True)


def test_image_member_of_the_wrong_type(market_pack: tuple[Path, Path]) -> None:
    from tests.fixtures_layouts import tiny_image

    _, out = market_pack
    rewrite_shard(out, "query-000000.tar", lambda m: [(m[0][0], tiny_image(1, "PNG"))] + m[1:])
    _fails(out, "decodes as PNG, expected JPEG", sample_key("query", 0), decode=True)


def test_samples_out_of_order(market_pack: tuple[Path, Path]) -> None:
    _, out = market_pack
    rewrite_shard(out, "gallery-000000.tar", lambda m: m[2:4] + m[0:2] + m[4:])
    _fails(out, "expected key gallery_00000000", "gallery-000000.tar", "gallery_00000001")


def test_json_index_mismatch(market_pack: tuple[Path, Path]) -> None:
    _, out = market_pack

    def reindex(members: Members) -> Members:
        name, meta = members[3]
        raw = json.loads(meta)
        raw["index"] = 7
        return members[:3] + [(name, json.dumps(raw).encode())] + members[4:]

    rewrite_shard(out, "train-000000.tar", reindex)
    _fails(out, "index=7; expected 'train' 1", "train-000000.tar", "train_00000001")


def test_sample_without_json(market_pack: tuple[Path, Path]) -> None:
    _, out = market_pack
    rewrite_shard(out, "query-000000.tar", lambda m: m[:1] + m[2:])
    _fails(out, r"members \['jpg'\]", "query_00000000")


def test_manifest_lies(market_pack: tuple[Path, Path]) -> None:
    _, out = market_pack

    def pids(m: Manifest) -> None:
        m.splits["gallery"].num_pids = 2

    edit_manifest(out, pids)
    _fails(out, "split gallery holds 3 samples, 3 pids, 4 cams; the manifest says 3, 2, 4")


def test_manifest_not_contiguous(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pack("market1501", many_market(tmp_path / "m"), out, shard_bytes=4000)

    def shift(m: Manifest) -> None:
        m.shards[1].first_index += 1

    edit_manifest(out, shift)
    _fails(out, "contiguous train indices", "train-000001.tar")


# ------------------------------------------------------------------ the synthetic generator's layouts


@pytest.mark.parametrize(
    "layout, name",
    [("market1501", "market1501"), ("dukemtmc", "dukemtmc"), ("msmt17", "msmt17"),
     ("cuhk03np", "cuhk03np_detected"), ("cuhk03np", "cuhk03np_labeled")],
)
def test_synth_layouts_parse_pack_verify(tmp_path: Path, layout: str, name: str) -> None:
    from shards.synth.config import SynthConfig
    from shards.synth.write import synthesize

    root = tmp_path / layout
    cams = 2 if layout == "cuhk03np" else 3
    cfg = SynthConfig(layout=layout, out=str(root), ids=3, cams=cams, images_per_id_cam=2, size=(32, 16))
    written = synthesize(cfg)
    got = parse(name, root)
    variant = name.split("_")[1] if "_" in name else ""
    expected = sorted(r for r in written.records if r.pid != -1 and r.relpath.startswith(variant))
    assert sorted(r for records in got.values() for r in records) == expected
    manifest = pack(name, root, tmp_path / "pack")
    assert verify(tmp_path / "pack", decode=True) == manifest
    assert {s: i.count for s, i in manifest.splits.items()} == {s: len(got[s]) for s in SPLITS}


def test_synth_market_with_more_cameras_needs_the_synthetic_layout(tmp_path: Path) -> None:
    from shards.synth.config import SynthConfig
    from shards.synth.write import synthesize

    root = tmp_path / "m8"
    synthesize(SynthConfig(layout="market1501", out=str(root), ids=2, cams=8, images_per_id_cam=1, size=(32, 16)))
    with pytest.raises(ValueError, match="camera [78] out of range"):
        parse("market1501", root)
    got = parse("synthetic", root)
    assert max(r.camid for records in got.values() for r in records) == 7


def test_command_lines(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    root = make_market(tmp_path / "m")
    env = dict(os.environ)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", *args], cwd=repo, env=env, capture_output=True, text=True)

    done = run("shards.pack", "--dataset", "market1501", "--root", str(root), "--out", str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr
    assert "gallery" in done.stdout
    done = run("shards.verify", str(tmp_path / "p"))
    assert done.returncode == 0 and "ok: 8 samples" in done.stdout, done.stderr
    (tmp_path / "p" / "train-000000.tar").write_bytes(b"")
    done = run("shards.verify", str(tmp_path / "p"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("verify: error: ") and done.stderr.count("\n") == 1
    assert "train-000000.tar" in done.stderr


def test_garbled_header_between_samples(market_pack: tuple[Path, Path]) -> None:
    _, out = market_pack
    path = out / "gallery-000000.tar"
    data = bytearray(path.read_bytes())
    members = read_members(path)
    at = sum(512 + -(-len(d) // 512) * 512 for _, d in members[:2])  # header of sample 1's image
    data[at : at + 100] = b"\xff" * 100  # tarfile stops quietly here instead of raising
    path.write_bytes(bytes(data))
    refresh_manifest(out, path.name)
    _fails(out, "no end-of-archive marker after member gallery_00000000.json", str(path))


# ------------------------------------------------------------------------- images checked at pack time


def _truncate(path: Path, cut: int = 20) -> None:
    """Drop the last ``cut`` bytes: the end of the scan and the EOI marker, as a broken copy does."""
    path.write_bytes(path.read_bytes()[:-cut])


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_check_image(tmp_path: Path) -> None:
    from tests.fixtures_layouts import tiny_image

    cases = {
        "ok.jpg": tiny_image(1), "ok.JPEG": tiny_image(2), "ok.png": tiny_image(3, "PNG"),
        "truncated.jpg": tiny_image(4)[:-20], "header_cut.jpg": tiny_image(5)[:100],
        "text.jpg": b"not an image", "png_inside.jpg": tiny_image(6, "PNG"),
        "garbage_after_magic.jpg": b"\xff\xd8\xff" + b"junk" * 20,
    }
    png = bytearray(tiny_image(7, "PNG"))
    png[png.index(b"IEND") - 8] ^= 0x10  # the CRC of the last IDAT chunk: only verify() sees it
    cases["bad_crc.png"] = bytes(png)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    got = {name: packmod.check_image(tmp_path / name) for name in cases}
    assert got["ok.jpg"] == (cases["ok.jpg"], "jpg") and got["ok.JPEG"] == (cases["ok.JPEG"], "jpg")
    assert got["ok.png"] == (cases["ok.png"], "png")
    reasons = {name: reason for name, (data, reason) in got.items() if data is None}
    assert set(reasons) == set(cases) - {"ok.jpg", "ok.JPEG", "ok.png"}
    assert "image file is truncated" in reasons["truncated.jpg"]
    assert "holds neither JPEG nor PNG data" in reasons["text.jpg"]
    assert "holds PNG data" in reasons["png_inside.jpg"]
    assert reasons["garbage_after_magic.jpg"] == "not a readable JPEG image"  # no object address in it
    assert "checksum in b'IDAT'" in reasons["bad_crc.png"]
    for reason in reasons.values():  # they go into manifest.json: one line, no path, same every run
        assert "\n" not in reason and str(tmp_path) not in reason and "0x" not in reason
    assert packmod.check_image(tmp_path / "missing.jpg")[1].startswith("cannot read it")


def test_bad_image_refused_and_nothing_written(tmp_path: Path) -> None:
    root = many_market(tmp_path / "m")
    _truncate(root / "bounding_box_train/0002_c1s1_000451_03.jpg")
    (root / "query/0007_c5s3_001001_00.jpg").write_text("not an image")
    out = tmp_path / "packs" / "deeper" / "m"
    with pytest.raises(packmod.PackError) as exc:
        pack("market1501", root, out)
    msg = str(exc.value)
    first = "bounding_box_train/0002_c1s1_000451_03.jpg (image file is truncated"
    assert msg.startswith(f"2 images under {root} do not decode: {first}")
    assert "query/0007_c5s3_001001_00.jpg (file named .jpg holds neither JPEG nor PNG data" in msg
    assert msg.endswith("; fix or remove them, or pass --skip-bad to pack the rest") and "\n" not in msg
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no out, no temp folder, not even packs/
    # an existing pack stays as it was, --overwrite or not
    good = many_market(tmp_path / "good")
    out.parent.mkdir(parents=True)
    pack("market1501", good, out)
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(packmod.PackError, match="do not decode" if overwrite else "not empty"):
            pack("market1501", root, out, overwrite=overwrite)
        assert _tree(out) == before and sorted(os.listdir(out.parent)) == ["m"]


def test_refusal_lists_the_first_and_counts_all(tmp_path: Path) -> None:
    root = many_market(tmp_path / "m", n=40)
    bad = sorted(root.glob("bounding_box_train/01*.jpg"))
    for path in bad:
        _truncate(path)
    with pytest.raises(packmod.PackError) as exc:
        pack("market1501", root, tmp_path / "out", workers=0)
    msg = str(exc.value)
    listed = [p for p in bad if p.relative_to(root).as_posix() in msg]
    assert len(bad) == 40 and msg.startswith(f"40 images under {root}")
    assert listed == bad[: packmod.MAX_LISTED] and packmod.MAX_LISTED == 20  # the first 20, in relpath order
    assert f"… ({40 - len(listed)} more)" in msg and msg.endswith("or pass --skip-bad to pack the rest")
    assert "\n" not in msg and len(msg) <= 4000  # one line, within the error path's limit: the fix survives


def test_skip_bad_packs_the_rest_and_lists_the_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = many_market(tmp_path / "m")
    bad = {"bounding_box_train/0002_c2s1_000551_01.jpg": "train",
           "bounding_box_test/0002_c4s2_000801_02.jpg": "gallery"}
    for rel in bad:
        _truncate(root / rel)
    out = tmp_path / "out"
    rc = packmod.main(["--dataset", "market1501", "--root", str(root), "--out", str(out), "--skip-bad",
                       "--shard-bytes", "4096", "--workers", "0"])
    assert rc == 0
    manifest = read_manifest(out)
    assert [(s.relpath, s.split) for s in manifest.skipped] == sorted(bad.items(), key=lambda kv: SPLITS.index(kv[1]))
    assert all("image file is truncated" in s.reason for s in manifest.skipped)
    records = parse("market1501", root)
    assert manifest.splits["train"].count == len(records["train"]) - 1 == 14
    assert manifest.splits["gallery"].count == 2 and manifest.splits["query"].count == 2
    assert verify(out, decode=True) == manifest  # contiguous indices over the packed images
    packed = [json.loads(data)["relpath"] for s in manifest.shards
              for name, data in read_members(out / s.name) if name.endswith(".json")]
    assert packed == [r.relpath for split in SPLITS for r in records[split] if r.relpath not in bad]
    assert verifymod.main([str(out)]) == 0
    report = capsys.readouterr().out
    assert "skipped at pack time: 2 files (see manifest.json)" in report
    assert all(rel in report for rel in bad)


def test_skip_bad_is_deterministic_whatever_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = many_market(tmp_path / "m", n=30)
    for path in sorted(root.glob("bounding_box_train/01*.jpg"))[::4]:
        _truncate(path)
    (root / "query/0002_c3s1_000301_00.jpg").write_bytes(b"\x89PNG\r\n\x1a\n not a jpeg")
    monkeypatch.setattr(packmod, "PARALLEL_MIN", 1)  # small enough input for the worker pool
    monkeypatch.setattr(packmod, "_CHUNK", 3)  # many chunks: results must come back in order
    packs = {}
    for workers in (0, 2, 3):
        out = packs[workers] = tmp_path / f"w{workers}"
        pack("market1501", root, out, shard_bytes=4096, workers=workers, skip_bad=True)
    assert len(read_manifest(packs[0]).skipped) == 9
    reference = _tree(packs[0])
    assert len(reference) > 5
    for workers in (2, 3):
        assert _tree(packs[workers]) == reference


def test_skip_bad_refuses_to_empty_a_split(tmp_path: Path) -> None:
    root = make_market(tmp_path / "m")
    for path in (root / "query").glob("*.jpg"):
        _truncate(path)
    with pytest.raises(packmod.PackError, match="none of the query images decodes") as exc:
        pack("market1501", root, tmp_path / "out", skip_bad=True)
    assert str(root) in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_manifest_without_skipped_list_still_reads(market_pack: tuple[Path, Path]) -> None:
    _, out = market_pack
    raw = json.loads((out / MANIFEST).read_text())
    assert raw.pop("skipped") == []
    (out / MANIFEST).write_text(json.dumps(raw))  # a pack made before --skip-bad existed
    assert verify(out).skipped == []


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 4096, 8**11 - 1])
def test_headers_are_tarfiles(size: int) -> None:
    for name in ("train_00000000.jpg", "gallery_00012345.json", "x" * 100):
        info = packmod._tar_info(name, size)
        assert packmod.ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    with pytest.raises(ValueError, match="longer than a plain ustar header"):
        packmod.ustar_header("x" * 101, size)


def test_shards_are_what_tarfile_writes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = pack("market1501", many_market(tmp_path / "m"), out, shard_bytes=6000)
    assert len(manifest.shards) > 3
    for shard in manifest.shards:
        ref = tmp_path / "ref.tar"
        with tarfile.open(ref, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in read_members(out / shard.name):
                packmod._add_member(tar, name, data)
        assert (out / shard.name).read_bytes() == ref.read_bytes(), shard.name


# ------------------------------------------------------------------- the one reader of the pack format


def _reader_samples(folder: Path, shard_name: str, data: bytes | None = None) -> list[ShardSample]:
    shard = next(s for s in read_manifest(folder).shards if s.name == shard_name)
    buf = memoryview((folder / shard_name).read_bytes() if data is None else data)
    return list(read_samples(folder / shard_name, buf, shard))


def test_reader_parses_what_the_packer_writes(tmp_path: Path) -> None:
    root = many_market(tmp_path / "m")
    out = tmp_path / "out"
    manifest = pack("market1501", root, out, shard_bytes=5000)
    records = parse("market1501", root)
    assert len(manifest.shards_of("train")) >= 3
    for shard in manifest.shards:
        data = (out / shard.name).read_bytes()
        samples = _reader_samples(out, shard.name)
        with tarfile.open(out / shard.name) as tar:  # the standard library's offsets of the same members
            offsets = {m.name: (m.offset_data, m.size) for m in tar}
        assert len(samples) == shard.count
        for i, sample in enumerate(samples):
            index = shard.first_index + i
            rec = records[shard.split][index]
            assert sample.key == sample_key(shard.split, index) and sample.image_ext == "jpg"
            assert sample.meta == SampleMeta(rec.pid, rec.camid, shard.split, index, rec.relpath)
            assert {ext: (m.offset, m.size) for ext, m in sample.members.items()} == {
                ext: offsets[f"{sample.key}.{ext}"] for ext in ("jpg", "json")
            }
            image = sample.image
            assert data[image.offset : image.offset + image.size] == (root / rec.relpath).read_bytes()
    cuhk = tmp_path / "cuhk"
    pack("cuhk03np_labeled", make_cuhk03np(tmp_path / "cuhk03-np"), cuhk)
    assert {s.image_ext for s in _reader_samples(cuhk, "query-000000.tar")} == {"png"}


def test_member_names_split_as_webdataset_and_wids_split_them() -> None:
    from webdataset.tariterators import base_plus_ext
    from wids.wids import splitname

    for key, ext in (("train_00000007", "jpg"), ("query_00000000", "json"), ("k", "tar.gz")):
        name = member_name(key, ext)
        assert split_member_name(name) == (key, ext) == base_plus_ext(name)
        assert splitname(name) == (key, f".{ext}")  # wids keeps the dot of the extension
    for bad in ("train_00000007", ".jpg", "train_00000007.", "shard/train_00000007.jpg"):
        with pytest.raises(ValueError, match="is not '<key>.<ext>'"):
            split_member_name(bad)


def _members_end(data: bytes) -> int:
    """Offset just after the last member's padded data: where the end-of-archive marker starts."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def _pax(data: bytes) -> bytes:
    out = io.BytesIO()
    with (tarfile.open(fileobj=io.BytesIO(data)) as src,
          tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst):
        for m in src:
            m.pax_headers = {"comment": "forces a pax extended header"}
            dst.addfile(m, src.extractfile(m))
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["ustar", "pax"])
def test_reader_refuses_every_truncation_in_one_line(market_pack: tuple[Path, Path], fmt: str) -> None:
    """Cut anywhere before the end-of-archive marker is whole: a ShardError, never fewer samples;
    the zeros padding the tar to a whole record may go (two zero blocks end a tar)."""
    _, out = market_pack
    name = "gallery-000000.tar"
    data = (out / name).read_bytes()
    data = data if fmt == "ustar" else _pax(data)  # pax: the tarfile path of the reader
    want = _reader_samples(out, name, data)
    end = _members_end(data)
    assert len(want) == 3 and end + 1024 < len(data)
    blocks = {k * 512 + d for k in range(len(data) // 512 + 1) for d in (-1, 0, 1)}  # header and data edges
    for cut in sorted((set(range(0, len(data), 11)) | blocks) & set(range(len(data)))):
        if cut >= end + 1024:
            assert [s.meta for s in _reader_samples(out, name, data[:cut])] == [s.meta for s in want]
            continue
        with pytest.raises(ShardError) as exc:
            _reader_samples(out, name, data[:cut])
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith(f"{out / name}: "), (cut, msg)
        assert "truncated" in msg, (cut, msg)


def test_reader_refuses_every_garbled_header_byte(market_pack: tuple[Path, Path]) -> None:
    """One byte changed anywhere in a member header: a ShardError, or (only the unused byte after the
    checksum's NUL, which tarfile ignores too) the same samples."""
    _, out = market_pack
    name = "gallery-000000.tar"
    data = (out / name).read_bytes()
    want = _reader_samples(out, name)
    headers = [m.offset - 512 for s in want for m in s.members.values()]
    assert len(headers) == 6
    ignored = 0
    for header in headers:
        for at in range(header, header + 512):
            bad = bytearray(data)
            bad[at] ^= 0x55
            try:
                got = _reader_samples(out, name, bytes(bad))
            except ShardError as exc:
                assert "\n" not in str(exc) and str(out / name) in str(exc), (at, str(exc))
                continue
            assert got == want and at - header == 155, at  # the " " after "%06o\0": read by no one
            ignored += 1
    assert ignored == len(headers)
    bad = bytearray(data)
    bad[headers[2] + 10] ^= 0x55  # the name of sample 1's image
    with pytest.raises(ShardError, match=f"corrupt tar header at byte {headers[2]} .checksum mismatch.: .*"
                                         f"no end-of-archive marker after member gallery_00000000.json"):
        _reader_samples(out, name, bytes(bad))
