"""TMGF method: pseudo-labelling pipeline against naive restatements, training step, exact resume,
world=2 equals world=1, and the config wiring.

Everything runs the real ``tmgf`` model (``exp=tmgf_smoke``: vit_test, 64x32, [2, 3] stripes), whose
contract is ``model(img, camid) -> [B, S, D]`` (slot 0 global, every row BN'd then L2-normalised).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.mp import run_distributed
from trainer import dist
from trainer.config import Config, TMGFConfig, compose
from trainer.data.prepare import ensure_datasets
from trainer.losses.o2cap import O2CAPLossConfig
from trainer.models import available_models

assert "tmgf" in available_models(), "trainer/models/tmgf.py registers the model these tests train"


def _cfg(tmp: Path | str, *extra: str) -> Config:
    return compose(["exp=tmgf_smoke", f"run_dir={tmp}", *extra])


def _method_and_model(cfg: Config):
    from trainer.methods.tmgf import TMGFMethod

    ensure_datasets(cfg.data)  # as trainer.train.run does before it builds the method
    method = TMGFMethod(cfg)
    torch.manual_seed(cfg.train.seed)
    model = method.build_model().to(dist.info().device)
    return method, model


# -- config ------------------------------------------------------------------------------------
def test_loss_hyper_parameters_are_defined_once() -> None:
    t = TMGFConfig(pos_k=2, reduction="camera_groups", part_weight=0.0, neg_k=7)
    assert isinstance(t, O2CAPLossConfig)  # the losses take cfg.tmgf as it is
    for f in dataclasses.fields(O2CAPLossConfig):  # same (paper) defaults when not overridden
        assert getattr(TMGFConfig(), f.name) == getattr(O2CAPLossConfig(), f.name), f.name
    assert (t.pos_k, t.reduction, t.part_weight, t.neg_k) == (2, "camera_groups", 0.0, 7)
    with pytest.raises(ValueError, match="tmgf.reduction='none'"):
        TMGFConfig(reduction="none")  # per-sample reduction is for the losses' callers, not a run


@pytest.mark.parametrize("override", ["tmgf.eps=1.0", "tmgf.k2=30", "tmgf.reduction=sum", "tmgf.cluster_feature=x",
                                      "tmgf.momentum=1.0", "tmgf.iters_per_epoch=0"])
def test_bad_tmgf_values_fail_at_compose(override: str) -> None:
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        compose(["exp=tmgf_smoke", override])


def test_tmgf_experiments_compose() -> None:
    names = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "exp").glob("tmgf_*.yaml"))
    assert {"tmgf_smoke", "tmgf_demo", "tmgf_market", "tmgf_duke", "tmgf_msmt", "tmgf_market_gt"} <= set(names)
    for name in names:
        cfg = compose([f"exp={name}"])
        assert cfg.method == "tmgf" and cfg.model.name == "tmgf", name
        assert cfg.data.resolved()[0] == cfg.data.resolved()[1], f"{name}: unsupervised: test on the training set"


# -- pseudo labels -----------------------------------------------------------------------------
def _naive_features(method, model) -> torch.Tensor:
    """Every training image in index order straight from the dataset (no loader, no gather), eval mode."""
    from trainer.data.dataset import ReIDDataset

    ds = ReIDDataset(method.train_store, method.test_tf)
    model.eval()
    rows = []
    with torch.no_grad():
        for start in range(0, len(ds), 32):
            items = [ds[i] for i in range(start, min(start + 32, len(ds)))]
            img = torch.stack([s["img"] for s in items])
            cam = torch.tensor([int(s["camid"]) for s in items])
            rows.append(model(img, cam).double())
    model.train()
    return torch.cat(rows)


def _naive_proxies(labels: np.ndarray, cams: np.ndarray) -> np.ndarray:
    out, nxt = np.full(labels.shape, -1), 0
    for c in range(labels.max() + 1):
        for cam in sorted(set(cams[labels == c].tolist())):
            for i in range(len(labels)):
                if labels[i] == c and cams[i] == cam:
                    out[i] = nxt
            nxt += 1
    return out


def test_recluster_matches_naive_restatement(tmp_path: Path) -> None:
    from trainer.cluster.reference import reference_jaccard_dbscan

    method, model = _method_and_model(_cfg(tmp_path))
    stats = method.recluster(model, 0)
    feats = _naive_features(method, model)  # [N, S, D]
    t = method.t
    labels = reference_jaccard_dbscan(feats[:, 0].float().numpy(), t.k1, t.k2, t.eps, t.min_samples)
    assert np.array_equal(method.labels, labels)
    assert stats["clusters"] == labels.max() + 1 and stats["outliers"] == int((labels < 0).sum())
    proxy = _naive_proxies(labels, method.train_store.camid)
    assert np.array_equal(method.proxies.proxy_labels, proxy)
    # memory: per slot, normalised mean of each proxy's normalised features (float64 loop)
    mem = method.memory.memory.cpu().double()
    assert mem.shape == (model.num_slots, proxy.max() + 1, model.feat_dim)
    for p in range(proxy.max() + 1):
        members = np.flatnonzero(proxy == p)
        for s in range(model.num_slots):
            c = sum(feats[i, s] / feats[i, s].norm() for i in members)
            assert torch.allclose(mem[s, p], c / c.norm(), atol=1e-5)
    # sampler: proxies as classes, 8 distinct proxies x 4 images per global batch, outliers never drawn
    batches = method.loader.sampler.global_batches(0)
    assert batches.shape == (t.iters_per_epoch, t.proxies_per_batch, t.images_per_proxy)
    for b in batches:
        ids = proxy[b]
        assert (ids >= 0).all() and (ids == ids[:, :1]).all() and len(set(ids[:, 0].tolist())) == t.proxies_per_batch


def test_ivf_knn_settings_reach_the_clustering(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """tmgf.knn_index=ivf clusters through faiss IVF: with every list probed it is exact search (same labels
    as flat); with one list probed its measured recall falls under knn_recall_floor=1 and the one-line
    warning names tmgf.knn_nprobe."""
    import logging

    from trainer.cluster.knn import default_nlist

    method, model = _method_and_model(_cfg(tmp_path))
    feats = method.extract_train(model)
    flat = method.cluster(feats)
    nlist = default_nlist(feats.shape[0])
    assert nlist > 1, "the smoke set must give the IVF index more than one list"
    method.t = dataclasses.replace(method.t, knn_index="ivf", knn_nprobe=nlist)
    with caplog.at_level(logging.INFO, logger="trainer.cluster.pipeline"):
        assert np.array_equal(method.cluster(feats), flat)
    assert "IVF k-NN recall@20 = 1.0000" in caplog.text and "knn_recall_floor" not in caplog.text
    caplog.clear()
    method.t = dataclasses.replace(method.t, knn_nprobe=1, knn_recall_floor=1.0)
    with caplog.at_level(logging.INFO, logger="trainer.cluster.pipeline"):
        method.cluster(feats)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "raise tmgf.knn_nprobe (now 1" in warnings[0], warnings


def test_training_labels_are_never_read(tmp_path: Path) -> None:
    """Unsupervised: scrambling the true identities changes only the report (ARI), not the pseudo labels."""
    method, model = _method_and_model(_cfg(tmp_path))
    method.recluster(model, 0)
    labels, mem = method.labels.copy(), method.memory.memory.clone()
    rng = np.random.default_rng(0)
    method.train_store.pid = rng.permutation(method.train_store.pid)
    method.recluster(model, 0)
    assert np.array_equal(method.labels, labels) and torch.equal(method.memory.memory, mem)


def test_ground_truth_variant_uses_true_identities(tmp_path: Path) -> None:
    method, model = _method_and_model(_cfg(tmp_path, "tmgf.use_ground_truth=true"))
    stats = method.recluster(model, 0)
    assert np.array_equal(method.labels, method.train_store.pid)
    assert stats["clusters"] == method.train_store.num_classes and stats["outliers"] == 0 and stats["ari"] == 1.0


# -- step --------------------------------------------------------------------------------------
def test_step_uses_pre_update_memory_then_updates_sequentially(tmp_path: Path) -> None:
    from trainer.losses.o2cap import tmgf_loss

    method, model = _method_and_model(_cfg(tmp_path, "tmgf.part_weight=0.5"))
    method.recluster(model, 0)
    batch = next(iter(method.train_batches(0, 0)))
    model.train()
    before = method.memory.memory.clone()
    torch.manual_seed(5)
    res = method.training_step(model, batch)
    res.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the proxy ids are the pseudo labels of the batch's images
    expect_ids = [int(method.proxies.proxy_labels[i]) for i in batch["index"].tolist()]
    assert res.extras["proxy_ids"].tolist() == expect_ids
    torch.manual_seed(5)
    feats = model(batch["img"], batch["camid"])
    ref = tmgf_loss(feats, before, res.extras["proxy_ids"], method.tables, method.loss_cfg)["loss"]
    assert torch.allclose(res.loss, ref, atol=1e-6)
    assert set(res.logs) == {"global_off", "global_on", "part_off", "part_on"}
    method.after_optimizer_step(model, batch, res)
    # naive: M <- mu M + (1 - mu) x, renormalised, one sample at a time in batch order (float64)
    m = before.double().clone()
    mu = method.t.momentum
    x = res.extras["features"].double()
    for i, p in enumerate(expect_ids):
        v = mu * m[:, p] + (1 - mu) * x[i]
        m[:, p] = v / v.norm(dim=-1, keepdim=True)
    assert torch.allclose(method.memory.memory.double(), m, atol=1e-6)


# -- resume ------------------------------------------------------------------------------------
_RUN = ("tmgf.iters_per_epoch=2", "train.epochs=3", "train.ckpt_every_steps=2", "eval.period=3")


class _ListSink:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append({k: v for k, v in record.items() if k != "time"})

    def close(self) -> None:
        pass


def _records(method) -> list[dict]:
    return method.sink.records


def _fit(run_dir: Path, *extra: str):
    from trainer.engine.loop import Engine
    from trainer.methods.tmgf import TMGFMethod

    cfg = _cfg(run_dir, *_RUN, *extra)
    ensure_datasets(cfg.data)
    method = TMGFMethod(cfg)
    method.sink = _ListSink()
    result = Engine(method, cfg.train, cfg.eval, run_dir, sinks=[method.sink]).fit()
    return method, result


@pytest.mark.slow
def test_resume_mid_epoch_keeps_pseudo_labels_and_is_bit_identical(tmp_path: Path) -> None:
    full, res = _fit(tmp_path / "full")
    assert res.status == "finished" and full.clusterings == 3
    # one "cluster" record per re-clustering, through the engine's metrics (the method's own hook)
    records = [r for r in _records(full) if r["kind"] == "cluster"]
    assert [r["epoch"] for r in records] == [0, 1, 2] and records == [{"kind": "cluster", **h} for h in full.history]
    cut, res = _fit(tmp_path / "cut", "train.max_steps=3")  # epoch 1, step 1 of 2
    assert res.status == "max_steps" and cut.clusterings == 2
    labels_epoch1 = cut.labels.copy()
    resumed, res = _fit(tmp_path / "cut")
    assert res.status == "finished"
    # only epoch 2 re-clustered; epoch 1's labels came from the checkpoint
    assert resumed.clusterings == 1 and [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert full.history[1]["clusters"] == resumed.history[1]["clusters"]
    assert np.array_equal(labels_epoch1, _labels_in_checkpoint(tmp_path / "cut", step=3))
    a = (tmp_path / "full" / "model_final.safetensors").read_bytes()
    b = (tmp_path / "cut" / "model_final.safetensors").read_bytes()
    assert a == b
    assert torch.equal(full.memory.memory, resumed.memory.memory)


def _labels_in_checkpoint(run_dir: Path, step: int) -> np.ndarray:
    from trainer.engine.checkpoint import list_checkpoints, load_checkpoint, step_dir_name

    ckpt = [c for c in list_checkpoints(run_dir / "checkpoints") if c.name == step_dir_name(step)]
    assert ckpt, f"no checkpoint of step {step} in {run_dir}"
    return load_checkpoint(ckpt[-1], restore_rng=False)["method"]["labels"].numpy()


# -- distributed -------------------------------------------------------------------------------
def _full_memory(method) -> torch.Tensor:
    """The whole [S, P, D] memory on every rank (sharded by default at W > 1: consolidated)."""
    return method.memory.full_state_dict(to_all=True)["memory"]


def _world_body(rank: int, world_size: int, run_dir: str, state: dict | None, train: bool):
    """Pseudo labels with the initial (or given) weights; with ``train``, a few DDP steps, then
    pseudo labels again after the ranks' BN statistics drifted apart. Returns what must agree."""
    from safetensors.torch import load_file

    from trainer.engine.loop import Engine
    from trainer.methods.tmgf import TMGFMethod

    cfg = _cfg(run_dir, *_RUN, "train.epochs=1", "train.ckpt_every_steps=0")
    method, model = _method_and_model(cfg)
    if state is not None:
        model.load_state_dict(state)
    method.recluster(model, 0)
    out = {"labels0": method.labels.copy(), "memory0": _full_memory(method)}
    if not train:
        return out
    method = TMGFMethod(cfg)
    Engine(method, cfg.train, cfg.eval, run_dir, sinks=[]).fit()
    out["memory_trained"] = _full_memory(method)
    model.load_state_dict(load_file(str(Path(run_dir) / "model_final.safetensors")))
    g = torch.Generator().manual_seed(rank)  # different images per rank: BN running stats drift apart
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 32, generator=g), torch.zeros(8, dtype=torch.long))
    method.recluster(model, 1)  # averages the BN statistics, then the distributed clustering
    out.update(labels1=method.labels.copy(), memory1=_full_memory(method),
               state1={k: v.clone() for k, v in model.state_dict().items()})
    return out


