"""DeepSpeed ZeRO beside DDP, end to end through the launcher on local processes (gloo, DeepSpeed's
CPU accelerator): the same runs, the same weights; exact resume; resume at another world size and
under the other strategy.

Tolerance of the DDP-vs-ZeRO weight comparisons (fp32): the two strategies run the same kernels on
the same slices; they differ only in how the per-rank gradients are summed (DDP's bucketed
all-reduce vs ZeRO's reduction into each owner's partition), which can reorder a sum of 2 terms per
element and step. That is <= 1 ulp per element per step, ~1e-7 relative after 8 steps; rtol 1e-5 /
atol 1e-6 sits two orders above it and far below what a wrong partition, a skipped clip or a lost
optimizer state does (>= 1e-3 of the weights after one step at these learning rates).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _launch(run_dir: Path, tasks: int, *overrides: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "slurm.py"), "--cluster", "local",
                           "--tasks-per-node", str(tasks), "--time", "20", "--wait", f"run_dir={run_dir}",
                           *overrides], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model_final.safetensors"))


def _records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def _assert_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **({"rtol": 0, "atol": 0} if exact else TOL), msg=k)


RUNS = {
    "pat": ["exp=pat_smoke", "train.epochs=2"],  # 8 steps, checkpoints every 2, evaluation at the end
    "tmgf": ["exp=tmgf_smoke", "train.epochs=2"],  # 12 steps, re-clustering at both epoch starts
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ds")
    out: dict[str, Path] = {}
    for name, exp in RUNS.items():
        for strategy, stage in (("ddp", 2), ("deepspeed", 2), ("deepspeed", 1)):
            key = f"{name}/{strategy}" if stage == 2 else f"{name}/zero1"
            out[key] = root / key.replace("/", "_")
            _launch(out[key], 2, *exp, f"train.strategy={strategy}", f"train.zero_stage={stage}")
    return out


@pytest.mark.parametrize("name", sorted(RUNS))
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_on_two_ranks_trains_as_ddp(name: str, stage: int, runs: dict[str, Path]) -> None:
    ddp, zero = runs[f"{name}/ddp"], runs[f"{name}/deepspeed" if stage == 2 else f"{name}/zero1"]
    _assert_weights(_weights(zero), _weights(ddp))
    assert _records(zero, "eval") and _records(zero, "end")[0]["status"] == "finished"
    losses = [(a["loss"], b["loss"]) for a, b in zip(_records(ddp, "train"), _records(zero, "train"))]
    assert len(losses) == len(_records(ddp, "train")) > 0
    for a, b in losses:
        assert abs(a - b) <= 1e-5 * abs(a) + 1e-6
    ds_json = json.loads((zero / "deepspeed.json").read_text())  # the resolved DeepSpeed config, recorded
    assert ds_json["zero_optimization"]["stage"] == stage and ds_json["gradient_clipping"] == 0.0
    assert ds_json["train_micro_batch_size_per_gpu"] * 2 == ds_json["train_batch_size"]
    assert not (ddp / "deepspeed.json").exists()


def test_zero_resumes_mid_epoch_exactly(runs: dict[str, Path], tmp_path: Path) -> None:
    """Stopped after step 3 (mid-epoch, between checkpoints: the stop writes one) and resumed at the same
    world size: the weights of the uninterrupted run, bit for bit (the state moves by copies only)."""
    run_dir = tmp_path / "resumed"
    exp = [*RUNS["pat"], "train.strategy=deepspeed", "train.zero_stage=2"]
    _launch(run_dir, 2, *exp, "train.max_steps=3")
    assert not (run_dir / "model_final.safetensors").exists()
    _launch(run_dir, 2, *exp)
    assert _records(run_dir, "resume")[0]["step"] == 3
    _assert_weights(_weights(run_dir), _weights(runs["pat/deepspeed"]), exact=True)


@pytest.mark.parametrize("saved,world,strategy", [("ddp", 1, "ddp"), ("ddp", 4, "deepspeed"),
                                                  ("deepspeed", 1, "deepspeed"), ("deepspeed", 4, "ddp")])
def test_a_two_rank_checkpoint_resumes_at_one_and_four_ranks(saved: str, world: int, strategy: str,
                                                             runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = runs[f"pat/{saved}"] / "checkpoints" / "step_000000006"
    run_dir = tmp_path / "elastic"
    _launch(run_dir, world, *RUNS["pat"], f"train.strategy={strategy}", f"train.resume={ckpt}")
    assert _records(run_dir, "end")[0]["status"] == "finished" and _records(run_dir, "eval")
    changed = _records(run_dir, "world_size_changed")
    assert changed and changed[0]["saved_world_size"] == 2 and changed[0]["world_size"] == world
    assert bool(_records(run_dir, "strategy_changed")) == (saved != strategy)
    # it went on from step 6 (not from scratch): the two steps left, then the final evaluation
    assert [r["step"] for r in _records(run_dir, "train")] == [7, 8]
