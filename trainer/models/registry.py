"""Model registry: ``@register_model(name)`` builders and ``build_model(cfg, num_classes)``.

A builder is ``fn(cfg: ModelConfig, num_classes: int) -> nn.Module``. ``build_model`` validates the
config, calls the builder and then, when ``cfg.pretrained`` names a file, loads it with the model's own
``load_pretrained_weights`` when it has one (TMGF), else :func:`trainer.models.weights.load_pretrained`
(which raises on anything that does not fit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Callable, Mapping, Optional

from torch import nn

log = logging.getLogger(__name__)

REGION_MODES = ("random", "fixed")
NECK_FEATS = ("before", "after")
TMGF_STEMS = ("ibn", "patch")


@dataclass
class ModelConfig:
    """What to build. Defaults are PAT's (ViT-B/16 at 256x128, 3 parts)."""

    name: str = "pat"
    """Registered model: ``pat`` (part-aware transformer) or ``vit`` (the same ViT + BN-neck, no part tokens)."""
    backbone: str = "vit_base_patch16_224"
    """Backbone arch (``trainer.models.backbones.available_backbones()``): timm ``vit_base_patch16_224``,
    ``vit_small_patch16_224``, ``deit_{tiny,small,base}_patch16_224``, or ``vit_test`` (depth 2, width 64)."""
    img_size: tuple[int, int] = (256, 128)
    """Input (height, width); with patch 16 the token grid is (H/16) x (W/16) = 16 x 8 for 256 x 128."""
    pretrained: Optional[str] = None
    """Local weight file (``.pth``/``.pt``, ``.npz``, ``.safetensors``) loaded into the backbone, or None."""
    pretrained_grid: Optional[tuple[int, int]] = None
    """Patch grid the pretrained position table was trained at; None infers it (square, or same as the model)."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the last block (linear from 0 over the blocks)."""
    num_parts: int = 3
    """Part tokens P (PAT). Bands of H/2 rows with evenly spaced tops (0, 4, 8 for P=3 on a 16-row grid)."""
    part_regions: str = "random"
    """Regions in training: ``random`` (official: a random sub-rectangle of each band, redrawn every forward)
    or ``fixed`` (the full band)."""
    test_part_regions: str = "fixed"
    """Regions in eval mode. ``fixed`` (default) is deterministic; ``random`` reproduces the official code,
    whose test features are stochastic."""
    fixed_band_extra_row: bool = False
    """``fixed`` bands span H/2 rows; True gives the official commented-out test band of H/2+1 rows (off by one)."""
    region_seed: int = 0
    """Seed of the region generator (the same on every rank, so every rank draws the same regions)."""
    tie_part_tokens: bool = False
    """True: all part tokens share one parameter (the published-era code used ``part_token1`` for all three)."""
    cls_part_links: bool = True
    """cls <-> part-token attention, both ways (the official code); False = the paper's Eq. 3-4: the cls
    token attends to itself and the image tokens, a part token to itself and its region."""
    freeze_patch_embed: bool = True
    """Freeze the patch-embedding conv (PAT's FREEZE_PATCH_EMBED, the MoCo v3 trick)."""
    neck_feat: str = "before"
    """Eval-mode feature: ``before`` the BN-neck (PAT's test feature) or ``after`` it."""
    num_cams: int = 0
    """Cameras C of the camera embedding (``tmgf``: required > 0; the method sets it from the data). Camera
    ids are 0-based and offset per source, so every id must be < C. Not read by ``pat``/``vit``."""
    cam_embed_coef: float = 3.0
    """Weight λ_c of the camera embedding added to every token (``tmgf``; TMGF's ``SIE_COEF``).
    0 builds no camera embedding at all (the camera ids are then only checked)."""
    tmgf_stem: str = "ibn"
    """``tmgf`` patch embedding: ``ibn`` (TransReID-SSL's IBN conv stem + kernel-8 projection) or ``patch``
    (timm's plain 16x16 patch conv)."""
    tmgf_granularities: tuple[int, ...] = (2, 3)
    """``tmgf`` horizontal stripes per branch [K_1, K_2, ...] (paper Table 3: (2, 3), (2, 4), (3, 4)).
    One branch per entry; a single entry = one branch (TMGF2: (2,), TMGF3: (3,)); () = one branch
    and no parts (TMGF1, the baseline)."""
    tmgf_duplicate_last_block: bool = True
    """``tmgf``: each branch gets its own copy of the last block + final LayerNorm. False = one shared
    copy whose tokens feed every partition (TMGF4, "w/o Dup."); the global feature is then its cls."""
    tmgf_global: str = "mean"
    """``tmgf`` global feature: ``mean`` of the branches' cls tokens (full TMGF), or ``cls1``/``cls2``/...
    = the cls token of branch 1/2/... alone (TMGF5 / TMGF6)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field as ``model.<field>=<value>: expected <what>``.

        Only what this object alone decides; the registered names (``name``, ``backbone``) are checked
        by ``build_model`` and ``trainer.config.validate``, whether ``pretrained`` exists by
        ``trainer.config.check_files`` (a config may name a file that another run will write)."""
        from .weights import SUFFIXES  # the formats read_state_dict reads

        size, grid, glob = tuple(self.img_size), self.pretrained_grid, self.tmgf_global
        branch = int(glob[3:]) if glob.startswith("cls") and glob[3:].isdigit() else 0
        # as TMGF builds its branches: one per granularity with duplication, else one shared
        branches = max(1, len(self.tmgf_granularities)) if self.tmgf_duplicate_last_block else 1
        min_parts = 1 if self.name == "pat" else 0  # PAT's part-aware attention needs a part token
        checks = [
            ("img_size", len(size) == 2 and min(size) > 0, "(height, width), both > 0"),
            ("pretrained", not self.pretrained or self.pretrained.lower().endswith(SUFFIXES),
             f"null or a weight file ending in one of {SUFFIXES}"),
            ("pretrained_grid", grid is None or (len(tuple(grid)) == 2 and min(grid) > 0),
             "null (inferred) or (rows, cols), both > 0"),
            ("drop_path_rate", 0.0 <= self.drop_path_rate < 1.0, "in [0, 1)"),
            ("num_parts", self.num_parts >= min_parts,
             ">= 1 (PAT needs a part token)" if min_parts else ">= 0"),
            ("part_regions", self.part_regions in REGION_MODES, f"one of {REGION_MODES}"),
            ("test_part_regions", self.test_part_regions in REGION_MODES, f"one of {REGION_MODES}"),
            ("neck_feat", self.neck_feat in NECK_FEATS, f"one of {NECK_FEATS}"),
            ("num_cams", self.num_cams >= 0, ">= 0 (0: set from the data)"),
            ("cam_embed_coef", self.cam_embed_coef >= 0.0, ">= 0"),
            ("tmgf_stem", self.tmgf_stem in TMGF_STEMS, f"one of {TMGF_STEMS}"),
            ("tmgf_granularities", all(int(g) >= 1 for g in self.tmgf_granularities), "stripe counts >= 1"),
            ("tmgf_global", glob == "mean" or 1 <= branch <= branches,
             f"'mean' or cls1..cls{branches} (one per branch of tmgf_granularities / tmgf_duplicate_last_block)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: expected {expected}")


ModelBuilder = Callable[[ModelConfig, int], nn.Module]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder(cfg, num_classes) -> nn.Module`` under ``name`` (a class works as the builder)."""

    def deco(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
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
        DictConfig = ()  # type: ignore[assignment]
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
