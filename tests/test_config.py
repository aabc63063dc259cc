"""Configuration: every experiment composes, bad overrides fail with one line, protocol rules."""

from __future__ import annotations

import pytest

from trainer.config import CONFIG_DIR, ConfigError, compose

EXPS = sorted(p.stem for p in (CONFIG_DIR / "exp").glob("*.yaml"))


@pytest.mark.parametrize("exp", EXPS)
def test_every_exp_composes(exp: str) -> None:
    cfg = compose([f"exp={exp}"])
    assert cfg.name == exp
    sources, targets = cfg.data.resolved()
    assert sources and targets
    if cfg.method == "pat":  # domain generalization: targets are unseen (TMGF trains on the target's train split)
        assert not set(sources) & set(targets)


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
    ("model.part_regions=zz", "model.part_regions='zz'"),
    ("method=foo", "method='foo'"),
])
def test_bad_overrides_are_one_line_errors(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose([override])
    msg = str(info.value)
    assert needle in msg and "\n" not in msg
