"""Sample store (in-memory and wids), transforms, dataset and loaders, on packs made by shards.pack."""

from __future__ import annotations

import io
import json
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards.pack import pack
from shards.reader import REPACK, read_samples
from shards.records import read_manifest
from shards.verify import check_shard, verify
from tests.mp import run_distributed
from trainer.data import (
    LGT,
    AugRNG,
    RandomErasing,
    ReIDDataset,
    SampleStore,
    ShardError,
    TransformConfig,
    WidsSampleStore,
    build_inference_loader,
    build_train_loader,
    build_transforms,
)
from trainer.data.transforms import NORM_PRESETS

H, W = 64, 32

# (pid, camera 1-based, images) per split; two sources with different camera counts and pid ranges
SOURCE_A = {
    "bounding_box_train": [(7, 1, 3), (2, 2, 5), (9, 3, 1), (5, 1, 4), (5, 3, 2), (12, 2, 6)],
    "query": [(31, 1, 1), (33, 2, 1), (34, 3, 1)],
    "bounding_box_test": [(31, 2, 2), (33, 1, 2), (34, 1, 1), (0, 3, 2)],
}
SOURCE_B = {
    "bounding_box_train": [(104, 1, 4), (101, 2, 3), (103, 2, 5), (108, 1, 2)],
    "query": [(201, 1, 1), (202, 2, 1)],
    "bounding_box_test": [(201, 2, 2), (202, 1, 1)],
}


