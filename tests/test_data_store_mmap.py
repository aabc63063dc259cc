"""The mapped store (``data.store=memory``): the shards' pages in the page cache, one copy per node.

Same samples, order and bytes as the private-buffer :class:`SampleStore`, through DataLoader workers
of either start method, refusing the same bad shards; and the pages shared between processes, read
from ``/proc`` (Linux only)."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import multiprocessing as mp
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from shards.pack import pack
from shards.reader import REPACK, tar_members
from shards.records import read_manifest
from trainer.config import DATA_STORES
from trainer.data import ReIDDataset, ShardError, TransformConfig, build_inference_loader, build_transforms
from trainer.data.store import STORES, MappedSampleStore, SampleStore, memory_use, open_split

H, W = 64, 32


def _noise_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """Random pixels: JPEG barely compresses them, so a few hundred images make megabytes of shards."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _pack(base: Path, name: str, ids: int, per_id: int, seed: int, shard_bytes: int,
          size: tuple[int, int] = (H, W)) -> Path:
    """A Market-1501 folder of ``ids × per_id`` train images (and a few query/gallery ones), packed."""
    rng = np.random.default_rng(seed)
    raw = base / f"raw_{name}"
    for folder, n_ids, n_per in (("bounding_box_train", ids, per_id), ("query", 2, 1), ("bounding_box_test", 2, 2)):
        (raw / folder).mkdir(parents=True)
        for pid in range(1, n_ids + 1):
            for k in range(n_per):
                cam = 1 + k % 3
                (raw / folder / f"{pid:04d}_c{cam}s1_{1000 * cam + k:06d}_00.jpg").write_bytes(_noise_jpeg(rng, size))
    pack("market1501", raw, base / name, shard_bytes=shard_bytes, workers=0)
    return base / name


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two sources of several shards each (different pid ranges and image counts)."""
    base = tmp_path_factory.mktemp("mmap_packs")
    return [_pack(base, "a", 6, 4, seed=1, shard_bytes=20_000), _pack(base, "b", 4, 5, seed=2, shard_bytes=15_000)]


def _rewrite_shard(pack_dir: Path, name: str, data: bytes) -> None:
    """Replace a shard and make the manifest agree with it (size + sha256)."""
    (pack_dir / name).write_bytes(data)
    raw = json.loads((pack_dir / "manifest.json").read_text())
    for s in raw["shards"]:
        if s["name"] == name:
            s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (pack_dir / "manifest.json").write_text(json.dumps(raw))


def _copy_pack(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _pax_copy(src: Path, dst: Path) -> Path:
    """Every shard rewritten in pax format: extended headers move each member's data offset."""
    p = _copy_pack(src, dst)
    for shard in read_manifest(p).shards:
        out = io.BytesIO()
        with tarfile.open(p / shard.name) as tar, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as pax:
            for m in tar:
                m.pax_headers = {"comment": "forces a pax extended header"}
                pax.addfile(m, tar.extractfile(m))
        _rewrite_shard(p, shard.name, out.getvalue())
    return p


CATALOGUE = ("pid", "pid_orig", "camid", "camid_orig", "domain", "index", "split_index", "relpath", "ext_code")


@pytest.mark.parametrize("fmt", ["ustar", "pax"])
def test_same_samples_order_and_bytes_as_the_private_store(packs: list[Path], tmp_path: Path, fmt: str) -> None:
    sources = packs if fmt == "ustar" else [_pax_copy(p, tmp_path / f"pax{k}") for k, p in enumerate(packs)]
    for split, relabel in (("train", True), ("query", False), ("gallery", False)):
        ref = SampleStore.from_manifests(sources, split, relabel=relabel)
        got = MappedSampleStore.from_manifests(sources, split, relabel=relabel)
        assert len(got) == len(ref) and got.sources == ref.sources
        for name in CATALOGUE:
            assert np.array_equal(getattr(got, name), getattr(ref, name)), (split, name)
        assert [got.get_bytes(i) for i in range(len(got))] == [ref.get_bytes(i) for i in range(len(ref))], split
        assert got.nbytes == ref.nbytes
    assert len({f.path for f in got.files}) == len(got.files) == sum(
        len(read_manifest(s).shards_of("gallery")) for s in sources)


