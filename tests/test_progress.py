"""The launcher's live progress (``--wait``, ``submit_and_wait``): rank 0's metrics.jsonl followed as the job
appends to it, a bar on a terminal, plain lines elsewhere, each evaluation's table as it ends."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from launch.progress import Follower, RunState, duration, offset

REPO = Path(__file__).resolve().parents[1]


def _train(step: int, epoch: int, total: int = 16, sec: float = 0.5, **kw: Any) -> dict[str, Any]:
    return {"kind": "train", "step": step, "epoch": epoch, "loss": 8.0 / step, "lr": 0.01, "sec": sec,
            "img_per_s": 64.0, "progress": step / total, "eta_s": 999, "mfu": 0.0125, "data_wait_ratio": 0.25,
            "id": 1.0, **kw}


def _eval(epoch: int, step: int, seconds: float = 3.0) -> dict[str, Any]:
    return {"kind": "eval", "epoch": epoch, "step": step, "seconds": seconds, "results": {
        "smoke_b": {"mAP": 0.125, "R1": 0.5, "R5": 0.75, "R10": 0.875, "mINP": 0.0625, "cmc": [0.5, 0.75]}}}


RECORDED = [  # a run of 4 epochs x 4 steps, evaluated every 2 epochs (pat_smoke's schedule)
    {"kind": "metrics_server", "url": "http://127.0.0.1:1/metrics", "urls": ["http://127.0.0.1:1/metrics",
                                                                           "http://127.0.0.1:2/metrics"]},
    *[_train(s, 0) for s in range(1, 5)],
    {"kind": "checkpoint", "step": 4, "path": "x"},
    *[_train(s, 1) for s in range(5, 9)],
    _eval(1, 8),
    *[_train(s, 2) for s in range(9, 13)],
    *[_train(s, 3) for s in range(13, 17)],
    _eval(3, 16),
    {"kind": "end", "status": "finished", "step": 16},
]


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _append(path: Path, records: list[dict[str, Any]], tail: str = "") -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_eta_counts_steps_evaluations_and_reclusterings() -> None:
    state = RunState(epochs=4, eval_period=2)
    for r in RECORDED[1:5]:
        state.update(r)
    # 12 steps at 0.5 s; the 2 evaluations to come (after epochs 2 and 4) have not been timed yet
    assert state.eta() == (6.0, True)
    assert "epoch 1/4 step 4/16 25% loss 2 64 img/s MFU 1.2% data wait 25% ETA 6s + eval" == state.describe()
    for r in RECORDED[5:11]:
        state.update(r)  # through step 8, the last of epoch 2, and the evaluation after it (3 s)
    assert state.eta() == (8 * 0.5 + 1 * 3.0, False)  # one evaluation left, after epoch 4
    state.update({"kind": "cluster", "epoch": 2, "clusters": 9, "extract_s": 1.5, "cluster_s": 0.5})
    assert state.eta() == (8 * 0.5 + 3.0 + 1 * 2.0, False)  # the one before epoch 3 is done, epoch 4's to come
    assert RunState().eta() is None  # nothing trained yet


def test_without_the_schedule_the_engine_eta_is_shown() -> None:
    state = RunState()
    state.update(_train(3, 0))
    assert state.eta() == (999.0, False)


def test_plain_lines_every_n_seconds_and_each_evaluation(tmp_path: Path) -> None:
    path, out, clock = tmp_path / "metrics.jsonl", io.StringIO(), _Clock()
    _append(path, [{"kind": "train", "step": 99, "epoch": 9}])  # an earlier job's records
    follower = Follower(path, out=out, tty=False, every_s=30, epochs=4, eval_period=2, start=offset(tmp_path),
                        clock=clock)
    follower.poll()
    assert out.getvalue() == ""  # the file has nothing new
    for i, record in enumerate(RECORDED):
        clock.t = 10.0 * i  # a record every 10 s: a progress line every third record at most
        _append(path, [record])
        follower.poll()
    follower.close()
    lines = out.getvalue().splitlines()
    progress = [line for line in lines if line.startswith("[progress]")]
    assert lines[0] == "metrics: http://127.0.0.1:1/metrics http://127.0.0.1:2/metrics"
    assert progress[0] == "[progress] epoch 1/4 step 1/16 6% loss 8 64 img/s MFU 1.2% data wait 25% ETA 8s + eval"
    # records 1, 4, 7 (step 6), 10 (the evaluation: no line), 11 (step 9), ... 30 s apart; the last at the end
    assert [int(re.findall(r"step (\d+)/", p)[0]) for p in progress] == [1, 4, 6, 9, 12, 15, 16]
    table = lines.index("evaluation after epoch 2 (step 8, 3.0 s):")
    assert lines[table + 1:table + 4] == [
        "| target  | mAP  | R1   | R5   | R10  | mINP |",
        "|---------|------|------|------|------|------|",
        "| smoke_b | 12.5 | 50.0 | 75.0 | 87.5 | 6.2  |"]
    assert lines[table + 4] == "[progress] epoch 3/4 step 9/16 56% loss 0.8889 64 img/s MFU 1.2% data wait 25% ETA 6s"
    assert lines[-3:] == ["| smoke_b | 12.5 | 50.0 | 75.0 | 87.5 | 6.2  |",
                          "[progress] epoch 4/4 step 16/16 100% loss 0.5 64 img/s MFU 1.2% data wait 25% ETA 0s",
                          "finished at step 16"]
    assert not any("\r" in line or "\x1b" in line for line in lines)  # plain text for logs


def test_bar_on_a_terminal(tmp_path: Path) -> None:
    path, out = tmp_path / "metrics.jsonl", io.StringIO()
    follower = Follower(path, out=out, tty=True, epochs=4, eval_period=2)
    _append(path, RECORDED[:9])
    follower.poll()  # through step 7: one bar for the records read together
    bar = "\r\x1b[2K"
    assert out.getvalue() == ("metrics: http://127.0.0.1:1/metrics http://127.0.0.1:2/metrics\n"
                              f"{bar}epoch 2/4 step 7/16 44% loss 1.143 64 img/s MFU 1.2% data wait 25% ETA 4s + eval")
    seen = len(out.getvalue())
    _append(path, RECORDED[9:12])
    follower.poll()  # step 8, its evaluation, step 9: the table clears the bar, which is drawn again below it
    assert out.getvalue()[seen:] == (
        f"{bar}evaluation after epoch 2 (step 8, 3.0 s):\n"
        "| target  | mAP  | R1   | R5   | R10  | mINP |\n"
        "|---------|------|------|------|------|------|\n"
        "| smoke_b | 12.5 | 50.0 | 75.0 | 87.5 | 6.2  |\n"
        f"{bar}epoch 3/4 step 9/16 56% loss 0.8889 64 img/s MFU 1.2% data wait 25% ETA 6s")
    _append(path, RECORDED[12:])
    follower.poll()
    follower.close()
    assert out.getvalue().endswith(  # the last figures stay on screen above the run's last line
        f" 6.2  |\n{bar}epoch 4/4 step 16/16 100% loss 0.5 64 img/s MFU 1.2% data wait 25% ETA 0s\n"
        "finished at step 16\n")
    assert "[progress]" not in out.getvalue()


def test_a_line_being_written_is_read_when_complete(tmp_path: Path) -> None:
    path, out = tmp_path / "metrics.jsonl", io.StringIO()
    follower = Follower(path, out=out, tty=False, every_s=0)
    line = json.dumps(_eval(1, 8))
    _append(path, [], tail=line[:20])
    follower.poll()
    assert out.getvalue() == ""
    _append(path, [], tail=line[20:] + "\nnot json\n")  # a cut line of a killed job is skipped
    follower.poll()
    assert out.getvalue().startswith("evaluation after epoch 2 (step 8, 3.0 s):\n")


def test_follow_reads_to_the_end_once_the_job_is_done(tmp_path: Path) -> None:
    path, out = tmp_path / "metrics.jsonl", io.StringIO()
    follower = Follower(path, out=out, tty=False, every_s=3600)  # no schedule: the engine's ETA
    chunks = [RECORDED[1:3], RECORDED[3:]]

    def done() -> bool:  # the job appends between two polls, then ends: the follower reads the rest
        if chunks:
            _append(path, chunks.pop(0))
        return not chunks

    follower.follow(done, poll_s=0)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[progress] epoch 1 step 2/16 12% loss 4 64 img/s MFU 1.2% data wait 25% ETA 16m39s"
    assert lines[-2:] == ["[progress] epoch 4 step 16/16 100% loss 0.5 64 img/s MFU 1.2% data wait 25% ETA 16m39s",
                          "finished at step 16"]


def test_durations() -> None:
    assert [duration(s) for s in (0, 42.4, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]


@pytest.mark.slow
def test_launcher_wait_shows_progress_and_the_evaluation(tmp_path: Path) -> None:
    """``--cluster local --wait`` off a terminal: progress lines and the evaluation table on stdout (the
    demo takes the same path through ``submit_and_wait``)."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "slurm.py"), "--cluster", "local",
                           "--tasks-per-node", "2", "--time", "20", "--wait", "--progress-every", "0.01",
                           "exp=pat_smoke", "train.epochs=2", f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=400, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # the follower polls metrics.jsonl: which steps of epoch 1 it catches depends on the machine's pace
    assert re.search(r"\[progress\] epoch 1/2 step [1-4]/8 \d+%", out), out
    assert "[progress] epoch 2/2 step 8/8 100%" in out, out
    assert "evaluation after epoch 2 (step 8," in out and "| smoke_b |" in out, out
    assert re.search(r"finished at step 8\njob \d+: finished at step 8", out), out
