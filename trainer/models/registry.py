"""Model registry: ``@register_model(name)`` builders and ``build_model(cfg, num_classes)``.

A builder is ``fn(cfg: ModelConfig, num_classes: int) -> nn.Module``. The config classes live in
:mod:`trainer.config` (reading a config loads no model). ``build_model`` validates the
config, calls the builder and then, when ``cfg.pretrained`` names a file, loads it with the model's own
``load_pretrained_weights`` when it has one (TMGF), else :func:`trainer.models.weights.load_pretrained`
(which raises on anything that does not fit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import fields

from torch import nn

from trainer.config import MODEL_NAMES, ModelConfig

log = logging.getLogger(__name__)

ModelBuilder = Callable[[ModelConfig, int], nn.Module]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder(cfg, num_classes) -> nn.Module`` under ``name`` (a class works as the builder)."""

    def deco(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        if name not in MODEL_NAMES:  # configs are validated against that list, without importing models
            raise ValueError(f"model {name!r} is not in trainer.config.MODEL_NAMES {MODEL_NAMES}: add it there")
        _MODELS[name] = builder
        return builder

    return deco


def available_models() -> list[str]:
    """Names accepted as ``ModelConfig.name``."""
    return sorted(_MODELS)


def as_model_config(cfg: object) -> ModelConfig:
    """A ``ModelConfig`` from itself, an OmegaConf node (Hydra) or a plain mapping."""
    if isinstance(cfg, ModelConfig):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra is a dependency
        DictConfig = ()  # type: ignore[assignment,misc]
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
        if isinstance(cfg, ModelConfig):
            return cfg
    if isinstance(cfg, Mapping):
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(map(str, cfg)) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; expected a subset of {sorted(known)}")
        return ModelConfig(**cfg)
    raise TypeError(f"model config must be a ModelConfig, an OmegaConf node or a mapping, got {type(cfg).__name__}")


def build_model(cfg: ModelConfig | Mapping, num_classes: int) -> nn.Module:
    """Build ``cfg.name`` with a ``num_classes``-way classifier and load ``cfg.pretrained`` if set.

    A model with a ``load_pretrained_weights(path, old_grid=...) -> LoadReport`` method loads the file
    itself (its own key renaming, post-load steps); every other model goes through ``load_pretrained``.
    """
    cfg = as_model_config(cfg)
    if cfg.name not in _MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; expected one of {available_models()}")
    cfg.validate()
    model = _MODELS[cfg.name](cfg, num_classes)
    if cfg.pretrained:
        from .weights import load_pretrained

        # A model that must adapt after loading (TMGF copies its last block into branches) loads itself.
        own_loader = getattr(model, "load_pretrained_weights", None)
        if callable(own_loader):
            report = own_loader(cfg.pretrained, old_grid=cfg.pretrained_grid)
        else:
            report = load_pretrained(model, cfg.pretrained, old_grid=cfg.pretrained_grid)
        log.info("%s", report.summary())
    return model
