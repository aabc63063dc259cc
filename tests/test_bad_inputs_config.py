"""Bad config values given to ``python -m trainer.train``: refused at compose time, before any work,
as one line naming the key and value and what is expected (harness: ``tests/badinput.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.badinput import BadInput, check


def _train(*overrides: str) -> list[str]:
    return ["-m", "trainer.train", *overrides, "run_dir={tmp}/run"]


ROWS = [
    BadInput("data_store", _train("exp=pat_smoke", "data.store=bogus"),
             names=("data.store='bogus'",), fix=("'memory'", "'wids'")),
    BadInput("precision", _train("exp=pat_smoke", "train.precision=fp8"),
             names=("train.precision='fp8'",), fix=("'fp32'", "'bf16'")),
    BadInput("optimizer", _train("exp=pat_smoke", "train.optim.name=lamb"),
             names=("train.optim.name='lamb'",), fix=("'sgd'", "'adam'")),
    BadInput("norm", _train("exp=pat_smoke", "data.transform.norm=foo"),
             names=("data.transform.norm='foo'",), fix=("'vit_jx'", "'imagenet'")),
    BadInput("moved_key", _train("exp=pat_smoke", "data.norm=foo"),
             names=("data.norm",), fix=("renamed to data.transform.norm", "pass data.transform.norm=foo")),
    BadInput("group_choice", _train("exp=pat_market", "data=nope"),
             names=("data='nope'",), fix=("'market'", "'leave_one_out'")),
    BadInput("backbone", _train("exp=pat_smoke", "model.backbone=nope"),
             names=("model.backbone='nope'",), fix=("'vit_test'",)),
    BadInput("model_for_method", _train("exp=pat_smoke", "model.name=tmgf"),
             names=("model.name='tmgf'",), fix=("('pat', 'vit') for method=pat",)),
    BadInput("pretrained_missing", _train("exp=pat_smoke", "model.pretrained={tmp}/missing.pth"),
             names=("model.pretrained=", "missing.pth"), fix=("model.pretrained=''",)),
    BadInput("unknown_key", _train("exp=pat_smoke", "train.bogus=1"),
             names=("'bogus'", "TrainConfig")),
    BadInput("unknown_exp", _train("exp=nope"),
             names=("exp/nope",), fix=("pat_smoke",)),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row: BadInput, tmp_path: Path) -> None:
    check(row, tmp_path)
