"""Batched augmentation (``trainer.data.augment``) against the per-image pipeline on the same seeds.

The batched output must equal the per-image tensor exactly: every geometric op copies uint8 pixels, LGT's
grey value is PIL's integer formula, normalisation is the same two float32 roundings in the same order and
erasing writes the same float32 fill (module docstring of ``trainer.data.augment``). Only decoding JPEGs
with another decoder and resizing with torch instead of PIL (``data.pipeline=gpu_decode``) changes
pixels, by a bounded few levels (see the tolerance tests)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import TransformConfig
from trainer.data.augment import PARAMS, BatchAugment
from trainer.data.dataset import decode, sample_seeds
from trainer.data.decoded import decode_on_device
from trainer.data.transforms import LGT, Pipeline, RandomErasing, Resize, ToTensorNormalize, build_transforms

SIZE = (64, 32)
CONFIGS = {
    "pat": TransformConfig(size=SIZE, lgt_p=0.5),  # PAT: flip, pad 10 + crop, LGT, 0.5/0.5
    "pat_lgt_always": TransformConfig(size=SIZE, lgt_p=1.0),
    "tmgf": TransformConfig(size=SIZE, erasing_p=0.5, norm="luperson"),  # TMGF: flip, pad + crop, erasing
    "tmgf_erase_always": TransformConfig(size=SIZE, erasing_p=1.0, norm="imagenet"),
    "all_ops": TransformConfig(size=SIZE, lgt_p=0.7, erasing_p=0.7),
    "flip_only": TransformConfig(size=SIZE, pad=0),
    "crop_only": TransformConfig(size=SIZE, flip_p=0.0, pad=4),
    "lgt_only": TransformConfig(size=SIZE, flip_p=0.0, pad=0, lgt_p=1.0),
}


def _images(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """RGB images of mixed content: noise, flat colours (grey value at its rounding boundaries), gradients."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for k in range(n):
        if k % 3 == 0:
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif k % 3 == 1:
            a = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (h, w, 3)).copy()
        else:
            a = (np.linspace(0, 255, h * w * 3).reshape(h, w, 3) + rng.integers(0, 9)).clip(0, 255).astype(np.uint8)
        out.append(Image.fromarray(a))
    return out