def test_open_split_opens_the_configs_choices(packs: list[Path]) -> None:
    assert tuple(STORES) == DATA_STORES
    assert isinstance(open_split("memory", packs, "train", relabel=True), MappedSampleStore)
    with pytest.raises(ValueError, match=r"data.store='bogus': expected one of \('memory', 'wids'\)"):
        open_split("bogus", packs, "train", relabel=True)


def _collect(loader: DataLoader) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def test_dataset_and_loaders_give_the_private_stores_tensors(packs: list[Path]) -> None:
    """Forked workers use the maps of the process they fork from; a spawned worker gets the store
    pickled, without maps, and maps the shards itself."""
    ref = SampleStore.from_manifests(packs, "train", relabel=True)
    got = MappedSampleStore.from_manifests(packs, "train", relabel=True)
    tf = build_transforms(TransformConfig(size=(H, W)), train=True)  # random: seeded per sample
    for i in range(len(ref)):
        a, b = ReIDDataset(ref, tf)[(i, 1000 + i)], ReIDDataset(got, tf)[(i, 1000 + i)]
        assert torch.equal(a["img"], b["img"]) and a["pid"] == b["pid"] and a["index"] == b["index"]
    want = _collect(build_inference_loader(ref, tf, 8, num_workers=0, rank=0, world_size=1))
    forked = _collect(build_inference_loader(got, tf, 8, num_workers=2, rank=0, world_size=1))
    assert len(forked) == len(want) and all(
        torch.equal(a["img"], b["img"]) and torch.equal(a["index"], b["index"]) for a, b in zip(forked, want))
    test_tf = build_transforms(TransformConfig(size=(H, W)), train=False)
    spawned = _collect(DataLoader(ReIDDataset(got, test_tf), batch_size=16, num_workers=1,
                                  multiprocessing_context="spawn"))
    plain = _collect(DataLoader(ReIDDataset(ref, test_tf), batch_size=16))
    assert len(spawned) == len(plain) and all(torch.equal(a["img"], b["img"]) for a, b in zip(spawned, plain))


def test_an_unpickled_store_maps_again_and_refuses_a_replaced_shard(packs: list[Path], tmp_path: Path) -> None:
    p = _copy_pack(packs[0], tmp_path / "p")
    store = MappedSampleStore.from_manifests([p], "train", relabel=True)
    want = [store.get_bytes(i) for i in range(len(store))]
    clone = pickle.loads(pickle.dumps(store))
    assert clone._maps == [None] * len(store.files)
    assert [clone.get_bytes(i) for i in range(len(clone))] == want
    # replaced the way shards.pack replaces a pack (a new file renamed over the old one): the open
    # store keeps the file it checked; a store mapping it again refuses the new one
    last = store.files[-1].path
    tmp = Path(last + ".new")
    tmp.write_bytes(Path(last).read_bytes())
    os.replace(tmp, last)
    assert [store.get_bytes(i) for i in range(len(store))] == want
    late = pickle.loads(pickle.dumps(store))
    with pytest.raises(ShardError, match=f"{last}: shard replaced or changed since the store was opened"):
        late.get_bytes(len(late) - 1)
    os.remove(last)
    with pytest.raises(ShardError, match=f"{last}: shard removed since the store was opened"):
        pickle.loads(pickle.dumps(store)).get_bytes(len(store) - 1)


