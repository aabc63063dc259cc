"""Where the tokens look: PAT's last-block attention of the class token and of each part token, and
TMGF's attention rollout for each branch, as maps over the patch grid.

The attention weights are recomputed from outside the model: a forward hook on each block's
``attn.qkv`` keeps its output, and the weights are ``softmax(q kᵀ · scale)`` of it (with PAT's part
mask). Why that hook and not timm's ``attn_drop`` with fused attention switched off: PAT's blocks run
through ``masked_block_forward``, one fused SDPA call that never forms the weights and never calls
``attn_drop``; ``attn.qkv`` is called by that path and by timm's own ``Block.forward`` (TMGF's trunk
and branches) alike, fused or not, and the forward pass itself is left exactly as it is.

Rollout (Abnar & Zuidema, 2020): per layer, the head-averaged weights plus the identity (the residual
path), rows renormalised; the product over the layers, first layer rightmost. A TMGF branch is its
own last layer on the shared trunk, so each branch has its own rollout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from trainer.models import PartAwareTransformer
from trainer.visualize.draw import Box, Cell, compose, heat_overlay, hlines, outline, png_bytes

GridBox = tuple[int, int, int, int]
"""(top, bottom, left, right) grid cells, inclusive (as ``PartRegion``)."""


@contextmanager
def record_qkv(modules: list[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Inside the block, the output of every call of each ``module.attn.qkv``, per module."""
    kept: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = []
    for i, m in enumerate(modules):
        qkv: Any = m.attn.qkv  # type: ignore[union-attr]  # timm's Block: attn is a submodule
        handles.append(qkv.register_forward_hook(lambda _m, _in, out, i=i: kept[i].append(out.detach())))
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()