def _stack(images: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """What the decoded store holds: ``Resize(size)`` of each image, channels first."""
    resize = Resize(size)
    return torch.from_numpy(np.stack([np.asarray(resize(im)).transpose(2, 0, 1) for im in images])).contiguous()


def _seeds(n: int) -> list[int]:
    return sample_seeds(7, 3, 11, np.arange(n)).tolist()  # the loader's per-sample seeds


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("train", [True, False])
def test_batched_equals_per_image_exactly(name: str, train: bool) -> None:
    """Source images of another size than the training size: the per-image pipeline resizes them, the
    batched one gets them resized (as the decoded store keeps them). 37 samples: the CPU chunks of 8 end
    with a partial one."""
    tf = build_transforms(CONFIGS[name], train=train)
    images = _images(37, (40, 24))
    seeds = _seeds(len(images))
    want = torch.stack([tf(im, s) for im, s in zip(images, seeds)])
    aug = BatchAugment.from_pipeline(tf)
    assert aug.random == train
    params = aug.draw(seeds) if train else None
    got = aug(_stack(images, SIZE), params)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("name", ["pat_lgt_always", "tmgf_erase_always", "all_ops"])
def test_the_gpu_formulation_is_the_same_on_cpu(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The masked whole-batch forms of LGT and erasing (what a GPU runs), and one chunk per batch, on CPU."""
    tf = build_transforms(CONFIGS[name], train=True)
    images = _images(21, SIZE, seed=1)
    seeds = _seeds(len(images))
    want = torch.stack([tf(im, s) for im, s in zip(images, seeds)])
    monkeypatch.setattr(BatchAugment, "_by_slices", staticmethod(lambda device: False))
    monkeypatch.setattr(BatchAugment, "cpu_chunk", 1000)
    aug = BatchAugment.from_pipeline(tf)
    assert torch.equal(aug(_stack(images, SIZE), aug.draw(seeds)), want)


def test_training_size_batch_and_the_input_left_untouched() -> None:
    """The real PAT shape (256×128, LGT 0.5), pixels that came from JPEGs; the uint8 input is not written."""
    tf = build_transforms(TransformConfig(size=(256, 128), lgt_p=0.5), train=True)
    images = [decode(_jpeg(np.random.default_rng(k), (128, 64))) for k in range(12)]
    seeds = _seeds(len(images))
    x = _stack(images, (256, 128))
    before = x.clone()
    aug = BatchAugment.from_pipeline(tf)
    params = aug.draw(seeds)
    assert params.shape == (12, len(PARAMS)) and params.dtype == torch.int64
    assert torch.equal(aug(x, params), torch.stack([tf(im, s) for im, s in zip(images, seeds)]))
    assert torch.equal(x, before)


def test_refuses_what_it_cannot_restate() -> None:
    tf = build_transforms(CONFIGS["pat"], train=True)
    with pytest.raises(ValueError, match="no batched form"):
        BatchAugment.from_pipeline(Pipeline([tf.ops[0], tf.ops[-1], LGT(0.5)], random=True))  # LGT after ToTensor
    with pytest.raises(ValueError, match="no batched form"):
        BatchAugment.from_pipeline(Pipeline([Resize(SIZE), lambda x, r: x, ToTensorNormalize((0, 0, 0), (1, 1, 1))]))
    with pytest.raises(ValueError, match="no batched form"):  # no normalisation
        BatchAugment.from_pipeline(Pipeline([Resize(SIZE), RandomErasing(0.5, (0, 0, 0))], random=True))
    aug = BatchAugment.from_pipeline(tf)
    with pytest.raises(ValueError, match="expected B×3×H×W uint8"):
        aug(torch.zeros(2, 3, 32, 16, dtype=torch.uint8), aug.draw([1, 2]))
    with pytest.raises(ValueError, match="params"):
        aug(torch.zeros(2, 3, *SIZE, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------
# JPEG bytes decoded by torchvision (the gpu_decode path), on whichever device


def _jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A Market-like JPEG: blocks of colour plus noise (bench/data.py's synthetic images)."""
    h, w = size
    blocks = rng.integers(0, 256, size=(8, 4, 3)).astype(np.uint8)
    a = np.kron(blocks, np.ones((h // 8, w // 4, 1), dtype=np.uint8)).astype(np.int16)
    a += rng.integers(-25, 26, size=a.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


MAX_LEVELS, MEAN_LEVELS = 6, 0.5
"""Device-decode tolerance, uint8 levels against PIL decode + bicubic resize. Decoding: libjpeg-turbo on
CPU gives PIL's pixels; nvJPEG may differ by a level or two in the IDCT and chroma upsampling. Resizing:
PIL resamples in 22-bit fixed point and rounds to uint8 between the horizontal and the vertical pass,
torch with its own precision and rounding; bicubic's weights sum to 1 with |w| summing to ≤ 1.25, so
each pass's half-level rounding difference grows to a few levels at most near sharp edges, while most
pixels agree (measured here: max 4, mean 0.26 on the resampled downscale, 0–1 on the 2× upscale)."""


def _decode_check(device: torch.device) -> None:
    rng = np.random.default_rng(5)
    sources = [(128, 64)] * 6 + [(256, 128)] * 2 + [(300, 120)] * 4  # Market's size, no resize, a downscale
    data = [_jpeg(rng, s) for s in sources]
    want = _stack([decode(d) for d in data], (256, 128)).to(torch.int16)
    got = decode_on_device([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data], (256, 128), device)
    assert got.device.type == device.type and got.dtype == torch.uint8 and got.shape == (12, 3, 256, 128)
    diff = (got.cpu().to(torch.int16) - want).abs()
    mean = float(diff.float().mean())
    assert int(diff.max()) <= MAX_LEVELS and mean <= MEAN_LEVELS, (int(diff.max()), mean)
    # the same size is kept as decoded, as Resize keeps it
    assert torch.equal(got[6:8].cpu(), torch.stack([torch.from_numpy(np.asarray(decode(d)).transpose(2, 0, 1).copy())
                                                   for d in data[6:8]])) or device.type == "cuda"


def test_device_decode_on_cpu_is_within_the_stated_tolerance() -> None:
    _decode_check(torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["pat", "all_ops", "tmgf_erase_always"])
def test_cuda_batched_augmentation_equals_cpu_and_per_image(name: str) -> None:
    """On the GPU: the same uint8 ops, the same float32 mul then add (separate kernels, no FMA contraction)."""
    tf = build_transforms(CONFIGS[name], train=True)
    images = _images(40, SIZE, seed=2)
    seeds = _seeds(len(images))
    want = torch.stack([tf(im, s) for im, s in zip(images, seeds)])
    aug = BatchAugment.from_pipeline(tf)
    params = aug.draw(seeds)
    got = aug(_stack(images, SIZE).cuda(), params)
    assert got.is_cuda and torch.equal(got.cpu(), want)


@pytest.mark.cuda
def test_cuda_device_decode_is_within_the_stated_tolerance() -> None:
    _decode_check(torch.device("cuda"))
