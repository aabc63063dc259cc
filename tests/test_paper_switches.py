"""The switches that run what the PAT paper's text writes where it differs from the official code
(defaults: the code), the renamed PSD keys, and the experiment files that use them.

Each switch is checked twice: its paper form against a float64 restatement of the paper's equation,
and "nothing else": with the switch on, everything it should not touch is bit-identical."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from launch import slurm as launcher
from tests.badinput import BadInput, check
from trainer.config import CONFIG_DIR, Config, ModelConfig, OptimConfig, PATConfig, compose
from trainer.engine.optim import EpochLR, build_optimizer, param_groups
from trainer.losses.csl import csl_loss, csl_loss_reference
from trainer.losses.psd import pat_total, psd_loss, self_distillation_loss
from trainer.losses.triplet import triplet_loss
from trainer.memory import PartMemoryBank
from trainer.models import build_model, part_attention_mask
from trainer.models.pat import fixed_regions

EXPS = sorted(p.stem for p in (CONFIG_DIR / "exp").glob("*.yaml"))
DEMOS = {"pat_demo", "pat_smoke", "tmgf_demo", "tmgf_smoke"}


@functools.cache
def _exp(name: str) -> Config:
    """``exp=name`` composed once for the whole module (read-only use)."""
    return compose([f"exp={name}"])


def _bank(n: int, num_parts: int, dim: int, seed: int, unfilled: tuple[int, ...] = ()) -> PartMemoryBank:
    g = torch.Generator().manual_seed(seed)
    bank = PartMemoryBank(n, num_parts, dim, device="cpu")
    bank.feats.copy_(torch.randn(num_parts, n, dim, generator=g))
    bank.filled[:] = True
    bank.filled[list(unfilled)] = False
    bank.write_order.copy_(torch.where(bank.filled, torch.cumsum(bank.filled.long(), 0) - 1, -1))
    return bank


# ---------------------------------------------------------------------------------------------- CSL, Eq. 6
def eq6(feats: torch.Tensor, indices: torch.Tensor, bank: torch.Tensor, filled: torch.Tensor, k: int,
        tau: float) -> tuple[torch.Tensor, list]:
    """Eq. 6 in float64 scalars, a loop per sample, part and row: K = the k rows of highest f·w among the
    filled rows other than the sample's own; ℓ = −log(Σ_K exp(f·w/τ) / Σ_all exp(f·w/τ)); mean over all.
    Plain exp/sum/log: the inputs keep f·w/τ small enough for float64."""
    b, num_parts, _ = feats.shape
    total = feats.new_zeros(())
    nbrs = []
    for i in range(b):
        row = []
        for p in range(num_parts):
            sims = [((feats[i, p] * bank[p, j]).sum() / tau, j) for j in range(bank.shape[1])
                    if bool(filled[j]) and j != int(indices[i])]
            top = sorted(sims, key=lambda t: -float(t[0].detach()))[:k]
            row.append([j for _, j in top])
            num = sum(torch.exp(s) for s, _ in top)
            den = sum(torch.exp(s) for s, _ in sims)
            total = total - torch.log(num / den)
        nbrs.append(row)
    return total / (b * num_parts), nbrs


@pytest.mark.parametrize("chunked", [False, True])
def test_paper_csl_is_eq6_value_neighbours_and_gradient(chunked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.losses import csl as csl_mod

    if chunked:  # stream the bank in 4-row chunks (< k): the online LSE / top-k merge of the paper form
        monkeypatch.setattr(csl_mod, "_CHUNK_ELEMS", 1)
        monkeypatch.setattr(csl_mod, "_MIN_CHUNK_ROWS", 4)
    n, num_parts, dim, b, k, tau = 21, 3, 5, 4, 4, 0.5
    bank = _bank(n, num_parts, dim, seed=21, unfilled=(3, 11))
    feats = torch.randn(b, num_parts, dim, generator=torch.Generator().manual_seed(22))
    indices = torch.tensor([0, 11, 7, 20])  # an unfilled row as a sample's own index too

    f32 = feats.clone().requires_grad_()
    out = csl_loss(f32, indices, bank, k=k, form="paper", tau=tau)
    out.loss.backward()
    f64 = feats.double().requires_grad_()
    want, want_ids = eq6(f64, indices, bank.feats.double(), bank.filled, k, tau)
    want.backward()
    # float32 streamed sums against float64 loops over ~20 terms of magnitude ~e^10: 1e-5 relative
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.neighbour_indices.tolist() == want_ids
    torch.testing.assert_close(f32.grad.double(), f64.grad, rtol=1e-4, atol=1e-6)

    r64 = feats.double().requires_grad_()  # the float64 reference implementation: equal to the loops
    ref = csl_loss_reference(r64, indices, bank.feats.double(), bank.filled, k=k, form="paper", tau=tau)
    ref.loss.backward()
    assert ref.loss.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(r64.grad, f64.grad, rtol=1e-10, atol=1e-12)


def test_paper_csl_differs_from_official_and_defaults_are_untouched() -> None:
    bank = _bank(30, 3, 6, seed=23)
    feats = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(24))
    idx = torch.tensor([1, 4, 9, 16, 25])
    default = csl_loss(feats, idx, bank, k=5)
    official = csl_loss(feats, idx, bank, k=5, form="official", tau=123.0)  # tau is the paper form's only
    assert torch.equal(default.loss, official.loss) and torch.equal(default.neighbour_indices,
                                                                    official.neighbour_indices)
    paper = csl_loss(feats, idx, bank, k=5, form="paper", tau=0.02)
    assert not torch.equal(paper.neighbour_indices, default.neighbour_indices)  # nearest by f·w, not distance
    with pytest.raises(ValueError, match="form='cosine'"):
        csl_loss(feats, idx, bank, form="cosine")


def test_csl_part_sum_is_eq10_and_changes_nothing_else() -> None:
    bank = _bank(25, 3, 4, seed=25)
    feats = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(26))
    idx = torch.arange(6) * 3
    for form in ("official", "paper"):
        mean = csl_loss(feats, idx, bank, k=3, form=form)
        summed = csl_loss(feats, idx, bank, k=3, form=form, part_reduction="sum")
        # Eq. 10 sums ℓ over the parts: the per-part means summed, i.e. 3 × the code's mean (float32 rounding)
        assert summed.loss.item() == pytest.approx(mean.per_sample.mean(0).sum().item(), rel=1e-6)
        assert summed.loss.item() == pytest.approx(3 * mean.loss.item(), rel=1e-6)
        assert torch.equal(summed.per_sample, mean.per_sample)
        assert torch.equal(summed.neighbour_indices, mean.neighbour_indices)


# ---------------------------------------------------------------------------------------------- triplet, Eq. 9
def eq9(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Batch-hard soft-margin triplet with squared distances, float64 loops: log(1 + exp(d²_ap − d²_an))."""
    out = 0.0
    for a in range(len(labels)):
        d2 = [float(((feats[a] - feats[j]) ** 2).sum()) for j in range(len(labels))]
        ap = max(d for d, y in zip(d2, labels) if y == labels[a])
        an = min((d for d, y in zip(d2, labels) if y != labels[a]), default=math.inf)
        out += math.log1p(math.exp(ap - an))
    return out / len(labels)


