"""Tests of trainer.models: part-attention mask, fused masked block, PAT forward, regions, weights."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.models import (
    ModelOutput,
    PartAwareTransformer,
    available_backbones,
    build_model,
    build_vit,
    load_pretrained,
    masked_block_forward,
    part_attention_mask,
)
from trainer.models.pat import PartRegion, PartRegionSampler, band_tops, fixed_regions, random_regions

IMG = (64, 32)  # vit_test grid 4 x 2
GRID = (4, 2)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(backbone="vit_test", img_size=IMG, drop_path_rate=0.0)
    base.update(kw)
    return ModelConfig(**base)


# ----------------------------------------------------------------------------------------------
# Regions and mask


def naive_mask(grid: tuple[int, int], regions: list[PartRegion]) -> torch.Tensor:
    """The rule of docs/methods/pat.md §Attention mask restated entry by entry."""
    rows, cols = grid
    p_count = len(regions)
    n = 1 + p_count + rows * cols
    members = [set() for _ in regions]
    for p, g in enumerate(regions):
        for r in range(rows):
            for c in range(cols):
                if g.top <= r <= g.bottom and g.left <= c <= g.right:
                    members[p].add(1 + p_count + r * cols + c)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            i_part = 1 <= i <= p_count
            j_part = 1 <= j <= p_count
            if not i_part and not j_part:
                ok = True  # cls and patches: global attention
            elif i_part and j_part:
                ok = i == j  # a part sees itself, never another part
            elif i_part:
                ok = j == 0 or j in members[i - 1]
            else:
                ok = i == 0 or i in members[j - 1]
            m[i, j] = ok
    return m


def test_band_tops_match_official_and_generalise():
    assert band_tops(16, 3) == [0, 4, 8]  # H/4 steps, the official bands
    assert band_tops(16, 2) == [0, 8]
    assert band_tops(16, 1) == [4]
    assert band_tops(4, 3) == [0, 1, 2]
    for rows in (2, 4, 16, 24):
        for p in range(1, 6):
            tops = band_tops(rows, p)
            assert len(tops) == p and tops == sorted(tops)
            assert tops[0] >= 0 and tops[-1] + rows // 2 <= rows
    assert [(g.top, g.bottom, g.left, g.right) for g in fixed_regions((16, 8), 3)] == [
        (0, 7, 0, 7), (4, 11, 0, 7), (8, 15, 0, 7)]
    # the official commented-out test band: one row too many, clipped at the grid
    assert [(g.top, g.bottom) for g in fixed_regions((16, 8), 3, extra_row=True)] == [(0, 8), (4, 12), (8, 15)]


@pytest.mark.parametrize("grid", [GRID, (16, 8)])
@pytest.mark.parametrize("num_parts", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["fixed", "random"])
def test_mask_matches_naive_rule(grid, num_parts, mode):
    sampler = PartRegionSampler(grid, num_parts, seed=7)
    for _ in range(3 if mode == "random" else 1):
        regions = sampler.sample(mode)
        mask = part_attention_mask(grid, regions)
        assert torch.equal(mask, naive_mask(grid, regions))
        n_p, n = num_parts, mask.shape[0]
        assert mask[0].all()  # cls sees everything
        assert mask.diagonal().all()  # no query row is empty
        parts = mask[1 : 1 + n_p, 1 : 1 + n_p]
        assert torch.equal(parts, torch.eye(n_p, dtype=torch.bool))  # parts never see each other
        for p, g in enumerate(regions):
            cells = {1 + n_p + c for c in g.cells(grid)}
            seen = set(torch.nonzero(mask[1 + p]).flatten().tolist())
            assert seen == {0, 1 + p} | cells  # part: cls, itself, its region
            seen_by = set(torch.nonzero(mask[:, 1 + p]).flatten().tolist())
            assert seen_by == {0, 1 + p} | cells  # both directions
        patches = mask[1 + n_p :]
        assert patches[:, 0].all() and patches[:, 1 + n_p :].all()  # patches see cls and all patches
        assert n == 1 + n_p + grid[0] * grid[1]


def test_random_regions_reproducible_within_band_and_official_statistics():
    grid = (16, 8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draws = [random_regions(grid, 3, g1) for _ in range(3000)]
    assert draws[:50] == [random_regions(grid, 3, g2) for _ in range(50)]
    tops = band_tops(16, 3)
    incl = np.zeros((3, 16))
    heights, widths = set(), set()
    for regs in draws:
        for p, g in enumerate(regs):
            assert tops[p] <= g.top <= g.bottom <= min(tops[p] + 8, 15)  # t < h, but h=16 clips to 15
            assert 0 <= g.left <= g.right <= 7
            heights.add(g.bottom - g.top + 1)
            widths.add(g.right - g.left + 1)
            incl[p, g.top : g.bottom + 1] += 1
    assert len(heights) >= 6 and len(widths) >= 6  # sizes vary
    incl /= len(draws)
    # docs/methods/pat.md §Attention mask: P(row included) is 8/36=0.22 at the band edges and 24/36=0.67 in the centre
    # (rows t<h are a sorted pair of 9 values; row k is in [t,h] for (k+1)(9-k)-1 of 36 pairs).
    for p, top in enumerate(tops):
        for k in range(9):
            row = top + k
            if row < 16:
                expected = ((k + 1) * (9 - k) - 1) / 36
                assert abs(incl[p, row] - expected) < 0.04, (p, row, incl[p, row], expected)


def test_region_generator_state_is_checkpointed():
    cfg = tiny_cfg(region_seed=5)
    model = build_model(cfg, 4)
    for _ in range(3):
        model.regions.sample("random")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = [model.regions.sample("random") for _ in range(4)]
    other = build_model(tiny_cfg(region_seed=99), 4)
    other.load_state_dict(state)
    assert [other.regions.sample("random") for _ in range(4)] == expected


# ----------------------------------------------------------------------------------------------
# The fused masked block


def naive_block(blk, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pre-norm block with per-head masked attention written out: softmax over the allowed keys only."""
    attn = blk.attn
    b, n, d = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    h = blk.norm1(x)
    q, k, v = attn.qkv(h).split(d, dim=-1)
    out = torch.zeros_like(h)
    for bi in range(b):
        for head in range(heads):
            sl = slice(head * hd, (head + 1) * hd)
            for i in range(n):
                allowed = [j for j in range(n) if mask[i, j]]
                scores = torch.stack([(q[bi, i, sl] * k[bi, j, sl]).sum() / math.sqrt(hd) for j in allowed])
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                out[bi, i, sl] = sum(wj * v[bi, j, sl] for wj, j in zip(w, allowed))
    x = x + attn.proj(out)
    return x + blk.mlp(blk.norm2(x))


