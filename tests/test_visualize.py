"""``python -m trainer.visualize``: attention maps and ranking lists of real pat_smoke / tmgf_smoke runs.

The runs are trained here (PAT one step, ending in a checkpoint; TMGF one short epoch, ending in
``model_final.safetensors``), so both weight paths are read. The figures are read back from the PNG
files and compared with what the stores say (pids, cameras), not with what the code under test says.
"""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import compose
from trainer.data.catalogue import SampleIndex
from trainer.evaluation.rank import evaluate_features
from trainer.methods.common import open_store
from trainer.visualize import attention, ranking
from trainer.visualize.cli import main
from trainer.visualize.report import Report, visualize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CACHE = f"data.cache_dir={Path(__file__).resolve().parents[1] / '.cache' / 'reid'}"
"""The repository's synthetic smoke sets, by absolute path: the runs' config.yaml then works from any folder."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pat_smoke run stopped after one step (a checkpoint, no final model) and a one-epoch tmgf_smoke run."""
    from trainer.train import run

    root = tmp_path_factory.mktemp("vis-runs")
    pat = run(compose(["exp=pat_smoke", CACHE, f"run_dir={root / 'pat'}", "train.max_steps=1",
                       "train.ckpt_every_steps=0"]))
    assert pat.status == "max_steps"
    tmgf = run(compose(["exp=tmgf_smoke", CACHE, f"run_dir={root / 'tmgf'}", "train.epochs=1", "tmgf.iters_per_epoch=2",
                        "train.ckpt_every_steps=0"]))
    assert tmgf.status == "finished"
    return {"pat": root / "pat", "tmgf": root / "tmgf"}


@pytest.fixture(scope="module")
def reports(runs: dict[str, Path]) -> dict[str, Report]:
    return {name: visualize(path, queries=4, topk=5) for name, path in runs.items()}


def _png(data: bytes) -> Image.Image:
    assert data[:8] == PNG_SIGNATURE
    Image.open(io.BytesIO(data)).verify()  # checks the chunks' CRCs
    return Image.open(io.BytesIO(data)).convert("RGB")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for k, v in attrs:
            if k == "src":
                self.srcs.append(v or "")
            if k == "href":
                self.links.append(v or "")


@pytest.mark.parametrize("name", ["pat", "tmgf"])
def test_writes_valid_pngs_and_one_self_contained_page(name: str, reports: dict[str, Report]) -> None:
    rep = reports[name]
    assert set(rep.files) == {"attention", "ranking", "html"}
    for key in ("attention", "ranking"):
        _png(rep.files[key].read_bytes())
    text = rep.files["html"].read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    parsed = _Page()
    parsed.feed(text)
    assert parsed.tags.count("img") == 2 and not parsed.links and "<script" not in text
    for src in parsed.srcs:  # every image inline: the page is one file
        assert src.startswith("data:image/png;base64,")
        _png(base64.b64decode(src.split(",", 1)[1]))
    assert {base64.b64decode(s.split(",", 1)[1]) for s in parsed.srcs} == {
        rep.files["attention"].read_bytes(), rep.files["ranking"].read_bytes()}
    assert not list(rep.files["html"].parent.glob(".*tmp*"))  # atomic writes left no temporary


def test_weights_come_from_the_checkpoint_or_the_final_model(runs: dict[str, Path], reports: dict[str, Report]) -> None:
    page = reports["pat"].files["html"].read_text()
    assert "checkpoints/step_000000001/state.pt" in page  # the PAT run stopped before a final model
    assert str(runs["tmgf"] / "model_final.safetensors") in reports["tmgf"].files["html"].read_text()


def _stores(exp: str, target: str) -> tuple[SampleIndex, SampleIndex]:
    cfg = compose([f"exp={exp}", CACHE])
    return open_store(cfg, [target], "query", False), open_store(cfg, [target], "gallery", False)


