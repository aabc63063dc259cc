"""Batched augmentation: the transforms of :mod:`trainer.data.transforms` on whole uint8 batches.

The per-image pipeline (``Resize → flip → pad + crop → LGT → ToTensorNormalize → RandomErasing``)
splits in two here:

- :meth:`BatchAugment.draw`: every random parameter of every sample, drawn by the per-image ops'
  own draw methods from the sample's :class:`~trainer.data.transforms.AugRNG` (its per-sample seed),
  in the per-image order. A sample therefore gets the same flip, crop and rectangles whatever the
  path, world size or worker count. Cheap (tens of µs per sample, Python), done where the batch is
  assembled; the result is a small int64 table that travels with the batch (:data:`PARAMS`).
- :meth:`BatchAugment.__call__`: the parameters applied to a ``B×3×H×W`` uint8 batch already at the
  training size (the decoded store's images, or JPEGs decoded on the device), with whole-batch torch
  ops that run unchanged on the CPU and on a GPU.

Exactness: every geometric op (flip, pad + crop) is an index copy of uint8 pixels and LGT's grey
value is PIL's own integer formula (``(19595 R + 38470 G + 7471 B + 2^15) >> 16``), so the uint8
image before normalisation is the per-image one bit for bit; normalisation is the same two float32
operations in the same order (``x · scale``, then ``+ bias``, no fused multiply-add), and erasing writes
the same float32 fill. The output equals the per-image pipeline's tensor exactly (tested on CPU and,
where a GPU is present, on CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.utils.data import get_worker_info

from trainer.data.transforms import (
    LGT,
    AugRNG,
    PadRandomCrop,
    Pipeline,
    RandomErasing,
    RandomHorizontalFlip,
    Resize,
    ToTensorNormalize,
)

PARAMS = ("flip", "top", "left", "lgt_y", "lgt_x", "lgt_h", "lgt_w", "erase_top", "erase_left", "erase_h",
          "erase_w")
"""Columns of the parameter table (int64, one row per sample). ``top``/``left``: the crop's corner in the
padded image (``pad, pad`` = no shift); a rectangle of height 0 = not drawn (an accepted one is never
empty: its area is at least 2 % of the image)."""
_C = {name: k for k, name in enumerate(PARAMS)}

_Op = TypeVar("_Op")

_GREY = (19595, 38470, 7471)
"""PIL's ``RGB → L`` weights (×2^16): ``L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16`` (Convert.c)."""


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, in shared memory inside a DataLoader worker.

    A worker hands its batch to the main process through shared memory; a tensor made elsewhere is
    copied there on the way (``share_memory_``). Allocating it there first, as torch's
    ``default_collate`` does for the batches it stacks, saves that copy of every output byte."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(tuple(shape))


def _band(start: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n)`` bool: position ``j`` lies in ``[start, start + length)`` (clipped to ``[0, n)`` by construction)."""
    j = torch.arange(n, device=start.device)
    return (j >= start[:, None]) & (j < (start + length)[:, None])


def _rect_mask(p: torch.Tensor, cols: tuple[str, str, str, str], height: int, width: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, H, W)`` 0/1 of ``dtype``: each sample's rectangle (rows ``y:y+h``, columns ``x:x+w``).

    0/1 arithmetic rather than ``torch.where`` on a bool mask: the same result, and no slow path on any
    device (torch's boolean select is not vectorised on CPU)."""
    y, x, h, w = (p[:, _C[c]] for c in cols)
    return _band(y, h, height).to(dtype)[:, None, :, None] * _band(x, w, width).to(dtype)[:, None, None, :]


