"""Training methods as engine plug-ins, by ``method=`` name."""

from __future__ import annotations

from collections.abc import Callable

from trainer.config import Config
from trainer.engine.method import Method


def _pat(cfg: Config) -> Method:
    from trainer.methods.pat import PATMethod

    return PATMethod(cfg)


def _tmgf(cfg: Config) -> Method:
    from trainer.methods.tmgf import TMGFMethod

    return TMGFMethod(cfg)


METHODS: dict[str, Callable[[Config], Method]] = {"pat": _pat, "tmgf": _tmgf}


def build_method(cfg: Config) -> Method:
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r}: expected one of {sorted(METHODS)}")
    return METHODS[cfg.method](cfg)
