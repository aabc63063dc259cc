"""TensorBoard (``train.tensorboard``): rank 0 writes grouped scalars and the run's config to ``run_dir/tb``,
read back here with TensorBoard's own event reader (that rank 0 alone writes: the 2-rank run of
``tests/test_prometheus.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.engine.tensorboard import TensorBoardSink


def _read(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every event
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _text(acc: EventAccumulator, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


def test_engine_writes_grouped_scalars_and_its_config(tmp_path: Path) -> None:
    from tests.test_engine import ToyMethod, _cfg
    from trainer.config import EvalConfig
    from trainer.engine.loop import Engine

    (tmp_path / "config.yaml").write_text("name: toy\ntrain:\n  epochs: 2\n")  # as trainer.train writes it
    Engine(ToyMethod(), _cfg(epochs=2), EvalConfig(period=1), tmp_path).fit()
    acc = _read(tmp_path / "tb")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/ce", "train/lr", "train/epoch", "throughput/img_per_s", "throughput/mfu",
            "throughput/step_s", "throughput/data_wait_s", "throughput/data_wait_ratio", "memory/peak_mib",
            "memory/sync_s", "eval/toy/mAP", "eval/toy/R1", "eval/seconds"} <= tags, sorted(tags)
    # TensorBoard stores scalars as float32: equal to the logged float64 within float32's rounding (2^-24)
    got = _scalars(acc, "loss/total")
    assert [s for s, _ in got] == [r["step"] for r in train] == list(range(1, 9))
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in train], rel=2**-23)
    assert [v for _, v in _scalars(acc, "throughput/mfu")] == pytest.approx([r["mfu"] for r in train], rel=2**-23)
    assert _scalars(acc, "eval/toy/mAP") == [(r["step"], pytest.approx(100 * r["results"]["toy"]["mAP"], rel=2**-23))
                                             for r in evals]  # in %, at the step evaluated
    assert _text(acc, "config").splitlines() == ["    name: toy", "    train:", "      epochs: 2"]  # verbatim


def test_records_without_a_step_take_the_latest_one(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "tb")
    records: list[dict[str, Any]] = [
        {"kind": "train", "step": 5, "epoch": 0, "loss": 2.0, "lr": 0.1, "sec": 0.5, "acc": 0.25, "tri": 1.0},
        {"kind": "cluster", "epoch": 1, "clusters": 221, "outliers": 50, "images": 200, "ari": 0.4, "cluster_s": 1.5},
        {"kind": "eval", "epoch": 1, "step": 6, "seconds": 3.0, "results": {
            "b": {"mAP": 0.5, "R1": 0.25}, "train_clustering": {"clusters": 230, "ari": 0.5}}},
        {"kind": "checkpoint", "step": 6, "path": "x"},
    ]
    for r in records:
        sink.log(r)
    sink.close()
    acc = _read(tmp_path / "tb")
    assert _scalars(acc, "loss/tri") == [(5, 1.0)] and _scalars(acc, "train/acc") == [(5, 0.25)]
    assert "loss/acc" not in acc.Tags()["scalars"]  # an accuracy is not a loss
    assert _scalars(acc, "cluster/clusters") == [(5, 221.0)]  # at the step it was found after
    assert _scalars(acc, "cluster/outlier_ratio") == [(5, 0.25)]
    assert _scalars(acc, "eval/b/mAP") == [(6, 50.0)] and _scalars(acc, "eval/b/R1") == [(6, 25.0)]
    assert _scalars(acc, "eval/train_clustering/clusters") == [(6, 230.0)]  # counts, not percentages
    assert "cluster/epoch" not in acc.Tags()["scalars"]


def test_off_writes_nothing(tmp_path: Path) -> None:
    from tests.test_engine import ToyMethod, _cfg
    from trainer.config import EvalConfig
    from trainer.engine.loop import Engine

    Engine(ToyMethod(), _cfg(epochs=1, tensorboard=False), EvalConfig(), tmp_path).fit()
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "tb").exists()

