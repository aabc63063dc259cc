"""The pictures of one run on one target: attention maps, ranking lists, and the page that holds both."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from shards.atomic import atomic_write_bytes
from shards.errors import UserError
from trainer import dist
from trainer.config import Config
from trainer.data.catalogue import SampleIndex
from trainer.data.dataset import decode
from trainer.data.transforms import Pipeline
from trainer.evaluation.rank import evaluate_features
from trainer.methods.common import Target, extract, transforms
from trainer.visualize import attention, ranking
from trainer.visualize.attention import AttentionMaps
from trainer.visualize.draw import Box, fit, tile_size
from trainer.visualize.load import LoadedRun, load_run
from trainer.visualize.page import page
from trainer.visualize.ranking import RankingList

ATTENTION_TILE = 192
"""Display height of the attention tiles (pixels)."""
RANKING_TILE = 128
"""Display height of the ranking tiles (Market-1501's own image height)."""


@dataclass
class Report:
    """What :func:`visualize` wrote and the data it drew (the tests read the figures back against it)."""

    target: str
    files: dict[str, Path]
    """``attention``, ``ranking`` (PNG) and ``html``."""
    lists: list[RankingList]
    ranking_boxes: list[list[Box]]
    """Per ranking row: the query tile's box in ``ranking.png``, then each hit's, in order."""
    maps: AttentionMaps
    metrics: dict[str, float] = field(default_factory=dict)


def _check_out(out: Path) -> None:
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {out}: {probe} is not a folder; pass another --out")


def _check_queries(query_ids: list[int], n: int) -> None:
    bad = [q for q in query_ids if not 0 <= q < n]
    if bad:
        raise UserError(f"--query {bad[0]}: the target's query set has {n} images (indices 0..{n - 1}); pass an "
                        "index in that range, or --queries N to pick N")


def _features(model: nn.Module, batch_size: int, workers: int, store: SampleIndex, tf: Pipeline,
              tmgf: bool) -> torch.Tensor:
    """The evaluation's features: the model's eval output (PAT), TMGF's global slot with camera ids."""
    if tmgf:
        from trainer.methods.tmgf import SlotView

        return extract(SlotView(model, "global"), store, tf, batch_size, workers, inputs=("img", "camid"))
    return extract(model, store, tf, batch_size, workers)


def _rank(model: nn.Module, tgt: Target, tf: Pipeline, cfg: Config, tmgf: bool, query_ids: list[int] | None,
          queries: int, topk: int) -> tuple[list[RankingList], dict[str, float]]:
    """The ranking lists of the chosen queries (each with its AP) and the target's mAP / R1."""
    bs, workers = cfg.eval.batch_size, cfg.data.num_workers
    qf, gf = (_features(model, bs, workers, store, tf, tmgf) for store in (tgt.query, tgt.gallery))
    q, g = tgt.query, tgt.gallery
    try:
        m = evaluate_features(qf, gf, q.pid, g.pid, q.camid, g.camid, max_rank=topk, return_per_query=True)
    except ValueError as exc:  # no query has a true match in the gallery
        raise UserError(f"--target {tgt.name}: {exc}") from None
    chosen = list(query_ids) if query_ids else ranking.pick_queries(q.pid, q.camid, g.pid, g.camid, queries)
    lists = ranking.rank_lists(qf, gf, q.pid, q.camid, g.pid, g.camid, chosen, topk)
    for r in lists:
        ap = float(m["AP"][r.query])
        r.ap = None if np.isnan(ap) else ap
    return lists, {"mAP": float(m["mAP"]), "R1": float(m["cmc"][0]), "valid": float(m["num_valid_queries"])}


def _attention(model: nn.Module, tgt: Target, tf: Pipeline, cfg: Config, chosen: list[int],
               raw: list[Image.Image]) -> tuple[bytes, AttentionMaps]:
    """The maps of the chosen queries, computed on what the model sees (the test transform of the raw
    images), drawn on the raw images resized to the model's aspect."""
    device = next(model.parameters()).device
    batch = torch.stack([tf(img) for img in raw]).to(device)
    camid = torch.as_tensor(tgt.query.camid[chosen], dtype=torch.long, device=device)
    maps = attention.maps_for(model, batch, camid)
    rows, cols = model.grid  # type: ignore[misc]  # PAT's and TMGF's patch grid, a plain attribute
    tiles = [fit(img, tile_size(cfg.model.img_size, ATTENTION_TILE)) for img in raw]
    caps = [(f"query {i}", f"pid {int(tgt.query.pid[i])} cam {int(tgt.query.camid[i])}") for i in chosen]
    return attention.render(tiles, caps, maps, (int(rows), int(cols))), maps


def _describe(model_name: str) -> str:
    if model_name == "tmgf":
        return "TMGF: attention rollout of the class token through the shared trunk and each branch's last block"
    if model_name == "vit":
        return "ViT baseline: last-block attention (heads averaged) of the class token"
    return "PAT: last-block attention (heads averaged) of the class token and of each part token; part regions outlined"


def _page(run: LoadedRun, tgt: Target, topk: int, metrics: dict[str, float], attention_png: bytes,
          ranking_png: bytes, lists: list[RankingList]) -> str:
    cfg = run.cfg
    facts = {"run": str(run.run_dir), "weights": str(run.weights), "method": cfg.method, "target": tgt.name,
             "queries / gallery": f"{len(tgt.query)} / {len(tgt.gallery)}",
             "mAP / R1": f"{metrics['mAP']:.4f} / {metrics['R1']:.4f} ({int(metrics['valid'])} valid queries)"}
    return page(f"{cfg.name} on {tgt.name}", facts, [
        ("Attention", _describe(cfg.model.name) + "; each map scaled to its maximum (jet: blue low, red high).",
         attention_png),
        (f"Ranking lists (top {topk})", "Distance 2 - 2 cos of the evaluation features; ties by gallery index; "
         "junk shown where it falls but not counted.", ranking_png),
    ], lists)


def visualize(run_dir: str | Path, *, weights: str | None = None, target: str | None = None, queries: int = 6,
              query_ids: list[int] | None = None, topk: int = 10, out: str | Path | None = None,
              data_root: str | None = None) -> Report:
    """Write ``attention.png``, ``ranking.png`` and ``index.html`` for ``queries`` queries of ``target``
    into ``out`` (default ``RUN_DIR/visualize/TARGET``); every user mistake is raised before any write."""
    if topk < 1 or queries < 1:
        raise UserError(f"--topk {topk} --queries {queries}: both must be >= 1")
    run, tgt = load_run(run_dir, weights, target, data_root)
    out_dir = Path(out) if out else run.run_dir / "visualize" / tgt.name
    _check_out(out_dir)
    _check_queries(list(query_ids or []), len(tgt.query))
    model = run.model.to(dist.info().device)
    tf = transforms(run.cfg, train=False)
    lists, metrics = _rank(model, tgt, tf, run.cfg, hasattr(model, "branches"), query_ids, queries, topk)
    chosen = [r.query for r in lists]
    raw = [decode(tgt.query.get_bytes(i)) for i in chosen]
    attention_png, maps = _attention(model, tgt, tf, run.cfg, chosen, raw)
    size = tile_size(run.cfg.model.img_size, RANKING_TILE)
    gallery = {h.gallery: fit(decode(tgt.gallery.get_bytes(h.gallery)), size) for r in lists for h in r.hits}
    ranking_png, boxes = ranking.render(lists, [fit(img, size) for img in raw], gallery)
    html = _page(run, tgt, topk, metrics, attention_png, ranking_png, lists)

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"attention": out_dir / "attention.png", "ranking": out_dir / "ranking.png", "html": out_dir / "index.html"}
    for key, data in (("attention", attention_png), ("ranking", ranking_png), ("html", html.encode("utf-8"))):
        atomic_write_bytes(files[key], data)
    return Report(tgt.name, files, lists, boxes, maps, metrics)
