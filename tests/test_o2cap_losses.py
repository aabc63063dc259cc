"""O2CAP offline/online association losses and the TMGF total against naive per-sample float64 restatements."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.cluster.proxies import CameraProxies, make_camera_proxies
from trainer.losses.o2cap import (
    O2CAPLossConfig,
    ProxyTables,
    offline_association_loss,
    online_association_loss,
    tmgf_loss,
)

TAU = 0.07


# ----------------------------------------------------------------------------------------------- fixtures
def _setup(seed: int, n: int = 160, k: int = 12, c: int = 5, s: int = 3, b: int = 12, d: int = 16,
           empty_cam: bool = True):
    """Random clustering -> proxies, a random unit memory [S, P, D] and a batch of unit features [B, S, D]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, k, size=n)
    camids = rng.integers(0, c - 1 if empty_cam else c, size=n)
    if empty_cam:  # camera c-1 holds only outliers: it has no proxy and must be skipped
        out = np.nonzero(labels == -1)[0][:2]
        camids[out] = c - 1
    cp = make_camera_proxies(labels, camids)
    g = torch.Generator().manual_seed(seed)
    memory = F.normalize(torch.randn(s, cp.num_proxies, d, generator=g, dtype=torch.float64), dim=-1)
    ids = torch.randint(0, cp.num_proxies, (b // 2,), generator=g).repeat_interleave(2)  # duplicate proxies
    # features near their proxy's centre, so positives are meaningful but not trivial
    feats = F.normalize(memory[:, ids].transpose(0, 1) + 0.8 * torch.randn(b, s, d, generator=g, dtype=torch.float64),
                        dim=-1)
    return cp, memory, feats, ids


F32_REL = 1e-5
"""float32 against a float64 reference (or another float32 order): the loss and its gradient sum a
few dozen terms of magnitude <= ~20, each rounded at 6e-8 relative, so their error is below ~1e-6
relative; 1e-5 leaves a margin over every CPU's kernels while a changed term moves them by >= 1e-3."""


def _soft_ce_naive(z: torch.Tensor, pos: list[int], sel: list[int]) -> torch.Tensor:
    lse = torch.logsumexp(torch.stack([z[q] for q in sel]), dim=0)
    return -sum(z[q] - lse for q in pos) / len(pos)


def _offline_naive(x: torch.Tensor, mem: torch.Tensor, ids: list[int], cp: CameraProxies, neg_k: int) -> list:
    """Per-sample offline loss, one slot: x [B, D], mem [P, D] (float64, python loops)."""
    out = []
    for i, p in enumerate(ids):
        z = torch.stack([x[i] @ mem[q] for q in range(cp.num_proxies)]) / TAU
        pos = [q for q in range(cp.num_proxies) if cp.proxy2cluster[q] == cp.proxy2cluster[p]]
        others = sorted((q for q in range(cp.num_proxies) if q not in pos), key=lambda q: -float(z[q].detach()))
        out.append(_soft_ce_naive(z, pos, pos + others[:neg_k]))
    return out


def _online_naive(x: torch.Tensor, mem: torch.Tensor, ids: list[int], cp: CameraProxies, neg_k: int, pos_k: int,
                  w: float, few_cams: str = "fill") -> list:
    out = []
    for i, p in enumerate(ids):
        z = torch.stack([x[i] @ mem[q] for q in range(cp.num_proxies)]) / TAU
        sim = {q: w * float(x[i].detach() @ mem[q]) + (1 - w) * float(mem[p] @ mem[q]) for q in range(cp.num_proxies)}
        cands = []
        for cam in range(cp.num_cams):
            members = [q for q in range(cp.num_proxies) if cp.proxy2cam[q] == cam]
            if members:  # cameras without proxies are skipped
                cands.append(max(members, key=lambda q: sim[q]))
        pos = sorted(cands, key=lambda q: -sim[q])[:pos_k]
        rest = sorted((q for q in range(cp.num_proxies) if q not in pos), key=lambda q: -sim[q])
        if few_cams == "fill" and len(pos) < pos_k:
            pos, rest = pos + rest[: pos_k - len(pos)], rest[pos_k - len(pos):]
        out.append(_soft_ce_naive(z, pos, pos + rest[:neg_k]))
    return out


def _reduce_naive(per: list, cams: list[int], reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return sum(per) / len(per)
    total = 0.0
    for cam in sorted(set(cams)):
        group = [per[i] for i in range(len(per)) if cams[i] == cam]
        total = total + sum(group) / len(group)
    return total


# ----------------------------------------------------------------------------------------------- tests
# k=12 clusters give P ~ 46 < 50 + |Pos| (every proxy is used), k=20 gives P ~ 75 (the top-50 selection matters).
@pytest.mark.parametrize("seed,k,neg_k,reduction", [(0, 12, 50, "mean"), (1, 12, 5, "mean"), (11, 20, 50, "mean"),
                                                     (2, 12, 8, "camera_groups"), (3, 20, 50, "camera_groups")])
def test_offline_matches_naive(seed: int, k: int, neg_k: int, reduction: str) -> None:
    cp, memory, feats, ids = _setup(seed, n=40 * k // 3, k=k)
    tables = ProxyTables.from_proxies(cp)
    cams = cp.proxy2cam[ids.numpy()].tolist()
    for k in range(memory.shape[0]):
        x64 = feats[:, k].clone().requires_grad_(True)
        want = _reduce_naive(_offline_naive(x64, memory[k], ids.tolist(), cp, neg_k), cams, reduction)
        (g_want,) = torch.autograd.grad(want, x64)
        # float64 through the vectorised path: equal to rounding
        x = feats[:, k].clone().requires_grad_(True)
        got = offline_association_loss(x, memory[k], ids, tables, TAU, neg_k, reduction)
        (g_got,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, want.detach(), atol=1e-10, rtol=0)
        torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=0)
        # float32 features and memory (the training dtype)
        x32 = feats[:, k].float().requires_grad_(True)
        got32 = offline_association_loss(x32, memory[k].float(), ids, tables, TAU, neg_k, reduction)
        (g32,) = torch.autograd.grad(got32, x32)
        assert got32.item() == pytest.approx(want.item(), rel=F32_REL, abs=F32_REL)
        torch.testing.assert_close(g32.double(), g_want, atol=F32_REL, rtol=F32_REL)


@pytest.mark.parametrize("seed,k,neg_k,reduction", [(0, 12, 50, "mean"), (4, 12, 6, "mean"), (12, 20, 50, "mean"),
                                                     (5, 12, 10, "camera_groups")])
def test_online_matches_naive(seed: int, k: int, neg_k: int, reduction: str) -> None:
    cp, memory, feats, ids = _setup(seed, n=40 * k // 3, k=k)
    assert cp.cam2proxy(cp.num_cams - 1).size == 0  # a camera without proxies is present
    tables = ProxyTables.from_proxies(cp)
    cams = cp.proxy2cam[ids.numpy()].tolist()
    for k in range(memory.shape[0]):
        x64 = feats[:, k].clone().requires_grad_(True)
        want = _reduce_naive(_online_naive(x64, memory[k], ids.tolist(), cp, neg_k, 3, 0.15), cams, reduction)
        (g_want,) = torch.autograd.grad(want, x64)
        x = feats[:, k].clone().requires_grad_(True)
        got = online_association_loss(x, memory[k], ids, tables, TAU, neg_k, 3, 0.15, reduction)
        (g_got,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, want.detach(), atol=1e-10, rtol=0)
        torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=0)
        x32 = feats[:, k].float().requires_grad_(True)
        got32 = online_association_loss(x32, memory[k].float(), ids, tables, TAU, neg_k, 3, 0.15, reduction)
        (g32,) = torch.autograd.grad(got32, x32)
        assert got32.item() == pytest.approx(want.item(), rel=F32_REL, abs=F32_REL)
        torch.testing.assert_close(g32.double(), g_want, atol=F32_REL, rtol=F32_REL)


def test_online_positives_are_camera_aware() -> None:
    """Positives come one per camera: a camera-blind top-3 restatement gives different losses."""
    cp, memory, feats, ids = _setup(6, b=8)
    tables = ProxyTables.from_proxies(cp)
    per = online_association_loss(feats[:, 0], memory[0], ids, tables, neg_k=5, reduction="none")
    assert per.shape == (8,) and torch.isfinite(per).all()
    # a restatement that ignores cameras (plain top-3 by S) gives different losses: the test can tell
    x = feats[:, 0]
    sim = 0.15 * x @ memory[0].T + 0.85 * memory[0][ids] @ memory[0].T
    z = x @ memory[0].T / TAU
    pos = sim.topk(3, dim=-1).indices
    sel = sim.topk(8, dim=-1).indices
    plain = torch.logsumexp(z.gather(1, sel), 1) - z.gather(1, pos).mean(1)
    assert not torch.allclose(plain, per)


@pytest.mark.parametrize("few_cams", ["fill", "clip"])
def test_online_fewer_cameras_than_pos_k(few_cams: str) -> None:
    cp, memory, feats, ids = _setup(7, c=3)  # cameras 0, 1 with proxies, camera 2 outliers only
    assert sum(cp.cam2proxy(c).size > 0 for c in range(cp.num_cams)) == 2
    tables = ProxyTables.from_proxies(cp)
    x = feats[:, 0]
    want = _reduce_naive(_online_naive(x, memory[0], ids.tolist(), cp, 50, 3, 0.15, few_cams), [], "mean")
    got = online_association_loss(x, memory[0], ids, tables, few_cams=few_cams)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    other = online_association_loss(x, memory[0], ids, tables, few_cams="clip" if few_cams == "fill" else "fill")
    assert abs(float(other) - float(got)) > 1e-6


@pytest.mark.parametrize("reduction", ["mean", "camera_groups"])
def test_tmgf_loss_weights(reduction: str) -> None:
    cp, memory, feats, ids = _setup(8, s=4, b=8)
    tables = ProxyTables.from_proxies(cp)
    cams = cp.proxy2cam[ids.numpy()].tolist()
    cfg = O2CAPLossConfig(part_weight=0.1, reduction=reduction)
    x = feats.clone().requires_grad_(True)
    out = tmgf_loss(x, memory, ids, tables, cfg)
    off = [_reduce_naive(_offline_naive(feats[:, k], memory[k], ids.tolist(), cp, 50), cams, reduction)
           for k in range(4)]
    on = [_reduce_naive(_online_naive(feats[:, k], memory[k], ids.tolist(), cp, 50, 3, 0.15), cams, reduction)
          for k in range(4)]
    part_off, part_on = sum(off[1:]) / 3, sum(on[1:]) / 3
    torch.testing.assert_close(out["global_off"], off[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(out["global_on"], on[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(out["part_off"], part_off, atol=1e-10, rtol=0)
    torch.testing.assert_close(out["part_on"], part_on, atol=1e-10, rtol=0)
    torch.testing.assert_close(out["loss"].detach(), off[0] + on[0] + 0.1 * (part_off + part_on), atol=1e-10, rtol=0)
    out["loss"].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad[:, 1:].abs().sum() > 0
    # global-only model: no part terms
    g_only = tmgf_loss(feats[:, :1], memory[:1], ids, tables, cfg)
    assert float(g_only["part_off"]) == 0.0 and float(g_only["part_on"]) == 0.0
    torch.testing.assert_close(g_only["loss"].detach(), off[0] + on[0], atol=1e-10, rtol=0)


def test_camera_groups_differs_from_mean_and_sums_groups() -> None:
    cp, memory, feats, ids = _setup(9, b=12)
    tables = ProxyTables.from_proxies(cp)
    per = offline_association_loss(feats[:, 0], memory[0], ids, tables, reduction="none")
    grouped = offline_association_loss(feats[:, 0], memory[0], ids, tables, reduction="camera_groups")
    n_groups = len(set(cp.proxy2cam[ids.numpy()].tolist()))
    assert n_groups > 1
    assert not math.isclose(float(grouped), float(per.mean()))
    # each group mean is in the sum: for equal per-sample losses the total is n_groups * value
    const = torch.ones_like(per)
    from trainer.losses.o2cap import reduce_per_sample

    assert float(reduce_per_sample(const, tables.proxy2cam[ids], "camera_groups")) == n_groups


def test_fp32_under_autocast_and_errors() -> None:
    cp, memory, feats, ids = _setup(10, b=8)
    tables = ProxyTables.from_proxies(cp)
    mem32, x32 = memory.float(), feats.float()
    ref = tmgf_loss(x32, mem32, ids, tables)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = tmgf_loss(x32, mem32, ids, tables)["loss"]
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="proxy ids must lie"):
        tmgf_loss(x32, mem32, ids - 100, tables)
    with pytest.raises(ValueError, match="expected \\[B, S, D\\]"):
        tmgf_loss(x32[:, 0], mem32, ids, tables)
    with pytest.raises(ValueError, match="reduction"):
        O2CAPLossConfig(reduction="sum")
    with pytest.raises(ValueError, match="few_cams"):
        O2CAPLossConfig(few_cams="drop")


def _official_offline(z: torch.Tensor, pos: list[int], neg_k: int) -> torch.Tensor:
    """The official selection, restated: positives masked to 1e4, ascending sort, keep the last neg_k + |Pos|."""
    temp = z.detach().clone()
    temp[pos] = 1e4
    sel = torch.argsort(temp)[-neg_k - len(pos):]
    target = torch.zeros(len(sel), dtype=z.dtype)
    target[-len(pos):] = 1.0 / len(pos)
    return -(F.log_softmax(z[sel], dim=0) * target).sum()


def _official_online(z: torch.Tensor, sim: torch.Tensor, cp: CameraProxies, neg_k: int, pos_k: int) -> torch.Tensor:
    """The official online selection, restated (cameras without proxies skipped, as the spec asks)."""
    sim = sim.clone()
    tops = []
    for cam in range(cp.num_cams):
        members = torch.as_tensor(cp.cam2proxy(cam))
        if members.numel():
            tops.append(int(members[sim[members].argmax()]))
    tops = torch.tensor(tops)
    sim[tops[torch.argsort(sim[tops])[-pos_k:]]] = 1e4
    sel = torch.sort(sim)[1][-neg_k - pos_k:]
    target = torch.zeros(len(sel), dtype=z.dtype)
    target[-pos_k:] = 1.0 / pos_k
    return -(F.log_softmax(z[sel], dim=0) * target).sum()


@pytest.mark.parametrize("seed,k,c,neg_k", [(13, 12, 5, 50), (14, 20, 5, 50), (15, 20, 5, 7), (16, 12, 3, 50)])
def test_matches_official_formulation(seed: int, k: int, c: int, neg_k: int) -> None:
    """Sort-and-slice selection of the official code == our masks (c=3: two cameras < pos_k, the 'fill' case)."""
    cp, memory, feats, ids = _setup(seed, n=40 * k // 3, k=k, c=c, b=8)
    tables = ProxyTables.from_proxies(cp)
    x, mem = feats[:, 0], memory[0]
    z = x @ mem.T / TAU
    sim = 0.15 * (x @ mem.T) + 0.85 * (mem[ids] @ mem.T)
    off = sum(_official_offline(z[i], cp.cluster2proxy(int(cp.proxy2cluster[p])).tolist(), neg_k)
              for i, p in enumerate(ids.tolist())) / len(ids)
    on = sum(_official_online(z[i], sim[i], cp, neg_k, 3) for i in range(len(ids))) / len(ids)
    torch.testing.assert_close(offline_association_loss(x, mem, ids, tables, neg_k=neg_k), off, atol=1e-10, rtol=0)
    torch.testing.assert_close(online_association_loss(x, mem, ids, tables, neg_k=neg_k), on, atol=1e-10, rtol=0)


def _train_steps(rank: int, world_size: int, cp_state, centers: torch.Tensor, batches):
    """loss -> backward -> memory.update on this rank's slice of every global batch (the documented order)."""
    from trainer import dist
    from trainer.memory.proxy import ProxyMemory

    cp = CameraProxies.from_state_dict(cp_state)
    tables = ProxyTables.from_proxies(cp)
    mem = ProxyMemory(num_slots=centers.shape[0], num_proxies=centers.shape[1], dim=centers.shape[2], device="cpu")
    mem.init_from_centers(centers)
    losses, grads = [], []
    for feats, ids in batches:
        lo, hi = dist.shard_range(feats.shape[0], rank, world_size)
        x = feats[lo:hi].clone().requires_grad_(True)
        loss = tmgf_loss(x, mem.memory, ids[lo:hi], tables)["loss"]
        loss.backward()
        mem.update(x.detach(), ids[lo:hi])
        losses.append(dist.all_reduce(loss.detach().clone()) / world_size)  # what DDP logs/averages
        grads.append(dist.all_gather(x.grad / world_size))  # the 1/world of DDP gradient averaging
    return torch.stack(losses), torch.stack(grads), mem.memory


def test_training_steps_world2_equal_world1() -> None:
    from tests.mp import run_distributed

    cp, memory, _, _ = _setup(17, s=3, b=8)
    g = torch.Generator().manual_seed(17)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, cp.num_proxies, (4,), generator=g).repeat_interleave(4)[torch.randperm(16, generator=g)]
        batches.append((F.normalize(torch.randn(16, 3, 16, generator=g), dim=-1), ids))
    centers = memory.float()
    one = _train_steps(0, 1, cp.state_dict(), centers, batches)
    two = run_distributed(_train_steps, 2, cp.state_dict(), centers, batches)
    for r in range(2):
        torch.testing.assert_close(two[r][0], one[0], atol=1e-5, rtol=F32_REL)  # losses up to ~18: 1e-5 alone is 5 ulp
        torch.testing.assert_close(two[r][1], one[1], atol=1e-6, rtol=0)
        torch.testing.assert_close(two[r][2], one[2], atol=1e-6, rtol=0)
    assert not torch.allclose(one[2], centers)  # the memory moved