def _faults(src: Path, base: Path) -> dict[str, Path]:
    """Packs with one bad shard each: a flipped image byte (same size), cut short, missing."""
    shard = read_manifest(src).shards_of("train")[1]
    out = {}
    for fault in ("flipped", "cut", "missing"):
        p = _copy_pack(src, base / fault)
        data = bytearray((p / shard.name).read_bytes())
        if fault == "flipped":
            image = next(m for m in tar_members(p / shard.name, memoryview(data)) if m.name.endswith(".jpg"))
            data[image.offset + image.size // 2] ^= 0xFF
            (p / shard.name).write_bytes(bytes(data))
        elif fault == "cut":
            (p / shard.name).write_bytes(bytes(data[: len(data) // 2]))
        else:
            (p / shard.name).unlink()
        out[fault] = p
    return out


def test_verification_at_open_refuses_what_the_private_store_refuses(packs: list[Path], tmp_path: Path) -> None:
    for fault, p in _faults(packs[0], tmp_path).items():
        errors = []
        for cls in (SampleStore, MappedSampleStore):
            with pytest.raises(ShardError) as exc:
                cls.from_manifests([p], "train", relabel=True)
            errors.append(str(exc.value))
        assert errors[0] == errors[1] and errors[0].endswith(REPACK), fault
        assert {"flipped": "does not match the manifest's", "cut": "manifest says", "missing": "is missing"}[
            fault] in errors[0]
    # the hash check is what caught the flipped byte: without it the tar reads, with the changed byte
    flipped = MappedSampleStore.from_manifests([tmp_path / "flipped"], "train", relabel=True, verify=False)
    ref = SampleStore.from_manifests([packs[0]], "train", relabel=True)
    assert sum(flipped.get_bytes(i) != ref.get_bytes(i) for i in range(len(ref))) == 1


# ---------------------------------------------------------------------------------------------
# one copy per node, measured in /proc


def _child(pack_dir: Path, first: bool, opened: Any, barrier: Any, out: Any) -> None:
    """Open the mapped store (after the first child, when not first), measure alone and together, then
    the private store. gc off: a collection writes to every object inherited from the forked pytest
    process, copying those pages into private memory that is not the store's."""
    gc.disable()
    try:
        barrier.wait(60)  # both forked: the sharers of the pages inherited from pytest stay the same from here
        if not first:
            opened.wait(60)
        before = memory_use()
        store = MappedSampleStore.from_manifests([pack_dir], "train", relabel=True)
        for i in range(len(store)):
            store.get_bytes(i)
        alone = memory_use(store)
        opened.set()
        barrier.wait(60)  # both have mapped every page
        together = memory_use(store)
        barrier.wait(60)  # both have measured: the other's maps stay alive until then
        private = SampleStore.from_manifests([pack_dir], "train", relabel=True)
        after = memory_use()
        out.put({"first": first, "before": before, "alone": alone, "together": together, "after": after,
                 "mapped": store.mapped_bytes, "images": store.nbytes, "held": private.nbytes})
    except BaseException as exc:  # noqa: BLE001  (the parent reports it)
        out.put({"error": repr(exc)})


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux /proc/<pid>/smaps_rollup")
def test_two_processes_share_one_copy_of_the_shard_pages(tmp_path: Path) -> None:
    """Bounds, with their margins: a page mapped by both processes counts half in each one's Pss, so
    the mapping's Pss is Rss/2 exactly once both have touched every page (0.45–0.55 allowed), and
    Rss/1 while only one maps it (≥ 0.95); the mapped store adds under a quarter of the image bytes
    of private memory (its metadata: a few kB here), the private store at least 90 % of them (its
    buffer, every byte written)."""
    pack_dir = _pack(tmp_path, "big", 40, 10, seed=3, shard_bytes=4 << 20, size=(256, 128))  # ~ 16 MB, 4 shards
    ctx = mp.get_context("fork")  # no store is open in this process: the children map the pack first
    opened, barrier, out = ctx.Event(), ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(pack_dir, first, opened, barrier, out)) for first in (True, False)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all("error" not in r for r in results), results
    for r in results:
        mapped, images = r["mapped"], r["images"]
        assert images > 12 << 20 and r["held"] == images
        alone, together = r["alone"], r["together"]
        assert together.shards_rss >= 0.95 * mapped, r
        assert 0.45 <= together.shards_pss / together.shards_rss <= 0.55, r
        if r["first"]:
            assert alone.shards_pss >= 0.95 * alone.shards_rss >= 0.9 * mapped, r
        assert alone.anon - r["before"].anon < 0.25 * images, r
        assert r["after"].anon - together.anon >= 0.9 * images, r
