"""PAT end to end on the engine: DDP step equals one process, exact resume, the bank in checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.mp import run_distributed
from trainer.config import compose
from trainer.data.prepare import ensure_datasets


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The pat_smoke synthetic datasets, made once for this module."""
    cache = tmp_path_factory.mktemp("reid-cache")
    cfg = compose(["exp=pat_smoke", f"data.cache_dir={cache}"])
    ensure_datasets(cfg.data)
    return str(cache)


def _overrides(cache: str, run_dir: str, *extra: str) -> list[str]:
    return ["exp=pat_smoke", f"data.cache_dir={cache}", f"run_dir={run_dir}", "data.num_workers=0", *extra]


def _one_step(rank: int, world_size: int, cache: str, ids: int = 8) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from trainer.config import OptimConfig
    from trainer.engine.strategy import DDPStrategy
    from trainer.methods.pat import PATMethod
    from trainer.models.stochastic import sample_seeds

    # the experiment's own drop_path_rate (0.1): stochastic depth is seeded per sample, not per rank
    cfg = compose(_overrides(cache, "/tmp/unused", f"data.ids_per_batch={ids}"))
    assert cfg.model.drop_path_rate > 0
    method = PATMethod(cfg)
    torch.manual_seed(0)
    model = method.build_model()
    method.on_fit_start(model, resumed=False)
    # train-mode BN neck over the global batch (train.sync_bn): with the bank, CSL, PSD, triplet and
    # gradient averaging, the whole step — running statistics included — equals one process.
    model.train()
    plain_sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    wrapped, opt = DDPStrategy(torch.device("cpu"), "fp32", sync_bn=True).setup(model, groups, plain_sgd)
    assert isinstance(wrapped, DistributedDataParallel) == (world_size > 1)
    batch = next(iter(method.train_batches(0, 0)))
    with sample_seeds(batch["seed"]):  # as the engine scopes a step
        result = method.training_step(wrapped, batch)
    opt.zero_grad()
    result.loss.backward()
    opt.step()
    losses = torch.tensor([float(result.loss.detach())])
    from trainer import dist

    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "loss": float(dist.all_reduce(losses).item()) / world_size,
        "bank": method.bank.full_state_dict(to_all=True)["feats"],
        "index": dist.all_gather(batch["index"]),
    }


@pytest.mark.parametrize("world,ids", [(2, 8), (3, 6), (4, 8)])
def test_ddp_step_equals_single_process(smoke_cache: str, world: int, ids: int) -> None:
    """The whole PAT step (bank, CSL, PSD, triplet, BN over the global batch, stochastic depth) at W ranks
    equals one process on the global batch; the bank's 32·K rows do not split evenly over 3 ranks."""
    one = _one_step(0, 1, smoke_cache, ids)
    two = run_distributed(_one_step, world, smoke_cache, ids)
    assert torch.equal(one["index"], two[0]["index"])  # the same global batch
    assert two[0]["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for name, p in one["params"].items():
        torch.testing.assert_close(two[0]["params"][name], p, atol=1e-5, rtol=1e-4, msg=name)
        for other in two[1:]:
            torch.testing.assert_close(other["params"][name], two[0]["params"][name], atol=0, rtol=0)
    torch.testing.assert_close(two[0]["bank"], one["bank"], atol=1e-5, rtol=1e-5)


def test_resume_mid_epoch_is_bit_identical(smoke_cache: str, tmp_path: Path) -> None:
    from trainer.train import run

    full = run(compose(_overrides(smoke_cache, str(tmp_path / "full"))))
    assert full.status == "finished"
    cut = run(compose(_overrides(smoke_cache, str(tmp_path / "cut"), "train.max_steps=7")))
    assert cut.status == "max_steps" and cut.global_step == 7
    state = torch.load(sorted((tmp_path / "cut" / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)
    assert 0 < state["step_in_epoch"] and state["method"]["bank"]["filled"].all()
    resumed = run(compose(_overrides(smoke_cache, str(tmp_path / "cut"))))
    assert resumed.status == "finished" and resumed.global_step == full.global_step
    a = (tmp_path / "full" / "model_final.safetensors").read_bytes()
    b = (tmp_path / "cut" / "model_final.safetensors").read_bytes()
    assert a == b
