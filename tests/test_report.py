"""``python -m trainer.report``: the PNGs of a run from its metrics.jsonl alone.

Two short real runs (pat_smoke, tmgf_smoke, trained once per module) check that every figure is a
valid PNG and that each series drawn is the numbers the records hold. Hand-written records check
what the smoke runs do not produce: a resumed run, a last line still being written, a full CMC
curve and the data-wait field.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from trainer.report import FIGURES, METRICS, main, read_records, report

PAT_FIGURES = {"losses.png", "lr.png", "retrieval.png", "cmc.png", "throughput.png"}
TMGF_FIGURES = PAT_FIGURES | {"clustering.png"}


def _train(tmp: Path, name: str, *overrides: str) -> Path:
    from trainer.config import compose
    from trainer.train import run

    run_dir = tmp / name
    cfg = compose([f"exp={name}", f"run_dir={run_dir}", *overrides])  # datasets: the shared cache
    assert run(cfg).status == "finished"
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("report_runs")
    return {
        # 4 steps per epoch, evaluated before training and after each epoch
        "pat": _train(tmp, "pat_smoke", "train.epochs=2", "eval.period=1", "eval.at_start=true",
                      "train.ckpt_every_steps=0"),
        # 2 re-clusterings, and the train set's clustering measured at every evaluation
        "tmgf": _train(tmp, "tmgf_smoke", "train.epochs=2", "tmgf.iters_per_epoch=2", "eval.period=1",
                       "eval.at_start=true", "tmgf.eval_clustering=true", "train.ckpt_every_steps=0"),
    }


def _records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / METRICS).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _assert_pngs(written: dict[str, Path], names: set[str]) -> None:
    assert set(written) == names
    for name, path in written.items():
        assert path.name == name and path.stat().st_size > 0
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 200, (name, im.format, im.size)
            im.load()  # the whole image decodes, not only its header
    assert not [p for p in next(iter(written.values())).parent.iterdir() if p.name.startswith(".")], \
        "a temporary file was left beside the PNGs"


def _steps(train: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    return [float(r["step"]) for r in train], [float(r[key]) for r in train]


# -- real runs --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pat_run(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = runs["pat"]
    rep = report(run_dir, tmp_path / "plots")
    _assert_pngs(rep.written, PAT_FIGURES)
    assert set(rep.skipped) == {"clustering.png"}
    train, evals = _records(run_dir, "train"), _records(run_dir, "eval")
    assert len(train) == 8 and len(evals) == 3
    # the drawn numbers are the logged ones, exactly (both are the same floats parsed from the file)
    assert rep.series["losses.png"]["loss"] == _steps(train, "loss")
    assert set(rep.series["losses.png"]) == {"loss", "id", "tri", "csl", "acc"}  # PAT's logged terms
    assert rep.series["losses.png"]["tri"] == _steps(train, "tri")
    assert rep.series["lr.png"]["lr"] == _steps(train, "lr")
    assert rep.series["throughput.png"]["img_per_s"] == _steps(train, "img_per_s")
    assert rep.series["throughput.png"]["data_wait_s"] == _steps(train, "data_wait_s")  # the engine logs it
    target = "smoke_b"
    assert rep.series["retrieval.png"][f"{target} mAP"] == ([0.0, 1.0, 2.0],
                                                          [100 * r["results"][target]["mAP"] for r in evals])
    assert rep.series["retrieval.png"][f"{target} R1"][1] == [100 * r["results"][target]["R1"] for r in evals]
    last = evals[-1]["results"][target]
    # evaluation records carry the whole curve (eval.max_rank points): it is drawn whole
    assert rep.series["cmc.png"][target] == ([float(r) for r in range(1, len(last["cmc"]) + 1)],
                                             [100 * c for c in last["cmc"]])


@pytest.mark.slow
def test_tmgf_run(runs: dict[str, Path]) -> None:
    run_dir = runs["tmgf"]
    rep = report(run_dir)  # the default folder, run_dir/plots
    _assert_pngs(rep.written, TMGF_FIGURES)
    assert all(p.parent == run_dir / "plots" for p in rep.written.values())
    assert not rep.skipped
    train, evals, clusters = (_records(run_dir, k) for k in ("train", "eval", "cluster"))
    assert len(clusters) == 2 and len(evals) == 3
    assert set(rep.series["losses.png"]) == {"loss", "global_off", "global_on", "part_off", "part_on"}
    assert rep.series["losses.png"]["part_on"] == _steps(train, "part_on")
    drawn = rep.series["clustering.png"]
    # re-clustering at epoch e's start: after e epochs; at evaluation after epoch e: after e + 1
    for k in ("clusters", "outliers", "true_ids", "ari", "nmi"):
        assert drawn[f"{k} (re-clustering)"] == ([float(r["epoch"]) for r in clusters],
                                                 [float(r[k]) for r in clusters]), k
        assert drawn[f"{k} (at evaluation)"] == ([r["epoch"] + 1.0 for r in evals],
                                                 [float(r["results"]["train_clustering"][k]) for r in evals]), k
    assert "train_clustering" not in {k.split()[0] for k in rep.series["retrieval.png"]}  # not a target


@pytest.mark.slow
def test_cli_prints_where_the_pictures_are(runs: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pics"
    assert main([str(runs["pat"]), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"pictures in {out}:"
    drawn = {ln.split()[0]: ln.split(maxsplit=1)[1] for ln in lines[1:]}
    assert {k: v for k, v in drawn.items() if k in PAT_FIGURES} == {k: FIGURES[k] for k in PAT_FIGURES}
    assert drawn["clustering.png"].startswith("not drawn: no clustering record")
    assert all((out / name).is_file() for name in PAT_FIGURES)


# -- hand-written records: what a smoke run does not produce ----------------------------------------
def _train_record(step: int, loss: float, **extra: Any) -> dict[str, Any]:
    return {"kind": "train", "step": step, "epoch": (step - 1) // 2, "loss": loss, "lr": 0.1, "sec": 0.5,
            "img_per_s": 64.0, "time": 0.0, **extra}


def _eval_record(epoch: int, **metrics: Any) -> dict[str, Any]:
    return {"kind": "eval", "epoch": epoch, "step": 2 * (epoch + 1),
            "results": {"b": {"mAP": 0.25, "R1": 0.5, "R5": 0.75, "R10": 0.875, **metrics}}}


def _write(run_dir: Path, records: list[dict[str, Any]], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / METRICS
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_run_still_going_skips_the_line_being_written(tmp_path: Path) -> None:
    records = [_train_record(1, 3.0, tri=1.0), _train_record(2, 2.0, tri=0.5)]
    cut = json.dumps(_train_record(3, 1.0, tri=0.25))[:37]  # rank 0 is writing step 3
    _write(tmp_path / "run", records, tail=cut)
    rep = report(tmp_path / "run")
    assert rep.series["losses.png"]["loss"] == ([1.0, 2.0], [3.0, 2.0])
    assert not rep.notes  # a last line being written is expected, not worth a note
    # no evaluation or clustering yet: those figures are skipped, saying why
    assert set(rep.written) == {"losses.png", "lr.png", "throughput.png"}
    assert rep.skipped["retrieval.png"] == rep.skipped["cmc.png"] == "no evaluation record yet"


def test_a_cut_line_inside_the_file_is_skipped_and_said(tmp_path: Path) -> None:
    """A killed job can leave a cut line that the resumed job's records follow."""
    path = tmp_path / METRICS
    whole = json.dumps(_train_record(1, 3.0))
    path.write_text(whole + "\n" + whole[:20] + json.dumps(_train_record(2, 2.0)) + "\n"
                    + json.dumps(_train_record(3, 1.0)) + "\n")
    notes: list[str] = []
    assert [r["step"] for r in read_records(path, notes)] == [1, 3]
    assert len(notes) == 1 and "line 2" in notes[0] and str(path) in notes[0]


