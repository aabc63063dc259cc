"""Engine: exact resume, world=2 equals world=1, checkpoint atomicity, schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.mp import run_distributed
from trainer import dist
from trainer.config import EvalConfig, OptimConfig, TrainConfig
from trainer.engine.checkpoint import list_checkpoints, save_checkpoint
from trainer.engine.loop import Engine
from trainer.engine.method import Method, StepResult
from trainer.engine.optim import EpochLR, build_optimizer, param_groups

N, DIM, CLASSES, GLOBAL_BATCH, STEPS = 48, 8, 4, 8, 4


class ToyMethod(Method):
    """Linear classifier with dropout (consumes RNG) and a running-mean 'bank' (method state)."""

    def __init__(self, dropout: float = 0.2) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, DIM, generator=g)
        self.y = torch.randint(0, CLASSES, (N,), generator=g)
        self.bank = torch.zeros(N, CLASSES)
        self.dropout = dropout

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Dropout(self.dropout), nn.Linear(DIM, CLASSES))

    def steps_per_epoch(self) -> int:
        return STEPS

    def train_batches(self, epoch: int, start_step: int):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(1000 + epoch))
        w, r = dist.get_world_size(), dist.get_rank()
        local = GLOBAL_BATCH // w
        for s in range(start_step, STEPS):
            idx = perm[s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH][r * local:(r + 1) * local]
            yield {"img": self.x[idx], "pid": self.y[idx], "index": idx}

    def training_step(self, model, batch):
        logits = model(batch["img"])
        loss = nn.functional.cross_entropy(logits, batch["pid"])
        return StepResult(loss, {"ce": float(loss.detach())}, {"logits": logits.detach()})

    def after_optimizer_step(self, model, batch, result):
        idx = dist.all_gather(batch["index"])
        logits = dist.all_gather(result.extras["logits"])
        self.bank[idx] = 0.5 * self.bank[idx] + 0.5 * logits

    def evaluate(self, model):
        with torch.no_grad():
            acc = (model(self.x).argmax(1) == self.y).float().mean().item()
        return {"toy": {"mAP": acc, "R1": acc}}

    def state_dict(self):
        return {"bank": self.bank.clone()}

    def load_state_dict(self, state):
        self.bank.copy_(state["bank"])


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, seed=7, optim=OptimConfig(lr=0.1, warmup_epochs=1), ckpt_every_steps=3, log_every=100)
    base.update(kw)
    return TrainConfig(**base)


def _fit(run_dir: Path, dropout: float = 0.2, **kw):
    method = ToyMethod(dropout)
    result = Engine(method, _cfg(**kw), EvalConfig(period=1), run_dir).fit()
    return result, method


def test_resume_mid_epoch_is_bit_identical(tmp_path: Path) -> None:
    full, _ = _fit(tmp_path / "full")
    assert full.status == "finished" and full.global_step == 3 * STEPS
    part, _ = _fit(tmp_path / "cut", max_steps=6)  # mid-epoch 1 (steps 4..7)
    assert part.status == "max_steps"
    ck = list_checkpoints(tmp_path / "cut" / "checkpoints")
    assert ck[-1].name.endswith("6")
    resumed, _ = _fit(tmp_path / "cut", resume="auto")
    assert resumed.status == "finished"
    a = (tmp_path / "full" / "model_final.safetensors").read_bytes()
    b = (tmp_path / "cut" / "model_final.safetensors").read_bytes()
    assert a == b
    log = (tmp_path / "cut" / "metrics.jsonl").read_text()
    assert '"kind": "resume"' in log and '"step_in_epoch": 2' in log


def test_resume_at_epoch_boundary_and_keep(tmp_path: Path) -> None:
    full, _ = _fit(tmp_path / "full", keep_checkpoints=0)
    _fit(tmp_path / "cut", max_steps=STEPS, ckpt_every_steps=0)
    _fit(tmp_path / "cut", resume="auto", ckpt_every_steps=0)
    assert (tmp_path / "full" / "model_final.safetensors").read_bytes() == \
        (tmp_path / "cut" / "model_final.safetensors").read_bytes()
    assert len(list_checkpoints(tmp_path / "full" / "checkpoints")) >= 4


def test_interrupted_save_leaves_no_complete_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "step_000000009.tmp").mkdir()  # what a crash mid-save leaves behind
    assert list_checkpoints(tmp_path) == []
    save_checkpoint(tmp_path, 10, {"x": torch.ones(1)})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000010"]


def _ddp_body(rank: int, world_size: int, run_dir: str):
    result, method = _fit(Path(run_dir), dropout=0.0, epochs=2)
    return {"bank": method.bank, "last": result.last}


def test_ddp_world2_equals_world1(tmp_path: Path) -> None:
    one = _ddp_body(0, 1, str(tmp_path / "w1"))
    two = run_distributed(_ddp_body, 2, str(tmp_path / "w2"))
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "w1" / "model_final.safetensors"))
    w2 = load_file(str(tmp_path / "w2" / "model_final.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(two[0]["bank"], two[1]["bank"], atol=0, rtol=0)
    torch.testing.assert_close(one["bank"], two[0]["bank"], atol=1e-6, rtol=1e-5)


def test_cosine_schedule_matches_official_formula() -> None:
    cfg = OptimConfig(lr=1e-3)
    opt = build_optimizer(param_groups(nn.Linear(2, 2), cfg), cfg)
    sched = EpochLR(opt, cfg)
    B = 1e-3
    for e0 in range(60):
        sched.set_epoch(e0)
        e = e0 + 1
        for g, v in zip(opt.param_groups, (B, 2 * B)):
            want = 0.01 * B + e * (v - 0.01 * B) / 5 if e < 5 else \
                0.002 * B + 0.5 * (v - 0.002 * B) * (1 + math.cos(math.pi * e / 120))
            assert g["lr"] == pytest.approx(want, rel=1e-12)


def test_multistep_schedule() -> None:
    cfg = OptimConfig(lr=3.5e-4, schedule="multistep", warmup_epochs=10, bias_lr_factor=1.0)
    opt = build_optimizer(param_groups(nn.Linear(2, 2), cfg), cfg)
    sched = EpochLR(opt, cfg)
    for e, want in [(0, 3.5e-6), (9, 3.1535e-4), (10, 3.5e-4), (20, 3.5e-5), (45, 3.5e-6)]:
        sched.set_epoch(e)
        assert opt.param_groups[0]["lr"] == pytest.approx(want)


def test_train_records_carry_progress_and_eta(tmp_path: Path) -> None:
    records: list[dict] = []

    class ListSink:
        def log(self, record: dict) -> None:
            records.append(record)

        def close(self) -> None:
            pass

    Engine(ToyMethod(), _cfg(epochs=2), EvalConfig(period=1), tmp_path, sinks=[ListSink()]).fit()
    train = [r for r in records if r["kind"] == "train"]
    assert [r["progress"] for r in train] == [round((i + 1) / (2 * STEPS), 4) for i in range(2 * STEPS)]
    assert all(r["eta_s"] >= 0 for r in train) and train[-1]["eta_s"] == 0


# -- checkpoint format and user errors agreed by every rank ----------------------------------------


def test_checkpoint_records_its_format_and_an_incompatible_one_is_refused(tmp_path: Path) -> None:
    import json

    from shards.errors import UserError
    from trainer.engine.checkpoint import FORMAT_VERSION, META, CheckpointError, check_checkpoint
    from trainer.engine.loop import STATE_KEYS

    ckpt = save_checkpoint(tmp_path, 4, {k: torch.zeros(1) for k in STATE_KEYS})
    meta = json.loads((ckpt / META).read_text())
    assert meta == {"format_version": FORMAT_VERSION, "step": 4, "world_size": 1, "epoch": 0, "step_in_epoch": 0,
                    "keys": sorted(STATE_KEYS)}  # the position too: resume checks read it without state.pt
    assert check_checkpoint(ckpt, STATE_KEYS) == meta
    assert issubclass(CheckpointError, UserError)

    def refused(match: str) -> None:
        with pytest.raises(CheckpointError) as err:
            check_checkpoint(ckpt, STATE_KEYS)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(str(ckpt)) and match in msg
        assert msg.endswith("pass train.resume=never to start over, or another run_dir")

    (ckpt / META).write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    refused(f"a checkpoint of format {FORMAT_VERSION + 1}")
    (ckpt / META).write_text(json.dumps({**meta, "keys": ["model", "epoch"]}))
    refused("state.pt lacks optimizer, strategy, method, step_in_epoch, global_step")
    (ckpt / META).write_text(json.dumps({**meta, "world_size": 2}))  # saved by 2 ranks: rank 1's RNG is gone
    refused("incomplete checkpoint, missing rng_rank1.pt")
    (ckpt / META).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta.json: unreadable checkpoint metadata"):
        check_checkpoint(ckpt, STATE_KEYS)
    (ckpt / META).unlink()  # what checkpoints written before formats were versioned look like
    refused("a checkpoint of format 1 (no meta.json")


def test_engine_refuses_an_incompatible_checkpoint_before_loading_it(tmp_path: Path) -> None:
    from trainer.engine.checkpoint import META, CheckpointError

    _fit(tmp_path, max_steps=2)
    (list_checkpoints(tmp_path / "checkpoints")[-1] / META).unlink()
    with pytest.raises(CheckpointError, match="step_000000002: a checkpoint of format 1"):
        _fit(tmp_path, resume="auto")
    _fit(tmp_path, resume="never")  # the fix the message names works


def _agreement_body(rank: int, world_size: int, run_dir: str, busy_port: int) -> dict[str, str]:
    from shards.errors import UserError
    from trainer.config import compose
    from trainer.engine.loop import agreed
    from trainer.train import run

    out: dict[str, str] = {}

    def only_rank_1() -> None:
        if rank == 1:
            raise UserError("rank 1 alone saw this")

    try:
        agreed(only_rank_1)
    except UserError as exc:
        out["agreed"] = str(exc)
    try:  # a rank whose port is busy must stop every rank: none may go on into the run
        run(compose(["exp=pat_smoke", f"run_dir={run_dir}", f"train.metrics_port={busy_port}"]))
    except UserError as exc:
        out["run"] = str(exc)
    return out


def test_a_user_error_seen_by_one_rank_stops_every_rank_with_the_same_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = run_distributed(_agreement_body, 2, str(tmp_path / "run"), port)
    assert out[0] == out[1]
    assert out[0]["agreed"] == "rank 1 alone saw this"
    assert out[0]["run"].startswith(f"train.metrics_port={port}: cannot serve metrics")
    assert not (tmp_path / "run").exists()  # refused before anything was written
