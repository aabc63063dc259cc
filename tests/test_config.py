"""Configuration: every experiment composes, every field is checked at compose time with one line
``key=value: expected <what>``, files are checked apart, protocol rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from trainer.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    OptimConfig,
    PATConfig,
    TMGFConfig,
    TrainConfig,
    TransformConfig,
    compose,
)
from trainer.train import check_files

EXPS = sorted(p.stem for p in (CONFIG_DIR / "exp").glob("*.yaml"))


@pytest.mark.parametrize("exp", EXPS)
def test_every_exp_composes(exp: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose([f"exp={exp}"])
    assert cfg.name == exp
    sources, targets = cfg.data.resolved()
    assert sources and targets
    if cfg.method == "pat":  # domain generalization: targets are unseen (TMGF trains on the target's train split)
        assert not set(sources) & set(targets)
    # Its files are checked apart: refused while the named weights are absent, accepted once in place.
    monkeypatch.chdir(tmp_path)
    if cfg.model.pretrained:
        with pytest.raises(ConfigError, match=f"model.pretrained='{cfg.model.pretrained}': no such file"):
            check_files(cfg)
        weights = tmp_path / cfg.model.pretrained
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(b"")
    check_files(cfg)


def test_multisource_leave_one_out_and_lr() -> None:
    cfg = compose(["exp=multisource"])
    assert cfg.data.resolved() == (["market1501", "dukemtmc", "cuhk03np_detected"], ["msmt17"])
    assert cfg.train.optim.lr == pytest.approx(1e-3)
    cfg = compose(["exp=multisource", "data.target=market1501"])
    assert cfg.data.resolved() == (["dukemtmc", "cuhk03np_detected", "msmt17"], ["market1501"])
    assert cfg.train.optim.lr == pytest.approx(4e-4)
    with pytest.raises(ConfigError, match="data.target='viper'"):
        compose(["exp=multisource", "data.target=viper"])


def test_table_settings() -> None:
    assert compose(["exp=table6_parts5"]).model.num_parts == 5
    base = compose(["exp=table4_deit_tiny_baseline"])
    assert base.model.name == "vit" and base.model.backbone == "deit_tiny_patch16_224" and not base.pat.csl
    assert compose(["exp=table5_csl"]).pat.psd is False


@pytest.mark.parametrize("override,needle", [
    ("train.epochs=abc", "train.epochs=abc"),
    ("nonexistent=1", "nonexistent"),
    ("exp=nope", "exp/nope"),
    ("train.bogus=1", "Key 'bogus' not in 'TrainConfig'"),
])
def test_bad_keys_and_types_are_one_line_errors(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose([override])
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


# One row per kind of check: the whole line is asserted, so it must name the key, the value and what
# is expected (the valid choices come from where the code that uses them defines them).
BAD_VALUES = [
    # choices
    ("method=foo", "method='foo': expected one of ('pat', 'tmgf')"),
    ("data.store=bogus", "data.store='bogus': expected one of ('memory', 'wids')"),
    ("data.transform.norm=foo", "data.transform.norm='foo': expected one of ('imagenet', 'vit_jx', 'luperson')"),
    ("train.precision=fp8", "train.precision='fp8': expected one of ('auto', 'fp32', 'bf16', 'fp16')"),
    ("train.optim.name=lamb", "train.optim.name='lamb': expected one of ('sgd', 'adam')"),
    ("train.optim.schedule=linear",
     "train.optim.schedule='linear': expected one of ('cosine', 'multistep', 'paper')"),
    ("pat.csl_form=cosine", "pat.csl_form='cosine': expected one of ('official', 'paper')"),
    ("pat.csl_part_reduction=max", "pat.csl_part_reduction='max': expected one of ('mean', 'sum')"),
    ("model.name=zz", "model.name='zz': expected one of ('pat', 'tmgf', 'vit')"),
    ("model.part_regions=zz", "model.part_regions='zz': expected one of ('random', 'fixed')"),
    ("tmgf.knn_backend=gpu", "tmgf.knn_backend='gpu': expected one of ('auto', 'torch', 'faiss')"),
    # ranges
    ("train.epochs=0", "train.epochs=0: expected > 0"),
    ("train.seed=-1", "train.seed=-1: expected >= 0"),
    ("train.optim.lr=0", "train.optim.lr=0.0: expected > 0"),
    ("train.optim.momentum=1.0", "train.optim.momentum=1.0: expected in [0, 1)"),
    ("train.ckpt_every_epochs=0", "train.ckpt_every_epochs=0: expected >= 1"),
    ("train.metrics_port=70000",
     "train.metrics_port=70000: expected -1 (off), 0 (any free port) or a port in 1..65535"),
    ("data.transform.flip_p=1.5", "data.transform.flip_p=1.5: expected a probability in [0, 1]"),
    ("data.ids_per_batch=0", "data.ids_per_batch=0: expected > 0"),
    ("eval.max_rank=0", "eval.max_rank=0: expected >= 1"),
    ("pat.memory_momentum=0", "pat.memory_momentum=0.0: expected in (0, 1]"),
    ("pat.csl_tau=0", "pat.csl_tau=0.0: expected > 0"),
    ("pat.psd_alpha=1.5", "pat.psd_alpha=1.5: expected in [0, 1]"),
    ("pat.sd_weight=-1", "pat.sd_weight=-1.0: expected >= 0 (0: off)"),
    ("pat.sd_temperature=0", "pat.sd_temperature=0.0: expected > 0"),
    ("train.optim.decay_epochs=0", "train.optim.decay_epochs=0: expected >= 1 epoch"),
    # renamed keys: refused, naming the new key (never read with another meaning)
    ("pat.psd_lambda=0.3", "pat.psd_lambda=0.3: expected no value: renamed to pat.psd_alpha (the paper's α, Eq. 7, "
     "same meaning); pass pat.psd_alpha=0.3 instead"),
    ("data.norm=foo", "data.norm: renamed to data.transform.norm (same meaning); pass data.transform.norm=foo instead"),
    ("pat.triplet_margin=-1", "pat.triplet_margin=-1.0: expected null (soft margin) or >= 0"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate=1.0: expected in [0, 1)"),
    ("model.img_size=[0,32]", "model.img_size=[0, 32]: expected (height, width), both > 0"),
    ("tmgf.k1=0", "tmgf.k1=0: expected >= 1"),  # raised while OmegaConf builds the dataclass: same line
    # order within a field
    ("train.optim.milestones=[30,10]",
     "train.optim.milestones=[30, 10]: expected strictly increasing 0-based epochs, e.g. [20, 40]"),
    # file format (existence is check_files')
    ("model.pretrained=w.h5", "model.pretrained='w.h5': expected null or a weight file ending in one of "
     "('.pth', '.pt', '.npz', '.safetensors')"),
    # registries
    ("model.backbone=nope", "model.backbone='nope': expected one of ('deit_base_patch16_224', "
     "'deit_small_patch16_224', 'deit_tiny_patch16_224', 'vit_base_patch16_224', 'vit_small_patch16_224', 'vit_test')"),
    # cross-field
    ("model.name=tmgf", "model.name='tmgf': expected one of ('pat', 'vit') for method=pat"),
    ("model.num_parts=0", "model.num_parts=0: expected >= 1 (PAT needs a part token)"),
    ("model.tmgf_global=cls3", "model.tmgf_global='cls3': expected 'mean' or cls1..cls2 "
     "(one per branch of tmgf_granularities / tmgf_duplicate_last_block)"),
    ("data.sources=[]", "data.sources=[]: expected at least one training dataset"),
    # a synthetic dataset's settings, by the generator's own rules
    ("data.synthetic.smoke_a.cams=12", "data.synthetic.smoke_a.cams=12: market1501 names hold cameras 1..9"),
    ("data.synthetic.smoke_a.ids=0", "data.synthetic.smoke_a.ids=0: expected >= 1"),
]


@pytest.mark.parametrize("override,line", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_are_refused_at_compose(override: str, line: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(["exp=pat_smoke", override])
    assert str(info.value) == line


def test_every_field_is_checked() -> None:
    """A new field needs a check (or a reason here): the keys each ``_checks()`` names, plus those
    validated elsewhere, cover every non-bool field."""
    elsewhere = {
        Config: {"data", "model", "train", "eval", "pat", "tmgf"},  # sections, checked each on its own
        DataConfig: {"sources", "targets", "leave_one_out", "target", "synthetic",  # via resolved() / shards.synth
                     "transform"},  # a section, checked on its own
        TransformConfig: {"size"},  # = model.img_size (Config's check), checked as that
        TrainConfig: {"optim"},
    }
    for cls in (Config, DataConfig, TransformConfig, TrainConfig, OptimConfig, EvalConfig, PATConfig, TMGFConfig):
        checked = {key.split(".")[0] for key, _, _ in cls()._checks()} | elsewhere.get(cls, set())
        fields = {f.name for f in dataclasses.fields(cls) if f.type not in ("bool", bool)}
        assert fields <= checked, f"{cls.__name__}: no check for {sorted(fields - checked)}"


def test_check_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "w" / "vit.pth"
    cfg = compose(["exp=pat_smoke", f"model.pretrained={missing}"])  # a valid config: the file may come later
    with pytest.raises(ConfigError) as info:
        check_files(cfg)
    assert str(info.value) == (f"model.pretrained='{missing}': no such file ({missing}); place the weight file there, "
                               "pass the path of another (.pth/.pt/.npz/.safetensors), or model.pretrained='' to "
                               "train from scratch")
    missing.parent.mkdir()
    missing.write_bytes(b"")
    check_files(cfg)

    ckpt = tmp_path / "run" / "checkpoints" / "step_000000004"
    cfg = compose(["exp=pat_smoke", "train.resume=run/checkpoints/step_000000004"])
    with pytest.raises(ConfigError, match=rf"train.resume='run/checkpoints/step_000000004': no checkpoint at {ckpt} "):
        check_files(cfg)
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"")
    check_files(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "w"]  # it wrote nothing