def attention_weights(attn: nn.Module, qkv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """B x heads x N x N softmax weights of a timm ``Attention`` from its ``qkv`` output (B x N x 3·D).

    ``mask`` (N x N bool, True = attend) as ``masked_block_forward`` applies it. Computed in float32."""
    a: Any = attn
    batch, tokens, _ = qkv.shape
    q, k, _ = qkv.float().reshape(batch, tokens, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    logits = (q * a.scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
    return logits.softmax(dim=-1)


def rollout(layers: list[torch.Tensor]) -> torch.Tensor:
    """B x N x N attention rollout of head-averaged per-layer weights (first layer first)."""
    eye = torch.eye(layers[0].shape[-1], dtype=layers[0].dtype, device=layers[0].device)
    out = None
    for a in layers:
        r = a + eye
        r = r / r.sum(dim=-1, keepdim=True)
        out = r if out is None else r @ out
    assert out is not None, "rollout of no layer"
    return out


@dataclass
class AttentionMaps:
    """Maps over the patch grid of a batch of images, one column per token (or branch)."""

    names: list[str]
    """Column titles, e.g. ``cls``, ``part 1``, ``branch 1 rollout``."""
    maps: torch.Tensor
    """B x M x rows x cols: each map's weights on the patches (not rescaled; the figure scales each to its max)."""
    mass: torch.Tensor
    """B x M: share of the token's attention on the patches (the rest is on the class/part tokens)."""
    regions: list[GridBox | None] = field(default_factory=list)
    """Per column: the grid cells the token may attend to (PAT's part regions), or None."""
    stripes: list[int] = field(default_factory=list)
    """Per column: the branch's number of part stripes (TMGF), or 0."""


def _grid_box(member: torch.Tensor, grid: tuple[int, int]) -> GridBox | None:
    cells = member.reshape(grid).nonzero()
    if cells.numel() == 0:
        return None
    (top, left), (bottom, right) = cells.min(dim=0).values.tolist(), cells.max(dim=0).values.tolist()
    return int(top), int(bottom), int(left), int(right)


@torch.no_grad()
def pat_maps(model: nn.Module, img: torch.Tensor) -> AttentionMaps:
    """Last-block attention (heads averaged) of the class token and every part token over the patches.

    A PAT model runs with the mask its evaluation uses (``model.test_part_regions``); the ViT baseline
    (no parts) through its own forward."""
    m: Any = model
    bb = m.backbone
    grid = tuple(m.grid)
    parts = int(getattr(m, "num_parts", 0))
    mask = m.attention_mask(img.device) if isinstance(model, PartAwareTransformer) else None
    with record_qkv([bb.blocks[-1]]) as kept:
        if mask is not None:
            m.forward_tokens(img, mask)
        else:
            model(img)
    weights = attention_weights(bb.blocks[-1].attn, kept[0][-1], mask).mean(dim=1)  # B x N x N
    first = 1 + parts  # [cls, parts, patches]
    rows = weights[:, :first, first:]  # B x (1+P) x patches
    names = ["cls"] + [f"part {p + 1}" for p in range(parts)]
    regions: list[GridBox | None] = [None]
    if mask is not None:
        regions += [_grid_box(mask[1 + p, first:].cpu(), grid) for p in range(parts)]
    return AttentionMaps(names, rows.reshape(rows.shape[0], first, *grid).cpu(), rows.sum(-1).cpu(), regions,
                         [0] * first)


@torch.no_grad()
def tmgf_maps(model: nn.Module, img: torch.Tensor, camid: torch.Tensor) -> AttentionMaps:
    """Attention rollout of the class token for each branch: trunk blocks 1..L-1, then the branch's block L."""
    m: Any = model
    trunk = list(m.backbone.blocks)[:-1]  # the trunk's own block L only seeds the branches: never run
    blocks = [b.get_submodule("block") for b in m.branches]
    with record_qkv(trunk + blocks) as kept:
        m.branch_tokens(img, camid)
    shared = [attention_weights(blk.attn, kept[i][-1]).mean(dim=1) for i, blk in enumerate(trunk)]
    maps, names, stripes = [], [], []
    for b, blk in enumerate(blocks):
        last = attention_weights(blk.attn, kept[len(trunk) + b][-1]).mean(dim=1)
        maps.append(rollout([*shared, last])[:, 0, 1:])  # the class token's row, over the patches
        names.append(f"branch {b + 1} rollout")
        owned = [g for g, pb in zip(m.granularities, m.part_branch) if pb == b]
        stripes.append(owned[0] if len(owned) == 1 else 0)
    rows = torch.stack(maps, dim=1)  # B x branches x patches
    grid = tuple(m.grid)
    return AttentionMaps(names, rows.reshape(rows.shape[0], len(blocks), *grid).cpu(), rows.sum(-1).cpu(),
                         [None] * len(blocks), stripes)


def maps_for(model: nn.Module, img: torch.Tensor, camid: torch.Tensor) -> AttentionMaps:
    """PAT's (or the ViT baseline's) last-block maps, or TMGF's per-branch rollout."""
    if hasattr(model, "branches"):
        return tmgf_maps(model, img, camid)
    return pat_maps(model, img)


def _image_box(box: GridBox, grid: tuple[int, int], size: tuple[int, int]) -> Box:
    """Grid cells -> the pixels they cover in a tile of ``size`` (w, h): the grid spans the whole image."""
    (rows, cols), (w, h) = grid, size
    top, bottom, left, right = box
    return (round(left * w / cols), round(top * h / rows),
            round((right + 1) * w / cols), round((bottom + 1) * h / rows))


def peak_ratio(grid_map: torch.Tensor) -> float:
    """Largest weight over the mean of the patches it may attend to (1.0 = flat; masked patches are 0)."""
    live = grid_map[grid_map > 0]
    return float(live.max() / live.mean()) if live.numel() else 0.0


def render(images: list[Image.Image], captions: Sequence[tuple[str, ...]], maps: AttentionMaps,
           grid: tuple[int, int]) -> bytes:
    """One row per image: the image, then each map over it (part regions outlined white, a branch's stripe
    boundaries as white lines); captions give the share of attention on the patches and how peaked the map
    is, since each map is scaled to its own maximum (a flat map shows as one colour)."""
    rows = []
    for i, img in enumerate(images):
        row = [Cell(img, captions[i])]
        for j in range(len(maps.names)):
            tile = heat_overlay(img, maps.maps[i, j])
            region = maps.regions[j] if j < len(maps.regions) else None
            if region is not None:
                tile = outline(tile, _image_box(region, grid, img.size))
            k = maps.stripes[j] if j < len(maps.stripes) else 0
            if k > 1:
                tile = hlines(tile, [round(s * img.height / k) for s in range(1, k)])
            row.append(Cell(tile, (f"{float(maps.mass[i, j]):.0%} on patches",
                                   f"peak {peak_ratio(maps.maps[i, j]):.2f}x mean")))
        rows.append(row)
    sheet, _ = compose(rows, header=["query", *maps.names])
    return png_bytes(sheet)
