"""The strategy seam: DDP and DeepSpeed ZeRO-1/2 train alike and save ONE checkpoint format.

A small model with two parameter groups (weights and biases at different LRs, as both papers train)
and sizes that do not split evenly over 3 ranks, so ZeRO's flat partitions cut parameters in the
middle and carry padding: the consolidated optimizer state must still be the unsharded optimizer's.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from torch import nn

from tests.mp import run_distributed
from trainer.config import OptimConfig, TrainConfig
from trainer.engine.zero import deepspeed_config

pytest.importorskip("deepspeed")

GLOBAL = 12  # images per step over all ranks: splits over 1, 2, 3 and 4 ranks
STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))  # 104 + 18 + 65 + 5: odd sizes


def _groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    from trainer.engine.optim import param_groups

    return param_groups(model, cfg)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL, 7, generator=g), torch.randn(GLOBAL, 5, generator=g)) for _ in range(STEPS)]


def _optim(name: str) -> OptimConfig:
    if name == "adam":
        return OptimConfig(name="adam", lr=0.01, weight_decay=1e-4, bias_lr_factor=2.0)
    return OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, bias_lr_factor=2.0)


def _build(strategy: str, stage: int, clip: float = 0.0, precision: str = "fp32"):
    from trainer.engine.strategy import build_strategy

    cfg = TrainConfig(strategy=strategy, zero_stage=stage, clip_grad=clip, sync_bn=False)
    return build_strategy(cfg, torch.device("cpu"), precision, GLOBAL)


def _train(rank: int, world: int, strategy: str, stage: int, optim: str, clip: float,
           load: dict[str, Any] | None, precision: str = "fp32") -> dict[str, Any]:
    """``STEPS`` steps on this rank's slice of each global batch (mean-squared error: the mean over the
    slice, averaged over the ranks by the strategy = the mean over the global batch)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    s = _build(strategy, stage, clip, precision)
    model = _model()
    module, opt = s.setup(model, _groups(model, _optim(optim)), _optim(optim))
    if load is not None:
        load = copy.deepcopy(load)  # spawn shares the parent's tensors: a torch optimizer would step them in place
        s.load_model_state_dict(module, load["model"])
        s.load_optimizer_state_dict(load["optimizer"])
    per = GLOBAL // world
    for x, y in _batches():
        with s.autocast():  # as the engine runs a training step
            out = module(x[rank * per:(rank + 1) * per])
            loss = ((out.float() - y[rank * per:(rank + 1) * per]) ** 2).mean()
        s.backward_and_step(loss)
    return {"model": s.model_state_dict(module), "optimizer": s.optimizer_state_dict(),
            "lr": [g["lr"] for g in opt.param_groups]}


VARIANTS = [(optim, stage, clip) for optim in ("sgd", "adam") for stage in (1, 2) for clip in (0.0, 0.05)]
"""(optimizer, ZeRO stage, clip_grad): both papers' optimizers, both stages, clipping off and active."""


def _ddp(optim: str, clip: float = 0.0, load: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reference: one process (no process group) on the whole global batch."""
    return _train(0, 1, "ddp", 1, optim, clip, load)


def _zero_suite(rank: int, world: int, starts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every ZeRO run of this file on ``world`` ranks, in one spawn (DeepSpeed's import is the cost)."""
    out: dict[str, Any] = {}
    for optim, stage, clip in VARIANTS:
        out[f"{optim}/{stage}/{clip}"] = _train(rank, world, "deepspeed", stage, optim, clip, None)
    out["bf16"] = _train(rank, world, "deepspeed", 2, "sgd", 0.0, None, "bf16")
    for optim, state in starts.items():
        out[f"{optim}/resumed"] = _train(rank, world, "deepspeed", 2, optim, 0.0, state)
        out[f"{optim}/roundtrip"] = _roundtrip(state)
    return out


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    s = _build("deepspeed", 2)
    model = _model()
    module, _ = s.setup(model, _groups(model, _optim("adam")), _optim("adam"))
    s.load_model_state_dict(module, state["model"])
    s.load_optimizer_state_dict(state["optimizer"])
    return {"model": s.model_state_dict(module), "optimizer": s.optimizer_state_dict()}


def _assert_state_close(a: dict[str, Any], b: dict[str, Any], exact: bool,
                        tol: dict[str, float] | None = None) -> None:
    # fp32; a different number of ranks only reorders the sum of the per-rank gradients (a few ulp of
    # gradients of magnitude <= 10 per step): 1e-5 is far above that after 3 steps and far below a wrong
    # partition (O(0.1) of the weights, or a state tensor of another parameter)
    tol = {"rtol": 0, "atol": 0} if exact else tol or {"rtol": 1e-5, "atol": 1e-6}
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], **tol, msg=k)
    sa, sb = a["optimizer"], b["optimizer"]
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        for key in ("lr", "weight_decay"):
            assert ga[key] == gb[key], key
    assert sorted(sa["state"]) == sorted(sb["state"])
    for i in sa["state"]:
        assert sorted(sa["state"][i]) == sorted(sb["state"][i]), i
        for key, va in sa["state"][i].items():
            torch.testing.assert_close(torch.as_tensor(va).float(), torch.as_tensor(sb["state"][i][key]).float(),
                                       **tol, msg=f"param {i} {key}")


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    ref: dict[str, Any] = {f"{o}/{c}": _ddp(o, c) for o in ("sgd", "adam") for c in (0.0, 0.05)}
    ref.update({f"{o}/resumed": _ddp(o, load=ref[f"{o}/0.0"]) for o in ("sgd", "adam")})
    ref["bf16"] = _train(0, 1, "ddp", 1, "sgd", 0.0, None, "bf16")
    return ref