@pytest.mark.slow
def test_world2_memories_agree_and_labels_equal_world1(tmp_path: Path) -> None:
    r0, r1 = run_distributed(_world_body, 2, str(tmp_path / "w2"), None, True)
    # the memory (sharded: the default at W = 2) is identical on both ranks after training steps
    assert torch.equal(r0["memory_trained"], r1["memory_trained"])
    for key in ("labels0", "labels1"):
        assert np.array_equal(r0[key], r1[key]), key
    for key in ("memory0", "memory1"):
        assert torch.equal(r0[key], r1[key]), key
    for k in r0["state1"]:  # after the BN-statistics average every rank holds the same model
        assert torch.equal(r0["state1"][k], r1["state1"][k]), k
    # world = 1 with the same weights: the same pseudo labels and memory, before and after training
    w1 = _world_body(0, 1, str(tmp_path / "w1"), None, False)
    assert np.array_equal(w1["labels0"], r0["labels0"])
    assert torch.allclose(w1["memory0"], r0["memory0"], atol=1e-6)
    w1 = _world_body(0, 1, str(tmp_path / "w1b"), r0["state1"], False)
    assert np.array_equal(w1["labels0"], r0["labels1"])
    assert torch.allclose(w1["memory0"], r0["memory1"], atol=1e-6)


