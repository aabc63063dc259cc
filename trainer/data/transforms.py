"""The papers' image transforms, PIL-based, with every random draw taken from an explicit RNG.

Train (PAT, ``docs/methods/pat.md`` §Data and recipe): Resize((H, W), bicubic) → RandomHorizontalFlip → Pad(10, black) →
RandomCrop((H, W)) → LGT → ToTensor → Normalize. TMGF/O2CAP (``docs/methods/tmgf.md`` §Recipe): the same
without LGT, followed by the reference RandomErasing (area 0.02–0.4, aspect 0.3–1/0.3, filled with
the normalisation *mean* values, written into the normalised tensor). Test: Resize → ToTensor →
Normalize.

Why explicit RNGs: a sample's augmentation is a pure function of a per-sample seed that the
loader derives from (seed, epoch, step, slot in the global batch), so training is reproducible
whatever the number of workers or ranks, and a resumed run augments exactly like an
uninterrupted one. Flip and crop draw from a ``torch.Generator`` with the same calls as
torchvision (so they match torchvision under the same torch seed); LGT and RandomErasing draw
from a ``random.Random`` with the same calls as the reference code (``random.uniform``,
``random.randint``), so they match it under the same Python seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.config import NORM_PRESETS, TransformConfig  # the settings (``data.transform``) live with the schema


@dataclass
class AugRNG:
    """The random sources of one sample's augmentation."""

    torch: torch.Generator
    """Draws of the torchvision-style ops (flip, crop)."""
    py: random.Random
    """Draws of the reference-code ops (LGT, RandomErasing)."""

    @classmethod
    def from_seed(cls, seed: int) -> AugRNG:
        """Both sources from one 64-bit seed (independent streams via numpy's SeedSequence)."""
        return cls(torch.Generator(), random.Random()).reseed(seed)

    def reseed(self, seed: int) -> AugRNG:
        """Both sources put in the state :meth:`from_seed` gives them (reusing the objects: the batched path
        draws sample after sample without making new generators)."""
        a, b = np.random.SeedSequence(int(seed) & ((1 << 64) - 1)).generate_state(2, dtype=np.uint64)
        self.torch.manual_seed(int(a) & ((1 << 63) - 1))
        self.py.seed(int(b))
        return self


def pat_config(size: tuple[int, int] = (256, 128), lgt_p: float = 0.5) -> TransformConfig:
    """PAT (docs/methods/pat.md §Data and recipe): flip, pad 10 + crop, LGT (0.5 in the paper era),
    0.5/0.5 normalisation."""
    return TransformConfig(size=size, lgt_p=lgt_p, erasing_p=0.0, norm="vit_jx")


def tmgf_config(size: tuple[int, int] = (384, 128)) -> TransformConfig:
    """TMGF (docs/methods/tmgf.md §Recipe): flip, pad 10 + crop, LUPerson normalisation, RandomErasing 0.5."""
    return TransformConfig(size=size, lgt_p=0.0, erasing_p=0.5, norm="luperson")


# --------------------------------------------------------------------------------------------
# The ops. Each random op is called as op(x, rng); deterministic ops ignore rng.


class Resize:
    """PIL resize to (H, W) with bicubic interpolation (what torchvision's Resize does on PIL)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, img: Image.Image, rng: AugRNG | None = None) -> Image.Image:
        h, w = self.size
        if img.size == (w, h):
            return img
        return img.resize((w, h), Image.Resampling.BICUBIC)


class RandomHorizontalFlip:
    """Flip with probability p; one ``torch.rand(1)`` draw, as torchvision."""

    def __init__(self, p: float) -> None:
        self.p = p

    def draw(self, rng: AugRNG) -> bool:
        """Whether this sample is flipped (the batched path draws through here too)."""
        return bool(torch.rand(1, generator=rng.torch).item() < self.p)

    def __call__(self, img: Image.Image, rng: AugRNG) -> Image.Image:
        if self.draw(rng):
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class PadRandomCrop:
    """Pad ``pad`` black pixels on every side, then crop ``size`` at a random offset.

    Offsets are drawn as torchvision's ``RandomCrop.get_params``: ``randint(0, H_pad − H + 1)``
    for the top, then the same for the left.
    """

    def __init__(self, size: tuple[int, int], pad: int) -> None:
        self.size = size
        self.pad = pad

    def draw(self, width: int, height: int, rng: AugRNG) -> tuple[int, int]:
        """The crop's (top, left) in the padded image of an input ``width`` × ``height``."""
        th, tw = self.size
        ph, pw = height + 2 * self.pad, width + 2 * self.pad
        if ph < th or pw < tw:
            raise ValueError(f"PadRandomCrop: padded image {pw}x{ph} is smaller than the crop {tw}x{th}")
        top = int(torch.randint(0, ph - th + 1, size=(1,), generator=rng.torch).item())
        left = int(torch.randint(0, pw - tw + 1, size=(1,), generator=rng.torch).item())
        return top, left

    def __call__(self, img: Image.Image, rng: AugRNG) -> Image.Image:
        th, tw = self.size
        w, h = img.size
        top, left = self.draw(w, h, rng)
        padded = Image.new(img.mode, (w + 2 * self.pad, h + 2 * self.pad), 0)
        padded.paste(img, (self.pad, self.pad))
        return padded.crop((left, top, left + tw, top + th))


