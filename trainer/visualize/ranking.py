"""Ranking lists: a query and its top-k gallery images, as the evaluation ranks them.

The same distance as the evaluation (:func:`trainer.evaluation.rank.pairwise_distance`: ``2 − 2 cos``
of the eval features), the same order (ascending distance, ties by gallery index) and the same junk
rule: a gallery image with the query's pid *and* camera is junk, removed from the ranking. Junk is
shown where it falls, framed grey and labelled ``junk``, and is not counted: the k counted images are
exactly the protocol's first k, and their rank numbers are the positions CMC and AP use. A true
match (same pid, other camera) is framed green, anything else red — distractors (pid 0 or −1 in the
gallery) included, since they match no query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer.evaluation.rank import pairwise_distance
from trainer.visualize.draw import RGB, Box, Cell, compose, framed, png_bytes

TRUE, FALSE, JUNK = "true", "false", "junk"
COLORS: dict[str, RGB] = {TRUE: (0, 170, 0), FALSE: (220, 30, 30), JUNK: (150, 150, 150)}
"""Frame colour of a gallery image by verdict."""
QUERY_COLOR: RGB = (30, 90, 220)


def verdict(q_pid: int, q_camid: int, g_pid: int, g_camid: int) -> str:
    """The protocol's reading of one (query, gallery) pair."""
    if g_pid != q_pid:
        return FALSE
    return JUNK if g_camid == q_camid else TRUE


@dataclass(frozen=True)
class Hit:
    """One gallery image of a ranking list."""

    gallery: int
    """Index in the gallery store."""
    pid: int
    camid: int
    distance: float
    verdict: str
    rank: int | None
    """1-based position in the protocol's ranking (junk removed); None for junk."""


@dataclass
class RankingList:
    query: int
    """Index in the query store."""
    pid: int
    camid: int
    hits: list[Hit]
    """The gallery in ranked order up to the k-th counted image, junk included where it falls."""
    num_true: int
    """True matches of the query in the whole gallery (0: the protocol skips this query)."""
    ap: float | None = None
    """The query's AP from the evaluation (None for a skipped query)."""


@torch.no_grad()
def rank_lists(qf: torch.Tensor, gf: torch.Tensor, q_pids: np.ndarray, q_camids: np.ndarray, g_pids: np.ndarray,
               g_camids: np.ndarray, queries: list[int], topk: int) -> list[RankingList]:
    """The ranking list of each query index in ``queries`` (``topk`` counted images each)."""
    if not queries:
        return []
    dist = pairwise_distance(qf[queries], gf).cpu()
    g_pids, g_camids = np.asarray(g_pids), np.asarray(g_camids)
    out = []
    for row, q in enumerate(queries):
        qp, qc = int(q_pids[q]), int(q_camids[q])
        order = torch.sort(dist[row], stable=True).indices.numpy()  # stable: ties by gallery index
        same = g_pids[order] == qp
        junk = same & (g_camids[order] == qc)
        counted = np.cumsum(~junk)
        stop = int(np.searchsorted(counted, topk, side="left")) + 1  # through the k-th counted image
        hits = []
        for pos in range(min(stop, len(order))):
            g = int(order[pos])
            v = verdict(qp, qc, int(g_pids[g]), int(g_camids[g]))
            hits.append(Hit(g, int(g_pids[g]), int(g_camids[g]), float(dist[row, g]), v,
                            None if v == JUNK else int(counted[pos])))
        out.append(RankingList(q, qp, qc, hits, int((same & ~junk).sum())))
    return out


def pick_queries(q_pids: np.ndarray, q_camids: np.ndarray, g_pids: np.ndarray, g_camids: np.ndarray,
                 count: int) -> list[int]:
    """``count`` queries spread evenly over those the protocol evaluates (a true match in the gallery)."""
    cams_of: dict[int, set[int]] = {}
    for p, c in zip(np.asarray(g_pids).tolist(), np.asarray(g_camids).tolist()):
        cams_of.setdefault(int(p), set()).add(int(c))
    valid = [i for i, (p, c) in enumerate(zip(np.asarray(q_pids).tolist(), np.asarray(q_camids).tolist()))
             if cams_of.get(int(p), set()) - {int(c)}]
    if not valid or count <= 0:
        return []
    picks = np.linspace(0, len(valid) - 1, num=min(count, len(valid))).round().astype(int)
    return [valid[i] for i in dict.fromkeys(picks.tolist())]


def _query_caption(r: RankingList) -> tuple[str, ...]:
    ap = f"AP {r.ap:.2f}" if r.ap is not None else "no true match"
    return f"query {r.query}", f"pid {r.pid} cam {r.camid}", ap


def _hit_caption(h: Hit) -> tuple[str, ...]:
    head = "junk" if h.rank is None else f"#{h.rank}"
    return f"{head} pid {h.pid}", f"cam {h.camid} d {h.distance:.3g}", ""


def render(lists: list[RankingList], query_images: list[Image.Image],
           gallery_images: dict[int, Image.Image]) -> tuple[bytes, list[list[Box]]]:
    """The PNG (one row per query: the query framed blue, then its hits framed by verdict) and the box
    of every framed tile, per row: the query's first, then its hits in order."""
    rows = []
    for r, q_img in zip(lists, query_images):
        row = [Cell(framed(q_img, QUERY_COLOR), _query_caption(r))]
        for i, h in enumerate(r.hits):
            row.append(Cell(framed(gallery_images[h.gallery], COLORS[h.verdict]), _hit_caption(h),
                            gap_before=16 if i == 0 else 0))
        rows.append(row)
    sheet, boxes = compose(rows)
    return png_bytes(sheet), boxes