def _jpeg(seed: int, size: tuple[int, int] = (W, H)) -> bytes:
    r = np.random.default_rng(seed)
    base = r.integers(0, 256, size=(4, 2, 3), dtype=np.uint8)  # smooth blocks: real-looking, varied
    arr = np.kron(base, np.ones((size[1] // 4, size[0] // 2, 1), dtype=np.uint8))
    arr = np.clip(arr.astype(int) + r.integers(-20, 21, size=arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _make_layout(root: Path, spec: dict[str, list[tuple[int, int, int]]], seed: int) -> Path:
    k = 0
    for folder, entries in spec.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for pid, cam, n in entries:
            for j in range(n):
                name = f"{pid:04d}_c{cam}s1_{1000 * cam + j:06d}_00.jpg"
                (root / folder / name).write_bytes(_jpeg(seed * 10_000 + k))
                k += 1
    return root


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("packs")
    out = {}
    for name, spec, seed in (("a", SOURCE_A, 1), ("b", SOURCE_B, 2)):
        root = _make_layout(base / f"raw_{name}", spec, seed)
        pack("market1501", root, base / f"pack_{name}", shard_bytes=12_000)  # several shards per split
        out[name] = base / f"pack_{name}"
        out[f"raw_{name}"] = root
    return out


def _copy_pack(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# ---------------------------------------------------------------------------------------------
# store


def test_store_round_trip(packs: dict[str, Path]) -> None:
    man = read_manifest(packs["a"])
    assert len(man.shards_of("train")) >= 2
    st = SampleStore.from_manifests([packs["a"]], "train", relabel=True)
    assert len(st) == man.splits["train"].count == 21
    assert np.array_equal(st.index, np.arange(len(st))) and np.array_equal(st.split_index, st.index)
    assert st.buffer.dtype == np.uint8 and st.buffer.ndim == 1 and st.offsets[-1] == st.nbytes
    for i in range(len(st)):
        rel = str(st.relpath[i])
        assert st.get_bytes(i) == (packs["raw_a"] / rel).read_bytes()  # the original bytes, no re-encode
        name = rel.split("/")[-1]
        assert st.pid_orig[i] == int(name[:4]) and st.camid_orig[i] == int(name[6]) - 1
        assert st.meta(i)["ext"] == "jpg"
    assert st.relpath.tolist() == sorted(st.relpath.tolist())  # the packer's relpath order


def test_multi_source_merge(packs: dict[str, Path]) -> None:
    a = SampleStore.from_manifests([packs["a"]], "train", relabel=True)
    b = SampleStore.from_manifests([packs["b"]], "train", relabel=True)
    ab = SampleStore.from_manifests([packs["a"], packs["b"]], "train", relabel=True)
    na = len(a)
    assert len(ab) == na + len(b)
    assert np.array_equal(ab.domain, np.r_[np.zeros(na), np.ones(len(b))])
    assert np.array_equal(ab.index, np.arange(len(ab)))
    assert np.array_equal(ab.split_index, np.r_[np.arange(na), np.arange(len(b))])
    # pids: contiguous 0..C-1, sorted original pid per source, sources in order
    ids_a = sorted({p for p, _, _ in SOURCE_A["bounding_box_train"]})
    ids_b = sorted({p for p, _, _ in SOURCE_B["bounding_box_train"]})
    expect = {(0, p): k for k, p in enumerate(ids_a)} | {(1, p): len(ids_a) + k for k, p in enumerate(ids_b)}
    assert ab.num_classes == len(expect) == len(np.unique(ab.pid)) and ab.pid.max() == ab.num_classes - 1
    for i in range(len(ab)):
        assert ab.pid[i] == expect[(int(ab.domain[i]), int(ab.pid_orig[i]))]
        assert ab.get_bytes(i) == (a.get_bytes(i) if i < na else b.get_bytes(i - na))
    assert [tuple(r) for r in ab.class_table()] == sorted(expect, key=expect.get)
    # cameras: source b shifted by source a's camera count (manifest's num_cams, max over splits)
    cams_a = max(s.num_cams for s in read_manifest(packs["a"]).splits.values())
    assert ab.sources[1].cam_offset == cams_a == 3
    assert np.array_equal(ab.camid, ab.camid_orig + np.where(ab.domain == 1, cams_a, 0))
    assert set(ab.camid[ab.domain == 0].tolist()).isdisjoint(ab.camid[ab.domain == 1].tolist())
    assert ab.num_cams == cams_a + 2
    # query/gallery: original pids, cameras offset the same way
    q = SampleStore.from_manifests([packs["a"], packs["b"]], "query", relabel=False)
    assert np.array_equal(q.pid, q.pid_orig) and {31, 201} <= set(q.pid.tolist())
    g = SampleStore.from_manifests([packs["a"], packs["b"]], "gallery", relabel=False)
    assert g.sources[1].cam_offset == q.sources[1].cam_offset == cams_a
    assert 0 in g.pid.tolist()  # distractors kept
    with pytest.raises(ValueError, match="relabel=False"):
        q.class_table()


def test_store_errors(packs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest"):
        SampleStore.from_manifests([tmp_path / "nothing"], "train", relabel=True)
    with pytest.raises(ValueError, match="no split 'val'"):
        SampleStore.from_manifests([packs["a"]], "val", relabel=True)
    man = read_manifest(packs["a"])
    shard = man.shards_of("train")[1].name
    # missing shard
    p = _copy_pack(packs["a"], tmp_path / "missing")
    (p / shard).unlink()
    with pytest.raises(ShardError, match=f"{shard}: shard listed in the manifest is missing"):
        SampleStore.from_manifests([p], "train", relabel=True)
    # one flipped byte: same size, hash mismatch
    p = _copy_pack(packs["a"], tmp_path / "flipped")
    data = bytearray((p / shard).read_bytes())
    data[700] ^= 0xFF
    (p / shard).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{shard}: sha256 .* does not match"):
        SampleStore.from_manifests([p], "train", relabel=True)
    SampleStore.from_manifests([p], "train", relabel=True, verify=False)  # the check is what caught it
    # truncated shard
    p = _copy_pack(packs["a"], tmp_path / "truncated")
    (p / shard).write_bytes((p / shard).read_bytes()[:-3000])
    with pytest.raises(ShardError, match=f"{shard}: .* bytes, manifest says .*truncated"):
        SampleStore.from_manifests([p], "train", relabel=True)
    # truncated mid-member with a manifest that agrees (size + hash rewritten): the tar itself is checked
    _rewrite_shard(p, shard, (packs["a"] / shard).read_bytes()[:1800])
    with pytest.raises(ShardError, match=rf"{shard}: truncated inside member 'train_\d{{8}}\.jpg'"):
        SampleStore.from_manifests([p], "train", relabel=True)
    with pytest.raises(ShardError, match=shard):
        WidsSampleStore.from_manifests([p], "train", relabel=True, cache_dir=tmp_path / "wc")


def _rewrite_shard(pack_dir: Path, name: str, data: bytes) -> None:
    """Replace a shard and make the manifest agree with it (size + sha256)."""
    import hashlib

    (pack_dir / name).write_bytes(data)
    raw = json.loads((pack_dir / "manifest.json").read_text())
    for s in raw["shards"]:
        if s["name"] == name:
            s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (pack_dir / "manifest.json").write_text(json.dumps(raw))


def test_pax_tar_fallback_and_corrupt_header(packs: dict[str, Path], tmp_path: Path) -> None:
    """A shard in pax format (webdataset's TarWriter default) reads the same through tarfile."""
    import tarfile

    shard = read_manifest(packs["a"]).shards_of("train")[0].name
    p = _copy_pack(packs["a"], tmp_path / "pax")
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO((p / shard).read_bytes())) as src, tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT
    ) as dst:
        for m in src:
            m.pax_headers = {"comment": "forces a pax extended header"}
            dst.addfile(m, src.extractfile(m))
    _rewrite_shard(p, shard, out.getvalue())
    ref = SampleStore.from_manifests([packs["a"]], "train", relabel=True)
    got = SampleStore.from_manifests([p], "train", relabel=True)
    assert np.array_equal(got.offsets, ref.offsets) and np.array_equal(got.buffer, ref.buffer)
    assert np.array_equal(got.pid, ref.pid)
    # a damaged header (the hash check off, so the tar reader is what catches it)
    data = bytearray((packs["a"] / shard).read_bytes())
    with tarfile.open(packs["a"] / shard) as t:
        second = t.getmembers()[1].offset
    data[second + 10] ^= 0x55  # inside the name field of the second member's header
    p2 = _copy_pack(packs["a"], tmp_path / "hdr")
    (p2 / shard).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{shard}: corrupt tar header at byte"):
        SampleStore.from_manifests([p2], "train", relabel=True, verify=False)


def test_wids_store_matches_memory_store(packs: dict[str, Path], tmp_path: Path) -> None:
    mem = SampleStore.from_manifests([packs["a"], packs["b"]], "train", relabel=True)
    wds = WidsSampleStore.from_manifests([packs["a"], packs["b"]], "train", relabel=True, cache_dir=tmp_path / "c")
    assert len(wds) == len(mem)
    for name in ("pid", "pid_orig", "camid", "camid_orig", "domain", "index", "split_index", "relpath"):
        assert np.array_equal(getattr(wds, name), getattr(mem, name)), name
    order = np.random.default_rng(0).permutation(len(mem))  # random access across shards and sources
    for i in order:
        assert wds.get_bytes(int(i)) == mem.get_bytes(int(i))
    clone = pickle.loads(pickle.dumps(wds))  # DataLoader workers get their own reader
    assert clone._ds is None and clone.get_bytes(5) == mem.get_bytes(5)
    # through DataLoader workers (forked with an open reader), same tensors as the memory store
    tf = build_transforms(TransformConfig(size=(H, W)), train=False)
    got = _collect(build_inference_loader(wds, tf, 8, num_workers=2, rank=0, world_size=1))
    want = _collect(build_inference_loader(mem, tf, 8, num_workers=0, rank=0, world_size=1))
    assert len(got) == len(want) == math.ceil(len(mem) / 8)
    assert all(torch.equal(a["img"], b["img"]) and torch.equal(a["index"], b["index"]) for a, b in zip(got, want))
    wds.close()
    copied = WidsSampleStore.from_manifests([packs["b"]], "query", relabel=False, cache_dir=tmp_path / "d", copy=True)
    assert copied.get_bytes(1) == SampleStore.from_manifests([packs["b"]], "query", relabel=False).get_bytes(1)
    assert not any(p.is_symlink() for p in (tmp_path / "d").iterdir())


def _pax_pack(src: Path, dst: Path) -> Path:
    """A copy of a pack with every shard in pax format (webdataset's TarWriter default), the manifest agreeing."""
    import tarfile

    p = _copy_pack(src, dst)
    for shard in read_manifest(p).shards:
        out = io.BytesIO()
        with tarfile.open(p / shard.name) as tar, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as pax:
            for m in tar:
                m.pax_headers = {"comment": "forces a pax extended header"}
                pax.addfile(m, tar.extractfile(m))
        _rewrite_shard(p, shard.name, out.getvalue())
    return p


@pytest.mark.parametrize("fmt", ["ustar", "pax"])
def test_verifier_and_both_stores_read_the_same_samples(packs: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    """One reader of the pack format: the verifier, the in-memory store and the wids store see the
    same samples (metadata, image type and the original image bytes), in the same order."""
    sources = [packs["a"], packs["b"]]
    if fmt == "pax":
        sources = [_pax_pack(src, tmp_path / f"pax{k}") for k, src in enumerate(sources)]
    verified = []
    for root in sources:
        manifest = verify(root, decode=True)
        for shard in manifest.shards_of("train"):
            data = (root / shard.name).read_bytes()
            for s in check_shard(root / shard.name, data, shard, manifest.splits["train"].num_cams, decode=True):
                image = bytes(s.image.data(memoryview(data)))
                verified.append((s.meta.relpath, s.meta.pid, s.meta.camid, s.image_ext, image))
    mem = SampleStore.from_manifests(sources, "train", relabel=True)
    wds = WidsSampleStore.from_manifests(sources, "train", relabel=True, cache_dir=tmp_path / "c")
    for store in (mem, wds):
        got = [(str(store.relpath[i]), int(store.pid_orig[i]), int(store.camid_orig[i]), store.meta(i)["ext"],
                store.get_bytes(i)) for i in range(len(store))]
        assert got == verified, type(store).__name__
    wds.close()
    raw = [packs["raw_a"], packs["raw_b"]]
    assert [v[4] for v in verified] == [(raw[d] / rel).read_bytes() for d, rel in zip(mem.domain, mem.relpath)]


def test_verifier_and_both_stores_refuse_a_cut_shard_alike(packs: dict[str, Path], tmp_path: Path) -> None:
    """A shard cut short (its size and sha256 in the manifest agreeing): the reader's one line,
    with the same fix, from the verifier and from both stores."""
    shard = read_manifest(packs["a"]).shards_of("train")[1].name
    p = _copy_pack(packs["a"], tmp_path / "cut")
    data = (packs["a"] / shard).read_bytes()
    _rewrite_shard(p, shard, data[: len(data) // 2])
    info = next(s for s in read_manifest(p).shards if s.name == shard)
    with pytest.raises(ShardError, match="truncated") as exc:
        list(read_samples(p / shard, memoryview((p / shard).read_bytes()), info))
    want = f"{exc.value}; {REPACK}"
    assert str(p / shard) in want and "\n" not in want
    for build in (lambda: verify(p), lambda: SampleStore.from_manifests([p], "train", relabel=True),
                  lambda: WidsSampleStore.from_manifests([p], "train", relabel=True, cache_dir=tmp_path / "c")):
        with pytest.raises(ShardError) as exc:
            build()
        assert str(exc.value) == want


# ---------------------------------------------------------------------------------------------
# transforms


def _pil(seed: int, size: tuple[int, int] = (40, 90)) -> Image.Image:
    return Image.open(io.BytesIO(_jpeg(seed, size))).convert("RGB")


def _naive_lgt(img: Image.Image, p: float, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3) -> Image.Image:
    """The reference LGT on Python's global ``random`` (docs/methods/pat.md §Data and recipe), restated plainly."""
    new = img.convert("L")
    np_img = np.array(new, dtype=np.uint8)
    img_gray = np.dstack([np_img, np_img, np_img])
    if random.uniform(0, 1) >= p:
        return img
    for _ in range(100):
        area = img.size[0] * img.size[1]
        target_area = random.uniform(sl, sh) * area
        aspect_ratio = random.uniform(r1, 1 / r1)
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < img.size[1] and h < img.size[0]:
            x1 = random.randint(0, img.size[0] - h)
            y1 = random.randint(0, img.size[1] - w)
            arr = np.asarray(img).astype("float")
            for c in range(3):
                for y in range(y1, min(y1 + h, arr.shape[0])):
                    for x in range(x1, min(x1 + w, arr.shape[1])):
                        arr[y, x, c] = img_gray[y, x, c]
            return Image.fromarray(arr.astype("uint8"))
    return img


def _naive_erasing(x: torch.Tensor, p: float, mean: tuple[float, ...]) -> torch.Tensor:
    """The reference ReID RandomErasing (C×H×W tensor) on Python's global ``random``."""
    if random.uniform(0, 1) >= p:
        return x
    for _ in range(100):
        area = x.size()[1] * x.size()[2]
        target_area = random.uniform(0.02, 0.4) * area
        aspect_ratio = random.uniform(0.3, 1 / 0.3)
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < x.size()[2] and h < x.size()[1]:
            x1 = random.randint(0, x.size()[1] - h)
            y1 = random.randint(0, x.size()[2] - w)
            for c in range(3):
                x[c, x1 : x1 + h, y1 : y1 + w] = mean[c]
            return x
    return x


def test_lgt_matches_reference_restatement() -> None:
    lgt = LGT(p=0.7)
    applied = clipped = 0
    for seed in range(60):
        img = _pil(seed, (32, 80))  # W != H: the swapped bounds matter
        random.seed(seed)
        want = np.asarray(_naive_lgt(img, 0.7))
        got_img = lgt(img, AugRNG(torch.Generator(), random.Random(seed)))
        assert np.array_equal(np.asarray(got_img), want), seed
        rect = lgt.rectangle(32, 80, random.Random(seed))
        if rect is not None:
            applied += 1
            y1, x1, h, w = rect
            clipped += (x1 + w > 32) or (y1 + h > 80)
            gray = np.asarray(img.convert("L"))
            assert np.array_equal(np.asarray(got_img)[y1 : y1 + h, x1 : x1 + w, 1], gray[y1 : y1 + h, x1 : x1 + w])
    assert 20 < applied < 60 and clipped > 0  # both branches and the edge clipping were exercised


def test_random_erasing_matches_reference_restatement() -> None:
    mean = NORM_PRESETS["luperson"][0]
    er = RandomErasing(0.5, fill=mean)
    erased = 0
    for seed in range(40):
        x = torch.randn(3, H, W)
        random.seed(seed)
        want = _naive_erasing(x.clone(), 0.5, mean)
        got = er(x.clone(), AugRNG(torch.Generator(), random.Random(seed)))
        assert torch.equal(got, want)
        erased += int(not torch.equal(got, x))
    assert 5 < erased < 35


@pytest.mark.parametrize("lgt_p", [0.0, 0.5])
def test_train_pipeline_matches_torchvision(lgt_p: float) -> None:
    import torchvision.transforms as T

    cfg = TransformConfig(size=(H, W), lgt_p=lgt_p, norm="imagenet")
    ours = build_transforms(cfg, train=True)
    mean, std = NORM_PRESETS["imagenet"]
    for seed in range(12):
        img = _pil(100 + seed)
        ref_ops = [T.Resize((H, W), interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(0.5),
                   T.Pad(10, fill=0), T.RandomCrop((H, W))]
        if lgt_p:
            ref_ops.append(lambda im: _naive_lgt(im, lgt_p))
        ref = T.Compose(ref_ops + [T.ToTensor(), T.Normalize(mean, std)])
        torch.manual_seed(seed)
        random.seed(1000 + seed)
        want = ref(img)
        got = ours(img, AugRNG(torch.Generator().manual_seed(seed), random.Random(1000 + seed)))
        assert got.shape == (3, H, W) and got.dtype == torch.float32
        # uint8 pixels: a wrong pixel, flip or crop moves a value by >= 1/255/std ~ 0.017; float32
        # normalisation in another order differs by a few ulp (<= 1e-6 at |x| <= 2.7)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), seed


def test_pipelines_shapes_and_seeding() -> None:
    img = _pil(7)
    test_tf = build_transforms(TransformConfig(size=(H, W), norm="vit_jx"), train=False)
    x = test_tf(img)
    import torchvision.transforms as T

    ref = T.Compose([T.Resize((H, W), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                     T.Normalize([0.5] * 3, [0.5] * 3)])
    assert torch.allclose(x, ref(img), atol=1e-5, rtol=0) and x.shape == (3, H, W)  # same bound as above
    tr = build_transforms(TransformConfig(size=(H, W), lgt_p=0.5, erasing_p=0.5, norm="luperson"), train=True)
    outs = [tr(img, s) for s in range(8)]
    assert all(o.shape == (3, H, W) for o in outs)
    assert torch.equal(tr(img, 3), outs[3])  # same seed, same augmentation
    assert len({o.sum().item() for o in outs}) > 4  # different seeds differ
    with pytest.raises(ValueError, match="norm"):
        TransformConfig(norm="cifar")
    with pytest.raises(ValueError, match="lgt_p"):
        TransformConfig(lgt_p=1.5)


# ---------------------------------------------------------------------------------------------
# dataset and loaders


def test_dataset_item_and_foreign_transform(packs: dict[str, Path]) -> None:
    import torchvision.transforms as T

    st = SampleStore.from_manifests([packs["a"], packs["b"]], "train", relabel=True)
    tf = build_transforms(TransformConfig(size=(H, W), lgt_p=0.5), train=True)
    ds = ReIDDataset(st, tf)
    item = ds[(22, 99)]
    assert set(item) == {"img", "pid", "camid", "domain", "index", "seed"}
    assert item["seed"] == 99  # the sample's seed travels with it: it also seeds its stochastic depth
    assert item["index"] == 22 and item["domain"] == 1 and item["pid"] == st.pid[22] and item["camid"] == st.camid[22]
    assert torch.equal(ds[(22, 99)]["img"], item["img"])
    foreign = ReIDDataset(st, T.Compose([T.RandomResizedCrop((H, W)), T.ToTensor()]))
    state = torch.get_rng_state()
    a, b = foreign[(3, 5)]["img"], foreign[(3, 5)]["img"]
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)  # seeded, globals restored
    with pytest.raises(IndexError):
        ds[len(ds)]


def _collect(loader, n: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for k, batch in enumerate(loader):
        out.append({k2: v.clone() for k2, v in batch.items()})
        if n is not None and k + 1 == n:
            break
    return out


def test_train_loader_batches_resume_and_workers(packs: dict[str, Path]) -> None:
    st = SampleStore.from_manifests([packs["a"], packs["b"]], "train", relabel=True)
    tf = build_transforms(TransformConfig(size=(H, W), lgt_p=0.5, erasing_p=0.5), train=True)
    P, K = 4, 2
    ld = build_train_loader(st, tf, P, K, seed=7, num_workers=0, rank=0, world_size=1)
    ld.set_epoch(1)
    full = _collect(ld)
    assert len(full) == len(ld) > 2
    for b in full:
        assert b["img"].shape == (P * K, 3, H, W) and b["img"].dtype == torch.float32
        for key in ("pid", "camid", "domain", "index"):
            assert b[key].dtype == torch.int64 and b[key].shape == (P * K,)
        assert torch.equal(b["pid"], torch.from_numpy(st.pid[b["index"].numpy()]))
        assert len(set(b["pid"].tolist())) == P
    assert ld.state_dict() == {"seed": 7, "epoch": 1, "cursor": len(full)}
    # interrupted after 2 steps, resumed in a new loader: the remaining batches, images included
    ld.set_epoch(1)
    _collect(ld, 2)
    state = ld.state_dict()
    assert state["cursor"] == 2
    ld2 = build_train_loader(st, tf, P, K, seed=7, num_workers=2, rank=0, world_size=1)  # workers don't matter
    ld2.load_state_dict(state)
    rest = _collect(ld2)
    assert len(rest) == len(full) - 2
    for x, y in zip(rest, full[2:]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    ld2.set_epoch(2)
    assert not torch.equal(_collect(ld2, 1)[0]["index"], full[0]["index"])


def _dist_body(rank: int, world: int, pack_a: str, pack_b: str) -> dict:
    st = SampleStore.from_manifests([pack_a, pack_b], "train", relabel=True)
    tf = build_transforms(TransformConfig(size=(H, W), lgt_p=0.5), train=True)
    ld = build_train_loader(st, tf, 4, 2, seed=3, num_workers=0)  # rank/world from trainer.dist
    ld.set_epoch(0)
    train = _collect(ld, 3)
    q = SampleStore.from_manifests([pack_a, pack_b], "gallery", relabel=False)
    test_tf = build_transforms(TransformConfig(size=(H, W)), train=False)
    inf = _collect(build_inference_loader(q, test_tf, 3, num_workers=0))
    # an inference pass with a random (train) transform, as PAT's bank initialisation does
    aug = _collect(build_inference_loader(st, tf, 5, num_workers=0, seed=3))
    return {"train": train, "inf_index": torch.cat([b["index"] for b in inf]).tolist(),
            "aug_img": torch.cat([b["img"] for b in aug]), "aug_index": torch.cat([b["index"] for b in aug])}


def test_two_process_loader_equals_single_process(packs: dict[str, Path]) -> None:
    ranks = run_distributed(_dist_body, 2, str(packs["a"]), str(packs["b"]))
    single = _dist_body(0, 1, str(packs["a"]), str(packs["b"]))
    for step in range(3):
        for key in ("img", "pid", "camid", "domain", "index"):
            merged = torch.cat([ranks[0]["train"][step][key], ranks[1]["train"][step][key]])
            assert torch.equal(merged, single["train"][step][key]), (step, key)
    n = len(single["inf_index"])
    assert ranks[0]["inf_index"] + ranks[1]["inf_index"] == single["inf_index"] == list(range(n))
    assert torch.equal(torch.cat([ranks[0]["aug_index"], ranks[1]["aug_index"]]), single["aug_index"])
    assert torch.equal(torch.cat([ranks[0]["aug_img"], ranks[1]["aug_img"]]), single["aug_img"])