class LGT:
    """Local Grayscale Transformation, exactly as PAT's official code (docs/methods/pat.md §Data and recipe).

    With probability ``p``: up to 100 attempts to draw a rectangle of area U(sl, sh)·W·H and
    aspect U(r1, 1/r1); ``h = round(sqrt(A·r))``, ``w = round(sqrt(A/r))``; accepted when
    ``w < H and h < W``; top-left ``x1 = randint(0, W − h)``, ``y1 = randint(0, H − w)``; rows
    ``y1:y1+h`` and columns ``x1:x1+w`` (clipped to the image) become the PIL ``L`` grayscale.
    The bounds are swapped on purpose: that is what the reference does (rectangles can be
    clipped at the right or bottom edge). The first draw is the ``uniform(0, 1) >= p`` test.
    """

    def __init__(self, p: float, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3) -> None:
        self.p, self.sl, self.sh, self.r1 = p, sl, sh, r1

    def rectangle(self, width: int, height: int, r: random.Random) -> tuple[int, int, int, int] | None:
        """The drawn (y1, x1, h, w), or None when skipped / no attempt fits. Consumes ``r`` exactly as the reference."""
        if r.uniform(0, 1) >= self.p:
            return None
        for _ in range(100):
            area = width * height
            target = r.uniform(self.sl, self.sh) * area
            aspect = r.uniform(self.r1, 1 / self.r1)
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < height and h < width:
                x1 = r.randint(0, width - h)
                y1 = r.randint(0, height - w)
                return y1, x1, h, w
        return None

    def __call__(self, img: Image.Image, rng: AugRNG) -> Image.Image:
        rect = self.rectangle(img.size[0], img.size[1], rng.py)
        if rect is None:
            return img
        y1, x1, h, w = rect
        arr = np.array(img.convert("RGB"), dtype=np.uint8)
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
        arr[y1 : y1 + h, x1 : x1 + w, :] = gray[y1 : y1 + h, x1 : x1 + w, None]
        return Image.fromarray(arr)


class ToTensorNormalize:
    """PIL RGB → float32 C×H×W: ``(x / 255 − mean) / std``, fused as one multiply-add per pixel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        m = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
        self.scale = (1.0 / (255.0 * s)).float()
        self.bias = (-m / s).float()

    def __call__(self, img: Image.Image, rng: AugRNG | None = None) -> torch.Tensor:
        arr = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)  # one writable copy
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous().float()
        return x.mul_(self.scale).add_(self.bias)


class RandomErasing:
    """The reference ReID RandomErasing on a normalised C×H×W tensor (docs/methods/tmgf.md §Recipe).

    With probability ``p``: up to 100 attempts, area U(sl, sh)·H·W, aspect U(r1, 1/r1),
    ``h = round(sqrt(A·r))`` rows, ``w = round(sqrt(A/r))`` columns, accepted when ``w < W and
    h < H``; top ``randint(0, H − h)``, left ``randint(0, W − w)``; the patch is set to ``fill``
    per channel (the normalisation mean values, as the reference passes ``mean=PIXEL_MEAN``).
    """

    def __init__(self, p: float, fill: Sequence[float], sl: float = 0.02, sh: float = 0.4, r1: float = 0.3) -> None:
        self.p, self.sl, self.sh, self.r1 = p, sl, sh, r1
        self.fill = torch.tensor(fill, dtype=torch.float32).view(-1, 1, 1)

    def rectangle(self, height: int, width: int, r: random.Random) -> tuple[int, int, int, int] | None:
        """The drawn (top, left, h, w), or None when skipped / no attempt fits; consumes ``r`` as the reference."""
        if r.uniform(0, 1) >= self.p:
            return None
        for _ in range(100):
            target = r.uniform(self.sl, self.sh) * height * width
            aspect = r.uniform(self.r1, 1 / self.r1)
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top = r.randint(0, height - h)
                left = r.randint(0, width - w)
                return top, left, h, w
        return None

    def __call__(self, x: torch.Tensor, rng: AugRNG) -> torch.Tensor:
        rect = self.rectangle(x.shape[1], x.shape[2], rng.py)
        if rect is not None:
            top, left, h, w = rect
            x[:, top : top + h, left : left + w] = self.fill.to(x.dtype)
        return x


@dataclass
class Pipeline:
    """A sequence of ops applied as ``op(x, rng)``; ``pipeline(img, seed)`` seeds the RNGs."""

    ops: list[Callable] = field(default_factory=list)
    random: bool = False
    """Whether any op draws random numbers (False for the test transform)."""

    def __call__(self, img: Image.Image, seed: int | AugRNG = 0) -> torch.Tensor:
        rng = seed if isinstance(seed, AugRNG) else AugRNG.from_seed(seed)
        x: Any = img  # an image until the op that makes it a tensor
        for op in self.ops:
            x = op(x, rng)
        return x

    def __repr__(self) -> str:
        return "Pipeline(" + " → ".join(type(o).__name__ for o in self.ops) + ")"


def build_transforms(cfg: TransformConfig, train: bool) -> Pipeline:
    """The train or test pipeline of ``cfg``; call it as ``pipeline(pil_rgb_image, seed)``."""
    mean, std = NORM_PRESETS[cfg.norm]
    ops: list[Callable] = [Resize(cfg.size)]
    if train:
        if cfg.flip_p > 0:
            ops.append(RandomHorizontalFlip(cfg.flip_p))
        if cfg.pad > 0:
            ops.append(PadRandomCrop(cfg.size, cfg.pad))
        if cfg.lgt_p > 0:
            ops.append(LGT(cfg.lgt_p))
    ops.append(ToTensorNormalize(mean, std))
    if train and cfg.erasing_p > 0:
        ops.append(RandomErasing(cfg.erasing_p, fill=mean))
    return Pipeline(ops, random=train)


__all__ = [
    "NORM_PRESETS", "AugRNG", "TransformConfig", "pat_config", "tmgf_config", "Resize", "RandomHorizontalFlip",
    "PadRandomCrop", "LGT", "ToTensorNormalize", "RandomErasing", "Pipeline", "build_transforms",
]
