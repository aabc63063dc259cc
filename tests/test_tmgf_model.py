"""Tests of the TMGF model (trainer/models/tmgf.py) against naive restatements of docs/methods/tmgf.md §Model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.models import build_model
from trainer.models.ibn_stem import IBNStemPatchEmbed
from trainer.models.tmgf import TMGF, TMGF_VARIANTS, stripe_pool
from trainer.models.tmgf_weights import transreid_key

IMG = (64, 32)  # vit_test: grid 4 x 2
B = 4
CAMS = 3


def tmgf_cfg(**kw) -> ModelConfig:
    base = dict(name="tmgf", backbone="vit_test", img_size=IMG, drop_path_rate=0.0, num_cams=CAMS)
    base.update(kw)
    return ModelConfig(**base)


def make(seed: int = 0, **kw) -> TMGF:
    torch.manual_seed(seed)
    return build_model(tmgf_cfg(**kw), num_classes=0)


def inputs(seed: int = 1, size: tuple[int, int] = IMG, batch: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g), torch.randint(0, CAMS, (batch,), generator=g)


def naive_bn(x: torch.Tensor, bn: torch.nn.BatchNorm1d, training: bool) -> torch.Tensor:
    x = x.double()
    if training:
        mean, var = x.mean(0), x.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.double() + bn.bias.double()


# ----------------------------------------------------------------------------------------------
# Shapes, contract


@pytest.mark.parametrize("train", [True, False])
def test_output_shape_unit_norm_and_attributes(train):
    model = make()
    assert (model.num_slots, model.num_parts, model.feat_dim, model.num_cams) == (6, 5, 64, CAMS)
    assert model.grid == (4, 2) and len(model.branches) == 2
    img, cam = inputs()
    out = model.train(train)(img, cam)
    assert out.shape == (B, 6, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(B, 6))


def test_forward_is_bn_then_l2_of_raw_features_train_and_eval():
    model = make()
    img, cam = inputs()
    for train in (True, False):
        model.train(train)
        raw = model.raw_features(img, cam)
        want = torch.stack([naive_bn(raw[:, i], model.necks[i], train) for i in range(6)], dim=1)
        want = want / want.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(model(img, cam).double(), want, atol=1e-5, rtol=1e-5)


def test_eval_uses_running_stats_train_updates_them():
    model = make()
    img, cam = inputs()
    before = model.necks[0].running_mean.clone()
    model.train()(img, cam)
    assert not torch.equal(before, model.necks[0].running_mean)
    model.eval()
    with torch.no_grad():
        full = model(img, cam)
        half = model(img[:2], cam[:2])  # eval features do not depend on the rest of the batch
    torch.testing.assert_close(full[:2], half, atol=1e-5, rtol=1e-5)


def test_global_is_mean_of_branch_cls_and_parts_are_branch_stripes_in_order():
    model = make().eval()
    img, cam = inputs()
    with torch.no_grad():
        raw = model.raw_features(img, cam)
        outs = model.branch_tokens(img, cam)
    torch.testing.assert_close(raw[:, 0], 0.5 * (outs[0][:, 0] + outs[1][:, 0]))
    rows, cols = model.grid
    parts = []
    for branch, k in ((0, 2), (1, 3)):
        patches = outs[branch][:, 1:].double().reshape(B, rows, cols, -1)
        for s in range(k):
            lo, hi = math.floor(s * rows / k), math.ceil((s + 1) * rows / k)
            parts.append(patches[:, lo:hi].mean(dim=(1, 2)))
    torch.testing.assert_close(raw[:, 1:].double(), torch.stack(parts, dim=1), atol=1e-6, rtol=1e-6)


def test_branch_is_copy_of_last_block_then_ln_on_trunk_without_final_norm():
    model = make().eval()
    img, cam = inputs()
    bb = model.backbone
    with torch.no_grad():
        x = bb.patch_embed(img)
        x = torch.cat([bb.cls_token.expand(B, -1, -1), x], 1) + bb.pos_embed + 3.0 * model.cam_embed[cam]
        x = bb.blocks[0](x)  # vit_test has 2 blocks: the trunk is block 1 only, no final LayerNorm
        torch.testing.assert_close(model.trunk(img, cam), x)
        want = bb.norm(bb.blocks[1](x))  # the branches start as copies of block 2 + the final LayerNorm
        for tokens in model.branch_tokens(img, cam):
            torch.testing.assert_close(tokens, want)


# ----------------------------------------------------------------------------------------------
# Stem, camera embedding, stripes


def naive_ibn(x: torch.Tensor, ibn, training: bool) -> torch.Tensor:
    half = x.shape[1] // 2
    a, b = x[:, :half], x[:, half:]
    # InstanceNorm: per sample and channel over H x W, biased variance, then the affine.
    mean_a, var_a = a.mean(dim=(2, 3), keepdim=True), a.var(dim=(2, 3), unbiased=False, keepdim=True)
    a = (a - mean_a) / torch.sqrt(var_a + ibn.inorm.eps) * ibn.inorm.weight.double().view(1, -1, 1, 1) \
        + ibn.inorm.bias.double().view(1, -1, 1, 1)
    return torch.cat([a, naive_bn2d(b, ibn.bnorm, training)], dim=1)


def naive_bn2d(x: torch.Tensor, bn, training: bool) -> torch.Tensor:
    if training:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    return (x - v(mean)) / torch.sqrt(v(var) + bn.eps) * v(bn.weight) + v(bn.bias)


@pytest.mark.parametrize("train", [True, False])
def test_ibn_stem_matches_naive_restatement(train):
    torch.manual_seed(0)
    embed = IBNStemPatchEmbed(img_size=IMG, patch_size=16, in_chans=3, embed_dim=48)
    for m in embed.modules():  # non-trivial affine parameters and running statistics
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
            if m.running_mean is not None:
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    img, _ = inputs()
    s = embed.stem
    w = lambda conv: conv.weight.double()  # noqa: E731
    x = img.double()
    x = F.relu(naive_ibn(F.conv2d(x, w(s.conv1), stride=2, padding=3), s.norm1, train))
    x = F.relu(naive_ibn(F.conv2d(x, w(s.conv2), padding=1), s.norm2, train))
    x = F.relu(naive_bn2d(F.conv2d(x, w(s.conv3), padding=1), s.norm3, train))
    assert x.shape[-2:] == (32, 16)  # stride 2
    x = F.conv2d(x, w(embed.proj), embed.proj.bias.double(), stride=8)
    want = x.flatten(2).transpose(1, 2)  # row-major tokens
    got = embed.train(train)(img)
    assert got.shape == (B, 4 * 2, 48) and embed.grid_size == (4, 2) and embed.num_patches == 8
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="built for img_size"):
        embed(torch.zeros(1, 3, 32, 32))


def test_reid_size_grid_and_plain_patch_stem():
    model = make(img_size=(384, 128), tmgf_granularities=(2, 3, 4))
    assert model.grid == (24, 8) and model.backbone.pos_embed.shape == (1, 1 + 192, 64)
    plain = make(tmgf_stem="patch")
    assert type(plain.backbone.patch_embed).__name__ == "PatchEmbed"
    img, cam = inputs()
    assert plain(img, cam).shape == (B, 6, 64)


def test_camera_embedding_changes_output_with_its_coefficient():
    img, cam = inputs()
    model = make(cam_embed_coef=3.0).eval()
    assert model.cam_embed.shape == (CAMS, 1, 64)
    # trunc_normal_(std=0.02) cuts at +-2 absolute (timm/TransReID alike): in effect N(0, 0.02^2)
    assert 0.012 < model.cam_embed.std().item() < 0.03
    other = (cam + 1) % CAMS
    with torch.no_grad():
        out, out_other = model(img, cam), model(img, other)
        trunk3 = model.trunk(img, cam)
        model.cam_embed_coef = 1.0
        trunk1 = model.trunk(img, cam)
        model.cam_embed_coef = 0.0
        trunk0 = model.trunk(img, cam)
    assert (out - out_other).abs().amax(dim=(1, 2)).min() > 1e-4  # every sample changes
    # the trunk is affine in the camera term only through the first block: check via the input tokens
    bb = model.backbone
    with torch.no_grad():
        tokens = torch.cat([bb.cls_token.expand(B, -1, -1), bb.patch_embed(img)], 1) + bb.pos_embed
        for coef, got in ((3.0, trunk3), (1.0, trunk1), (0.0, trunk0)):
            want = bb.blocks[0](tokens + coef * model.cam_embed[cam])  # every token, same vector
            torch.testing.assert_close(got, want)
    # coefficient 0: no camera parameter at all; the output ignores the camera
    flat = make(cam_embed_coef=0.0).eval()
    assert flat.cam_embed is None
    with torch.no_grad():
        torch.testing.assert_close(flat(img, cam), flat(img, other))


def test_camid_is_checked():
    model = make().eval()
    img, cam = inputs()
    with pytest.raises(ValueError, match=r"num_cams=3"):
        model(img, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="shape"):
        model(img, cam[:2])
    with pytest.raises(ValueError, match="integer"):
        model(img, cam.float())


@pytest.mark.parametrize("rows,cols,k", [(4, 2, 2), (4, 2, 3), (6, 2, 3), (24, 8, 4), (5, 3, 2), (4, 2, 1)])
def test_stripe_pool_matches_naive_row_means(rows, cols, k):
    g = torch.Generator().manual_seed(rows * 100 + k)
    tokens = torch.randn(3, rows * cols, 5, generator=g)
    got = stripe_pool(tokens, (rows, cols), k)
    want = torch.zeros(3, k, 5, dtype=torch.float64)
    for s in range(k):
        lo, hi = math.floor(s * rows / k), math.ceil((s + 1) * rows / k)
        cells = [r * cols + c for r in range(lo, hi) for c in range(cols)]
        for b in range(3):
            want[b, s] = sum(tokens[b, i].double() for i in cells) / len(cells)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    if rows % k == 0:  # the official pooling (AvgPool2d over (H/K, W) windows, stride H/K)
        fmap = tokens.transpose(1, 2).reshape(3, 5, rows, cols)
        official = F.avg_pool2d(fmap, kernel_size=(rows // k, cols), stride=(rows // k, cols))
        torch.testing.assert_close(got, official.flatten(2).transpose(1, 2))


# ----------------------------------------------------------------------------------------------
# Heads, gradients, variants


def test_bn_necks_have_frozen_zero_bias_and_every_trainable_param_gets_a_gradient():
    model = make(drop_path_rate=0.1).train()
    for neck in model.necks:
        assert torch.equal(neck.weight, torch.ones(64)) and torch.equal(neck.bias, torch.zeros(64))
        assert neck.weight.requires_grad and not neck.bias.requires_grad
    img, cam = inputs()
    out = model(img, cam)
    (out * torch.randn_like(out)).sum().backward()
    # the trunk's block L / final LN only seed the branches: frozen, so DDP has no unused trainable param
    seeds = {id(p) for p in list(model.backbone.blocks[-1].parameters()) + list(model.backbone.norm.parameters())}
    for name, p in model.named_parameters():
        if id(p) in seeds or name.startswith("necks.") and name.endswith(".bias"):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_one_branch_leaves_the_other_untouched():
    model = make().train()
    img, cam = inputs()
    b0, b1 = model.branches
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(b0.parameters(), b1.parameters()))
    before = {k: v.clone() for k, v in b1.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model.branch_tokens(img, cam)[0].pow(2).mean()  # depends on branch 1 only
    loss.backward()
    assert all(p.grad is None for p in b1.parameters())
    opt.step()
    for k, v in b1.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert not torch.equal(b0.block.attn.qkv.weight, b1.block.attn.qkv.weight)


@pytest.mark.parametrize("variant", sorted(TMGF_VARIANTS))
def test_variants_produce_their_documented_slots(variant):
    expected = {"tmgf": (6, 2), "tmgf1": (1, 1), "tmgf2": (3, 1), "tmgf3": (4, 1), "tmgf4": (6, 1),
                "tmgf5": (6, 2), "tmgf6": (6, 2)}
    model = make(**TMGF_VARIANTS[variant]).eval()
    slots, branches = expected[variant]
    assert (model.num_slots, len(model.branches), model.num_parts) == (slots, branches, slots - 1)
    img, cam = inputs()
    with torch.no_grad():
        out = model(img, cam)
        raw = model.raw_features(img, cam)
        outs = model.branch_tokens(img, cam)
    assert out.shape == (B, slots, 64)
    cls = [o[:, 0] for o in outs]
    want_global = {"tmgf5": cls[0], "tmgf6": cls[-1]}.get(variant, torch.stack(cls).mean(0))
    torch.testing.assert_close(raw[:, 0], want_global)
    if variant == "tmgf4":  # both partitions pool the one shared block's tokens
        parts = torch.cat([stripe_pool(outs[0][:, 1:], model.grid, k) for k in (2, 3)], dim=1)
        torch.testing.assert_close(raw[:, 1:], parts)


@pytest.mark.parametrize("grans,slots", [((2, 3), 6), ((2, 4), 7), ((3, 4), 8)])
def test_granularities_of_table_3(grans, slots):
    model = make(tmgf_granularities=grans)
    img, cam = inputs()
    assert model(img, cam).shape == (B, slots, 64) and len(model.branches) == 2


def test_config_errors():
    with pytest.raises(ValueError, match="num_cams=0"):
        make(num_cams=0)
    with pytest.raises(ValueError, match="no classifier"):
        build_model(tmgf_cfg(), num_classes=5)
    with pytest.raises(ValueError, match="5 stripes do not fit the 4-row grid"):
        make(tmgf_granularities=(2, 5))
    with pytest.raises(ValueError, match="tmgf_global='cls3'"):
        make(tmgf_global="cls3")
    with pytest.raises(ValueError, match="tmgf_global='cls2'"):
        make(tmgf_global="cls2", tmgf_duplicate_last_block=False)
    with pytest.raises(ValueError, match="tmgf_global='first'"):
        make(tmgf_global="first")
    with pytest.raises(ValueError, match="tmgf_stem"):
        make(tmgf_stem="resnet")
    with pytest.raises(ValueError, match="tmgf_granularities"):
        make(tmgf_granularities=(2, 0))
    with pytest.raises(ValueError, match="cam_embed_coef"):
        make(cam_embed_coef=-1.0)


# ----------------------------------------------------------------------------------------------
# Pretrained weights (TransReID-SSL naming)

_OURS_TO_TRANSREID = {
    "stem.conv1.": "conv.0.", "stem.norm1.inorm.": "conv.1.IN.", "stem.norm1.bnorm.": "conv.1.BN.",
    "stem.conv2.": "conv.3.", "stem.norm2.inorm.": "conv.4.IN.", "stem.norm2.bnorm.": "conv.4.BN.",
    "stem.conv3.": "conv.6.", "stem.norm3.": "conv.7.",
}


def transreid_checkpoint(seed: int, drop_counters: bool = False) -> dict[str, torch.Tensor]:
    """A random TransReID-SSL-style state dict for vit_test trained at 64 x 32 (grid 4 x 2; the analog of
    256 x 128 -> 16 x 8), written independently of the loader's table."""
    torch.manual_seed(seed)
    src = TMGF(tmgf_cfg(), 0)  # same shapes; random values everywhere
    state = {}
    for k, v in src.backbone.state_dict().items():
        if k.endswith("num_batches_tracked") and drop_counters:
            continue
        v = torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v + 7
        if k.startswith("patch_embed.stem."):
            rest = k[len("patch_embed."):]
            old = next(o for o in _OURS_TO_TRANSREID if rest.startswith(o))
            k = "patch_embed." + _OURS_TO_TRANSREID[old] + rest[len(old):]
        state[k] = v
    state["sie_embed"] = torch.randn(15, 1, 64)  # TransReID's camera embedding: dataset-specific, skipped
    state["head.weight"] = torch.randn(10, 64)
    return state


