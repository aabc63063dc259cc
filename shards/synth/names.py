"""The dataset plan: which images to write and their file names in each real layout.

Protocol: train and test identities are disjoint; each identity visits a random subset of at least
``min_cams_per_id`` cameras; per test identity, one image of every camera it visits is a query and the
other images are gallery (so same-camera matches exist, and every query has a cross-camera match).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shards.synth.config import MSMT_SLOTS, SynthConfig
from shards.synth.streams import K_DISTRACTOR, K_ID, K_JUNK, T_SPLIT, stream


@dataclass(frozen=True)
class Shot:
    """One image to write: who, where, and its file names (several for cuhk03np's two variants)."""

    kind: int
    group: int
    ident: int
    """Index inside the group (train/test/duke-distractor) or the distractor/junk number."""
    cam: int
    """0-based camera."""
    k: int
    session: int
    """Time-of-day session (Market's ``s`` field, MSMT17's time slot): modulates the light."""
    relpaths: tuple[str, ...]
    pid: int
    split: str
    val: bool = False


def plan(cfg: SynthConfig, dom: int) -> list[Shot]:
    c = cfg
    assert c.test_ids is not None and c.distractors is not None and c.junk is not None, "pass cfg.resolved()"
    r = stream(c.seed, dom, T_SPLIT)
    n_tr, n_te = c.ids, int(c.test_ids)
    k_img = c.images_per_id_cam
    # Duke's gallery distractors are gallery-only identities, one camera each.
    n_dd = math.ceil(c.distractors / k_img) if c.layout == "dukemtmc" else 0
    # Dataset pids are interleaved between train and test like the real sets (relabelling is tested).
    pool = r.permutation(np.arange(1, n_tr + n_te + n_dd + 1))
    pids = {0: np.sort(pool[:n_tr]), 1: np.sort(pool[n_tr:n_tr + n_te]), 2: np.sort(pool[n_tr + n_te:])}
    if c.layout == "msmt17":  # MSMT17 numbers train and test identities separately from 0
        pids = {0: np.arange(n_tr), 1: np.arange(n_te), 2: np.arange(0)}

    shots: list[Shot] = []
    counters: dict[int, int] = {}  # msmt17/cuhk03: running image index per (group, ident)
    n_sessions = len(MSMT_SLOTS) if c.layout == "msmt17" else 6

    def add(kind: int, group: int, ident: int, pid: int, cam: int, k: int, slot: int, folder: str, split: str,
            ir: np.random.Generator, val: bool = False) -> None:
        """Append one image; ``slot`` is unique among the images sharing ``pid`` (frames of different
        slots fall in disjoint ranges, so names never collide)."""
        key = group * 1_000_000 + ident
        n = counters.get(key, 0)
        counters[key] = n + 1
        session = int(ir.integers(0, n_sessions))
        if c.layout == "market1501":
            frame = 1 + 40 * slot + int(ir.integers(0, 40))
            p = "-1" if pid < 0 else f"{pid:04d}"
            rel: tuple[str, ...] = (
                f"{folder}/{p}_c{cam + 1}s{session + 1}_{frame:06d}_{int(ir.integers(1, 9)):02d}.jpg",)
        elif c.layout == "dukemtmc":
            frame = 1 + 60 * slot + int(ir.integers(0, 60))
            rel = (f"{folder}/{pid:04d}_c{cam + 1}_f{frame:07d}.jpg",)
        elif c.layout == "msmt17":
            frame = int(ir.integers(0, 10000))
            rel = (f"{folder}/{pid:04d}/{pid:04d}_{n:03d}_{cam + 1:02d}_{MSMT_SLOTS[session]}_{frame:04d}_"
                   f"{int(ir.integers(0, 10))}.jpg",)
        else:
            rel = tuple(f"{v}/{folder}/{pid:04d}_c{cam + 1}_{n + 1}.png" for v in ("detected", "labeled"))
        shots.append(Shot(kind, group, ident, cam, k, session, rel, pid, split, val))

    def id_cams(group: int, ident: int) -> list[int]:
        ir = stream(c.seed, dom, T_SPLIT, 1, group, ident)
        lo = min(c.cams, max(c.min_cams_per_id, 2 if c.cams >= 2 else 1))
        m = int(ir.integers(lo, c.cams + 1))
        return sorted(ir.choice(c.cams, size=m, replace=False).tolist())

    train_dir = "train" if c.layout == "msmt17" else "bounding_box_train"
    query_dir, gallery_dir = ("test", "test") if c.layout == "msmt17" else ("query", "bounding_box_test")
    for i in range(n_tr):
        for cam in id_cams(0, i):
            for k in range(k_img):
                ir = stream(c.seed, dom, T_SPLIT, 2, 0, i, cam, k)
                val = c.layout == "msmt17" and ir.random() < c.val_fraction
                add(K_ID, 0, i, int(pids[0][i]), cam, k, k + k_img * cam, train_dir, "train", ir, val)
    for i in range(n_te):
        cams = id_cams(1, i)
        ir = stream(c.seed, dom, T_SPLIT, 3, 1, i)
        # Query: one image per camera the identity visits (Market protocol); with one image per
        # camera, one camera stays gallery-only so each query keeps a cross-camera match.
        qcams = cams if k_img >= 2 else cams[:-1] if len(cams) > 1 else []
        qk = {cam: int(ir.integers(0, k_img)) for cam in qcams}
        for cam in cams:
            for k in range(k_img):
                is_q = qk.get(cam) == k
                add(K_ID, 1, i, int(pids[1][i]), cam, k, k + k_img * cam, query_dir if is_q else gallery_dir,
                    "query" if is_q else "gallery", stream(c.seed, dom, T_SPLIT, 2, 1, i, cam, k))
    for i in range(n_dd):  # Duke: gallery-only identities, one camera
        cam = int(stream(c.seed, dom, T_SPLIT, 4, i).integers(0, c.cams))
        for k in range(min(k_img, c.distractors - i * k_img)):
            ir = stream(c.seed, dom, T_SPLIT, 2, 2, i, cam, k)
            add(K_ID, 2, i, int(pids[2][i]), cam, k, k, gallery_dir, "gallery", ir)
    if c.layout == "market1501":
        for kind, n, pid in ((K_DISTRACTOR, c.distractors, 0), (K_JUNK, c.junk, -1)):
            for j in range(n):
                ir = stream(c.seed, dom, T_SPLIT, 5, kind, j)
                add(kind, -1 - kind, j, pid, int(ir.integers(0, c.cams)), 0, j, gallery_dir, "gallery", ir)
    return shots
