"""``train.sync_bn``: BatchNorm over the global batch under DDP equals one process on that batch.

World = 2 (gloo, each rank half the batch, DDP) against world = 1 (the whole batch): outputs, every
parameter gradient and the running statistics, for BatchNorm2d (TMGF's IBN stem) and BatchNorm1d with
a frozen bias (the BN necks); plus the plain-DDP contrast (per-rank statistics differ) and a TMGF
model stepped under DDP with ``train.sync_bn`` against one process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.mp import run_distributed
from trainer.models.sync_bn import GlobalBatchNorm, convert_sync_bn

BATCH = 8


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.neck = nn.BatchNorm1d(6)
        self.neck.bias.requires_grad_(False)  # TMGF's frozen-bias neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2(self.conv(x))).mean(dim=(2, 3))
        return self.neck(self.fc(h))


# The equivalence tests run in float64 on both sides: the claim is that the algorithm (global
# statistics, their gradient through the all-reduce, DDP's averaging) equals one process, and in
# float64 both sides agree to ~1e-15 at these O(1) magnitudes. A float32 comparison would also
# compare rounding noise: grad.fc.bias is mathematically zero (a BatchNorm follows fc), so float32
# gives two noise vectors (~1e-5 vs ~1e-7) that a tolerance could only pass by the CPU's luck.
DTYPE = torch.float64
TOL = dict(atol=1e-10, rtol=1e-9)
"""Five orders above float64 rounding at these magnitudes; far below any algorithmic difference
(per-rank statistics change the outputs by O(0.1): test_plain_ddp_normalises_each_rank_on_its_own)."""


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(BATCH, 3, 5, 4, generator=g) * 2 + 1, torch.randn(BATCH, 6, generator=g)
    return x.to(DTYPE), t.to(DTYPE)


def _net() -> _Net:
    torch.manual_seed(3)
    net = _Net()
    with torch.no_grad():
        net.neck.bias.fill_(0.0)
        net.bn2.weight.uniform_(0.5, 1.5)
    return net.to(DTYPE)


def _step(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    y = net(x)
    loss = ((y - t) ** 2).sum(1).mean()  # mean over this process's samples
    loss.backward()
    return y.detach(), net


def _collect(net: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"grad.{k}": p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    out.update({f"buf.{k}": b.clone() for k, b in net.named_buffers()})
    return out


def _world_body(rank: int, world_size: int, sync: bool) -> dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel

    x, t = _data()
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    net = _net()
    if sync:
        net = convert_sync_bn(net, torch.device("cpu"))
    ddp = DistributedDataParallel(net, broadcast_buffers=False)
    y, _ = _step(ddp, x[rows], t[rows])
    out = _collect(net)
    out["y"] = y
    out["types"] = torch.tensor([isinstance(m, GlobalBatchNorm) for m in (net.bn2, net.neck)])
    return out


def test_global_bn_world2_equals_one_process_on_the_whole_batch() -> None:
    x, t = _data()
    ref_net = _net()
    y_ref, _ = _step(ref_net, x, t)
    ref = _collect(ref_net)
    results = run_distributed(_world_body, 2, True)
    for rank, res in enumerate(results):
        assert res["types"].all()
        rows = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        torch.testing.assert_close(res["y"], y_ref[rows], **TOL)
        for k, v in ref.items():
            torch.testing.assert_close(res[k], v, **TOL, msg=k)
    assert results[0]["grad.neck.weight"].abs().sum() > 0 and "grad.neck.bias" not in results[0]  # frozen stays frozen


def test_plain_ddp_normalises_each_rank_on_its_own() -> None:
    x, t = _data()
    ref_net = _net()
    y_ref, _ = _step(ref_net, x, t)
    res = run_distributed(_world_body, 2, False)[0]
    assert not res["types"].any()
    assert not torch.allclose(res["y"], y_ref[: BATCH // 2], atol=1e-3)
    assert not torch.allclose(res["buf.neck.running_mean"], ref_net.neck.running_mean, atol=1e-4)


def test_conversion_moves_parameters_and_buffers_and_eval_is_plain_bn() -> None:
    net = _net()
    params = {k: id(p) for k, p in net.named_parameters()}
    keys = list(net.state_dict())
    convert_sync_bn(net, torch.device("cpu"))
    assert isinstance(net.bn2, GlobalBatchNorm) and isinstance(net.neck, GlobalBatchNorm)
    assert {k: id(p) for k, p in net.named_parameters()} == params  # an optimizer built before stays valid
    assert list(net.state_dict()) == keys  # checkpoints load either way
    assert not net.neck.bias.requires_grad
    x, _ = _data()
    net.eval()
    ref = _net().eval()
    torch.testing.assert_close(net(x), ref(x))  # no process group / eval: the ordinary BatchNorm path
    net.train()
    torch.testing.assert_close(net(x), ref.train()(x))
    with pytest.raises(ValueError, match="GlobalBatchNorm: expected input with >= 2 dims"):
        net.neck(torch.randn(6))


def _tmgf_body(rank: int, world_size: int, run_dir: str) -> dict[str, torch.Tensor]:
    from trainer.config import compose
    from trainer.engine.strategy import DDPStrategy
    from trainer.methods.tmgf import TMGFMethod
    from trainer.models.stochastic import sample_seeds

    cfg = compose(["exp=tmgf_smoke", f"run_dir={run_dir}"])  # drop-path 0.1 on: seeded per sample
    assert cfg.model.drop_path_rate > 0
    method = TMGFMethod(cfg)
    torch.manual_seed(cfg.train.seed)
    model = method.build_model()
    method.recluster(model, 0)
    batch = next(iter(method.train_batches(0, 0)))  # this rank's slice of the (world-independent) global batch
    strategy = DDPStrategy(torch.device("cpu"), "fp32", sync_bn=True)
    wrapped, _ = strategy.setup(model, [{"params": list(model.parameters())}], cfg.train.optim)
    wrapped.train()
    with sample_seeds(batch["seed"]):  # as the engine scopes a step
        feats = wrapped(batch["img"], batch["camid"])
    feats.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None and "neck" in k}
    return {"feats": feats.detach(), "grads": grads,
            "running": torch.stack([n.running_mean for n in model.necks]).clone()}


@pytest.mark.parametrize("world", [2, 4])
def test_tmgf_forward_and_necks_under_sync_bn_match_world1(tmp_path, world: int) -> None:
    from trainer.config import compose
    from trainer.data.prepare import ensure_datasets

    ensure_datasets(compose(["exp=tmgf_smoke"]).data)  # once, before the ranks (as trainer.train's run does)
    single = run_distributed(_tmgf_body, 1, str(tmp_path / "w1"))[0]
    ranks = run_distributed(_tmgf_body, world, str(tmp_path / f"w{world}"))
    feats = torch.cat([r["feats"] for r in ranks])
    torch.testing.assert_close(feats, single["feats"], atol=1e-5, rtol=1e-4)
    for r in ranks:
        torch.testing.assert_close(r["running"], single["running"], atol=1e-6, rtol=1e-5)
        # DDP averages per-rank gradients of per-rank sums: world-W gradient = world-1 gradient / W
        for k, g in single["grads"].items():
            torch.testing.assert_close(r["grads"][k] * world, g, atol=1e-4, rtol=1e-4, msg=k)


def test_cuda_runs_get_torch_syncbatchnorm() -> None:
    # conversion only (no forward): runs without a GPU; the CUDA forward is torch's own kernel
    net = convert_sync_bn(_net(), torch.device("cuda"))
    assert isinstance(net.bn2, nn.SyncBatchNorm) and isinstance(net.neck, nn.SyncBatchNorm)
    assert not net.neck.bias.requires_grad