def test_transreid_key_mapping():
    assert transreid_key("patch_embed.conv.0.weight") == "patch_embed.stem.conv1.weight"
    assert transreid_key("patch_embed.conv.1.IN.bias") == "patch_embed.stem.norm1.inorm.bias"
    assert transreid_key("patch_embed.conv.4.BN.running_var") == "patch_embed.stem.norm2.bnorm.running_var"
    assert transreid_key("patch_embed.conv.7.weight") == "patch_embed.stem.norm3.weight"
    assert transreid_key("patch_embed.proj.weight") == "patch_embed.proj.weight"
    assert transreid_key("blocks.11.attn.qkv.weight") == "blocks.11.attn.qkv.weight"
    assert transreid_key("patch_embed.stem.conv1.weight") == "patch_embed.stem.conv1.weight"  # ours pass
    assert transreid_key("sie_embed") is None


@pytest.mark.parametrize("wrap", ["plain", "model"])
def test_load_transreid_checkpoint_resizes_pos_and_seeds_branches_after_loading(tmp_path, wrap):
    ckpt = transreid_checkpoint(seed=5)
    path = tmp_path / "vit_small_ics_cfs_lup.pth"
    torch.save({"model": {f"module.{k}": v for k, v in ckpt.items()}} if wrap == "model" else ckpt, path)
    torch.manual_seed(0)
    model = build_model(tmgf_cfg(img_size=(96, 32), pretrained=str(path), pretrained_grid=(4, 2)), num_classes=0)
    assert model.grid == (6, 2)
    bb = model.backbone
    # position table: cls row kept, the 4 x 2 grid resized bilinearly (align_corners=False) to 6 x 2
    pos = ckpt["pos_embed"]
    grid = pos[:, 1:].reshape(1, 4, 2, 64).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 2), mode="bilinear", align_corners=False)
    want_pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 12, 64)], dim=1)
    torch.testing.assert_close(bb.pos_embed.data, want_pos)
    # the stem under TransReID's names
    torch.testing.assert_close(bb.patch_embed.stem.conv1.weight.data, ckpt["patch_embed.conv.0.weight"])
    torch.testing.assert_close(bb.patch_embed.stem.norm2.inorm.weight.data, ckpt["patch_embed.conv.4.IN.weight"])
    torch.testing.assert_close(bb.patch_embed.stem.norm1.bnorm.running_var, ckpt["patch_embed.conv.1.BN.running_var"])
    torch.testing.assert_close(bb.patch_embed.stem.norm3.running_mean, ckpt["patch_embed.conv.7.running_mean"])
    torch.testing.assert_close(bb.cls_token.data, ckpt["cls_token"])
    # both branches = the checkpoint's last block and final LayerNorm (copied AFTER loading)
    for branch in model.branches:
        for k, v in branch.block.state_dict().items():
            torch.testing.assert_close(v, ckpt[f"blocks.1.{k}"])
        for k, v in branch.norm.state_dict().items():
            torch.testing.assert_close(v, ckpt[f"norm.{k}"])
    # the camera embedding is ours (not the checkpoint's 15 cameras)
    assert model.cam_embed.shape == (CAMS, 1, 64)
    img, cam = inputs(size=(96, 32))
    assert model(img, cam).shape == (B, 6, 64)