@pytest.fixture(scope="module", params=[2, 3])
def zero(request: pytest.FixtureRequest, reference: dict[str, Any]) -> dict[str, Any]:
    starts = {o: reference[f"{o}/0.0"] for o in ("sgd", "adam")}
    return run_distributed(_zero_suite, request.param, starts)[0]


@pytest.mark.parametrize("variant", [f"{o}/{s}/{c}" for o, s, c in VARIANTS])
def test_zero_trains_as_one_process_and_saves_the_unsharded_state(variant: str, zero: dict[str, Any],
                                                                  reference: dict[str, Any]) -> None:
    optim, _, clip = variant.split("/")
    _assert_state_close(zero[variant], reference[f"{optim}/{clip}"], exact=False)


def test_bf16_autocast_under_zero_is_ddps_bf16(zero: dict[str, Any], reference: dict[str, Any]) -> None:
    # bf16 matmul outputs keep 8 significant bits (relative rounding 2**-9 ~ 2e-3); another batch split
    # can round an element the other way, which moves a gradient by ~2e-3 of itself and the weights, after
    # 3 steps at LR 0.1 with gradients <= 10, by <~ 1e-2 at most: a wrong partition or a state lost on the
    # way moves them by O(0.1), and fp32 weights in a bf16 run (the module must stay fp32) by nothing at all
    assert all(v.dtype == torch.float32 for v in zero["bf16"]["model"].values())
    _assert_state_close(zero["bf16"], reference["bf16"], exact=False, tol={"rtol": 1e-2, "atol": 1e-2})
    moved = max((reference["bf16"]["model"][k] - reference["sgd/0.0"]["model"][k]).abs().max().item()
                for k in reference["sgd/0.0"]["model"])
    assert moved > 0  # bf16 ran (the fp32 and bf16 references differ)


def test_the_clip_is_active_in_the_clipped_variants(reference: dict[str, Any]) -> None:
    for optim in ("sgd", "adam"):
        moved = max((reference[f"{optim}/0.05"]["model"][k] - reference[f"{optim}/0.0"]["model"][k]).abs().max().item()
                    for k in reference[f"{optim}/0.0"]["model"])
        assert moved > 1e-4, optim  # else the clipped comparisons could not fail


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_a_ddp_checkpoint_resumes_under_zero_at_another_world_size(optim: str, zero: dict[str, Any],
                                                                   reference: dict[str, Any]) -> None:
    """DDP's state from one process, loaded into ZeRO-2 on 2 or 3 ranks and trained on, equals DDP
    trained on from it; and back: ZeRO's saved state resumes under DDP."""
    _assert_state_close(zero[f"{optim}/resumed"], reference[f"{optim}/resumed"], exact=False)
    back = _ddp(optim, load=zero[f"{optim}/2/0.0"])
    again = _ddp(optim, load=reference[f"{optim}/0.0"])
    _assert_state_close(back, again, exact=False)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_zero_load_then_save_returns_the_state_bit_for_bit(optim: str, zero: dict[str, Any],
                                                           reference: dict[str, Any]) -> None:
    # gather and scatter are copies through the fragment addresses: nothing may change, not one bit
    _assert_state_close(zero[f"{optim}/roundtrip"], reference[f"{optim}/0.0"], exact=True)


def test_deepspeed_config_is_derived_from_ours() -> None:
    cfg = deepspeed_config(zero_stage=2, precision="fp32", clip_grad=0.0, global_batch=64, world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 16 and cfg["train_batch_size"] == 64
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 0.0  # explicit: DeepSpeed's own default is not "off"
    assert cfg["zero_optimization"]["stage"] == 2
    assert "bf16" not in cfg and "fp16" not in cfg and "scheduler" not in cfg and "optimizer" not in cfg
    bf16 = deepspeed_config(zero_stage=1, precision="bf16", clip_grad=1.0, global_batch=64, world_size=2)
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in bf16 and bf16["gradient_clipping"] == 1.0 and bf16["zero_optimization"]["stage"] == 1
    fp16 = deepspeed_config(zero_stage=2, precision="fp16", clip_grad=0.0, global_batch=64, world_size=2)
    assert fp16["torch_autocast"]["dtype"] == "float16" and "fp16" not in fp16
    with pytest.raises(ValueError, match="64 images does not split over 3 ranks"):
        deepspeed_config(zero_stage=2, precision="fp32", clip_grad=0.0, global_batch=64, world_size=3)
