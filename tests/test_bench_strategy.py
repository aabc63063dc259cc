"""bench/strategy.py: its byte census counts what the strategies hold, and its verdicts read the rows right.

The end-to-end test runs the bench's own cases (tiny ViT, PAT's model and optimizer, W = 1 and 2) on
forked gloo ranks, as the script does on the CPU: a few seconds per case.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import strategy as sb
from trainer.config import TrainConfig


def test_unique_nbytes_counts_each_storage_once_and_whole() -> None:
    a = torch.zeros(10)  # 40 bytes
    b = torch.zeros(3, dtype=torch.float64)  # 24 bytes
    assert sb.unique_nbytes([a, a[2:5], a.view(2, 5), b]) == 64  # a view holds its whole storage
    assert sb.unique_nbytes([a[2:5], b], exclude=sb.storage_ptrs([a])) == 24


def test_tensors_in_walks_containers_but_not_modules() -> None:
    t, u = torch.zeros(2), torch.ones(3)
    found = sb.tensors_in({"x": [t, (u, None)], "m": torch.nn.Linear(2, 2), "n": 3})
    assert [x.data_ptr() for x in found] == [t.data_ptr(), u.data_ptr()]


def test_train_config_names_the_trainers_strategies() -> None:
    base = TrainConfig(sync_bn=True)
    assert (sb.train_config(base, "ddp").strategy, sb.train_config(base, "ddp").sync_bn) == ("ddp", True)
    assert [(c.strategy, c.zero_stage) for c in (sb.train_config(base, "zero1"), sb.train_config(base, "zero2"))] \
        == [("deepspeed", 1), ("deepspeed", 2)]
    with pytest.raises(ValueError, match="zero3"):
        sb.train_config(base, "zero3")


def _row(strategy: str, world: int, optim: int, losses: list[float]) -> sb.Row:
    return sb.Row(strategy, world, 100, optim, 0, 0, "-", 0, None, 0.1, losses)


def test_ratio_is_against_the_same_strategy_at_one_rank_and_gap_against_ddp_at_the_same_w() -> None:
    rows = [_row("ddp", 1, 400, [2.0, 1.0]), _row("zero2", 1, 400, [2.0, 1.0]),
            _row("ddp", 2, 400, [2.5, 1.5]), _row("zero2", 2, 200, [2.5, 1.25])]
    assert [sb.optimizer_ratio(rows, r) for r in rows] == [1.0, 1.0, 1.0, 0.5]
    assert sb.loss_gap(rows, rows[3]) == 0.25  # against DDP at W = 2, not at W = 1
    assert sb.optimizer_ratio(rows[2:], rows[3]) is None  # no W = 1 row: no ratio rather than a wrong one
    lines = sb.table(rows)
    assert lines[0].startswith("| strategy | W |") and len(lines) == 2 + len(rows)
    assert "  zero2 W=2: 0.500 (1/W = 0.500)" in sb.verdicts(rows)


@pytest.mark.parametrize("argv,words", [
    (["--quick", "--batch", "6"], "--batch 6"),  # not P x 4
    (["--quick", "--batch", "12", "--worlds", "1,8"], "--batch 12"),  # does not split over 8 ranks
    (["--quick", "--strategies", "ddp,zero3"], "zero3"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv: list[str], words: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert sb.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench/strategy.py: error:") and words in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path forks its ranks; CUDA ranks are spawned")
def test_zero_holds_optimizer_state_over_w_and_trains_as_ddp() -> None:
    pytest.importorskip("deepspeed")
    setting = sb.build_setting(sb.parse_args(["--quick", "--worlds", "1,2"]))
    # no drop path and a larger LR: step to step the loss then moves by the update alone, and far more
    # than the tolerance below, so a ZeRO update on the wrong partition could not pass
    train = dataclasses.replace(setting.train, optim=dataclasses.replace(setting.train.optim, lr=0.05))
    setting = dataclasses.replace(setting, model=dataclasses.replace(setting.model, drop_path_rate=0.0),
                                  train=train, warmup=0, steps=3)
    sb.preload()
    rows = [sb.summarize(s, w, sb.run_case(s, w, setting, "fork")) for w in (1, 2) for s in ("ddp", "zero1", "zero2")]
    by = {(r.strategy, r.world): r for r in rows}
    ddp1, ddp2 = by["ddp", 1], by["ddp", 2]
    assert sb.optimizer_ratio(rows, ddp2) == 1.0 and ddp2.master_bytes == 0
    assert ddp2.grad_bytes > ddp1.grad_bytes  # DDP's buckets beside p.grad
    assert abs(ddp1.losses[-1] - ddp1.losses[0]) > 1e-2
    for stage in ("zero1", "zero2"):
        one, two = by[stage, 1], by[stage, 2]
        assert one.optim_bytes == ddp1.optim_bytes  # one rank: the whole momentum, as DDP
        ratio = sb.optimizer_ratio(rows, two)
        # ZeRO pads each group's partition to an alignment of a few elements: far under 1 % of 60k parameters
        assert ratio is not None and 0.5 <= ratio < 0.51, ratio
        assert two.master_bytes == two.optim_bytes  # the fp32 partition copy: SGD momentum's size
        assert two.grad_bytes < one.grad_bytes
        # fp32: ZeRO's reduce-scatter only reorders the sum of the two ranks' gradients (~1e-7 relative)
        for w in (1, 2):
            gap = sb.loss_gap(rows, by[stage, w])
            assert gap is not None and gap <= 1e-5, (stage, w, gap)
