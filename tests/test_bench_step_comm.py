"""bench/step_comm.py reads bytes sent from /proc/self/io: that counter must see gloo's traffic exactly."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.mp import run_distributed

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/io is Linux's")


def _all_reduce_bytes(rank: int, world: int, numel: int) -> int:
    import torch.distributed as tdist

    from bench.step_comm import bytes_written

    t = torch.ones(numel)
    tdist.all_reduce(t)  # warm the pairs up: connection set-up is not part of the measured call
    tdist.barrier()
    before = bytes_written()
    tdist.all_reduce(t)
    return bytes_written() - before


@pytest.mark.parametrize("world", [2, 3])
def test_wchar_counts_a_ring_all_reduce(world: int) -> None:
    """gloo's ring all-reduce of B bytes sends 2(W-1)/W·B per rank (reduce-scatter + all-gather); the
    counter reads that plus per-message headers, a few hundred bytes for a 4 MB tensor (< 1 %)."""
    numel = 1_000_002  # divisible by 2 and 3: every chunk the same size
    payload = 2 * (world - 1) / world * 4 * numel
    sent = run_distributed(_all_reduce_bytes, world, numel)
    for b in sent:
        assert payload <= b <= 1.01 * payload, (b, payload)
