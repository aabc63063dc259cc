"""The decoded store (``data.pipeline=decoded``, ``trainer.data.decoded``): built once next to the shards,
served from the page cache (one copy per node, measured in ``/proc``), the same batches as the per-image
path on every loader, across world sizes, and through a resume."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.data import synth_folder
from shards.errors import UserError
from shards.pack import pack
from tests.mp import run_distributed
from trainer.config import DATA_PIPELINES, TransformConfig, compose
from trainer.data.dataset import decode
from trainer.data.decoded import (
    PIPELINES,
    DecodedSampleStore,
    DecodedStoreError,
    decoded_nbytes,
    decoded_path,
    main,
    open_pipeline_split,
)
from trainer.data.loader import build_inference_loader, build_train_loader
from trainer.data.store import MappedSampleStore, memory_use
from trainer.data.transforms import Resize, build_transforms

SIZE = (256, 128)  # PAT's training size; the JPEGs are Market's 128×64


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two packed Market-like sources (200 and 40 train images)."""
    base = tmp_path_factory.mktemp("decoded")
    out = []
    for name, n, ids in (("a", 200, 25), ("b", 40, 8)):
        synth_folder(base / f"raw_{name}", n, ids=ids, seed=len(name) + n)
        pack("market1501", base / f"raw_{name}", base / name, workers=0, shard_bytes=300_000)
        out.append(base / name)
    return out


def _open(sources: list[Path], pipeline: str = "decoded", split: str = "train", size: tuple[int, int] = SIZE,
          lines: list[str] | None = None) -> Any:
    return open_pipeline_split("memory", sources, split, relabel=split == "train", pipeline=pipeline, size=size,
                               log=(lines.append if lines is not None else lambda s: None))


CATALOGUE = ("pid", "pid_orig", "camid", "camid_orig", "domain", "index", "split_index", "relpath", "ext_code")


def test_built_once_next_to_the_shards_with_the_stated_size(packs: list[Path]) -> None:
    assert PIPELINES == DATA_PIPELINES
    lines: list[str] = []
    store = _open(packs, lines=lines)
    base = MappedSampleStore.from_manifests(packs, "train", relabel=True)
    assert isinstance(store, DecodedSampleStore) and len(store) == len(base) == 240
    for name in CATALOGUE:
        assert np.array_equal(getattr(store, name), getattr(base, name)), name
    for s, path in zip(store.sources, store.paths):
        assert Path(path) == decoded_path(s.root, "train", SIZE).resolve() and Path(path).parent.name == "decoded"
        assert os.path.getsize(path) == decoded_nbytes(s.count, SIZE) == s.count * 3 * 256 * 128 + 128
    assert store.nbytes == 240 * 3 * 256 * 128
    assert len(lines) == 2 and "market1501/train: 200 images x 3x256x128 uint8 = 18.8 MiB (built in" in lines[0]
    # every sample's pixels are what the per-image path hands its random ops: Resize(decode(bytes))
    resize = Resize(SIZE)
    want = np.stack([np.asarray(resize(decode(base.get_bytes(i)))).transpose(2, 0, 1) for i in range(len(base))])
    assert np.array_equal(store.images(np.arange(len(store))), want)
    order = np.random.default_rng(0).permutation(len(store))
    assert np.array_equal(store.images(order), want[order])  # across both sources, any order
    assert store.get_bytes(7) == base.get_bytes(7)
    # a second open maps the same file (no rebuild)
    ino = [os.stat(p).st_ino for p in store.paths]
    again: list[str] = []
    assert [os.stat(p).st_ino for p in _open(packs, lines=again).paths] == ino and "(cached)" in again[0]
    assert not [p for p in packs[0].glob("decoded/.*") if not p.name.endswith(".lock")]  # no temporary left


