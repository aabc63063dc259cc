"""TransReID(-SSL) checkpoint names -> ours, for TMGF's backbone.

Pretrained weights (TransReID-SSL ``vit_small_ics_cfs_lup.pth``, trained at 256x128 = a 16x8 grid).
The checkpoint uses TransReID's names (``libs/models/vit.py``: ``PatchEmbed(stem_conv=True)`` keeps
its stem in an ``nn.Sequential`` called ``conv``, IBN halves are ``IN``/``BN``); :func:`transreid_key`
maps them to ours (``module.`` prefixes and ``model``/``state_dict`` wrappers are removed by the reader):

=====================================  ==========================================
checkpoint key (TransReID)              our key (relative to ``model.backbone``)
=====================================  ==========================================
patch_embed.conv.0.weight               patch_embed.stem.conv1.weight
patch_embed.conv.1.IN.{weight,bias}     patch_embed.stem.norm1.inorm.*
patch_embed.conv.1.BN.*                 patch_embed.stem.norm1.bnorm.* (+ running stats)
patch_embed.conv.3.weight               patch_embed.stem.conv2.weight
patch_embed.conv.4.IN.* / .BN.*         patch_embed.stem.norm2.inorm.* / .bnorm.*
patch_embed.conv.6.weight               patch_embed.stem.conv3.weight
patch_embed.conv.7.*                    patch_embed.stem.norm3.* (plain BatchNorm2d)
patch_embed.proj.{weight,bias}          patch_embed.proj.* (64 -> D, kernel 8, stride 8)
cls_token, pos_embed                    same (pos grid resized, cls row kept; see below)
blocks.i.{norm1,attn.qkv,attn.proj,     same (timm's block names)
  norm2,mlp.fc1,mlp.fc2}.*
norm.{weight,bias}                      same (then copied into every branch)
sie_embed / cam_embed                   skipped: cameras are dataset-specific (ours is
                                        ``model.cam_embed``, trunc-normal 0.02)
head*, pre_logits*, dist_token          skipped (``load_pretrained``'s rule)
=====================================  ==========================================

Our own names pass through unchanged. The 16x8 position grid is resized bilinearly (no antialias,
align_corners=False, = the official ``F.interpolate``) to the model grid; the pretrained grid is not
square, so set ``model.pretrained_grid: [16, 8]`` (the official ``PRETRAIN_HW_RATIO=2`` inference).
Checkpoints without the BN ``num_batches_tracked`` counters load too (they keep 0): they are
:data:`OPTIONAL_STEM_KEYS`. Anything else that does not fit raises one error listing every key.
"""

from __future__ import annotations

_TRANSREID_STEM = (
    ("patch_embed.conv.0.", "patch_embed.stem.conv1."),
    ("patch_embed.conv.1.IN.", "patch_embed.stem.norm1.inorm."),
    ("patch_embed.conv.1.BN.", "patch_embed.stem.norm1.bnorm."),
    ("patch_embed.conv.3.", "patch_embed.stem.conv2."),
    ("patch_embed.conv.4.IN.", "patch_embed.stem.norm2.inorm."),
    ("patch_embed.conv.4.BN.", "patch_embed.stem.norm2.bnorm."),
    ("patch_embed.conv.6.", "patch_embed.stem.conv3."),
    ("patch_embed.conv.7.", "patch_embed.stem.norm3."),
)
CAMERA_KEYS = ("sie_embed", "cam_embed")
"""Camera embeddings: dataset-specific, so never loaded (a model keeps its own initialisation)."""
OPTIONAL_STEM_KEYS = (
    "patch_embed.stem.norm1.bnorm.num_batches_tracked",
    "patch_embed.stem.norm2.bnorm.num_batches_tracked",
    "patch_embed.stem.norm3.num_batches_tracked",
)
"""Stem BatchNorm counters a checkpoint may lack (they keep 0)."""


def transreid_key(key: str) -> str | None:
    """Our backbone key for a TransReID(-SSL) checkpoint key (None = skip it): the module doc's table."""
    if key in CAMERA_KEYS:
        return None
    for old, new in _TRANSREID_STEM:
        if key.startswith(old):
            return new + key[len(old):]
    return key
