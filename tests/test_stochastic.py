"""Stochastic depth seeded per sample (``trainer/models/stochastic.py``): a sample's masks are a function
of its seed and the drop-path's place, so any split of a batch over ranks draws the same masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.models.backbones import build_vit
from trainer.models.stochastic import SampleDropPath, _mul32, sample_seeds, seed_drop_paths, uniform


def test_mul32_is_the_product_modulo_2_to_the_32() -> None:
    rng = np.random.default_rng(0)
    xs = [0, 1, 2**32 - 1, *rng.integers(0, 2**32, 1000).tolist()]
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF, 1):
        got = _mul32(torch.tensor(xs, dtype=torch.int64), c).tolist()
        assert got == [(x * c) % 2**32 for x in xs]  # Python integers: exact


def test_uniform_is_a_pure_function_of_seed_and_salt() -> None:
    seeds = torch.tensor(np.random.default_rng(1).integers(0, 2**63, 100_000), dtype=torch.int64)
    u = uniform(seeds, salt=3)
    assert u.dtype == torch.float64 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u[17:40], uniform(seeds[17:40], salt=3))  # a slice draws the same numbers
    assert not torch.equal(u, uniform(seeds, salt=4))  # another drop-path draws others
    # 1e5 draws: mean 1/2 and the share below 0.1 within 5 standard errors (~0.0046, ~0.0047)
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12) ** 0.5 / 100_000 ** 0.5
    assert abs(float((u < 0.1).double().mean()) - 0.1) < 5 * (0.09 / 100_000) ** 0.5
    # the high 32 bits matter too: seeds that differ there only
    assert not torch.equal(uniform(seeds & 0xFFFFFFFF, 3), uniform((seeds & 0xFFFFFFFF) | (1 << 40), 3))


def test_drop_path_masks_do_not_depend_on_the_split() -> None:
    layer = SampleDropPath(0.5, salt=7).train()
    x = torch.randn(64, 5, 3)
    seeds = torch.arange(1000, 1064, dtype=torch.int64) * 7919
    with sample_seeds(seeds):
        whole = layer(x)
    parts = []
    for lo, hi in ((0, 10), (10, 40), (40, 64)):  # three uneven "ranks"
        with sample_seeds(seeds[lo:hi]):
            parts.append(layer(x[lo:hi]))
    assert torch.equal(torch.cat(parts), whole)  # elementwise: exactly the same
    dropped = (whole == 0).all(dim=(1, 2))
    assert 0 < int(dropped.sum()) < 64  # some dropped, some kept (scaled by 1/keep)
    torch.testing.assert_close(whole[~dropped], x[~dropped] * 2.0, rtol=0, atol=0)


def test_mismatched_seeds_are_refused() -> None:
    layer = SampleDropPath(0.5, salt=0).train()
    with sample_seeds(torch.zeros(3, dtype=torch.int64)), pytest.raises(ValueError, match="3.*batch of 4"):
        layer(torch.ones(4, 2))


def test_vit_forward_with_seeds_is_split_invariant() -> None:
    vit = build_vit("vit_test", (64, 32), drop_path_rate=0.5).train()
    # rates grow linearly from 0: block 0 has none (Identity), every later block two
    assert sum(isinstance(m, SampleDropPath) for m in vit.modules()) == 2 * (len(vit.blocks) - 1)
    x = torch.randn(8, 3, 64, 32)
    seeds = torch.arange(8, dtype=torch.int64) + 12345
    with sample_seeds(seeds):
        whole = vit.forward_features(x)
    parts = []
    for lo, hi in ((0, 3), (3, 8)):
        with sample_seeds(seeds[lo:hi]):
            parts.append(vit.forward_features(x[lo:hi]))
    halves = torch.cat(parts)
    # fp32 rows are computed alike whatever the batch size, up to the matmul kernels' blocking (rounding
    # of activations of magnitude ~3): 1e-5 is far above it and far below a differently dropped branch (O(1))
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-5)
    with sample_seeds(seeds + 1):
        other = vit.forward_features(x)
    assert (other - whole).abs().max() > 1e-2  # other seeds, other masks: the test can fail


def test_dropout_is_refused() -> None:
    vit = build_vit("vit_test", (64, 32), drop_path_rate=0.1)
    vit.blocks[0].attn.attn_drop.p = 0.1
    with pytest.raises(ValueError, match="dropout p=0.1 draws its masks per rank"):
        seed_drop_paths(vit)
