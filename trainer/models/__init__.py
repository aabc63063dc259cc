"""Models: timm ViT backbones, PAT and the ViT baseline, TMGF, BN-neck heads, pretrained-weight loading.

``build_model(trainer.config.ModelConfig(...), num_classes)`` is the entry point; importing this package registers
every model (``available_models()``).
"""

from __future__ import annotations

from . import pat as _pat  # noqa: F401  (registers "pat" and "vit")
from . import tmgf as _tmgf  # noqa: F401  (registers "tmgf")
from .backbones import available_backbones, build_vit, masked_block_forward
from .heads import BNNeck
from .pat import ModelOutput, PartAwareTransformer, PartRegion, ViTBaseline, part_attention_mask
from .registry import available_models, build_model, register_model
from .weights import LoadReport, load_pretrained, read_state_dict

__all__ = [
    "BNNeck",
    "LoadReport",
    "ModelOutput",
    "PartAwareTransformer",
    "PartRegion",
    "ViTBaseline",
    "available_backbones",
    "available_models",
    "build_model",
    "build_vit",
    "load_pretrained",
    "masked_block_forward",
    "part_attention_mask",
    "read_state_dict",
    "register_model",
]