def test_fused_masked_block_equals_naive_float64():
    torch.manual_seed(0)
    vit = build_vit("vit_test", IMG, drop_path_rate=0.0, reg_tokens=3).double().eval()
    blk = vit.blocks[0]
    mask = part_attention_mask(GRID, random_regions(GRID, 3, torch.Generator().manual_seed(1)))
    x = torch.randn(2, mask.shape[0], vit.embed_dim, dtype=torch.float64)
    got = masked_block_forward(blk, x, mask)
    want = naive_block(blk, x, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # a mask that changes nothing would make this test vacuous: the unmasked block differs
    assert not torch.allclose(masked_block_forward(blk, x, None), want, atol=1e-6)
    if "attn_mask" in inspect.signature(blk.forward).parameters:  # timm's own masked block agrees
        torch.testing.assert_close(blk(x, attn_mask=mask), want, rtol=1e-10, atol=1e-10)


def test_masked_block_gradients_match_naive():
    torch.manual_seed(1)
    vit = build_vit("vit_test", IMG, drop_path_rate=0.0, reg_tokens=2).double().eval()
    blk = vit.blocks[1]
    mask = part_attention_mask(GRID, fixed_regions(GRID, 2))
    x = torch.randn(1, mask.shape[0], vit.embed_dim, dtype=torch.float64, requires_grad=True)
    g1 = torch.autograd.grad(masked_block_forward(blk, x, mask).square().sum(), x)[0]
    g2 = torch.autograd.grad(naive_block(blk, x, mask).square().sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# PAT forward vs timm


def test_pat_tokens_equal_timm_forward():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(num_parts=3), 5).eval()
    img = torch.randn(2, 3, *IMG)
    p = model.num_parts
    n = 1 + p + GRID[0] * GRID[1]
    # cls and patches see only each other (the part tokens are invisible to them): PAT's cls and
    # patch outputs must then equal timm's plain ViT with the same weights.
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[:, 1 : 1 + p] = False
    mask[1 : 1 + p, 1 : 1 + p] = torch.eye(p, dtype=torch.bool)
    tokens = model.forward_tokens(img, mask)
    plain = build_vit("vit_test", IMG, drop_path_rate=0.0).eval()
    sd = {k: v for k, v in model.backbone.state_dict().items() if k != "reg_token"}
    sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 1 + p :]], dim=1)
    plain.load_state_dict(sd)
    ref = plain.forward_features(img)
    torch.testing.assert_close(tokens[:, 0], ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1 + p :], ref[:, 1:], rtol=1e-5, atol=1e-5)
    # with the real PAT mask the whole token sequence equals timm's own masked forward
    # (timm lays out [cls, register tokens, patches] + pos_embed exactly as PAT does)
    if "attn_mask" in inspect.signature(model.backbone.forward_features).parameters:
        pmask = part_attention_mask(GRID, fixed_regions(GRID, p))
        torch.testing.assert_close(model.forward_tokens(img, pmask),
                                   model.backbone.forward_features(img, attn_mask=pmask), rtol=1e-5, atol=1e-5)
    # and the part mask matters: cls differs from the plain ViT's once parts are visible
    full = model.forward_tokens(img, part_attention_mask(GRID, fixed_regions(GRID, p)))
    assert not torch.allclose(full[:, 0], ref[:, 0], atol=1e-4)


