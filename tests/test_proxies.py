"""Camera-aware proxies (cluster/proxies.py) and the proxy memory (memory/proxy.py) against naive restatements."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.mp import run_distributed
from trainer.cluster.proxies import CameraProxies, make_camera_proxies, proxy_centers
from trainer.memory.proxy import ProxyMemory, occurrence_rank, sequential_momentum_update


# ----------------------------------------------------------------------------------------------- helpers
def _random_clustering(seed: int, n: int = 120, k: int = 9, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, k, size=n)
    camids = rng.integers(0, c - 1, size=n)  # camera c-1 only for outliers: no proxy there
    labels[labels == 4] = 5  # cluster id 4 empty: tolerated, it owns no proxy
    outliers = np.nonzero(labels == -1)[0]
    camids[outliers[:3]] = c - 1
    labels[0], camids[0] = k, 0  # a single-image cluster, hence a single-image proxy
    return labels, camids


def _naive_split(labels: np.ndarray, camids: np.ndarray):
    """The official cam_label_split restated with python loops."""
    proxy_labels = [-1] * len(labels)
    proxy2cluster, proxy2cam = [], []
    counter = 0
    for c in range(int(labels.max()) + 1):
        members = [i for i in range(len(labels)) if labels[i] == c]
        for cam in sorted({int(camids[i]) for i in members}):
            for i in members:
                if camids[i] == cam:
                    proxy_labels[i] = counter
            proxy2cluster.append(c)
            proxy2cam.append(cam)
            counter += 1
    return np.array(proxy_labels), np.array(proxy2cluster), np.array(proxy2cam)


# ----------------------------------------------------------------------------------------------- proxies
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_matches_naive(seed: int) -> None:
    labels, camids = _random_clustering(seed)
    cp = make_camera_proxies(labels, camids)
    want_labels, want_p2c, want_p2cam = _naive_split(labels, camids)
    np.testing.assert_array_equal(cp.proxy_labels, want_labels)
    np.testing.assert_array_equal(cp.proxy2cluster, want_p2c)
    np.testing.assert_array_equal(cp.proxy2cam, want_p2cam)
    assert cp.num_proxies == len(want_p2c) and cp.num_clusters == int(labels.max()) + 1
    assert cp.num_cams == int(camids.max()) + 1
    for c in range(cp.num_clusters):
        np.testing.assert_array_equal(cp.cluster2proxy(c), np.nonzero(want_p2c == c)[0])
    for cam in range(cp.num_cams):
        np.testing.assert_array_equal(cp.cam2proxy(cam), np.nonzero(want_p2cam == cam)[0])
    assert cp.cam2proxy(cp.num_cams - 1).size == 0  # the outlier-only camera
    assert cp.cluster2proxy(4).size == 0  # the empty cluster id
    sizes = cp.proxy_sizes()
    assert sizes[cp.proxy_labels[0]] == 1 and sizes.sum() == (labels >= 0).sum()


def test_split_state_dict_roundtrip_and_errors() -> None:
    labels, camids = _random_clustering(3)
    cp = make_camera_proxies(labels, camids)
    back = CameraProxies.from_state_dict(cp.state_dict())
    for key, value in cp.state_dict().items():
        np.testing.assert_array_equal(getattr(back, key), value)
    broken = cp.state_dict()
    broken["cam_ptr"][1] += 1  # camera 0 claims a proxy of camera 1
    with pytest.raises(ValueError, match="cam_ptr"):
        CameraProxies.from_state_dict(broken)
    with pytest.raises(KeyError, match="proxy2cam"):
        CameraProxies.from_state_dict({k: v for k, v in cp.state_dict().items() if k != "proxy2cam"})
    with pytest.raises(ValueError, match="0-based"):
        make_camera_proxies(labels, camids - 1)
    with pytest.raises(ValueError, match="equal 1-D"):
        make_camera_proxies(labels, camids[:-1])
    with pytest.raises(ValueError, match="num_cams"):
        make_camera_proxies(labels, camids, num_cams=2)
    assert make_camera_proxies(labels, camids, num_cams=9).num_cams == 9


def test_all_outliers_gives_no_proxy() -> None:
    cp = make_camera_proxies(np.full(6, -1), np.arange(6) % 3)
    assert cp.num_proxies == 0 and cp.num_clusters == 0 and (cp.proxy_labels == -1).all()


@pytest.mark.parametrize("slots", [None, 3])
def test_proxy_centers_match_naive(slots: int | None) -> None:
    labels, camids = _random_clustering(4)
    cp = make_camera_proxies(labels, camids)
    g = torch.Generator().manual_seed(0)
    shape = (len(labels), 16) if slots is None else (slots, len(labels), 16)
    feats = torch.randn(*shape, generator=g) * 3.0  # unnormalised on purpose: each image is normalised first
    got = proxy_centers(feats, cp.proxy_labels, chunk=17)  # small chunks exercise the chunk loop
    f64 = feats.double() if slots is not None else feats.double().unsqueeze(0)
    want = torch.zeros(f64.shape[0], cp.num_proxies, 16, dtype=torch.float64)
    for s in range(f64.shape[0]):
        for p in range(cp.num_proxies):
            members = [i for i in range(len(labels)) if cp.proxy_labels[i] == p]
            mean = sum(f64[s, i] / f64[s, i].norm() for i in members) / len(members)
            want[s, p] = mean / mean.norm()
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="without images"):
        proxy_centers(feats, cp.proxy_labels, num_proxies=cp.num_proxies + 1)


# ----------------------------------------------------------------------------------------------- memory
def _naive_update(memory: torch.Tensor, feats: torch.Tensor, ids: torch.Tensor, mu: float) -> torch.Tensor:
    """The official backward loop: one sample after another, every slot."""
    mem = memory.clone()
    for i, y in enumerate(ids.tolist()):
        mem[:, y] = mu * mem[:, y] + (1.0 - mu) * feats[i]
        mem[:, y] /= mem[:, y].norm(dim=1, keepdim=True)
    return mem


def test_occurrence_rank() -> None:
    ids = torch.tensor([3, 1, 3, 3, 0, 1, 7, 3])
    assert occurrence_rank(ids).tolist() == [0, 0, 1, 2, 0, 1, 0, 3]
    assert occurrence_rank(torch.zeros(0, dtype=torch.long)).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequential_update_matches_naive_loop(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    s, p, d, b = 6, 20, 16, 16
    memory = F.normalize(torch.randn(s, p, d, generator=g, dtype=dtype), dim=-1)
    ids = torch.tensor([5, 2, 5, 9, 5, 2, 0, 19, 5, 3, 3, 11, 2, 7, 0, 5])  # proxy 5 five times
    feats = F.normalize(torch.randn(b, s, d, generator=g, dtype=dtype), dim=-1)
    want = _naive_update(memory, feats, ids, 0.2)
    got = memory.clone()
    sequential_momentum_update(got, feats, ids, 0.2)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    untouched = sorted(set(range(p)) - set(ids.tolist()))
    assert torch.equal(got[:, untouched], memory[:, untouched])
    # order matters: the reversed batch gives a different memory (so the test can tell)
    rev = memory.clone()
    sequential_momentum_update(rev, feats.flip(0), ids.flip(0), 0.2)
    assert not torch.allclose(rev, got, atol=1e-4)


def test_memory_init_update_state_and_api_order() -> None:
    g = torch.Generator().manual_seed(2)
    mem = ProxyMemory(num_slots=3, num_proxies=0, dim=16, momentum=0.2, device="cpu")
    centers = F.normalize(torch.randn(3, 12, 16, generator=g), dim=-1)
    mem.init_from_centers(centers)
    assert mem.num_proxies == 12 and mem.memory.dtype == torch.float32
    torch.testing.assert_close(mem.memory, centers)
    feats = F.normalize(torch.randn(8, 3, 16, generator=g), dim=-1)
    ids = torch.tensor([1, 1, 4, 4, 7, 7, 7, 7])
    want = _naive_update(mem.memory, feats, ids, 0.2)
    # the loss reads the pre-update memory; updating before backward is refused by autograd
    x = feats[:, 0].clone().requires_grad_(True)
    loss = (x @ mem.slot(0).T).logsumexp(-1).sum()
    mem.update(feats.half(), ids)  # any float dtype is accepted (cast to fp32)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # fp16 features: the cast rounds each |x| <= 1 by <= 2^-11 ~ 4.9e-4 (exact rounding, no kernel
    # involved), the update weighs them by 0.8 -> <= 4e-4; a wrong slot or momentum moves it by >= 0.05
    torch.testing.assert_close(mem.memory, want, atol=1e-3, rtol=0)
    state = mem.state_dict()
    other = ProxyMemory(num_slots=3, num_proxies=1, dim=16, device="cpu")
    other.load_state_dict(state)
    assert torch.equal(other.memory, mem.memory) and other.momentum == 0.2
    with pytest.raises(ValueError, match="proxy ids"):
        mem.update(feats, ids + 5)
    with pytest.raises(ValueError, match="expected \\[B, 3, 16\\]"):
        mem.update(feats[:, :2], ids)
    with pytest.raises(ValueError, match="centers"):
        mem.init_from_centers(centers[:2])
    with pytest.raises(ValueError, match="memory"):
        other.load_state_dict({"memory": torch.zeros(2, 3, 16)})


def _global_batches(steps: int, b: int, s: int, p: int, d: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, p, (b // 4,), generator=g).repeat_interleave(4)  # PK-style duplicates
        ids = ids[torch.randperm(b, generator=g)]
        out.append((F.normalize(torch.randn(b, s, d, generator=g), dim=-1), ids))
    return out


def _memory_rank_body(rank: int, world_size: int, centers: torch.Tensor, batches):
    """Both layouts in one spawn: equal shard_range slices, and a ragged last step (B/4 vs 3B/4 rows)."""
    from trainer import dist

    out = []
    for ragged in (False, True):
        mem = ProxyMemory(num_slots=centers.shape[0], num_proxies=centers.shape[1], dim=centers.shape[2], device="cpu")
        mem.init_from_centers(centers)
        for step, (feats, ids) in enumerate(batches):
            b = feats.shape[0]
            if ragged and step == len(batches) - 1:
                if rank == 0:
                    lo, hi = 0, b // 4
                else:  # the other ranks share the rest unevenly
                    a, e = dist.shard_range(b - b // 4, rank - 1, world_size - 1)
                    lo, hi = b // 4 + a, b // 4 + e
            else:
                lo, hi = dist.shard_range(b, rank, world_size)
            mem.update(feats[lo:hi], ids[lo:hi])
        out.append(mem.memory)
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_memory_equals_world1(world: int) -> None:
    s, p, d = 6, 24, 16
    centers = F.normalize(torch.randn(s, p, d, generator=torch.Generator().manual_seed(4)), dim=-1)
    batches = _global_batches(steps=4, b=16, s=s, p=p, d=d)
    single = ProxyMemory(num_slots=s, num_proxies=p, dim=d, device="cpu")
    single.init_from_centers(centers)
    naive = centers.clone()
    for feats, ids in batches:
        single.update(feats, ids)
        naive = _naive_update(naive, feats, ids, 0.2)
    torch.testing.assert_close(single.memory, naive, atol=1e-6, rtol=0)
    ranks = run_distributed(_memory_rank_body, world, centers, batches)  # 16 rows: 6+5+5 at W = 3
    for layout in range(2):
        for other in ranks[1:]:
            assert torch.equal(ranks[0][layout], other[layout])
        torch.testing.assert_close(ranks[0][layout], single.memory, atol=0, rtol=0)
