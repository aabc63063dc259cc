"""Resuming a run directory with another training config is refused with one line naming the keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, compose
from trainer.train import check_resume_config, write_run_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(run_dir: Path, *extra: str):
    return compose(["exp=tmgf_demo", f"run_dir={run_dir}", *extra])


def _with_checkpoint(run_dir: Path, *extra: str) -> None:
    write_run_config(_cfg(run_dir, *extra))
    step = run_dir / "checkpoints" / "step_000000004"
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(b"")  # complete = has state.pt (contents not read by the check)


def test_changed_training_config_is_refused_naming_old_and_new(tmp_path: Path) -> None:
    _with_checkpoint(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_resume_config(_cfg(tmp_path, "model.tmgf_stem=ibn", "tmgf.k1=20"))
    msg = str(err.value)
    assert "\n" not in msg and f"run_dir={tmp_path} holds checkpoints of another config" in msg
    assert "model.tmgf_stem ('patch' -> 'ibn')" in msg and "tmgf.k1 (10 -> 20)" in msg


def test_what_may_change_on_resume_passes(tmp_path: Path) -> None:
    _with_checkpoint(tmp_path)
    check_resume_config(_cfg(tmp_path))  # the same config
    check_resume_config(_cfg(tmp_path, "train.epochs=30", "eval.period=1", "data.num_workers=4", "train.max_steps=9",
                             "train.metrics_port=0", "train.log_every=1"))
    check_resume_config(_cfg(tmp_path, "tmgf.k1=20", "train.resume=never"))  # starting over is explicit


def test_no_checkpoint_means_nothing_to_protect(tmp_path: Path) -> None:
    write_run_config(_cfg(tmp_path))
    check_resume_config(_cfg(tmp_path, "tmgf.k1=20"))  # a config.yaml alone (a run that never checkpointed)


def test_cli_and_launcher_exit_with_the_one_line_error(tmp_path: Path) -> None:
    _with_checkpoint(tmp_path)
    for cmd in ([sys.executable, "-m", "trainer.train"],
                [sys.executable, str(ROOT / "launch" / "slurm.py"), "--cluster", "local", "--dry-run"]):
        proc = subprocess.run([*cmd, "exp=tmgf_demo", f"run_dir={tmp_path}", "tmgf.k1=20"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]  # "<program>: error: …"
        assert f"error: run_dir={tmp_path} holds checkpoints" in line, proc.stderr
