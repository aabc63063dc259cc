"""The config tree is composed, not copied: every experiment composes to exactly the values it had as a
flat file (``tests/golden_configs/configs.json``, written by ``tests/golden_configs/generate.py`` from the
flat tree), whatever groups and ``defaults:`` it is now made of; parsing a config loads no model code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.golden_configs.generate import FIXTURE, cases, composed
from trainer.config import CONFIG_DIR, METHOD_MODELS, ConfigError, compose

GOLDEN: dict[str, dict[str, Any]] = json.loads(FIXTURE.read_text())

RENAMED = {
    "data.flip_p": "data.transform.flip_p",
    "data.pad": "data.transform.pad",
    "data.lgt_p": "data.transform.lgt_p",
    "data.erasing_p": "data.transform.erasing_p",
    "data.norm": "data.transform.norm",
}
"""Keys renamed since the fixture was written (old -> new): the transform settings moved into
``data.transform`` (a ``TransformConfig``) with the same meaning and values."""

DERIVED = {"data.transform.size": "model.img_size"}
"""Keys new since the fixture (new -> the fixture key whose value it must have): the transforms' output
size, which the transforms took from ``model.img_size``, now sits in ``data.transform`` and follows it."""


ADDED = {"train.strategy": "ddp", "train.zero_stage": 2, "train.clip_grad": 0.0, "data.batch_scope": "global",
         "train.optim.lr_scaling": "none", "train.metrics_push_url": "", "train.tensorboard": True,
         "train.peak_tflops": 0.0, "tmgf.memory_layout": "auto",
         "tmgf.knn_index": "flat", "tmgf.knn_nprobe": 16, "tmgf.knn_recall_floor": 0.99,
         "data.pipeline": "per_image"}
"""Keys new since the fixture, with the defaults that keep every experiment as it was: torch DDP, no
gradient clipping (the papers'), the world-size-invariant global batch at the experiment's LR; the
ZeRO stage applies only under ``train.strategy=deepspeed``. Observability: no Pushgateway, TensorBoard
on (it changes no result), the MFU's peak from the GPU table or measured. TMGF's proxy memory: ``auto``
(replicated on one process, as before; sharded on several ranks, with the same results). Clustering:
exact (flat) k-NN search; the IVF settings apply only with ``tmgf.knn_index=ivf``. Input pipeline: per image
(the smoke and demo runs on synthetic data); the experiments on real datasets use :data:`REAL_DATA_PIPELINE`."""

REAL_DATA_PIPELINE = "decoded"
"""``data.pipeline`` of every experiment on real datasets (pat_market, tmgf_market and those built on them): the
decoded store, whose batches are the per-image path's tensors (tests/test_decoded_store.py), made faster."""


def expected(case: str) -> dict[str, Any]:
    old = GOLDEN[case]
    want = {RENAMED.get(k, k): v for k, v in old.items()}
    want.update({new: old[src] for new, src in DERIVED.items()})
    want.update(ADDED)
    if not any(k.startswith("data.synthetic.") for k in old):  # no synthetic source: real datasets
        want["data.pipeline"] = REAL_DATA_PIPELINE
    return want


def test_every_experiment_is_pinned() -> None:
    assert sorted(cases()) == sorted(GOLDEN), "an experiment was added or removed: update the fixture on purpose"


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_composes_to_the_flat_files_values(case: str) -> None:
    got, want = composed(case), expected(case)
    assert sorted(got) == sorted(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    # json text: 1 and 1.0, or 0 and False, must not pass for each other; floats are parsed from the
    # same YAML literals (or returned by the same resolver), so they must match exactly
    differ = {k: (want[k], got[k]) for k in want if json.dumps(got[k]) != json.dumps(want[k])}
    assert not differ, differ


@pytest.mark.parametrize("old,new", sorted(RENAMED.items()))
def test_renamed_keys_are_refused_naming_the_new_one(old: str, new: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose(["exp=pat_smoke", f"{old}=0.5"])
    msg = str(err.value)
    assert msg.startswith(f"{old}: renamed to {new}") and f"pass {new}=0.5" in msg and "\n" not in msg, msg


def test_renamed_key_in_a_config_file_is_refused(tmp_path: Path) -> None:
    tree = tmp_path / "configs"
    (tree / "exp").mkdir(parents=True)
    (tree / "config.yaml").write_text((CONFIG_DIR / "config.yaml").read_text())
    (tree / "exp" / "old.yaml").write_text("# @package _global_\nname: old\ndata:\n  lgt_p: 0.5\n")
    with pytest.raises(ConfigError, match=r"^data.lgt_p: renamed to data.transform.lgt_p \(same meaning\)"):
        compose(["exp=old"], config_dir=tree)


def test_transform_size_follows_the_model() -> None:
    assert compose(["exp=pat_smoke", "model.img_size=[128,64]"]).data.transform.size == (128, 64)
    with pytest.raises(ConfigError, match=r"^data.transform.size=\(32, 16\): expected model.img_size"):
        compose(["exp=pat_smoke", "data.transform.size=[32,16]"])


def test_groups_are_choices_of_the_command_line() -> None:
    cfg = compose(["exp=pat_market", "data=duke"])
    assert (cfg.name, cfg.data.sources, cfg.model.backbone) == ("pat_market", ["dukemtmc"], "vit_base_patch16_224")
    assert compose(["exp=pat_smoke", "method=tmgf"]).model.name == "tmgf"  # a method brings its model
    with pytest.raises(ConfigError, match=r"^data='nope': expected one of \(.*'market'"):
        compose(["exp=pat_market", "data=nope"])


def test_method_group_is_the_schemas_methods() -> None:
    assert sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml")) == sorted(METHOD_MODELS)


def test_light_name_lists_match_the_registries() -> None:
    """``trainer.config`` validates names without importing models: its lists must be the registries'."""
    from trainer.config import BACKBONES, MODEL_NAMES, WEIGHT_SUFFIXES
    from trainer.methods import METHODS
    from trainer.models import available_backbones, available_models
    from trainer.models.weights import SUFFIXES

    assert MODEL_NAMES == tuple(available_models())
    assert BACKBONES == tuple(available_backbones())
    assert WEIGHT_SUFFIXES == SUFFIXES
    assert tuple(METHOD_MODELS) == tuple(METHODS)


def test_composing_loads_no_model_code() -> None:
    probe = ("import sys; from trainer.config import compose; compose(['exp=pat_market']); "
             "compose(['exp=tmgf_msmt']); print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=CONFIG_DIR.parent, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_tmgf_sizes_its_cameras_from_the_data_without_changing_the_config(tmp_path: Path) -> None:
    """``config.yaml`` is written before the method builds its model: building must leave ``cfg`` as composed."""
    from trainer.config import to_yaml
    from trainer.data.prepare import ensure_datasets
    from trainer.methods.tmgf import TMGFMethod

    cfg = compose(["exp=tmgf_smoke", f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}"])
    ensure_datasets(cfg.data)
    written = to_yaml(cfg)
    method = TMGFMethod(cfg)
    model = method.build_model()
    assert model.num_cams == method.train_store.num_cams == 3  # tmgf_smoke's synthetic set has 3 cameras
    assert cfg.model.num_cams == 0 and to_yaml(cfg) == written