def test_another_size_or_pack_is_another_file_and_stale_ones_go(packs: list[Path], tmp_path: Path) -> None:
    src = tmp_path / "p"
    src.mkdir()
    for p in packs[1].iterdir():
        if p.is_file():
            (src / p.name).write_bytes(p.read_bytes())
    stale = src / "decoded" / "train-64x32-0000000000000000.npy"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    store = _open([src], size=(64, 32))
    assert not stale.exists() and len(list((src / "decoded").glob("*.npy"))) == 1
    assert decoded_path(src, "train", (64, 32)) != decoded_path(src, "train", SIZE)
    manifest = (src / "manifest.json").read_text()
    sha = json.loads(manifest)["shards"][0]["sha256"]
    (src / "manifest.json").write_text(manifest.replace(sha, "0" * 64))  # what a repack changes
    assert decoded_path(src, "train", (64, 32)) != Path(store.paths[0])


def test_no_room_or_no_write_access_is_one_line_naming_the_fix(packs: list[Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "p"
    src.mkdir()
    for p in packs[1].iterdir():
        if p.is_file():
            (src / p.name).write_bytes(p.read_bytes())
    import trainer.data.decoded as decoded

    real = decoded.shutil.disk_usage
    monkeypatch.setattr(decoded.shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    with pytest.raises(DecodedStoreError) as err:
        _open([src])
    msg = str(err.value)
    assert "\n" not in msg and "market1501/train at 256x128 needs 3.8 MiB in" in msg and "10.0 MiB free" in msg
    assert "data.pipeline=per_image" in msg and not list((src / "decoded").glob("*.npy"))
    monkeypatch.undo()
    if os.geteuid() != 0:  # root writes anywhere
        (src / "decoded").rmdir()
        os.chmod(src, 0o555)
        try:
            with pytest.raises(DecodedStoreError, match=r"cannot write the decoded cache in .*python -m "
                                                        r"trainer.data.decoded --size H W"):
                _open([src])
        finally:
            os.chmod(src, 0o755)


def test_a_damaged_or_replaced_array_is_refused(packs: list[Path], tmp_path: Path) -> None:
    src = tmp_path / "p"
    src.mkdir()
    for p in packs[1].iterdir():
        if p.is_file():
            (src / p.name).write_bytes(p.read_bytes())
    store = _open([src])
    want = store.images(np.arange(len(store)))
    clone = pickle.loads(pickle.dumps(store))  # a spawned worker: maps again on use, no pixels pickled
    assert len(pickle.dumps(store)) < store.nbytes / 10
    assert np.array_equal(clone.images(np.arange(len(clone))), want)
    path = Path(store.paths[0])
    tmp = path.with_name("x.npy")
    tmp.write_bytes(path.read_bytes())
    os.replace(tmp, path)  # replaced under a running job
    with pytest.raises(DecodedStoreError, match="replaced or changed since the store was opened"):
        pickle.loads(pickle.dumps(store)).images([0])
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DecodedStoreError, match="remove it and run again"):
        _open([src])


def test_the_config_key_and_a_machine_without_cuda(packs: list[Path]) -> None:
    from trainer.config import ConfigError

    assert compose(["exp=pat_market"]).data.pipeline == "decoded" == compose(["exp=tmgf_msmt"]).data.pipeline
    assert compose(["exp=pat_smoke"]).data.pipeline == "per_image"
    with pytest.raises(ConfigError, match=r"data.pipeline='bogus': expected one of \('per_image', 'decoded', "
                                          r"'gpu_decode'\)"):
        compose(["exp=pat_smoke", "data.pipeline=bogus"])
    assert _open(packs, split="query").split == "query"  # any split: decoded at the training size
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="data.pipeline=gpu_decode: no CUDA device here"):
            _open(packs, "gpu_decode")


def test_the_cli_builds_ahead_and_refuses_a_bad_size(packs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(packs[1]), "--size", "32", "16"]) == 0
    assert "market1501/train: 40 images x 3x32x16" in capsys.readouterr().out
    assert decoded_path(packs[1], "train", (32, 16)).is_file()
    assert main([str(packs[1]), "--size", "0", "16"]) == 2
    assert "--size 0 16: expected two positive integers" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The loaders: the per-image path's batches