@dataclass
class BatchAugment:
    """A per-image :class:`~trainer.data.transforms.Pipeline` restated for batches (see the module docstring)."""

    size: tuple[int, int]
    """(H, W): the batch's images must already be at this size (the pipeline's ``Resize``)."""
    flip: RandomHorizontalFlip | None
    crop: PadRandomCrop | None
    lgt: LGT | None
    normalize: ToTensorNormalize
    erasing: RandomErasing | None

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline) -> BatchAugment:
        """The batched form of ``pipeline`` (a :func:`~trainer.data.transforms.build_transforms` result).

        Refuses pipelines it cannot restate exactly: another op, or the ops in another order."""
        order = (Resize, RandomHorizontalFlip, PadRandomCrop, LGT, ToTensorNormalize, RandomErasing)
        ranks = [order.index(type(op)) if type(op) in order else -1 for op in pipeline.ops]

        def find(kind: type[_Op]) -> _Op | None:
            return next((op for op in pipeline.ops if type(op) is kind), None)

        resize, normalize = find(Resize), find(ToTensorNormalize)
        if -1 in ranks or ranks != sorted(set(ranks)) or resize is None or normalize is None:
            raise ValueError(f"{pipeline!r}: no batched form (expected the ops of build_transforms, in its order)")
        crop = find(PadRandomCrop)
        if crop is not None and crop.size != resize.size:
            raise ValueError(f"{pipeline!r}: crop {crop.size} differs from the resize {resize.size}")
        return cls(resize.size, find(RandomHorizontalFlip), crop, find(LGT), normalize, find(RandomErasing))

    @property
    def random(self) -> bool:
        """Whether any op draws (False for the test transform: :meth:`draw` is not needed)."""
        return any(op is not None for op in (self.flip, self.crop, self.lgt, self.erasing))

    @property
    def pad(self) -> int:
        return self.crop.pad if self.crop is not None else 0

    def draw_one(self, rng: AugRNG) -> list[int]:
        """One sample's row of :data:`PARAMS`, drawn by the per-image ops in the per-image order."""
        h, w = self.size
        row = [0, self.pad, self.pad] + [0] * 8
        if self.flip is not None:
            row[_C["flip"]] = int(self.flip.draw(rng))
        if self.crop is not None:
            row[_C["top"]], row[_C["left"]] = self.crop.draw(w, h, rng)
        if self.lgt is not None:
            rect = self.lgt.rectangle(w, h, rng.py)
            if rect is not None:
                row[_C["lgt_y"] : _C["lgt_w"] + 1] = rect
        if self.erasing is not None:
            rect = self.erasing.rectangle(h, w, rng.py)
            if rect is not None:
                row[_C["erase_top"] : _C["erase_w"] + 1] = rect
        return row

    def draw(self, seeds: Sequence[int]) -> torch.Tensor:
        """``(B, len(PARAMS))`` int64: the parameters of the samples of ``seeds`` (per-sample augmentation seeds)."""
        rng = AugRNG.from_seed(0)
        rows = [self.draw_one(rng.reseed(int(s))) for s in seeds]
        return torch.tensor(rows, dtype=torch.int64).view(len(rows), len(PARAMS))

    # -- apply ---------------------------------------------------------------------------------
    # Intermediates live in a workspace kept between calls: a fresh multi-megabyte CPU tensor is a fresh
    # mapping whose every page faults on first touch, which costs more than the arithmetic here.

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                zero: bool = False) -> torch.Tensor:
        """The workspace tensor ``name`` (made, zero-filled if ``zero``, when the shape/dtype/device changes)."""
        ws: dict[str, torch.Tensor] = self.__dict__.setdefault("_ws", {})
        t = ws.get(name)
        if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
            t = ws[name] = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
        return t

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_ws", "_inner")}  # workspaces stay home

    def _crop_starts(self, p: torch.Tensor, chunk: int, h: int, w: int) -> torch.Tensor:
        """``(B,)`` int64: where each sample's output starts in the flat padded buffer of its chunk (see below)."""
        pad = self.pad
        hp, wp = h + 2 * pad, w + 2 * pad
        plane = 3 * hp * wp
        slot = torch.arange(p.shape[0], device=p.device) % chunk
        return (p[:, _C["flip"]] * chunk + slot) * plane + p[:, _C["top"]] * wp + p[:, _C["left"]]

    def _flip_crop(self, x: torch.Tensor, flip: torch.Tensor, start: torch.Tensor, chunk: int,
                   dst: torch.Tensor) -> torch.Tensor:
        """Flip, pad and crop as one row gather into ``dst`` (``b×3×H×W`` uint8, ``b ≤ chunk``).

        Both orientations of the zero-padded chunk sit in one buffer, ``(2, chunk, 3, H + 2 pad, W + 2 pad)``
        (``flip(pad(img)) == pad(flip(img))``: the padding is symmetric); output row ``(b, c, y)`` is the
        ``W`` pixels from ``(top + y, left)`` of sample ``b``'s padded image in its orientation, so one
        ``index_select`` over a view whose row ``r`` is the ``W`` elements from flat offset ``r`` does the
        whole chunk. The buffer's borders are zeroed once and never written."""
        b, c, h, w = x.shape
        pad = self.pad
        hp, wp = h + 2 * pad, w + 2 * pad
        buf = self._buffer("padded", (2, chunk, c, hp, wp), torch.uint8, x.device, zero=True)
        buf[0, :b, :, pad : pad + h, pad : pad + w] = x
        if bool(flip.any()):  # a 2-D flip of rows: torch's fast last-dimension path
            buf[1, :b].view(-1, wp).copy_(buf[0, :b].view(-1, wp).flip(-1))
        flat = buf.view(-1)
        rows = flat.as_strided((flat.numel() - w + 1, w), (1, 1))
        inner = self.__dict__.setdefault("_inner", {})
        key = (c, h, hp, wp, x.device)
        if key not in inner:  # row (c, y) of a sample sits c·plane + y·wp after the sample's start
            inner[key] = (torch.arange(c, device=x.device)[:, None] * (hp * wp)
                          + torch.arange(h, device=x.device)[None, :] * wp)
        offsets = start[:, None, None] + inner[key]
        return torch.index_select(rows, 0, offsets.view(-1), out=dst.view(-1, w)).view(b, c, h, w)

    # LGT and erasing touch a rectangle per sample (2-40 % of the image). On a CPU each rectangle is
    # worked on as a slice, sample by sample: a few small ops per sample cost less than whole-image masks.
    # On a GPU one masked op over the batch replaces a launch per sample. Same pixels either way.

    @staticmethod
    def _by_slices(device: torch.device) -> bool:
        """Rectangles as per-sample slices (CPU) or as whole-batch masks (GPU)."""
        return device.type == "cpu"

    def _lgt(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """PIL's grey value inside each sample's LGT rectangle, in place (samples without one untouched).

        The grey value in float32 is exact: every product and partial sum is an integer below 2^24 and the
        division by 2^16 is a power of two, so truncation gives PIL's ``>> 16``."""
        idx = torch.nonzero(p[:, _C["lgt_h"]] > 0).squeeze(1)
        n = idx.numel()
        if n == 0:
            return x
        if self._by_slices(x.device):
            for i, (y, x0, hh, ww) in zip(idx.tolist(), p[idx, _C["lgt_y"] : _C["lgt_w"] + 1].tolist()):
                region = x[i, :, y : y + hh, x0 : x0 + ww]  # slicing clips at the edges, as the reference's
                region.copy_(self._grey(region.to(torch.float32)).expand_as(region))
            return x
        _, c, h, w = x.shape
        sub = x.index_select(0, idx)
        m = _rect_mask(p.index_select(0, idx), ("lgt_y", "lgt_x", "lgt_h", "lgt_w"), h, w, torch.uint8)
        grey = self._grey(sub.to(torch.float32)).mul_(m)
        sub.mul_(1 - m).add_(grey)  # one of the two terms is 0: no overflow
        return x.index_copy_(0, idx, sub)

    @staticmethod
    def _grey(f: torch.Tensor) -> torch.Tensor:
        """``(..., 3, h, w)`` float32 RGB values → ``(..., 1, h, w)`` uint8 grey, PIL's formula (see :meth:`_lgt`)."""
        grey = f.narrow(-3, 0, 1) * _GREY[0]
        grey.add_(f.narrow(-3, 1, 1), alpha=_GREY[1]).add_(f.narrow(-3, 2, 1), alpha=_GREY[2])
        return grey.add_(0x8000).mul_(2.0 ** -16).to(torch.uint8)  # float → uint8 truncates

    def _erase(self, out: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The fill (the normalisation mean, float32) inside each sample's erasing rectangle, in place.

        GPU: ``out · (1 − m)`` keeps or zeroes a value exactly, ``+ m · fill`` then adds 0 or the fill
        exactly (a product by 0 or 1 is exact, fused or not)."""
        idx = torch.nonzero(p[:, _C["erase_h"]] > 0).squeeze(1)
        if idx.numel() == 0:
            return out
        fill = self.erasing.fill.to(device=out.device, dtype=out.dtype)  # type: ignore[union-attr]
        if self._by_slices(out.device):
            for i, (t, left, hh, ww) in zip(idx.tolist(), p[idx, _C["erase_top"] : _C["erase_w"] + 1].tolist()):
                region = out[i, :, t : t + hh, left : left + ww]
                region.copy_(fill.expand_as(region))
            return out
        m = _rect_mask(p, ("erase_top", "erase_left", "erase_h", "erase_w"), out.shape[2], out.shape[3], out.dtype)
        return out.mul_(1 - m).addcmul_(m, fill.view(1, -1, 1, 1))

    def __call__(self, images: torch.Tensor, params: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """``B×3×H×W`` uint8 at :attr:`size` → the normalised float32 batch, on ``images``' device.

        ``params``: :meth:`draw`'s table (needed when :attr:`random`). ``out``: where to write (a shared
        buffer); a fresh tensor otherwise. ``images`` is never written to (a store's pages are read-only).
        On a CPU the batch goes through in chunks of :attr:`cpu_chunk` samples, each op over the whole
        chunk: the chunk's intermediates stay in the cache between ops instead of streaming the batch
        through memory once per op. On a GPU the chunk is the batch."""
        b, c, h, w = images.shape
        if (h, w) != tuple(self.size) or c != 3 or images.dtype != torch.uint8:
            raise ValueError(f"BatchAugment: images {tuple(images.shape)} {images.dtype}, expected B×3×H×W uint8 "
                             f"at {self.size}")
        p: torch.Tensor | None = None
        if self.random:
            if params is None or params.shape != (b, len(PARAMS)):
                raise ValueError(f"BatchAugment: params {None if params is None else tuple(params.shape)}, "
                                 f"expected ({b}, {len(PARAMS)})")
            p = params.to(images.device, torch.int64)
        if out is None:
            out = torch.empty(b, c, h, w, dtype=torch.float32, device=images.device)
        step = self.cpu_chunk if images.device.type == "cpu" else max(b, 1)
        start = self._crop_starts(p, step, h, w) if p is not None else None
        for lo in range(0, b, step):
            hi = min(lo + step, b)
            self._apply(images[lo:hi], None if p is None else p[lo:hi], None if start is None else start[lo:hi],
                        step, out[lo:hi])
        return out

    cpu_chunk = 8
    """Samples per chunk on a CPU (3 MiB of float32 at 256×128: a core's share of the cache)."""

    def _apply(self, images: torch.Tensor, p: torch.Tensor | None, start: torch.Tensor | None, chunk: int,
               out: torch.Tensor) -> None:
        x = images
        if p is not None and start is not None:
            if self.flip is not None or self.crop is not None or self.lgt is not None:
                dst = self._buffer("x", (chunk, *images.shape[1:]), torch.uint8, images.device)[: images.shape[0]]
                if self.flip is not None or self.crop is not None:
                    x = self._flip_crop(images, p[:, _C["flip"]], start, chunk, dst)
                else:
                    x = dst.copy_(images)
            if self.lgt is not None:
                x = self._lgt(x, p)
        n = self.normalize
        out.copy_(x)  # uint8 → float32 is exact
        out.mul_(n.scale.to(out.device)).add_(n.bias.to(out.device))  # ToTensorNormalize's two roundings
        if p is not None and self.erasing is not None:
            self._erase(out, p)


__all__ = ["PARAMS", "BatchAugment", "shared_empty"]
