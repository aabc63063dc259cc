"""Map-style dataset over a sample store: decode in the worker, transform, emit the batch contract.

An item is addressed by its global index, optionally paired with a per-sample augmentation seed
(``(index, seed)``, what :class:`trainer.data.loader.SeededBatchSampler` yields). The seed makes
the sample's augmentation a pure function of (run seed, epoch, step, slot in the global batch):
independent of the number of workers and ranks, and identical after a resume.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from trainer.data.catalogue import SampleIndex
from trainer.data.transforms import Pipeline

_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a cheap, well-spread hash."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, step: int, slots: np.ndarray) -> np.ndarray:
    """Per-sample augmentation seeds (uint64) for global-batch ``slots`` of (seed, epoch, step)."""
    with np.errstate(over="ignore"):
        h = _mix64(np.array([seed & _MASK64], dtype=np.uint64))
        h = _mix64(h ^ np.uint64(epoch & _MASK64))
        h = _mix64(h ^ np.uint64(step & _MASK64))
        return _mix64(h ^ np.asarray(slots, dtype=np.uint64))


def decode(data: bytes) -> Image.Image:
    """Original file bytes → RGB PIL image."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


@contextlib.contextmanager
def _seeded_globals(seed: int) -> Iterator[None]:
    """Seed python/numpy/torch global RNGs for a foreign transform, then restore them."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed & ((1 << 63) - 1))
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class ReIDDataset(Dataset):
    """``dataset[i]`` or ``dataset[(i, seed)]`` → ``{img, pid, camid, domain, index}``.

    ``transform`` is a :class:`~trainer.data.transforms.Pipeline` (called with the seed) or any
    callable on a PIL image (run under global RNGs seeded from the seed, restored afterwards).
    Without a seed, a random pipeline draws one from torch's global RNG (seeded per worker); the
    loaders of :mod:`trainer.data.loader` always pass seeds.
    """

    def __init__(self, store: SampleIndex, transform: Callable[..., torch.Tensor]) -> None:
        self.store = store
        self.transform = transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(item, tuple):
            i, seed = int(item[0]), int(item[1])
        else:
            i, seed = int(item), None
        if not 0 <= i < len(self.store):
            raise IndexError(f"ReIDDataset: index {i} outside 0..{len(self.store) - 1}")
        try:
            img = decode(self.store.get_bytes(i))
        except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
            raise OSError(f"sample {i} ({self.store.relpath[i]}): cannot decode image ({exc})") from None
        t = self.transform
        if isinstance(t, Pipeline):
            if seed is None:
                seed = int(torch.randint(0, 1 << 62, (1,)).item()) if t.random else 0
            x = t(img, seed)
        elif seed is not None:
            with _seeded_globals(seed):
                x = t(img)
        else:
            x = t(img)
        return {
            "img": x,
            "pid": int(self.store.pid[i]),
            "camid": int(self.store.camid[i]),
            "domain": int(self.store.domain[i]),
            "index": int(self.store.index[i]),
            # the sample's seed (63 bits: a non-negative int64) also seeds its stochastic depth
            **({"seed": seed & ((1 << 63) - 1)} if seed is not None else {}),
        }


__all__ = ["ReIDDataset", "decode", "sample_seeds"]
