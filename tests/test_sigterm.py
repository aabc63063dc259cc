"""SIGTERM — what scancel, SLURM preemption with a grace time and torchrun itself send — stops a
2-rank run the way USR2 does: the ranks agree at the next step boundary, write ONE checkpoint and exit;
``train.resume=auto`` then ends bit-identical to a run that was never interrupted.

What a user does is reproduced: ``torchrun --nproc_per_node 2 -m trainer.train …`` gets SIGTERM (torchrun
forwards it to its workers' process groups, so each rank's DataLoader worker gets it too: the run uses
one, which must survive it — ``trainer.data.loader.survive_foreign_sigterm``). The signal is sent once
metrics.jsonl shows a step, so it always lands mid-run whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.config import compose
from trainer.data.prepare import ensure_datasets
from trainer.engine.checkpoint import list_checkpoints, step_dir_name

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, STEPS_PER_EPOCH = 3, 4  # pat_smoke: 32 training ids, 8 per batch
SIGNAL_AT_STEP = 2


def _command(cache: Path, run_dir: Path) -> list[str]:
    # no periodic checkpoints: the stop's checkpoint is the only one a cut run can have
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "trainer.train", "exp=pat_smoke", f"run_dir={run_dir}", f"data.cache_dir={cache}",
            "data.num_workers=1", f"train.epochs={EPOCHS}", "train.ckpt_every_steps=0",
            "train.ckpt_every_epochs=100", "eval.period=100", "train.log_every=1"]


class Run:
    """One torchrun launch; its output goes to files (a pipe left unread could stall it)."""

    def __init__(self, cache: Path, run_dir: Path, tag: str) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.out, self.err = run_dir.parent / f"{tag}.out", run_dir.parent / f"{tag}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(_command(cache, run_dir), cwd=ROOT, env=env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, text=True, start_new_session=True)

    def finish(self, timeout: float = 300) -> tuple[str, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        return self.out.read_text(), self.err.read_text()


def _records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip().endswith("}")]
    return [r for r in lines if r["kind"] == kind]


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_once_and_resumes_bit_identically(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ensure_datasets(compose(["exp=pat_smoke", f"data.cache_dir={cache}"]).data)  # once, before the ranks
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = Run(cache, full_dir, "full")  # the uninterrupted reference, meanwhile
    cut = Run(cache, cut_dir, "cut")
    deadline = time.time() + 300
    while not any(r["step"] >= SIGNAL_AT_STEP for r in _records(cut_dir, "train")):
        assert cut.proc.poll() is None, f"the run ended before the signal:\n{cut.err.read_text()[-3000:]}"
        assert time.time() < deadline, "no training step within 300 s"
        time.sleep(0.05)
    cut.proc.send_signal(signal.SIGTERM)  # to torchrun, as scancel / a preemption / a Ctrl-C'd shell would
    out, err = cut.finish()
    shown = f"stdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"

    # one checkpoint, at the step where both ranks stopped, before the end
    saved = _records(cut_dir, "checkpoint")
    steps = [r["step"] for r in _records(cut_dir, "train")]
    assert len(saved) == 1, (saved, shown)
    stop = saved[0]["step"]
    assert stop == max(steps) and SIGNAL_AT_STEP <= stop < EPOCHS * STEPS_PER_EPOCH, (stop, steps)
    assert [p.name for p in list_checkpoints(cut_dir / "checkpoints")] == [step_dir_name(stop)]
    ckpt = cut_dir / "checkpoints" / step_dir_name(stop)
    assert {p.name for p in ckpt.iterdir()} == {"state.pt", "meta.json", "rng_rank0.pt", "rng_rank1.pt"}
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["global_step"] == stop and state["world_size"] == 2
    assert state["epoch"] * STEPS_PER_EPOCH + state["step_in_epoch"] == stop
    assert not (cut_dir / "model_final.safetensors").exists() and not _records(cut_dir, "end")
    # clean exit: rank 0 returned from the run, no rank was killed after torchrun's grace time, and
    # the only traceback is torchrun's own report of the signal it got (it exits 1 on SIGTERM)
    assert f"stopped at step {stop}" in out, shown
    assert "forcefully exiting" not in err, shown
    assert err.count("Traceback (most recent call last)") == err.count("SignalException: Process") == 1, shown

    out, err = Run(cache, cut_dir, "resumed").finish()  # train.resume=auto (the default): on to the end
    assert f"finished at step {EPOCHS * STEPS_PER_EPOCH}" in out, f"stdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    assert [r["step"] for r in _records(cut_dir, "resume")] == [stop]
    _, err = full.finish()
    assert full.proc.returncode == 0, err[-3000:]
    a = (full_dir / "model_final.safetensors").read_bytes()
    b = (cut_dir / "model_final.safetensors").read_bytes()
    assert a == b  # bit-identical: same world size, same global batches, RNG states restored
