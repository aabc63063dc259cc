"""The proxy memory sharded across ranks (``tmgf.memory_layout=sharded``) equals the replicated one.

At W = 1, 2, 3, 4 gloo ranks: the model-parallel TMGF loss (``tmgf_loss_sharded``) gives each rank the
loss and feature gradients of the replicated layout (``tmgf_loss`` on the rank's own batch) and of a
naive float64 restatement, and the sharded memory after momentum updates equals the replicated one.
The cases have a number of proxies not divisible by W, cameras with different numbers of proxies, a
camera without any, fewer proxies than ``neg_k``, fewer proxies than ranks (a rank holding none),
fewer cameras than ``pos_k`` (``few_cams=fill``) and exact score ties (integer-valued vectors), which
both layouts and the restatement break by the lower proxy id. Then the acceptance test of the
checkpoints: a ``tmgf_smoke`` run saved at 2 ranks sharded resumes at 1 rank replicated and at 4
ranks sharded, and finishes.

Tolerances: float64 through the vectorised paths against the float64 loops: 1e-10 (the losses sum a
few dozen terms of magnitude <= ~30 at 1e-16 relative). float32 (the training dtype) sharded against
float32 replicated: the same per-proxy arithmetic, only the matmul blocking differs, F32 = 1e-5 as in
tests/test_o2cap_losses.py. The memory after fp32 updates: 1e-6 against the float64 loop (as
tests/test_proxies.py); a wrong order or row moves it by >= 1e-2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.mp import run_distributed
from trainer.cluster.proxies import CameraProxies, make_camera_proxies
from trainer.config import O2CAPLossConfig
from trainer.losses.o2cap import ProxyTables, tmgf_loss, tmgf_loss_sharded
from trainer.memory.proxy import ProxyMemory, proxy_memory_bytes, proxy_range, resolve_layout

G = 24  # global batch: divisible by W = 1, 2, 3, 4
F32 = 1e-5


# ----------------------------------------------------------------------------------------------- cases
def _case(seed: int, k: int, cams: int, cfg: O2CAPLossConfig, grid: bool = False, s: int = 3, d: int = 16,
          n: int = 120) -> dict[str, Any]:
    """Random clustering -> proxies (the last camera holds only outliers: no proxy), memory [S, P, D], batch."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, k, size=n)
    camids = rng.integers(0, cams - 1, size=n)
    camids[np.nonzero(labels == -1)[0][:2]] = cams - 1
    return _finish(make_camera_proxies(labels, camids), seed, cfg, grid, s, d)