# -- BN neck calibration -------------------------------------------------------------------------
def test_fresh_necks_are_calibrated_once_from_the_training_set(tmp_path: Path) -> None:
    from trainer.data.dataset import ReIDDataset

    method, model = _method_and_model(_cfg(tmp_path))
    ds = ReIDDataset(method.train_store, method.test_tf)
    model.eval()
    with torch.no_grad():
        raw = torch.cat([model.raw_features(s["img"][None], torch.tensor([int(s["camid"])])).double()
                         for s in (ds[i] for i in range(len(ds)))])  # [N, S, D], one image at a time
    model.train()
    n = raw.shape[0]
    method.on_fit_start(model, resumed=False)
    for s, neck in enumerate(model.necks):  # naive: sum / N and sum of squares / (N - 1), float64
        mean = raw[:, s].sum(0) / n
        var = ((raw[:, s] - mean) ** 2).sum(0) / (n - 1)
        torch.testing.assert_close(neck.running_mean.double(), mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(neck.running_var.double(), var, atol=1e-5, rtol=1e-4)
        assert int(neck.num_batches_tracked) == 1
    # the calibrated pass returns what the calibrated model computes (no second extraction needed)
    before = [n_.running_mean.clone() for n_ in model.necks]
    feats = method.extract_train(model)  # not fresh any more: an ordinary extraction
    torch.testing.assert_close(feats.double(), _naive_features(method, model), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(b, n_.running_mean) for b, n_ in zip(before, model.necks))
    # after training steps (running stats updated by BN itself) the necks are never re-calibrated
    model.train()
    img, cam = ds[0]["img"][None].repeat(4, 1, 1, 1), torch.zeros(4, dtype=torch.long)
    model(img, cam)
    trained = [n_.running_mean.clone() for n_ in model.necks]
    method.on_fit_start(model, resumed=True)
    assert all(torch.equal(t, n_.running_mean) for t, n_ in zip(trained, model.necks))


def test_calibration_off_keeps_the_official_fresh_statistics(tmp_path: Path) -> None:
    method, model = _method_and_model(_cfg(tmp_path, "tmgf.calibrate_necks=false"))
    method.on_fit_start(model, resumed=False)
    method.recluster(model, 0)
    for neck in model.necks:
        assert torch.equal(neck.running_mean, torch.zeros_like(neck.running_mean))
        assert torch.equal(neck.running_var, torch.ones_like(neck.running_var))


# -- the demo's path: a PAT model initialises TMGF -----------------------------------------------
@pytest.mark.slow
def test_pat_run_initialises_a_tmgf_run_as_the_demo_does(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from demo.tmgf import summarize
    from trainer.train import run

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    pat_dir = tmp_path / "pat"
    res = run(compose(["exp=pat_smoke", cache, f"run_dir={pat_dir}", "train.epochs=1", "eval.period=5"]))
    assert res.status == "finished"
    source = pat_dir / "model_final.safetensors"
    pat = load_file(str(source))
    cfg = _cfg(tmp_path / "tmgf", cache, "model.tmgf_stem=patch", f"model.pretrained={source}",
               "data.transform.norm=vit_jx", "train.epochs=1", "eval.at_start=true", "tmgf.eval_clustering=true",
               "train.ckpt_every_steps=0")
    from trainer.methods.tmgf import TMGFMethod

    ensure_datasets(cfg.data)  # the PAT run made only its own datasets
    method = TMGFMethod(cfg)
    model = method.build_model()
    for k, v in model.backbone.state_dict().items():  # PAT's backbone, its part-token rows dropped
        if k != "pos_embed":
            torch.testing.assert_close(v, pat[f"backbone.{k}"], msg=k)
    res = run(cfg)
    assert res.status == "finished"
    text, numbers = summarize(tmp_path / "tmgf")
    assert "start (source model)" in text and "TMGF (last)" in text
    assert numbers["clusters_over_true_ids"] > 0 and np.isfinite(numbers["mAP_gain_points"])
    records = [json.loads(line) for line in (tmp_path / "tmgf" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "cluster"] == [0]
