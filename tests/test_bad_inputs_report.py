"""Bad inputs of ``python -m trainer.report``: one line, exit 2, nothing written (``tests/badinput.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.badinput import BadInput, check

REPORT = ["-m", "trainer.report"]
RECORD = json.dumps({"kind": "train", "step": 1, "epoch": 0, "loss": 1.0, "lr": 0.1}) + "\n"


def _run_dir(tmp: Path, text: str = RECORD) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text(text)


def _empty_run_dir(tmp: Path) -> None:
    (tmp / "run").mkdir()


def _a_file(tmp: Path) -> None:
    (tmp / "notes.txt").write_text("a file where a folder is expected\n")


def _run_dir_and_a_file(tmp: Path) -> None:
    _run_dir(tmp)
    _a_file(tmp)


ROWS = [
    BadInput("no_such_run_dir", [*REPORT, "{tmp}/nope"], names=("nope", "no such run dir"), fix=("run_dir=",)),
    BadInput("run_dir_is_a_file", [*REPORT, "{tmp}/notes.txt"], setup=_a_file,
             names=("notes.txt", "not a folder"), fix=("pass the run dir",)),
    BadInput("no_metrics_jsonl", [*REPORT, "{tmp}/run"], setup=_empty_run_dir,
             names=("run", "holds no metrics.jsonl"), fix=("pass the run dir of a training run",)),
    BadInput("metrics_jsonl_without_a_record", [*REPORT, "{tmp}/run"],
             setup=lambda tmp: _run_dir(tmp, '{"kind": "tra'),  # only the first record, being written
             names=("metrics.jsonl", "no record yet"), fix=("run the report again",)),
    BadInput("out_under_a_file", [*REPORT, "{tmp}/run", "--out", "{tmp}/notes.txt/plots"],
             setup=_run_dir_and_a_file, names=("notes.txt", "is a file"), fix=("choose another --out",)),
    BadInput("unknown_flag", [*REPORT, "{tmp}/run", "--bogus"], setup=_run_dir,
             names=("--bogus",), fix=("--help",)),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: BadInput, tmp_path: Path) -> None:
    check(row, tmp_path)