def test_train_output_head_and_eval_determinism():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), 7)
    img = torch.randn(4, 3, *IMG)
    out = model.train()(img)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (4, 7) and out.cls.shape == (4, 64) and out.parts.shape == (4, 3, 64)
    assert model.head.classifier.bias is None
    assert abs(model.head.classifier.weight.std().item() - 0.001) < 0.0003
    # logits = classifier(BN(cls)) with batch statistics in training
    bn = model.head.bn
    feat_bn = (out.cls - out.cls.mean(0)) / torch.sqrt(out.cls.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(out.logits, feat_bn @ model.head.classifier.weight.t(), rtol=1e-4, atol=1e-6)
    model.eval()
    f1, f2 = model(img), model(img)
    assert torch.equal(f1, f2) and f1.shape == (4, 64)
    tokens = model.forward_tokens(img, part_attention_mask(GRID, fixed_regions(GRID, 3)))
    torch.testing.assert_close(f1, tokens[:, 0])  # eval: pre-BN cls, fixed bands
    after = build_model(tiny_cfg(neck_feat="after"), 7)
    after.load_state_dict(model.state_dict())
    torch.testing.assert_close(after.eval()(img), model.head.bn(f1))
    rand = build_model(tiny_cfg(test_part_regions="random"), 7)
    rand.load_state_dict(model.state_dict())
    rand.eval()
    assert not torch.equal(rand(img), rand(img))  # repo-exact test features are stochastic


def test_frozen_parameters_and_gradients():
    model = build_model(tiny_cfg(), 3)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias", "head.bn.bias"}
    unfrozen = build_model(tiny_cfg(freeze_patch_embed=False), 3)
    assert {n for n, p in unfrozen.named_parameters() if not p.requires_grad} == {"head.bn.bias"}
    out = model.train()(torch.randn(3, 3, *IMG))
    (out.logits.sum() + out.parts.square().sum() + out.cls.sum()).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n


def test_tie_part_tokens_shares_one_parameter():
    torch.manual_seed(0)
    tied = build_model(tiny_cfg(tie_part_tokens=True), 3)
    untied = build_model(tiny_cfg(), 3)
    assert tied.backbone.reg_token.shape == (1, 1, 64) and untied.backbone.reg_token.shape == (1, 3, 64)
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) - n_tied == 2 * 64
    out = tied.train()(torch.randn(2, 3, *IMG))
    out.parts[:, 1].square().sum().backward()  # part 2 trains the shared token (a plain sum of LN outputs is constant)
    assert tied.backbone.reg_token.grad.abs().sum() > 0
    # tied tokens differ only through their position rows and regions
    tied.eval()
    with torch.no_grad():
        tied.backbone.pos_embed[:, 1:4] = tied.backbone.pos_embed[:, :1]
        img = torch.randn(2, 3, *IMG)
        same = torch.ones(1 + 3 + 8, 1 + 3 + 8, dtype=torch.bool)  # every part sees the same keys
        tok = tied.forward_tokens(img, same)
    torch.testing.assert_close(tok[:, 1], tok[:, 2])
    torch.testing.assert_close(tok[:, 1], tok[:, 3])