def _batches(loader: Any, n: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for k, b in enumerate(loader):
        if n is not None and k == n:
            break
        out.append({key: v.clone() for key, v in b.items()})
    return out


def _equal(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("cfg", [TransformConfig(size=(64, 32), lgt_p=0.5),
                                 TransformConfig(size=(64, 32), erasing_p=0.5, norm="luperson")], ids=["pat", "tmgf"])
def test_loaders_give_the_per_image_batches(packs: list[Path], cfg: TransformConfig) -> None:
    """Train loader (P×K, workers 0 and 2), the inference loader with the train transform (PAT's bank
    pass) and with the test transform: the same tensors, seeds and labels as the per-image path (at a
    small training size: the equality does not depend on it, the test's time does)."""
    per, dec = _open(packs, "per_image", size=cfg.size), _open(packs, size=cfg.size)
    tf = build_transforms(cfg, train=True)

    def train(store: Any, workers: int) -> list[dict[str, torch.Tensor]]:
        return _batches(build_train_loader(store, tf, 4, 4, seed=5, num_workers=workers, rank=0, world_size=1,
                                           device="cpu"), 3)

    want = train(per, 0)
    assert _equal(train(dec, 0), want) and _equal(train(dec, 2), want)
    for k, t in enumerate((tf, build_transforms(cfg, train=False))):
        a = _batches(build_inference_loader(per, t, 50, num_workers=0, rank=0, world_size=1, seed=2))
        b = _batches(build_inference_loader(dec, t, 50, num_workers=2 * k, rank=0, world_size=1, seed=2))
        assert _equal(a, b)


@pytest.mark.cuda
def test_cuda_training_batches_are_finished_on_the_gpu(packs: list[Path]) -> None:
    """On a GPU the workers hand over uint8 pixels (decoded) or JPEG bytes (gpu_decode) and the parameters;
    the loader augments on the device: the decoded path gives the per-image tensors exactly, gpu_decode
    within the stated decode/resize tolerance (tests/test_batch_augment.py: 6 levels = 6 · 2/255 here)."""
    size = (64, 32)
    tf = build_transforms(TransformConfig(size=size, lgt_p=0.5, erasing_p=0.5), train=True)

    def train(store: Any, device: str) -> list[dict[str, torch.Tensor]]:
        return _batches(build_train_loader(store, tf, 4, 4, seed=5, num_workers=2, rank=0, world_size=1,
                                           device=device), 3)

    want = train(_open(packs, "per_image", size=size), "cpu")
    got = train(_open(packs, size=size), "cuda")
    assert all(b["img"].is_cuda for b in got)
    assert _equal([{k: v.cpu() for k, v in b.items()} for b in got], want)
    for a, b in zip(train(_open(packs, "gpu_decode", size=size), "cuda"), want):
        assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k]) for k in a if k != "img")
        assert float((a["img"].cpu() - b["img"]).abs().max()) <= 6 * 2 / 255 + 1e-6


# --------------------------------------------------------------------------------------------
# Two ranks: one page-cache copy, the same augmented samples as one process


