"""Packer and verifier: round trip, determinism, sharding, atomic output, and every failure verify catches."""

from __future__ import annotations

import dataclasses
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
from shards.records import MANIFEST, SPLITS, Manifest, SampleMeta, read_manifest, sample_key
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
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
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
    assert rc == 1 and err.count("\n") == 1 and "missing folder" in err and "Traceback" not in err
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
    assert verifymod.main([str(out)]) == 1  # the CLI decodes by default
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
    from shards.synth import SynthConfig, synthesize

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
    from shards.synth import SynthConfig, synthesize

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
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", *args], cwd=repo, env=env, capture_output=True, text=True)

    done = run("shards.pack", "--dataset", "market1501", "--root", str(root), "--out", str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr
    assert "gallery" in done.stdout
    done = run("shards.verify", str(tmp_path / "p"))
    assert done.returncode == 0 and "ok: 8 samples" in done.stdout, done.stderr
    (tmp_path / "p" / "train-000000.tar").write_bytes(b"")
    done = run("shards.verify", str(tmp_path / "p"))
    assert done.returncode == 1 and done.stdout == ""
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