def test_vit_baseline_is_timm_forward():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(name="vit"), 5)
    img = torch.randn(2, 3, *IMG)
    out = model.train()(img)
    assert out.parts is None and out.logits.shape == (2, 5)
    model.eval()
    torch.testing.assert_close(model(img), model.backbone.forward_features(img)[:, 0])


def test_config_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model(tiny_cfg(name="nope"), 3)
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'"):
        build_model(tiny_cfg(backbone="resnet50"), 3)
    with pytest.raises(ValueError, match="part_regions='grid'"):
        build_model(tiny_cfg(part_regions="grid"), 3)
    with pytest.raises(ValueError, match="num_parts=0"):
        build_model(tiny_cfg(num_parts=0), 3)
    with pytest.raises(ValueError, match="neck_feat"):
        build_model(tiny_cfg(neck_feat="middle"), 3)


@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, marks=pytest.mark.slow) if "base" in a else a for a in available_backbones()],
)
def test_every_backbone_builds_at_reid_size(arch):
    model = build_model(ModelConfig(backbone=arch, img_size=(256, 128)), 10)
    assert model.grid == (16, 8)
    bb = model.backbone
    assert bb.pos_embed.shape == (1, 1 + 3 + 128, model.feat_dim)
    assert len(bb.blocks) == {"vit_test": 2}.get(arch, 12)
    dims = {"vit_base_patch16_224": 768, "deit_base_patch16_224": 768, "vit_small_patch16_224": 384,
            "deit_small_patch16_224": 384, "deit_tiny_patch16_224": 192, "vit_test": 64}
    assert model.feat_dim == dims[arch]
    dpr = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0 for blk in bb.blocks]
    assert dpr[0] == 0.0 and dpr[-1] == pytest.approx(0.1)
    if arch in ("vit_test", "deit_tiny_patch16_224"):  # cheap enough to run once
        feat = model.eval()(torch.randn(1, 3, 256, 128))
        assert feat.shape == (1, model.feat_dim)


# ----------------------------------------------------------------------------------------------
# Weight loading