def _rank(rank: int, world: int, pack_dir: str) -> dict[str, Any]:
    """Open (both ranks race to build: one does, under the lock), touch every page of the decoded array:
    rank 0 alone first, then rank 1, measuring the pages each process holds; then load two steps."""
    import psutil

    from trainer import dist

    store = _open([Path(pack_dir)])
    proc = psutil.Process()

    def touch() -> None:
        arr = store._array(0)
        for k in range(0, len(arr), 16):
            int(arr[k : k + 16].sum(dtype=np.uint64))  # reads every page, copies none

    dist.barrier()
    before = proc.memory_full_info().uss
    alone = None
    if rank == 0:
        touch()
        alone = memory_use(store)
    dist.barrier()
    if rank == 1:
        touch()
    dist.barrier()
    together, uss = memory_use(store), proc.memory_full_info().uss
    dist.barrier()  # both measured: the other's map stays until then
    tf = build_transforms(TransformConfig(size=SIZE, lgt_p=0.5), train=True)
    steps = _batches(build_train_loader(store, tf, 4, 4, seed=9, num_workers=0, device="cpu"), 2)
    return {"steps": steps, "alone": alone, "together": together, "uss_gain": uss - before,
            "mapped": store.mapped_bytes, "nbytes": store.nbytes}


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux /proc/<pid>/smaps_rollup")
def test_two_ranks_share_one_page_cache_copy_and_augment_as_one_process(packs: list[Path], tmp_path: Path) -> None:
    """Bounds: a page mapped by both ranks counts half in each one's Pss, so the mapping's Pss/Rss is 1/2
    once both touched every page (0.45–0.55 allowed) and ≥ 0.95 while rank 0 maps it alone; the unique
    memory (USS) a rank gains by reading the whole array is under a quarter of it (the pages are the page
    cache's, shared). The global batch of each step equals one process's, slot by slot."""
    src = tmp_path / "p"
    src.mkdir()
    for p in packs[0].iterdir():
        if p.is_file():
            (src / p.name).write_bytes(p.read_bytes())  # not yet decoded: the ranks build it
    two = run_distributed(_rank, 2, str(src))
    assert len(list((src / "decoded").glob("*.npy"))) == 1
    for r in two:
        assert r["nbytes"] > 18 << 20
        assert r["together"].shards_rss >= 0.95 * r["mapped"], r
        assert 0.45 <= r["together"].shards_pss / r["together"].shards_rss <= 0.55, r
        assert r["uss_gain"] < 0.25 * r["nbytes"], r
    assert two[0]["alone"].shards_pss >= 0.95 * two[0]["alone"].shards_rss >= 0.9 * two[0]["mapped"]
    tf = build_transforms(TransformConfig(size=SIZE, lgt_p=0.5), train=True)
    one = _batches(build_train_loader(_open([src]), tf, 4, 4, seed=9, num_workers=0, rank=0, world_size=1,
                                      device="cpu"), 2)
    for step, want in enumerate(one):
        got = {k: torch.cat([two[0]["steps"][step][k], two[1]["steps"][step][k]]) for k in want}
        assert all(torch.equal(got[k], want[k]) for k in want), step


# --------------------------------------------------------------------------------------------
# Resume


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    from trainer.data.prepare import ensure_datasets

    cache = tmp_path_factory.mktemp("reid-cache")
    ensure_datasets(compose(["exp=pat_smoke", f"data.cache_dir={cache}"]).data)
    return str(cache)


def test_resume_mid_epoch_is_bit_identical_on_the_decoded_path(smoke_cache: str, tmp_path: Path) -> None:
    """pat_smoke (LGT 0.5) on the decoded store, one epoch, cut after 3 of its 5 steps and resumed: the same
    final weights, byte for byte, as the uninterrupted run."""
    from trainer.train import run

    def cfg(run_dir: Path, *extra: str) -> Any:
        return compose(["exp=pat_smoke", f"data.cache_dir={smoke_cache}", f"run_dir={run_dir}",
                        "data.pipeline=decoded", "train.epochs=1", "data.num_workers=0", *extra])

    full = run(cfg(tmp_path / "full"))
    assert full.status == "finished"
    cut = run(cfg(tmp_path / "cut", "train.max_steps=3"))
    assert cut.status == "max_steps" and cut.global_step == 3 < full.global_step
    resumed = run(cfg(tmp_path / "cut"))
    assert resumed.status == "finished" and resumed.global_step == full.global_step
    assert (tmp_path / "full" / "model_final.safetensors").read_bytes() == (
        tmp_path / "cut" / "model_final.safetensors").read_bytes()