@pytest.mark.parametrize("name", ["pat", "tmgf"])
def test_ranking_frames_exactly_the_true_matches(name: str, runs: dict[str, Path], reports: dict[str, Report]) -> None:
    """The frame colour of every tile of ranking.png against the stores' pids and cameras: green exactly
    on the true matches (same pid, other camera), grey on same-pid same-camera junk, red elsewhere."""
    rep = reports[name]
    query, gallery = _stores(f"{name}_smoke", rep.target)
    sheet = _png(rep.files["ranking"].read_bytes())
    colours = {v: k for k, v in ranking.COLORS.items()}
    seen = set()
    assert len(rep.lists) == len(rep.ranking_boxes) == 4
    for r, boxes in zip(rep.lists, rep.ranking_boxes):
        qp, qc = int(query.pid[r.query]), int(query.camid[r.query])
        assert sheet.getpixel((boxes[0][0] + 1, (boxes[0][1] + boxes[0][3]) // 2)) == ranking.QUERY_COLOR
        assert len(boxes) == 1 + len(r.hits)
        for h, (x0, y0, _, y1) in zip(r.hits, boxes[1:]):
            gp, gc = int(gallery.pid[h.gallery]), int(gallery.camid[h.gallery])
            want = "junk" if (gp, gc) == (qp, qc) else "true" if gp == qp else "false"
            got = colours.get(sheet.getpixel((x0 + 1, (y0 + y1) // 2)))  # type: ignore[arg-type]
            assert got == want, (r.query, h)
            seen.add(got)
        counted = [h for h in r.hits if h.rank is not None]
        assert [h.rank for h in counted] == list(range(1, len(counted) + 1))
        assert len(counted) == min(5, len(gallery) - sum((gallery.pid == qp) & (gallery.camid == qc)))
        assert r.hits[-1].rank is not None  # the list ends at its k-th counted image
    assert "false" in seen  # a tiny model's lists are mostly wrong: the check had red frames to tell apart


def test_rank_lists_follow_the_evaluation_protocol() -> None:
    """Full-length lists give each query the AP the evaluator computes: same distance, same order (ties
    by gallery index: the features take few values, so exact ties are common), same junk rule.
    Float64 sums of the same terms in the same order: equal to 1e-12."""
    gen = torch.Generator().manual_seed(0)
    qf = torch.randint(0, 3, (30, 4), generator=gen).double() + 1
    gf = torch.randint(0, 3, (60, 4), generator=gen).double() + 1
    q_pids, g_pids = (torch.randint(0, 6, (n,), generator=gen).numpy() for n in (30, 60))
    q_cams, g_cams = (torch.randint(0, 3, (n,), generator=gen).numpy() for n in (30, 60))
    m = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, return_per_query=True, device="cpu")
    lists = ranking.rank_lists(qf, gf, q_pids, q_cams, g_pids, g_cams, list(range(30)), topk=60)
    checked = 0
    for r in lists:
        ranks = [h.rank for h in r.hits if h.verdict == "true" and h.rank is not None]
        assert len(r.hits) == 60 and r.num_true == len(ranks)
        if not ranks:
            assert np.isnan(m["AP"][r.query])
            continue
        ap = float(np.mean([k / rank for k, rank in enumerate(ranks, 1)]))
        assert ap == pytest.approx(m["AP"][r.query], rel=1e-12, abs=0)
        checked += 1
    assert checked >= 20
    picked = ranking.pick_queries(q_pids, q_cams, g_pids, g_cams, 5)
    assert len(picked) == 5 and all(not np.isnan(m["AP"][q]) for q in picked)


def _vit_models() -> list[Any]:
    import dataclasses

    from trainer.models import build_model

    pat = build_model(compose(["exp=pat_smoke"]).model, num_classes=4).eval()
    tmgf_cfg = compose(["exp=tmgf_smoke"]).model
    tmgf = build_model(dataclasses.replace(tmgf_cfg, num_cams=3), num_classes=0).eval()
    return [pat, tmgf]


def test_recomputed_attention_weights_are_the_ones_the_blocks_use() -> None:
    """weights @ v equals what each block feeds its output projection, for PAT's masked fused forward and
    for timm's own block (TMGF): the hook reads the real attention. float32 SDPA vs an explicit softmax
    of the same values: 1e-5."""
    torch.manual_seed(0)
    img = torch.randn(2, 3, 64, 32)
    camid = torch.tensor([0, 2])
    for model in _vit_models():
        blocks = [b.get_submodule("block") for b in model.branches] if hasattr(model, "branches") else \
            [model.backbone.blocks[-1]]
        fed: list[torch.Tensor] = []
        hooks = [b.attn.proj.register_forward_pre_hook(lambda _m, args, fed=fed: fed.append(args[0])) for b in blocks]
        with attention.record_qkv(blocks) as kept:
            if hasattr(model, "branches"):
                model.branch_tokens(img, camid)
            else:
                model.forward_tokens(img, model.attention_mask(img.device))
        for h in hooks:
            h.remove()
        for i, b in enumerate(blocks):
            qkv = kept[i][-1]
            mask = model.attention_mask(img.device) if not hasattr(model, "branches") else None
            w = attention.attention_weights(b.attn, qkv, mask)
            torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=0, atol=1e-6)
            v = qkv.reshape(2, qkv.shape[1], 3, b.attn.num_heads, b.attn.head_dim).permute(2, 0, 3, 1, 4)[2]
            out = (w @ v).transpose(1, 2).reshape(2, qkv.shape[1], -1)
            torch.testing.assert_close(out, fed[i], rtol=0, atol=1e-5)


def test_rollout_is_the_product_of_residual_normalised_layers() -> None:
    """A float64 restatement: (A + I) row-normalised per layer, multiplied last layer leftmost."""
    gen = torch.Generator().manual_seed(1)
    layers = [torch.rand(2, 5, 5, generator=gen, dtype=torch.float64).softmax(-1) for _ in range(3)]
    steps = [(a + torch.eye(5)) / 2 for a in layers]  # rows of a sum to 1: (a + I) / 2 is already normalised
    torch.testing.assert_close(attention.rollout(layers), steps[2] @ steps[1] @ steps[0], rtol=0, atol=1e-12)


def test_pat_part_maps_stay_in_their_regions(reports: dict[str, Report], runs: dict[str, Path]) -> None:
    """Each part token's map is zero outside its region (the mask PAT evaluates with), the class token's
    nowhere; each row of weights (patches plus tokens) sums to one, so the patch share is at most one."""
    from trainer.models.pat import fixed_regions, region_membership

    maps = reports["pat"].maps
    parts = compose(["exp=pat_smoke"]).model.num_parts
    assert maps.names == ["cls"] + [f"part {p + 1}" for p in range(parts)]
    grid = (int(maps.maps.shape[-2]), int(maps.maps.shape[-1]))
    member = region_membership(grid, fixed_regions(grid, parts)).reshape(parts, *grid)  # test_part_regions=fixed
    for p in range(parts):
        part = maps.maps[:, 1 + p]
        assert bool((part[:, ~member[p]] == 0).all()) and bool((part[:, member[p]] > 0).all())
    assert bool((maps.maps[:, 0] > 0).all())
    assert bool((maps.mass <= 1 + 1e-6).all()) and bool((maps.mass > 0).all())


def test_tmgf_has_one_rollout_per_branch(reports: dict[str, Report]) -> None:
    maps = reports["tmgf"].maps
    assert maps.names == ["branch 1 rollout", "branch 2 rollout"] and maps.stripes == [2, 3]
    assert bool((maps.maps > 0).all()) and bool((maps.mass < 1).all())  # the class token keeps some of itself


def test_cli_writes_into_out_and_prints_the_files(runs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(runs["tmgf"]), "--out", str(tmp_path / "vis"), "--query", "3", "--query", "0",
                 "--topk", "2"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "vis" / f) for f in ("attention.png", "ranking.png", "index.html")]
    sheet = _png((tmp_path / "vis" / "ranking.png").read_bytes())
    assert sheet.height > 0 and "query 3:" in (tmp_path / "vis" / "index.html").read_text()
