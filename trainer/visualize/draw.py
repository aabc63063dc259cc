"""Pillow pieces shared by the figures: tiles, frames, heat overlays, captions, one sheet of rows, PNG bytes.

Every figure is drawn at pixel level with Pillow (no plotting library's layout engine), so a frame is a
known rectangle of one known colour: the tests read the colours back from the PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]
"""(left, top, right, bottom), right/bottom exclusive."""

BACKGROUND: RGB = (255, 255, 255)
TEXT: RGB = (20, 20, 20)
FRAME = 5
"""Frame width in pixels (drawn outside the image: it hides none of it)."""
PAD = 8
FONT_SIZE = 12
LINE = FONT_SIZE + 3


@cache
def font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def tile_size(img_size: tuple[int, int] | list[int], height: int) -> tuple[int, int]:
    """(width, height) of a display tile ``height`` pixels high with the model input's aspect (H, W)."""
    h, w = int(img_size[0]), int(img_size[1])
    return max(1, round(height * w / h)), height


def fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The whole image resized to ``size`` (w, h), as the test transform resizes it for the model."""
    return img.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def framed(img: Image.Image, color: RGB, width: int = FRAME) -> Image.Image:
    """``img`` inside a solid frame of ``color``."""
    out = Image.new("RGB", (img.width + 2 * width, img.height + 2 * width), color)
    out.paste(img, (width, width))
    return out


def _jet(x: np.ndarray) -> np.ndarray:
    """[..] in [0, 1] -> [.., 3] uint8, the jet colormap (blue low, red high)."""
    import matplotlib

    rgba = matplotlib.colormaps["jet"](np.clip(x, 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def heat_overlay(img: Image.Image, grid_map: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """``grid_map`` (rows x cols over the patch grid) scaled to its maximum, spread over ``img`` (the grid
    covers the whole resized input) and blended over it with the jet colormap.

    Nearest, not bilinear: each block is one patch's weight. Bilinear smoothing would invent a
    gradient across a part region's edge (its outside weights are exactly 0), which reads as
    attention peaking at the edge on the coarse grids of small inputs."""
    m = grid_map.detach().float().cpu()
    m = m / m.max().clamp_min(1e-12)
    up = F.interpolate(m[None, None], size=(img.height, img.width), mode="nearest")[0, 0]
    heat = Image.fromarray(_jet(up.numpy()))
    return Image.blend(img.convert("RGB"), heat, alpha)


def outline(img: Image.Image, box: Box, color: RGB = (255, 255, 255), width: int = 2) -> Image.Image:
    out = img.copy()
    ImageDraw.Draw(out).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=color, width=width)
    return out


def hlines(img: Image.Image, ys: list[int], color: RGB = (255, 255, 255)) -> Image.Image:
    out = img.copy()
    draw = ImageDraw.Draw(out)
    for y in ys:
        draw.line((0, y, img.width - 1, y), fill=color, width=1)
    return out


@dataclass
class Cell:
    """One tile of a sheet: an image (framed or not) and the caption lines under it."""

    image: Image.Image
    caption: tuple[str, ...] = ()
    gap_before: int = 0
    """Extra space to the left (sets the query apart from its ranking list)."""


def _text_width(text: str) -> int:
    left, _, right, _ = font().getbbox(text)
    return int(right - left)


def compose(rows: list[list[Cell]], header: list[str] | None = None) -> tuple[Image.Image, list[list[Box]]]:
    """Cells laid out row by row (captions under the images) on a white sheet; the box of every cell's
    image, per row, in sheet pixels. ``header`` labels the columns above the first row."""
    lines = max((len(c.caption) for row in rows for c in row), default=0)
    cap_h = lines * LINE + (4 if lines else 0)
    head_h = LINE + 4 if header else 0
    widths: list[int] = []
    for row in rows:
        for j, c in enumerate(row):
            w = max(c.image.width, *(_text_width(t) for t in c.caption)) if c.caption else c.image.width
            while len(widths) <= j:
                widths.append(0)
            widths[j] = max(widths[j], w + c.gap_before)
    for j, label in enumerate(header or []):
        if j < len(widths):
            widths[j] = max(widths[j], _text_width(label))
    row_h = [max(c.image.height for c in row) + cap_h for row in rows]
    sheet = Image.new("RGB", (PAD + sum(w + PAD for w in widths), PAD + head_h + sum(h + PAD for h in row_h)),
                      BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    xs = [PAD + sum(w + PAD for w in widths[:j]) for j in range(len(widths))]
    for j, label in enumerate(header or []):
        draw.text((xs[j], PAD), label, fill=TEXT, font=font())
    boxes: list[list[Box]] = []
    y = PAD + head_h
    for row, h in zip(rows, row_h):
        row_boxes = []
        for j, c in enumerate(row):
            x = xs[j] + c.gap_before
            sheet.paste(c.image, (x, y))
            row_boxes.append((x, y, x + c.image.width, y + c.image.height))
            for k, t in enumerate(c.caption):
                draw.text((x, y + c.image.height + 2 + k * LINE), t, fill=TEXT, font=font())
        boxes.append(row_boxes)
        y += h + PAD
    return sheet, boxes


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