def test_load_report_and_missing_counters(tmp_path):
    path = tmp_path / "old.pth"
    torch.save(transreid_checkpoint(seed=2, drop_counters=True), path)
    model = make()
    report = model.load_pretrained_weights(path, old_grid=(4, 2))
    assert "sie_embed" in report.skipped and "head.weight" in report.skipped
    assert "patch_embed.stem.norm1.bnorm.running_mean" in report.loaded
    assert int(model.backbone.patch_embed.stem.norm3.num_batches_tracked) == 0
    bad = transreid_checkpoint(seed=2)
    del bad["patch_embed.conv.6.weight"]
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"missing: patch_embed\.stem\.conv3\.weight"):
        model.load_pretrained_weights(path)


def test_reloading_reseeds_branches_in_place(tmp_path):
    model = make()
    params_before = [id(p) for p in model.branches.parameters()]
    path = tmp_path / "w.pth"
    ckpt = transreid_checkpoint(seed=9)
    torch.save(ckpt, path)
    model.load_pretrained_weights(path)
    assert [id(p) for p in model.branches.parameters()] == params_before  # an existing optimizer stays valid
    assert all(p.requires_grad for p in model.branches.parameters())
    torch.testing.assert_close(model.branches[1].block.mlp.fc2.weight.data, ckpt["blocks.1.mlp.fc2.weight"])


