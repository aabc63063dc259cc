"""One owner per fact: the sampler's cursor is the training position, one gather of the global batch
per PAT step, the bank written by the method's memory hook (never by a loss), datasets made by the
run and not by a method."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.mp import run_distributed
from trainer.config import EvalConfig, PATConfig, TrainConfig, compose
from trainer.data.prepare import ensure_datasets
from trainer.data.samplers import PKSampler
from trainer.engine.loop import Engine
from trainer.engine.method import Method, StepResult
from trainer.losses import pat_total
from trainer.memory import PartMemoryBank, gather_batch


@pytest.fixture(scope="module")
def smoke_cache() -> str:
    """The shared cache of the smoke datasets (made once, reused by every later run)."""
    cfg = compose(["exp=pat_smoke"])
    ensure_datasets(cfg.data)
    return str(Path(cfg.data.cache_dir).absolute())


def _pat(cache: str, *extra: str, fill: bool = True) -> tuple[Any, nn.Module]:
    from trainer.methods.pat import PATMethod

    cfg = compose(["exp=pat_smoke", f"data.cache_dir={cache}", "data.num_workers=0", "model.drop_path_rate=0.0",
                   *extra])
    method = PATMethod(cfg)
    torch.manual_seed(0)
    model = method.build_model()
    if fill:  # the bank's init pass
        method.on_fit_start(model, resumed=False)
    model.train()
    return method, model


def _bank_state(bank: PartMemoryBank) -> dict[str, torch.Tensor]:
    return {k: getattr(bank, k).clone() for k in ("feats", "filled", "labels", "write_order")}


# -- the bank: read by the loss, written by the method ------------------------------------------------
def test_pat_total_reads_the_bank_and_never_writes_it() -> None:
    g = torch.Generator().manual_seed(3)
    n, parts, dim, c, b = 16, 3, 4, 4, 8
    bank = PartMemoryBank(n, parts, dim, device="cpu")
    bank.update(torch.arange(12), torch.randn(12, parts, dim, generator=g))  # rows 12..15 never written
    bank.set_labels(torch.randint(0, c, (n,), generator=g))
    before = _bank_state(bank)
    idx = torch.tensor([0, 3, 12, 13, 5, 6, 14, 1])  # unwritten rows among them: a write would fill them
    out = pat_total(torch.randn(b, c, generator=g), torch.randn(b, dim, generator=g),
                    torch.randn(b, parts, dim, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), idx, bank,
                    PATConfig(csl_k=3))
    assert torch.isfinite(out.total)
    after = _bank_state(bank)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_memory_hook_writes_before_the_loss_or_after_the_optimizer_step(smoke_cache: str) -> None:
    """Default (the official order): the step's write is in the bank when the loss reads it.
    ``pat.update_before_loss=false``: the loss reads the untouched bank and the method's
    ``after_optimizer_step`` makes the same write (same features: the bank ends equal)."""
    first, model = _pat(smoke_cache)
    batch = next(iter(first.train_batches(0, 0)))
    start = _bank_state(first.bank)
    first.training_step(model, batch)
    official = _bank_state(first.bank)
    assert not torch.equal(official["feats"], start["feats"])  # written inside the step, before the loss

    later, model = _pat(smoke_cache, "pat.update_before_loss=false")
    assert torch.equal(later.bank.feats, start["feats"])  # the same initial bank
    result = later.training_step(model, batch)
    assert torch.equal(later.bank.feats, start["feats"])  # the loss did not write
    later.after_optimizer_step(model, batch, result)
    for key, value in _bank_state(later.bank).items():
        assert torch.equal(value, official[key]), key


def _count_gathers(rank: int, world_size: int, cache: str) -> dict[str, Any]:
    import torch.distributed as tdist

    method, model = _pat(cache, fill=False)  # an empty bank takes the same collectives
    batch = next(iter(method.train_batches(0, 0)))
    calls: list[tuple[tuple[int, ...], torch.dtype]] = []
    real = tdist.all_gather

    def counted(tensors: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((tuple(tensor.shape), tensor.dtype))
        return real(tensors, tensor, *args, **kwargs)

    tdist.all_gather = counted
    try:
        result = method.training_step(model, batch)
        method.after_optimizer_step(model, batch, result)
    finally:
        tdist.all_gather = real
    # what the step shares: every rank's batch in rank order, the features' gradients going home
    idx = torch.arange(3) + 10 * rank
    parts = idx.float()[:, None, None].expand(3, 2, 3).clone().requires_grad_(True)
    g = gather_batch(idx, idx * 7, parts)
    g.parts.sum().backward()
    return {"b": int(batch["img"].shape[0]), "parts": (model.num_parts, model.feat_dim), "calls": calls,
            "indices": g.indices, "labels": g.labels, "gathered": g.parts.detach(), "grad": parts.grad}


def test_a_pat_step_gathers_its_batch_once(smoke_cache: str) -> None:
    """World 2, every all-gather of one step (forward and memory hook): of the per-sample ones (first
    dim = the local batch b), the metadata are one (b, 2) gather of indices and labels, the features
    one of the part tokens (bank write and CSL) and one of the cls features (triplet). CSL's gathers of
    partial results are not per sample."""
    want = torch.tensor([0, 1, 2, 10, 11, 12])
    for r in run_distributed(_count_gathers, 2, smoke_cache):
        b, (p, d) = r["b"], r["parts"]
        per_sample = [(shape, dtype) for shape, dtype in r["calls"] if shape[0] == b]
        assert [s for s, dtype in per_sample if dtype == torch.int64] == [(b, 2)]
        assert [s for s, dtype in per_sample if dtype.is_floating_point] == [(b, p, d), (b, d)]
        assert torch.equal(r["indices"], want) and torch.equal(r["labels"], want * 7)
        assert torch.equal(r["gathered"], want.float()[:, None, None].expand(6, 2, 3))
        assert torch.equal(r["grad"], torch.full((3, 2, 3), 2.0))  # its slice's gradient from both ranks' losses


# -- the position: the sampler's cursor ---------------------------------------------------------------
def test_loader_cursor_is_the_samplers_and_seek_refuses_a_step_outside_the_epoch() -> None:
    pids = np.repeat(np.arange(8), 4)
    s = PKSampler(pids, 2, 4, world_size=1, rank=0)
    s.seek(1, 2)
    assert (s.epoch, s.cursor) == (1, 2) and s.state_dict()["cursor"] == 2
    with pytest.raises(ValueError, match="cursor=99 outside the epoch's 4 steps"):
        s.seek(1, 99)
    s.set_epoch(3)
    assert (s.epoch, s.cursor) == (3, 0)


def test_pat_checkpoints_its_bank_and_not_the_position(smoke_cache: str) -> None:
    method, model = _pat(smoke_cache)
    loader = method.train_batches(2, 3)
    assert loader.cursor == 3 and loader.sampler.epoch == 2
    assert set(method.state_dict()) == {"bank"}  # epoch and step_in_epoch are the engine's record


class _Batches:
    """Batches that keep their own position, like a TrainLoader."""

    def __init__(self, start: int, steps: int) -> None:
        self.cursor = start
        self.steps = steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.cursor < self.steps:
            self.cursor += 1
            yield {"x": torch.ones(2, 1)}


class _PositionedMethod(Method):
    def __init__(self, skew: int = 0) -> None:
        self.skew = skew
        self.seen: list[tuple[int, int]] = []

    def build_model(self) -> nn.Module:
        return nn.Linear(1, 1)

    def steps_per_epoch(self) -> int:
        return 3

    def train_batches(self, epoch: int, start_step: int) -> _Batches:
        self.seen.append((epoch, start_step))
        return _Batches(start_step + self.skew, 3)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        return StepResult(model(batch["x"]).pow(2).mean())

    def evaluate(self, model: nn.Module) -> dict[str, dict[str, float]]:
        return {}


def _engine(method: Method, run_dir: Path, **kw: Any) -> Engine:
    return Engine(method, TrainConfig(epochs=2, seed=1, log_every=100, ckpt_every_steps=2, **kw), EvalConfig(period=5),
                  run_dir, sinks=[])


def test_engine_records_and_hands_back_the_batches_cursor(tmp_path: Path) -> None:
    method = _PositionedMethod()
    assert _engine(method, tmp_path, max_steps=4).fit().status == "max_steps"  # epoch 1, step 1
    state = torch.load(tmp_path / "checkpoints" / "step_000000004" / "state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1) and state["method"] == {}
    resumed = _PositionedMethod()
    assert _engine(resumed, tmp_path, resume="auto").fit().global_step == 6
    assert resumed.seen == [(1, 1)]


def test_engine_refuses_batches_standing_elsewhere_than_asked(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="stand at step 1, expected 0"):
        _engine(_PositionedMethod(skew=1), tmp_path).fit()


def test_a_checkpoint_that_kept_the_position_twice_still_resumes(tmp_path: Path) -> None:
    """Format 2 also kept the sampler's position in the method state; format 3 reads all else it holds."""
    import json

    from trainer.engine.checkpoint import FORMAT_VERSION, META, check_checkpoint, save_checkpoint
    from trainer.engine.loop import STATE_KEYS

    ckpt = save_checkpoint(tmp_path, 4, {k: torch.zeros(1) for k in STATE_KEYS})
    meta = json.loads((ckpt / META).read_text())
    assert meta["format_version"] == FORMAT_VERSION == 3
    (ckpt / META).write_text(json.dumps({**meta, "format_version": 2}))
    assert check_checkpoint(ckpt, STATE_KEYS)["format_version"] == 2


# -- datasets: ensured by the run, opened by the method -----------------------------------------------
def test_a_method_opens_the_datasets_and_makes_none(tmp_path: Path) -> None:
    from shards.errors import UserError
    from trainer.methods.pat import PATMethod

    cfg = compose(["exp=pat_smoke", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"])
    with pytest.raises((UserError, FileNotFoundError), match="smoke_a"):  # its pack is not there
        PATMethod(cfg)
    assert not (tmp_path / "cache").exists()