def test_squared_triplet_is_eq9_and_mines_the_same_pairs() -> None:
    feats = torch.randn(8, 5, generator=torch.Generator().manual_seed(27), dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    got = triplet_loss(feats, labels, squared=True)
    assert got.item() == pytest.approx(eq9(feats, labels), rel=1e-12)  # float64 both sides
    # the root is monotonic: the same hardest pairs, so the squared loss is the Euclidean one's with
    # every mined distance squared
    from trainer.losses.triplet import euclidean_dist, hard_example_mining

    ap, an = hard_example_mining(euclidean_dist(feats, feats), labels)
    want = F.softplus(ap**2 - an**2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.equal(triplet_loss(feats, labels), triplet_loss(feats, labels, squared=False))


# ---------------------------------------------------------------------------------------------- PSD names, Eq. 7-8
def eq7_8(logits: torch.Tensor, targets: torch.Tensor, nbr: torch.Tensor, alpha: float, lam: float,
          eps: float) -> float:
    """Eq. 8 with Eq. 7's soft label (the code's reading: the own identity among the neighbours adds to
    1 − α) and the label-smoothed hard branch of §4.2, float64 loops."""
    b, c = logits.shape
    total = 0.0
    for i in range(b):
        logp = F.log_softmax(logits[i].double(), 0)
        flat = nbr[i].reshape(-1).tolist()
        for y in range(c):
            onehot = float(y == int(targets[i]))
            soft = (1 - alpha) * onehot + alpha * flat.count(y) / len(flat)
            hard = (1 - eps) * onehot + eps / c
            total -= (lam * soft + (1 - lam) * hard) * float(logp[y])
    return total / b


def test_psd_alpha_and_lambda_weight_are_the_papers_symbols() -> None:
    g = torch.Generator().manual_seed(28)
    n, num_parts, dim, c, b = 24, 3, 4, 6, 8
    bank = _bank(n, num_parts, dim, seed=29)
    bank.set_labels(torch.randint(0, c, (n,), generator=g))
    logits, cls = torch.randn(b, c, generator=g), torch.randn(b, dim, generator=g)
    parts = torch.randn(b, num_parts, dim, generator=g)
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    idx = torch.randperm(n, generator=g)[:b]
    cfg = PATConfig(csl_k=3, psd_alpha=0.2, psd_lambda_weight=0.9)
    out = pat_total(logits, cls, parts, targets, idx, bank, cfg)
    nbr = bank.labels[out.neighbour_indices]
    assert out.id.item() == pytest.approx(eq7_8(logits, targets, nbr, 0.2, 0.9, 0.1), rel=1e-6)  # float32 CE
    # the official code's names: SOFT_LAMBDA is α, SOFT_WEIGHT is λ
    assert out.id.item() == pytest.approx(psd_loss(logits, targets, nbr, soft_lambda=0.2, soft_weight=0.9).item(),
                                          rel=1e-7)


@pytest.mark.parametrize("old,new", [("psd_lambda", "psd_alpha"), ("psd_weight", "psd_lambda_weight")])
def test_old_psd_names_are_refused_never_reinterpreted(old: str, new: str) -> None:
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as info:
        compose(["exp=pat_smoke", f"pat.{old}=0.3"])
    msg = str(info.value)
    assert msg.startswith(f"pat.{old}=0.3: ") and f"pass pat.{new}=0.3 instead" in msg and "\n" not in msg
    assert getattr(compose(["exp=pat_smoke", f"pat.{new}=0.3"]).pat, new) == 0.3


def _train(*overrides: str) -> list[str]:
    return ["-m", "trainer.train", "exp=pat_smoke", *overrides, "run_dir={tmp}/run"]


ROWS = [
    BadInput("old_psd_lambda", _train("pat.psd_lambda=0.3"),
             names=("pat.psd_lambda=0.3",), fix=("pat.psd_alpha=0.3",)),
    BadInput("old_psd_weight", _train("pat.psd_weight=0.7"),
             names=("pat.psd_weight=0.7",), fix=("pat.psd_lambda_weight=0.7",)),
    BadInput("csl_form", _train("pat.csl_form=cosine"),
             names=("pat.csl_form='cosine'",), fix=("'official'", "'paper'")),
    BadInput("schedule", _train("train.optim.schedule=linear"),
             names=("train.optim.schedule='linear'",), fix=("'paper'",)),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row: BadInput, tmp_path: Path) -> None:
    check(row, tmp_path)


# ---------------------------------------------------------------------------------------------- attention, Eq. 3-4
IMG, GRID = (64, 32), (4, 2)


def tiny_cfg(**kw: object) -> ModelConfig:
    return ModelConfig(**{"backbone": "vit_test", "img_size": IMG, "drop_path_rate": 0.0, **kw})


def test_without_cls_part_links_the_mask_is_eq3_and_eq4() -> None:
    regions = fixed_regions(GRID, 3)
    code = part_attention_mask(GRID, regions)
    paper = part_attention_mask(GRID, regions, cls_part_links=False)
    parts = slice(1, 4)
    # Eq. 3: the cls query sees cls and the image tokens; Eq. 4: a part query its token and its region
    assert paper[0].tolist() == [True] + [False] * 3 + [True] * 8
    assert not paper[parts, 0].any()
    # nothing else moves: the two masks differ in exactly the 2·P cls<->part entries
    diff = code ^ paper
    assert int(diff.sum()) == 6 and diff[0, parts].all() and diff[parts, 0].all()


def test_model_switch_uses_the_paper_mask_and_changes_only_attention() -> None:
    torch.manual_seed(0)
    code = build_model(tiny_cfg(), 5).eval()
    cfg = tiny_cfg()
    cfg.cls_part_links = False  # ModelConfig's field (model.cls_part_links)
    paper = build_model(cfg, 5).eval()
    paper.load_state_dict(code.state_dict())  # same parameters: the mask is the only difference
    img = torch.randn(2, 3, *IMG)
    want = part_attention_mask(GRID, fixed_regions(GRID, 3), cls_part_links=False)
    assert torch.equal(paper.attention_mask(img.device), want)
    torch.testing.assert_close(paper(img), paper.forward_tokens(img, want)[:, 0], rtol=0, atol=0)
    assert not torch.allclose(paper(img), code(img), atol=1e-4)


def test_fixed_regions_are_the_papers_three_overlapping_squares() -> None:
    """§3.1: "three overlapping square areas along the vertical direction" = model.part_regions=fixed at
    256x128 (a 16x8 patch grid)."""
    squares = fixed_regions((16, 8), 3)
    assert [(r.top, r.bottom, r.left, r.right) for r in squares] == [(0, 7, 0, 7), (4, 11, 0, 7), (8, 15, 0, 7)]
    assert all(r.bottom - r.top == r.right - r.left for r in squares)


# ---------------------------------------------------------------------------------------------- B+SD (Table 5)
def naive_sd(final: torch.Tensor, blocks: torch.Tensor, t: float) -> float:
    """SDViT's KL(final ‖ block) at temperature t, summed and ÷ numel, × t², averaged over a uniform
    draw of one of the L = len(blocks) + 1 blocks (the last gives 0); float64 loops."""
    b, c = final.shape
    total = 0.0
    for zb in blocks:
        kl = 0.0
        for i in range(b):
            p = F.softmax(final[i].double() / t, 0)
            q = F.softmax(zb[i].double() / t, 0)
            kl += sum(float(p[j] * (p[j].log() - q[j].log())) for j in range(c))
        total += kl * t * t / (b * c)
    return total / (len(blocks) + 1)


def test_self_distillation_is_sdvit_kl_in_expectation() -> None:
    g = torch.Generator().manual_seed(30)
    final = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3
    blocks = torch.randn(2, 4, 7, generator=g, dtype=torch.float64) * 3
    assert self_distillation_loss(final, blocks, 3.0).item() == pytest.approx(naive_sd(final, blocks, 3.0), rel=1e-12)
    assert self_distillation_loss(final, final[None].clone(), 3.0).item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("name", ["vit", "pat"])
def test_block_logits_are_the_neck_on_each_blocks_cls_and_change_nothing_else(name: str) -> None:
    torch.manual_seed(1)
    base = build_model(tiny_cfg(name=name), 5).train()
    sd = build_model(tiny_cfg(name=name), 5).train()
    sd.load_state_dict(base.state_dict())
    sd.emit_block_logits = True
    img = torch.randn(6, 3, *IMG)
    plain, out = base(img), sd(img)
    assert plain.blocks is None and out.blocks.shape == (1, 6, 5)  # vit_test: 2 blocks -> 1 earlier block
    assert torch.equal(plain.logits, out.logits) and torch.equal(plain.cls, out.cls)
    # the BN running statistics saw the final feature only, as without block logits
    for key in ("head.bn.running_mean", "head.bn.running_var", "head.bn.num_batches_tracked"):
        assert torch.equal(base.state_dict()[key], sd.state_dict()[key]), key
    # block 1's cls token -> final LayerNorm -> BN with batch statistics -> classifier
    bb = sd.backbone
    if name == "vit":
        x = bb.norm_pre(bb._pos_embed(bb.patch_embed(img)))
    else:
        x = torch.cat([bb.cls_token.expand(6, -1, -1), bb.reg_token.expand(6, 3, -1), bb.patch_embed(img)], 1)
        x = bb.norm_pre(x + bb.pos_embed)
    from trainer.models.backbones import masked_block_forward

    mask = sd.attention_mask(img.device) if name == "pat" else None
    c1 = bb.norm(masked_block_forward(bb.blocks[0], x, mask)[:, 0])
    bn = sd.head.bn
    want = ((c1 - c1.mean(0)) / torch.sqrt(c1.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias) \
        @ sd.head.classifier.weight.t()
    torch.testing.assert_close(out.blocks[0], want, rtol=1e-4, atol=1e-6)  # float32, two summation orders


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    from trainer.data.prepare import ensure_datasets

    cache = tmp_path_factory.mktemp("reid-cache")
    ensure_datasets(compose(["exp=pat_smoke", f"data.cache_dir={cache}"]).data)
    return str(cache)


@pytest.mark.parametrize("extra", [["model.name=vit", "pat.csl=false"], ["model.part_regions=fixed"]],
                         ids=["baseline", "pat"])
def test_method_step_adds_sd_and_squared_triplet(smoke_cache: str, extra: list[str]) -> None:
    from trainer.losses.id import label_smooth_ce
    from trainer.methods.pat import PATMethod

    cfg = compose(["exp=pat_smoke", f"data.cache_dir={smoke_cache}", "data.num_workers=0", "model.drop_path_rate=0",
                   "pat.sd_weight=0.5", "pat.triplet_squared=true", "pat.psd=false", *extra])
    method = PATMethod(cfg)
    torch.manual_seed(0)
    model = method.build_model()
    assert model.emit_block_logits
    method.on_fit_start(model, resumed=False)
    model.train()
    batch = next(iter(method.train_batches(0, 0)))
    result = method.training_step(model, batch)
    out = model(batch["img"])  # deterministic (no drop path; BN in train mode uses batch statistics)
    pid = batch["pid"]
    want = label_smooth_ce(out.logits, pid, 0.1) + triplet_loss(out.cls, pid, squared=True) \
        + 0.5 * self_distillation_loss(out.logits, out.blocks, 3.0)
    if cfg.pat.csl:
        want = want + result.logs["csl"]  # the bank moved with the first step: its CSL value is taken as logged
    assert "sd" in result.logs and result.loss.item() == pytest.approx(want.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- schedule, §4.2
def test_paper_schedule_warms_up_from_zero_then_decays() -> None:
    cfg = OptimConfig(lr=1e-3, schedule="paper", warmup_epochs=10, decay_epochs=50)
    opt = build_optimizer(param_groups(nn.Linear(2, 2), cfg), cfg)
    sched = EpochLR(opt, cfg)
    lrs = []
    for e in range(62):
        sched.set_epoch(e)
        lrs.append([g["lr"] for g in opt.param_groups])
    weight = [w for w, _ in lrs]
    # linear from 0: the e-th epoch (1-based) trains at e/10 of the LR, the 10th at the full 1e-3
    assert weight[:10] == pytest.approx([1e-3 * (e + 1) / 10 for e in range(10)], rel=1e-12)
    # then a half cosine over the following 50 epochs to the floor (0.002·lr), and the floor after
    for e in range(10, 62):
        frac = min(1.0, (e + 1 - 10) / 50)
        assert weight[e] == pytest.approx(1e-3 * (0.002 + 0.998 * (1 + math.cos(math.pi * frac)) / 2), rel=1e-12)
    assert weight[59] == pytest.approx(2e-6) and max(weight) == weight[9]
    assert all(b == pytest.approx(2 * w, rel=1e-12) for w, b in lrs)  # the bias group keeps its factor 2


def test_schedule_switch_leaves_the_code_schedule_alone() -> None:
    cosine, paper = OptimConfig(lr=1e-3), OptimConfig(lr=1e-3, schedule="paper")
    assert dataclasses.replace(paper, schedule="cosine") == cosine  # only the choice differs
    opt = build_optimizer(param_groups(nn.Linear(2, 2), cosine), cosine)
    sched = EpochLR(opt, cosine)
    sched.set_epoch(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01e-3 + (1e-3 - 0.01e-3) / 5)  # timm's warm-up, epoch 1


# ---------------------------------------------------------------------------------------------- experiments
def _resolved(exp: str) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(_exp(exp)))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _differing(a: str, b: str) -> set[str]:
    fa, fb = _flat(_resolved(a)), _flat(_resolved(b))
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)} - {"name", "run_dir"}


def test_paper_experiments_run_the_paper_era_recipe() -> None:
    pat = [e for e in EXPS if e not in DEMOS and _exp(e).method == "pat"]
    tmgf = [e for e in EXPS if e not in DEMOS and e not in pat]
    assert {"pat_market", "pat_duke", "multisource", "table5_sd", "fig5_tau_0p02"} <= set(pat)
    assert {"tmgf_market", "tmgf_msmt_gt", "tmgf_msmt_t4_cls2"} <= set(tmgf)
    for exp in pat:
        cfg = _exp(exp)
        assert cfg.data.transform.lgt_p == 0.5, exp
        full_pat = cfg.model.name == "pat" and cfg.pat.csl and exp != "table5_csl"  # Table 5 (3) is PSD off
        assert cfg.pat.psd == full_pat, exp
    for exp in tmgf:
        assert _exp(exp).tmgf.calibrate_necks is False, exp
    assert _exp("tmgf_demo").tmgf.calibrate_necks is True  # the demos keep the calibration
    for exp in pat + tmgf:
        assert "# Code state:" in (CONFIG_DIR / "exp" / f"{exp}.yaml").read_text(), exp


@pytest.mark.parametrize("exp,base,keys", [
    ("fig5_tau_0p005", "pat_market", {"pat.csl_scale", "pat.csl_tau"}),
    ("appx_psd_alpha_0p1", "pat_market", {"pat.psd_alpha"}),
    ("appx_psd_lambda_weight_0p9", "pat_market", {"pat.psd_lambda_weight"}),
    ("table5_sd", "table5_baseline", {"pat.sd_weight"}),
])
def test_sweep_experiments_change_only_their_knob(exp: str, base: str, keys: set[str]) -> None:
    assert _differing(exp, base) == keys


NEW_EXPS = [e for e in EXPS if e.startswith(("fig5_", "appx_")) or e == "table5_sd"]


def test_new_experiments_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert len(NEW_EXPS) == 17
    shards = tmp_path / "shards"
    for name in ("market1501", "dukemtmc", "msmt17", "cuhk03np_detected"):  # the launcher checks manifests exist
        (shards / name).mkdir(parents=True)
        (shards / name / "manifest.json").write_text("{}\n")
    monkeypatch.setattr(launcher, "make_executor", lambda *a, **k: pytest.fail("a dry run created an executor"))
    monkeypatch.chdir(tmp_path)  # the weight files the experiments name, relative to the working folder
    for exp in NEW_EXPS:
        weights = tmp_path / _exp(exp).model.pretrained
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(b"")  # the launcher checks that it exists; nothing reads it in a dry run
    for exp in NEW_EXPS:
        run_dir = tmp_path / exp
        code = launcher.main(["--dry-run", "--cluster", "local", f"exp={exp}", f"data.root={shards}",
                              f"run_dir={run_dir}"])
        out = capsys.readouterr().out
        assert code == 0 and f"exp={exp}" in out and not run_dir.exists(), exp