def _finish(cp: CameraProxies, seed: int, cfg: O2CAPLossConfig, grid: bool, s: int, d: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    p = cp.num_proxies
    if grid:  # entries in {-1, 0, 1}/4: every dot product is exact, so equal scores are exact ties
        memory = torch.randint(-1, 2, (s, p, d), generator=g).double() / 4
        feats = torch.randint(-1, 2, (G, s, d), generator=g).double() / 4
    else:
        memory = F.normalize(torch.randn(s, p, d, generator=g, dtype=torch.float64), dim=-1)
        feats = None
    ids = torch.randint(0, p, (G // 4,), generator=g).repeat_interleave(4)[torch.randperm(G, generator=g)]
    if feats is None:  # near their proxy: positives meaningful but not trivial
        noise = 0.8 * torch.randn(G, s, d, generator=g, dtype=torch.float64)
        feats = F.normalize(memory[:, ids].transpose(0, 1) + noise, dim=-1)
    return {"proxies": cp.state_dict(), "memory": memory, "feats": feats, "ids": ids, "cfg": dataclasses.asdict(cfg)}


def _cases() -> dict[str, dict[str, Any]]:
    tiny = make_camera_proxies(np.array([0, 0, 0, 1, 1, -1, -1]), np.array([0, 1, 1, 2, 2, 3, 3]))  # P = 3
    out = {
        "fewer_than_neg_k": _case(6, 12, 5, O2CAPLossConfig()),  # P ~ 46 < neg_k + |Pos|: every proxy is used
        "top_k_camera_groups": _case(7, 24, 6, O2CAPLossConfig(neg_k=5, reduction="camera_groups")),
        "ties_fill": _case(5, 20, 3, O2CAPLossConfig(neg_k=7), grid=True),  # 2 cameras < pos_k
        "ties_topk": _case(2, 20, 5, O2CAPLossConfig(neg_k=6, pos_k=2), grid=True, d=8),
        "fewer_proxies_than_ranks": _finish(tiny, 5, O2CAPLossConfig(), False, 3, 16),
    }
    for name, c in out.items():
        p = c["memory"].shape[1]
        assert name.startswith("fewer_proxies") or p % 2 and p % 3, f"{name}: P = {p} divides over some W"
    return out


def _tables(case: dict[str, Any]) -> tuple[CameraProxies, ProxyTables, O2CAPLossConfig]:
    cp = CameraProxies.from_state_dict(case["proxies"])
    return cp, ProxyTables.from_proxies(cp), O2CAPLossConfig(**case["cfg"])


# ----------------------------------------------------------------------------------------------- naive
def _ce(z: torch.Tensor, pos: list[int], sel: list[int]) -> torch.Tensor:
    return torch.logsumexp(z[sel], 0) - z[pos].mean()


def _naive_per_sample(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The features (a leaf) and their [S, G] offline and online losses: python loops over samples, cameras
    and proxies, float64; every ordering is (value desc, id asc)."""
    cp, _, cfg = _tables(case)
    x, mem, ids = case["feats"].clone().requires_grad_(True), case["memory"], case["ids"].tolist()
    num = cp.num_proxies
    members = [[q for q in range(num) if cp.proxy2cam[q] == cam] for cam in range(cp.num_cams)]
    off, on = [], []
    for k in range(x.shape[1]):
        scores = x[:, k] @ mem[k].T
        z = scores / cfg.temperature
        gram = (mem[k] @ mem[k].T).tolist()
        off_k, on_k = [], []
        for i, p in enumerate(ids):
            v = scores[i].detach().tolist()
            pos = [q for q in range(num) if cp.proxy2cluster[q] == cp.proxy2cluster[p]]
            neg = sorted((q for q in range(num) if q not in pos), key=lambda q: (-v[q], q))[:cfg.neg_k]
            off_k.append(_ce(z[i], pos, pos + neg))
            sim = [cfg.balance_w * v[q] + (1 - cfg.balance_w) * gram[p][q] for q in range(num)]
            # per camera that has proxies (one without is skipped) its best proxy
            cands = [min(m, key=lambda q: (-sim[q], q)) for m in members if m]
            pos = sorted(cands, key=lambda q: (-sim[q], q))[:cfg.pos_k]
            rest = sorted((q for q in range(num) if q not in pos), key=lambda q: (-sim[q], q))
            if cfg.few_cams == "fill" and len(pos) < cfg.pos_k:
                fill = cfg.pos_k - len(pos)
                pos, rest = pos + rest[:fill], rest[fill:]
            on_k.append(_ce(z[i], pos, pos + rest[:cfg.neg_k]))
        off.append(torch.stack(off_k))
        on.append(torch.stack(on_k))
    return x, torch.stack(off), torch.stack(on)


def _naive_rank_losses(case: dict[str, Any], naive: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       world: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each rank's loss (its own G/W samples reduced) and d(loss of the owning rank)/d(features), [G, S, D]."""
    cp, _, cfg = _tables(case)
    x, off, on = naive
    ids = case["ids"].numpy()
    b = G // world
    losses = []
    for r in range(world):
        own = slice(r * b, (r + 1) * b)
        cams = cp.proxy2cam[ids[own]]
        if cfg.reduction == "mean":
            groups = [np.arange(r * b, (r + 1) * b)]
        else:  # camera_groups: the mean of each camera's samples of this rank, summed
            groups = [np.flatnonzero(cams == c) + r * b for c in sorted(set(cams.tolist()))]
        o, n = (sum(t[:, torch.as_tensor(g)].mean(dim=1) for g in groups) for t in (off, on))
        losses.append(o[0] + n[0] + cfg.part_weight * (o[1:].mean() + n[1:].mean()))
    (grad,) = torch.autograd.grad(sum(losses), x, retain_graph=True)  # a rank's loss reads only its own samples
    return [t.detach() for t in losses], grad


# ----------------------------------------------------------------------------------------------- ranks
def _sharded_body(rank: int, world: int, cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per case: the sharded loss in float64 and float32 on this rank's samples, and the sharded memory
    after two updated steps (features gathered as the method gathers them), consolidated."""
    from trainer import dist

    out: dict[str, Any] = {}
    b = G // world
    own = slice(rank * b, (rank + 1) * b)
    for name, case in cases.items():
        _, tables, cfg = _tables(case)
        p = case["memory"].shape[1]
        start, stop = proxy_range(p, "sharded", rank, world)
        res = {}
        for dtype in (torch.float64, torch.float32):
            x = case["feats"][own].to(dtype).requires_grad_(True)
            shard = case["memory"][:, start:stop].to(dtype)
            gathered = dist.all_gather_autograd(x), dist.all_gather(case["ids"][own])
            got = tmgf_loss_sharded(*gathered, shard, start, tables, cfg)
            got["loss"].backward()
            assert x.grad is not None
            res[str(dtype)] = ({k: v.detach() for k, v in got.items()}, x.grad)
        mem = ProxyMemory(case["memory"].shape[0], 0, case["memory"].shape[2], device="cpu", layout="sharded")
        mem.init_from_centers(case["memory"].float())
        assert (mem.start, mem.stop) == (start, stop) and mem.memory.shape[1] == stop - start
        mem.update(case["feats"][own], case["ids"][own])  # gathers itself
        feats = dist.all_gather(case["feats"][own].float())  # as the method: the loss's gathered batch
        mem.update_gathered(feats.flip(0), dist.all_gather(case["ids"][own]).flip(0))
        res["memory"] = mem.full_state_dict(to_all=rank == world - 1)  # rank 0 by default; any rank on request
        out[name] = res
    return out


# A tmgf_smoke run (the last test) shares the spawns of W = 2 and 4: starting ranks is the cost here.
_RUN = ("exp=tmgf_smoke", "tmgf.iters_per_epoch=2", "train.epochs=1", "train.ckpt_every_steps=1", "eval.period=5",
        "tmgf.calibrate_necks=false")


def _fit_body(rank: int, world: int, run_dir: str, *extra: str) -> dict[str, Any]:
    from trainer.config import compose
    from trainer.data.prepare import ensure_datasets
    from trainer.engine.loop import Engine
    from trainer.methods.tmgf import TMGFMethod

    cfg = compose([*_RUN, f"run_dir={run_dir}", *extra])
    ensure_datasets(cfg.data)
    method = TMGFMethod(cfg)
    res = Engine(method, cfg.train, cfg.eval, run_dir, sinks=[]).fit()
    assert method.memory is not None
    return {"status": res.status, "step": res.global_step, "layout": method.memory.layout,
            "rows": (method.memory.start, method.memory.stop), "memory": method.memory.full_state_dict(),
            "clusterings": method.clusterings}


def _rank_body(rank: int, world: int, cases: dict[str, dict[str, Any]], fit: tuple[str, ...]) -> dict[str, Any]:
    return {"equality": _sharded_body(rank, world, cases), "fit": _fit_body(rank, world, *fit)}


@pytest.fixture(scope="module")
def cases() -> dict[str, dict[str, Any]]:
    return _cases()


@pytest.fixture(scope="module")
def naive(cases: dict[str, dict[str, Any]]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return {name: _naive_per_sample(case) for name, case in cases.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def world2(cases: dict[str, dict[str, Any]], runs: Path) -> list[dict[str, Any]]:
    """W = 2: the equality cases, and a tmgf_smoke run cut after its first step (a mid-epoch checkpoint)."""
    return run_distributed(_rank_body, 2, cases, (str(runs / "w2"), "train.max_steps=1"))


@pytest.fixture(scope="module")
def world4(cases: dict[str, dict[str, Any]], runs: Path, world2: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """W = 4: the equality cases, and the W = 2 run resumed (sharded: the default at W > 1)."""
    import shutil

    shutil.copytree(runs / "w2", runs / "w4")
    return run_distributed(_rank_body, 4, cases, (str(runs / "w4"),))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_equals_replicated_and_naive(world: int, cases: dict[str, dict[str, Any]], naive: dict[str, Any],
                                             request: pytest.FixtureRequest) -> None:
    if world in (2, 4):
        ranks = [r["equality"] for r in request.getfixturevalue(f"world{world}")]
    else:
        ranks = [_sharded_body(0, 1, cases)] if world == 1 else run_distributed(_sharded_body, world, cases)
    b = G // world
    for name, case in cases.items():
        cp, tables, cfg = _tables(case)
        want, want_grad = _naive_rank_losses(case, naive[name], world)
        grads: dict[str, list[torch.Tensor]] = {"torch.float64": [], "torch.float32": []}
        for r, out in enumerate(ranks):
            res, own = out[name], slice(r * b, (r + 1) * b)
            got, grad = res["torch.float64"]
            torch.testing.assert_close(got["loss"], want[r], atol=1e-10, rtol=0, msg=f"{name} rank {r}")
            grads["torch.float64"].append(grad)
            # float32: the replicated layout on this rank's batch, the same dtype
            x = case["feats"][own].float().requires_grad_(True)
            rep = tmgf_loss(x, case["memory"].float(), case["ids"][own], tables, cfg)
            rep["loss"].backward()
            got32, grad32 = res["torch.float32"]
            for key in rep:
                torch.testing.assert_close(got32[key], rep[key].detach(), atol=F32, rtol=F32, msg=f"{name} {key}")
            torch.testing.assert_close(grad32, x.grad, atol=F32, rtol=F32, msg=f"{name} rank {r} fp32 gradient")
        torch.testing.assert_close(torch.cat(grads["torch.float64"]), want_grad, atol=1e-10, rtol=0, msg=name)
        # memory: two steps (the global batch, then reversed) of the float64 loop vs the consolidated shards
        loop = F.normalize(case["memory"], dim=-1)  # the memory starts from normalised centres
        for order in (case["ids"].tolist(), case["ids"].flip(0).tolist()):
            feats = case["feats"] if order == case["ids"].tolist() else case["feats"].flip(0)
            for i, p in enumerate(order):
                v = 0.2 * loop[:, p] + 0.8 * feats[i]
                loop[:, p] = v / v.norm(dim=-1, keepdim=True)
        full = [out[name]["memory"] for out in ranks]
        assert full[0] is not None and (world == 1 or all(f is None for f in full[1:-1]))
        assert torch.equal(full[0]["memory"], full[-1]["memory"])
        torch.testing.assert_close(full[0]["memory"].double(), loop, atol=1e-6, rtol=0, msg=name)
        assert (loop - case["memory"]).abs().max() > 1e-2  # the memory moved: the comparison can tell
    assert resolve_layout("auto", world) == ("replicated" if world == 1 else "sharded")


def test_per_rank_bytes_follow_the_shard_ranges() -> None:
    assert proxy_memory_bytes("replicated", 10, 6, 384, 4) == [6 * 10 * 384 * 4] * 4
    assert proxy_memory_bytes("sharded", 10, 6, 384, 4) == [6 * n * 384 * 4 for n in (3, 3, 2, 2)]
    assert proxy_memory_bytes("sharded", 3, 1, 2, 4)[-1] == 0  # fewer proxies than ranks: one holds none
    mem = ProxyMemory(6, 10, 384, device="meta", layout="sharded", rank=2, world_size=4)
    assert mem.memory.nbytes == proxy_memory_bytes("sharded", 10, 6, 384, 4)[2]
    with pytest.raises(ValueError, match="layout='ring'"):
        resolve_layout("ring", 2)


def test_state_moves_between_layouts_and_world_sizes() -> None:
    """A whole state from a sharded memory loads into any layout / world size (slices of one array); a
    rank's own state only into the same layout and world size."""
    full = F.normalize(torch.randn(3, 11, 8, generator=torch.Generator().manual_seed(6)), dim=-1)
    state = {"memory": full, "momentum": 0.2, "num_proxies": 11}
    for layout, world in (("replicated", 1), ("sharded", 3), ("sharded", 4), ("replicated", 2)):
        for rank in range(world):
            mem = ProxyMemory(3, 0, 8, device="cpu", layout=layout, rank=rank, world_size=world)
            mem.load_full_state_dict(state)
            assert torch.equal(mem.memory, full[:, mem.start:mem.stop]) and mem.num_proxies == 11
            if not mem.sharded:  # (a sharded one consolidates over a process group: the tests above)
                assert torch.equal(cast(dict, mem.full_state_dict())["memory"], full)
            again = ProxyMemory(3, 0, 8, device="cpu", layout=layout, rank=rank, world_size=world)
            again.load_state_dict(mem.state_dict())
            assert torch.equal(again.memory, mem.memory)
    other = ProxyMemory(3, 0, 8, device="cpu", layout="sharded", rank=0, world_size=2)
    with pytest.raises(ValueError, match="full_state_dict"):
        other.load_state_dict(ProxyMemory(3, 11, 8, device="cpu", layout="sharded", rank=0, world_size=3).state_dict())


# ----------------------------------------------------------------------------------------------- resume
def test_checkpoint_at_two_ranks_sharded_resumes_at_one_replicated_and_four_sharded(
        runs: Path, world2: list[dict[str, Any]], world4: list[dict[str, Any]]) -> None:
    from trainer.engine.checkpoint import list_checkpoints, load_checkpoint

    cut = [r["fit"] for r in world2]
    assert [r["status"] for r in cut] == ["max_steps"] * 2 and {r["layout"] for r in cut} == {"sharded"}
    assert cut[0]["rows"][1] == cut[1]["rows"][0]  # two halves of the proxies
    (ckpt,) = list_checkpoints(runs / "w2" / "checkpoints")
    saved = load_checkpoint(ckpt, restore_rng=False)["method"]["memory"]["memory"]
    assert torch.equal(saved, cut[0]["memory"]["memory"])  # the whole memory, consolidated from the shards
    one = _fit_body(0, 1, str(runs / "w2"), "tmgf.memory_layout=replicated")
    four = [r["fit"] for r in world4]
    for res in (one, *four):
        assert res["status"] == "finished" and res["step"] == 2 and res["clusterings"] == 0  # resumed mid-epoch
    assert one["layout"] == "replicated" and {r["layout"] for r in four} == {"sharded"}
    # both went on from the saved memory with the same global batch: the same update up to the ranks'
    # random streams (drop-path, augmentation), which are re-laid at another world size
    a, b = one["memory"]["memory"], four[0]["memory"]["memory"]
    assert a.shape == b.shape == saved.shape and not torch.equal(a, saved)
    assert (a - b).abs().max() < 0.1 * (a - saved).abs().max(), ((a - b).abs().max(), (a - saved).abs().max())
