"""PKSampler / InferenceSampler: reference semantics, rank split, resume, exact-once."""

from __future__ import annotations

import time

import numpy as np
import pytest

from trainer.data.samplers import InferenceSampler, PKSampler, _rng, class_uniform_epoch, pk_epoch


def _pids(seed: int = 0, n_ids: int = 23, max_imgs: int = 9) -> np.ndarray:
    """Labels with uneven group sizes, including ids with fewer than K images, shuffled order."""
    r = np.random.default_rng(seed)
    counts = r.integers(1, max_imgs + 1, size=n_ids)
    pids = np.repeat(np.arange(n_ids) * 3 + 1, counts)  # non-contiguous label values
    return pids[r.permutation(len(pids))]


def _naive_pk_epoch(pids: np.ndarray, P: int, K: int, rng: np.random.Generator) -> list[list[list[int]]]:
    """Python-list restatement of pk_epoch consuming the same random draws in the same order."""
    valid = [i for i in range(len(pids)) if pids[i] >= 0]
    keys = rng.random(len(valid))
    order = [i for _, _, i in sorted((int(pids[i]), float(k), i) for i, k in zip(valid, keys))]
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(int(pids[i]), []).append(i)
    labels = sorted(groups)
    small = [u for u in labels if len(groups[u]) < K]
    draws = rng.integers(0, np.array([len(groups[u]) for u in small])[:, None], size=(len(small), K)) if small else []
    chunks: dict[int, list[list[int]]] = {}
    for u in labels:
        g = groups[u]
        if len(g) >= K:
            chunks[u] = [g[j * K : (j + 1) * K] for j in range(len(g) // K)]  # remainder dropped
    for u, d in zip(small, draws):
        chunks[u] = [[groups[u][int(x)] for x in d]]  # K draws with replacement
    avail = list(range(len(labels)))
    n = len(avail)
    out = []
    while n >= P:
        picks = rng.integers(np.arange(P), n)
        for j in range(P):
            r = int(picks[j])
            avail[j], avail[r] = avail[r], avail[j]
        batch = []
        for slot in avail[:P]:
            batch.append(chunks[labels[slot]].pop(0))
        out.append(batch)
        for pos in range(P - 1, -1, -1):
            if not chunks[labels[avail[pos]]]:
                n -= 1
                avail[pos], avail[n] = avail[n], avail[pos]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pk_epoch_matches_naive_restatement(seed: int) -> None:
    pids = _pids(seed)
    pids[:3] = -1  # outliers are never drawn
    fast = pk_epoch(pids, 4, 4, _rng(seed, 0, 0))
    slow = _naive_pk_epoch(pids, 4, 4, _rng(seed, 0, 0))
    assert fast.tolist() == slow
    assert len(slow) > 3


def test_reference_semantics() -> None:
    P, K = 4, 4
    pids = _pids(5)
    batches = pk_epoch(pids, P, K, _rng(9, 0, 0))
    uniq, counts = np.unique(pids, return_counts=True)
    chunks_of = {int(u): (c // K if c >= K else 1) for u, c in zip(uniq, counts)}
    used = {int(u): 0 for u in uniq}
    seen: dict[int, list[int]] = {int(u): [] for u in uniq}
    for b in batches:
        ids = [int(pids[chunk[0]]) for chunk in b]
        assert len(set(ids)) == P  # P distinct identities
        for chunk in b:
            assert len({int(pids[i]) for i in chunk}) == 1  # K images of one identity
            used[int(pids[chunk[0]])] += 1
            seen[int(pids[chunk[0]])] += chunk.tolist()
    for u, c in zip(uniq.tolist(), counts.tolist()):
        assert used[u] <= chunks_of[u]
        if c >= K:
            assert len(set(seen[u])) == len(seen[u])  # without replacement within an epoch
    # the loop stops only when fewer than P identities have chunks left
    assert sum(1 for u in used if used[u] < chunks_of[u]) < P
    # consistent with the total: every chunk either used or left in fewer than P ids
    assert len(batches) * P == sum(used.values())


def test_uniform_identity_choice() -> None:
    """Each identity is equally likely in the first batch (P/N): reference draws P ids uniformly."""
    pids = np.repeat(np.arange(10), 8)
    hits = np.zeros(10)
    trials = 600
    for s in range(trials):
        first = pk_epoch(pids, 3, 4, _rng(s, 0, 0))[0]
        hits[pids[first[:, 0]]] += 1
    freq = hits / trials
    assert np.all(np.abs(freq - 0.3) < 0.08), freq


def _naive_class_uniform(pids: np.ndarray, P: int, K: int, rng: np.random.Generator) -> list[list[list[int]]]:
    """The reference ClassUniformlySampler restated with Python lists, on the same random draws."""
    valid = [i for i in range(len(pids)) if pids[i] >= 0]
    keys = rng.random(len(valid))
    groups: dict[int, list[int]] = {}
    for _, _, i in sorted((int(pids[i]), float(k), i) for i, k in zip(valid, keys)):
        groups.setdefault(int(pids[i]), []).append(i)  # each class's list, shuffled
    labels = sorted(groups)
    small = [u for u in labels if len(groups[u]) < K]
    copy_keys = iter(rng.random(sum(len(groups[u]) * K for u in small)).tolist())
    chunk = {}
    for u in labels:
        g = groups[u]
        if len(g) >= K:
            chunk[u] = g[:K]  # shuffled, first K
        else:
            copies = [(next(copy_keys), j) for j in range(len(g) * K)]  # the list repeated K times
            chunk[u] = [g[j % len(g)] for _, j in sorted(copies)[:K]]  # shuffled, first K
    perm = rng.permutation(len(labels)).tolist()
    flat = [chunk[labels[c]] for c in perm]
    return [flat[b * P : (b + 1) * P] for b in range(len(flat) // P)]  # drop_last


@pytest.mark.parametrize("seed", [0, 1])
def test_class_uniform_matches_naive_restatement(seed: int) -> None:
    pids = _pids(seed, n_ids=30)
    pids[:4] = -1
    fast = class_uniform_epoch(pids, 4, 4, _rng(seed, 0, 0))
    assert fast.tolist() == _naive_class_uniform(pids, 4, 4, _rng(seed, 0, 0))
    classes = np.unique(pids[pids >= 0])
    assert len(fast) == len(classes) // 4
    ids = pids[fast[:, :, 0]].reshape(-1)
    assert len(set(ids.tolist())) == len(ids)  # every class at most once per pass
    for chunk in fast.reshape(-1, 4):
        members = np.flatnonzero(pids == pids[chunk[0]])
        assert set(chunk.tolist()) <= set(members.tolist())
        if len(members) >= 4:
            assert len(set(chunk.tolist())) == 4  # without replacement
    s = PKSampler(pids, 4, 4, seed=seed, world_size=2, rank=1, steps_per_epoch=50, policy="class_uniform")
    assert len(s) == 50 and all(len(b) == 8 for b in s)


@pytest.mark.parametrize("P,worlds", [(8, (2, 4, 8)), (6, (2, 3))])
def test_local_batches_whole_identities_and_union_equals_global(P: int, worlds: tuple[int, ...]) -> None:
    pids = _pids(1, n_ids=40)
    K = 4
    world1 = PKSampler(pids, P, K, seed=3, world_size=1, rank=0)
    g = list(world1)
    for world in worlds:
        parts = [list(PKSampler(pids, P, K, seed=3, world_size=world, rank=r)) for r in range(world)]
        assert all(len(p) == len(g) for p in parts)
        for step in range(len(g)):
            local = [p[step] for p in parts]
            for batch in local:
                assert len(batch) == (P // world) * K
                ids = [int(pids[i]) for i in batch]
                # whole identities: K consecutive indices share a pid, distinct pids across chunks
                chunks = [ids[j * K : (j + 1) * K] for j in range(P // world)]
                assert all(len(set(c)) == 1 for c in chunks)
                assert len({c[0] for c in chunks}) == P // world
            assert sum(local, []) == g[step]  # rank order concatenation is the global batch


def test_resume_mid_epoch_and_epochs_differ() -> None:
    pids = _pids(2, n_ids=30)
    s = PKSampler(pids, 4, 4, seed=11, world_size=2, rank=1)
    s.set_epoch(3)
    full = list(s)
    s.advance(5)
    state = s.state_dict()
    assert state == {"seed": 11, "epoch": 3, "cursor": 5}
    t = PKSampler(pids, 4, 4, seed=11, world_size=2, rank=1)
    t.load_state_dict(state)
    assert list(t) == full[5:]
    assert len(t) == len(full)
    s.set_epoch(4)
    assert s.cursor == 0 and list(s) != full
    s.set_epoch(3)
    assert list(s) == full  # a pure function of (seed, epoch)
    with pytest.raises(ValueError, match="seed"):
        PKSampler(pids, 4, 4, seed=12).load_state_dict(state)


def test_fixed_steps_per_epoch_concatenates_rounds() -> None:
    pids = _pids(3, n_ids=12)
    one_pass = len(pk_epoch(pids, 4, 4, _rng(5, 2, 0)))
    steps = 3 * one_pass + 1
    s = PKSampler(pids, 4, 4, seed=5, world_size=1, rank=0, steps_per_epoch=steps)
    s.set_epoch(2)
    got = s.global_batches()
    assert len(s) == steps == len(got)
    assert np.array_equal(got[:one_pass], pk_epoch(pids, 4, 4, _rng(5, 2, 0)))
    nxt = pk_epoch(pids, 4, 4, _rng(5, 2, 1))
    assert np.array_equal(got[one_pass : one_pass + len(nxt)], nxt[: steps - one_pass])
    # resume inside a later round
    full = list(s)
    t = PKSampler(pids, 4, 4, seed=5, world_size=1, rank=0, steps_per_epoch=steps)
    t.load_state_dict({"seed": 5, "epoch": 2, "cursor": steps - 2})
    assert list(t) == full[-2:]
    # shorter than one pass: a prefix
    u = PKSampler(pids, 4, 4, seed=5, world_size=1, rank=0, steps_per_epoch=2)
    u.set_epoch(2)
    assert np.array_equal(u.global_batches(), got[:2])


def test_set_pids_and_outliers() -> None:
    pids = _pids(4, n_ids=20)
    s = PKSampler(pids, 4, 2, seed=0, world_size=1, rank=0)
    before = list(s)
    new = pids.copy()
    new[new == pids[0]] = -1
    s.set_pids(new)
    after = sum(list(s), [])
    assert all(new[i] >= 0 for i in after)
    assert sum(before, []) != after


def test_errors() -> None:
    pids = _pids(0, n_ids=10)
    with pytest.raises(ValueError, match="divisible"):
        PKSampler(pids, 3, 4, world_size=2, rank=0)
    with pytest.raises(ValueError, match="fewer than P"):
        PKSampler(pids, 16, 4, world_size=1, rank=0)
    with pytest.raises(ValueError, match="cursor"):
        PKSampler(pids, 2, 4, world_size=1, rank=0).load_state_dict({"seed": 0, "epoch": 0, "cursor": 10**6})


def test_scales_to_100k_identities() -> None:
    r = np.random.default_rng(0)
    pids = np.repeat(np.arange(100_000), r.integers(1, 7, size=100_000))
    t0 = time.perf_counter()
    b = pk_epoch(pids, 16, 4, _rng(0, 0, 0))
    dt = time.perf_counter() - t0
    assert b.shape[1:] == (16, 4) and len(b) > 5000
    assert dt < 15.0, f"one epoch over 100k ids took {dt:.1f} s"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 3, 7])
def test_inference_sampler_exact_once(n: int, world: int) -> None:
    parts = [list(InferenceSampler(n, r, world)) for r in range(world)]
    assert sum(parts, []) == list(range(n))  # contiguous, in rank order, each once, no padding
    assert [len(InferenceSampler(n, r, world)) for r in range(world)] == [len(p) for p in parts]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