# ----------------------------------------------------------------------------------------------
# Our own checkpoints as initialisation (the TMGF demo starts from the PAT demo's model)


def test_whole_tmgf_checkpoint_loads_as_is_except_the_camera_embedding(tmp_path):
    from safetensors.torch import save_file

    src = make(seed=3)
    with torch.no_grad():  # trained branches differ from the trunk's block L: they must NOT be re-seeded
        for p in src.branches.parameters():
            p.add_(0.5)
        for neck in src.necks:
            neck.running_mean.fill_(0.25)
    path = tmp_path / "model_final.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    torch.manual_seed(0)
    dst = build_model(tmgf_cfg(num_cams=CAMS + 2, pretrained=str(path)), num_classes=0)
    ref = make(seed=0, num_cams=CAMS + 2)  # what dst was before loading (same seed)
    for k, v in dst.state_dict().items():
        if k == "cam_embed":  # cameras are dataset-specific: kept at its initialisation
            torch.testing.assert_close(v, ref.state_dict()[k])
        else:
            torch.testing.assert_close(v, src.state_dict()[k], msg=k)
    report = dst.load_pretrained_weights(path)
    assert report.skipped == ["cam_embed"] and "branches.1.block.mlp.fc2.weight" in report.loaded
    # another variant's checkpoint: one error listing what does not fit
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in make(tmgf_granularities=(2,)).state_dict().items()}, str(other))
    with pytest.raises(ValueError,
                       match=r"other\.safetensors: a TMGF checkpoint that does not fit.*missing: .*necks\.5"):
        dst.load_pretrained_weights(other)


def test_pat_model_backbone_initialises_tmgf_and_seeds_its_branches(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(4)
    pat = build_model(ModelConfig(name="pat", backbone="vit_test", img_size=IMG, num_parts=3, drop_path_rate=0.0),
                      num_classes=7)
    state = pat.state_dict()
    path = tmp_path / "pat_final.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = make(tmgf_stem="patch", pretrained=str(path))
    bb = model.backbone
    for k, v in bb.state_dict().items():
        if k == "pos_embed":  # PAT's table has rows for cls, 3 part tokens, then the grid
            want = torch.cat([state["backbone.pos_embed"][:, :1], state["backbone.pos_embed"][:, 4:]], dim=1)
            torch.testing.assert_close(v, want)
        else:
            torch.testing.assert_close(v, state[f"backbone.{k}"], msg=k)
    for branch in model.branches:
        torch.testing.assert_close(branch.block.attn.qkv.weight.data, state["backbone.blocks.1.attn.qkv.weight"])
        torch.testing.assert_close(branch.norm.weight.data, state["backbone.norm.weight"])
    report = model.load_pretrained_weights(path)
    assert "reg_token" in report.skipped and "head.classifier.weight" in report.skipped