def _save_npz(vit, path) -> None:
    """Write a timm ViT in Google's JAX ViT layout (the inverse of timm's npz loader)."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    d = vit.embed_dim
    heads = vit.blocks[0].attn.num_heads
    hd = d // heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(vit.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[j * d : (j + 1) * d].T.reshape(d, heads, hd)
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * d : (j + 1) * d].reshape(heads, hd)
        out_kernel = sd[b + "attn.proj.weight"].reshape(d, heads, hd).transpose(1, 2, 0)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = out_kernel
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    w["head/kernel"] = np.random.randn(d, 11).astype(np.float32)  # a classifier that must be skipped
    w["head/bias"] = np.zeros(11, np.float32)
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in w.items()})


@pytest.fixture(scope="module")
def source_vit():
    """A randomly initialised tiny timm ViT at 32x32 (grid 2x2), the 'pretrained' model."""
    torch.manual_seed(123)
    vit = build_vit("vit_test", (32, 32), drop_path_rate=0.0)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # make every tensor distinctive (LN weights are all ones)
    return vit


def _check_loaded(model: PartAwareTransformer, src) -> None:
    bb, ssd = model.backbone, src.state_dict()
    for k, v in ssd.items():
        if k not in ("pos_embed", "cls_token"):
            torch.testing.assert_close(bb.state_dict()[k], v, rtol=0, atol=1e-7, msg=k)
    torch.testing.assert_close(bb.cls_token, ssd["cls_token"])
    for p in range(model.num_parts):  # every part token starts as the cls token
        torch.testing.assert_close(bb.reg_token[:, p], ssd["cls_token"][:, 0])
    pe = bb.pos_embed
    for r in range(1 + model.num_parts):  # [cls, cls, ..., cls] position rows
        torch.testing.assert_close(pe[:, r], ssd["pos_embed"][:, 0])
    grid = ssd["pos_embed"][:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=GRID, mode="bilinear").permute(0, 2, 3, 1).reshape(1, 8, -1)
    torch.testing.assert_close(pe[:, 1 + model.num_parts :], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["pth", "pth_wrapped", "safetensors", "npz"])
def test_load_pretrained_formats(tmp_path, source_vit, fmt):
    sd = {k: v.clone() for k, v in source_vit.state_dict().items()}
    sd_with_head = dict(sd, **{"head.weight": torch.randn(11, 64), "head.bias": torch.zeros(11)})
    if fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(sd_with_head, path)
    elif fmt == "pth_wrapped":
        path = tmp_path / "w.pt"
        torch.save({"model": {f"module.{k}": v for k, v in sd_with_head.items()}, "epoch": 3}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(sd_with_head, str(path))
    else:
        path = tmp_path / "w.npz"
        _save_npz(source_vit, path)
    model = build_model(tiny_cfg(pretrained=str(path)), 4)
    _check_loaded(model, source_vit)
    report = load_pretrained(model, path)
    assert report.derived == ["reg_token"] and report.resized == ["pos_embed"]
    assert "pos_embed" in report.loaded and "blocks.1.mlp.fc2.weight" in report.loaded
    if fmt != "npz":  # timm's npz loader drops the head itself
        assert set(report.skipped) == {"head.weight", "head.bias"}
    # tied part tokens load too
    tied = build_model(tiny_cfg(pretrained=str(path), tie_part_tokens=True), 4)
    torch.testing.assert_close(tied.backbone.reg_token, source_vit.cls_token)


def test_load_pretrained_errors(tmp_path, source_vit):
    model = build_model(tiny_cfg(), 4)
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, missing)
    bad = tmp_path / "w.h5"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"'\.h5'.*\.safetensors"):
        load_pretrained(model, bad)
    sd = {k: v.clone() for k, v in source_vit.state_dict().items()}
    del sd["norm.weight"]
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(128, 64)
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_pretrained(model, path)
    msg = str(err.value)
    assert "missing: norm.weight" in msg and "unexpected: extra.weight" in msg
    assert "blocks.0.mlp.fc1.weight (expected (256, 64), found (128, 64))" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    # a different patch size is refused, not resampled
    other = build_vit("vit_test", (32, 32), drop_path_rate=0.0, patch_size=8)
    path8 = tmp_path / "p8.pth"
    torch.save(other.state_dict(), path8)
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        load_pretrained(model, path8)


def test_weight_errors_are_one_line_user_errors_with_counts_names_and_fix(tmp_path, source_vit):
    from safetensors.torch import save_file

    from shards.errors import UserError
    from trainer.models.weights import WeightsError, WeightsNotFound

    model = build_model(tiny_cfg(), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsNotFound) as err:  # a UserError and still a FileNotFoundError
        load_pretrained(model, tmp_path / "nope.safetensors")
    assert isinstance(err.value, UserError) and isinstance(err.value, FileNotFoundError)
    assert str(err.value).startswith(f"model.pretrained={tmp_path / 'nope.safetensors'}: no such file")
    # many keys off: counted, a few named, then what to do — all on one line
    sd = {k: v.clone() for k, v in source_vit.state_dict().items() if not k.startswith("blocks.1.")}
    sd.update({f"extra.{i}": torch.zeros(1) for i in range(5)})
    sd["cls_token"] = torch.zeros(1, 1, 32)  # another width: reported, not a crash while deriving part tokens
    path = tmp_path / "other.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError) as err:
        load_pretrained(model, path)
    msg = str(err.value)
    n_block = sum(k.startswith("blocks.1.") for k in source_vit.state_dict())
    assert "\n" not in msg and msg.startswith(f"{path}: weights do not fit the model's VisionTransformer (")
    assert (f"{n_block + 1} missing: reg_token, blocks.1.norm1.weight, blocks.1.norm1.bias, "
            f"... and {n_block - 2} more") in msg
    assert "5 unexpected: extra.0, extra.1, extra.2, ... and 2 more" in msg
    assert "1 shape mismatch: cls_token (expected (1, 1, 64), found (1, 1, 32))" in msg
    assert msg.endswith("or model.pretrained='' to train from scratch") and len(msg) < 600
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    # damaged or mislabelled files: the reader's complaint, the file and the fix
    for name, data in (("cut.safetensors", b"\x10\x00\x00"), ("cut.pth", b"PK\x03\x04 truncated"),
                       ("cut.npz", b"not a zip")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError,
                           match=rf"{name}: (cannot read it as|not a plain tensor checkpoint, or a damaged)"):
            load_pretrained(model, tmp_path / name)


def test_config_from_hydra_node_and_mapping():
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"backbone": "vit_test", "img_size": [64, 32]})
    assert build_model(node, 3).grid == GRID
    assert build_model({"backbone": "vit_test", "img_size": [64, 32], "name": "vit"}, 3).grid == GRID
    with pytest.raises(ValueError, match="unknown model config key"):
        build_model({"backbone": "vit_test", "parts": 3}, 3)


def test_load_pretrained_grids_allow_missing_and_unsafe_pickle(tmp_path):
    torch.manual_seed(5)
    src = build_vit("vit_test", (32, 16), drop_path_rate=0.0)  # grid 2x1: not square, not the model's
    path = tmp_path / "rect.pth"
    torch.save(src.state_dict(), path)
    model = build_model(tiny_cfg(), 4)
    with pytest.raises(ValueError, match="cannot infer the pretrained grid from 2 position rows"):
        load_pretrained(model, path)
    with pytest.raises(ValueError, match=r"old_grid=\(3, 1\)"):
        load_pretrained(model, path, old_grid=(3, 1))
    load_pretrained(model, path, old_grid=(2, 1))
    grid = src.pos_embed[:, 1:].reshape(1, 2, 1, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=GRID, mode="bilinear").permute(0, 2, 3, 1).reshape(1, 8, -1)
    torch.testing.assert_close(model.backbone.pos_embed[:, 4:], want.detach())
    # same grid as the model: copied as is, including the part rows of a PAT checkpoint
    same = build_model(tiny_cfg(), 4)
    with torch.no_grad():
        same.backbone.reg_token.normal_()
        same.backbone.pos_embed.normal_()
    path2 = tmp_path / "same.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in same.backbone.state_dict().items()}, str(path2))
    report = load_pretrained(model, path2)
    assert report.resized == [] and report.derived == []
    torch.testing.assert_close(model.backbone.pos_embed, same.backbone.pos_embed)
    torch.testing.assert_close(model.backbone.reg_token, same.backbone.reg_token)
    # allow_missing keeps new parameters at their init
    sd = {k: v for k, v in src.state_dict().items() if k != "norm.bias"}
    path3 = tmp_path / "nonorm.pth"
    torch.save(sd, path3)
    with pytest.raises(ValueError, match="missing: norm.bias"):
        load_pretrained(model, path3, old_grid=(2, 1))
    report = load_pretrained(model, path3, old_grid=(2, 1), allow_missing=("norm.",))
    assert "norm.bias" not in report.loaded and "norm.weight" in report.loaded
    # rename hook: foreign names mapped, None drops
    path4 = tmp_path / "base.pth"
    torch.save({f"base.{k}": v for k, v in src.state_dict().items()} | {"base.fc.weight": torch.zeros(2)}, path4)
    report = load_pretrained(model, path4, old_grid=(2, 1),
                             rename=lambda k: None if k.startswith("base.fc") else k.removeprefix("base."))
    assert report.skipped == ["base.fc.weight"]
    # a pickled module is refused, never executed
    path5 = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path5)
    with pytest.raises(ValueError, match="module.pth: not a plain tensor checkpoint"):
        load_pretrained(model, path5)


def test_load_distilled_checkpoint_drops_dist_row(tmp_path):
    torch.manual_seed(6)
    src = build_vit("vit_test", (32, 32), drop_path_rate=0.0)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    dist_row = torch.full((1, 1, 64), 7.0)
    # DeiT-distilled layout: [cls, dist, grid] position rows, plus dist_token and head_dist
    sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], dist_row, sd["pos_embed"][:, 1:]], dim=1)
    sd["dist_token"] = torch.zeros(1, 1, 64)
    sd["head_dist.weight"] = torch.zeros(5, 64)
    path = tmp_path / "deit.pth"
    torch.save(sd, path)
    model = build_model(tiny_cfg(pretrained=str(path)), 4)
    _check_loaded(model, src)
    assert not (model.backbone.pos_embed == 7.0).any()