def test_resumed_run_draws_the_records_it_continued_from(tmp_path: Path) -> None:
    records = [_train_record(1, 4.0), _train_record(2, 3.0), _train_record(3, 2.0),
               _eval_record(0, mAP=0.1), _eval_record(1, mAP=0.2),
               {"kind": "resume", "step": 2, "epoch": 1, "step_in_epoch": 0},
               _train_record(3, 1.5), _train_record(4, 1.0), _eval_record(1, mAP=0.3)]
    _write(tmp_path / "run", records)
    rep = report(tmp_path / "run")
    assert rep.series["losses.png"]["loss"] == ([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 1.5, 1.0])
    assert rep.series["retrieval.png"]["b mAP"] == ([1.0, 2.0], [10.0, 30.0])
    assert rep.series["cmc.png"]["b"][1] == [50.0, 75.0, 87.5]


def test_full_cmc_data_wait_and_non_finite_values_are_drawn(tmp_path: Path) -> None:
    cmc = [0.5, 0.625, 0.75, 1.0]
    records = [_train_record(1, float("nan"), data_wait_s=0.125), _train_record(2, 2.0, data_wait_s=0.25),
               _eval_record(0, cmc=cmc)]
    _write(tmp_path / "run", records)
    rep = report(tmp_path / "run")
    assert rep.series["cmc.png"]["b"] == ([1.0, 2.0, 3.0, 4.0], [100 * c for c in cmc])
    assert rep.series["throughput.png"]["data_wait_s"] == ([1.0, 2.0], [0.125, 0.25])
    loss = rep.series["losses.png"]["loss"][1]  # json writes NaN; the report draws a gap, not a crash
    assert math.isnan(loss[0]) and loss[1] == 2.0


def test_long_run_draws_running_means(tmp_path: Path) -> None:
    """Over SMOOTH_FROM steps each per-step line gets its running mean (a NaN step included)."""
    from trainer.report import SMOOTH_FROM

    n = SMOOTH_FROM + 50
    records = [_train_record(s, float("nan") if s == 7 else 10.0 / s, acc=s / n) for s in range(1, n + 1)]
    _write(tmp_path / "run", records)
    rep = report(tmp_path / "run")
    assert {"losses.png", "throughput.png"} <= set(rep.written)
    assert rep.series["losses.png"]["acc"][1] == [s / n for s in range(1, n + 1)]  # the raw values, as logged


def test_clustering_without_agreement_fields_says_so(tmp_path: Path) -> None:
    """On real data a run may log no ari/nmi: the figure draws counts only, nothing is made up."""
    records = [_train_record(1, 1.0), {"kind": "cluster", "epoch": 0, "clusters": 10, "outliers": 3}]
    _write(tmp_path / "run", records)
    rep = report(tmp_path / "run")
    assert set(rep.series["clustering.png"]) == {"clusters (re-clustering)", "outliers (re-clustering)"}


def test_report_loads_no_torch() -> None:
    """No model needed: it runs on a login node or a laptop with the metrics file alone."""
    probe = "import sys, trainer.report; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
