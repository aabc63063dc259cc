"""``trainer.export`` on real runs: a ``pat_smoke`` and a ``tmgf_smoke`` run (one epoch each) exported to
ONNX and safetensors, checked against the features the run's own evaluation ranks with.

Precision: onnxruntime and torch compute the same fp32 features with other kernels, so they agree to
fp32 rounding, not bit for bit. The bound is ``trainer.export.rounding_tolerance``: 4x torch's own fp32
error against an fp64 run of the same weights and images, plus 16 ulp of the largest feature (each
runtime is within its rounding error of the exact features; see that function). The tests also check
that the bound is tight (<= 1e-4 of the feature scale) and that a wrong feature (another slot, the
other side of the BN neck) misses it by far, so the comparison can fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import trainer.methods.common as common
from tests.badinput import REPO
from trainer.config import NORM_PRESETS, Config, compose
from trainer.data.catalogue import SampleIndex
from trainer.data.dataset import decode
from trainer.data.loader import build_inference_loader
from trainer.export import export, extractor, reference_features, rounding_tolerance
from trainer.methods import build_method
from trainer.models.registry import as_model_config, build_model
from trainer.train import run

RUNS = ("pat_smoke", "tmgf_smoke")
EPS32 = float(torch.finfo(torch.float32).eps)


@dataclass
class Exported:
    """A finished one-epoch run, its exports, and what its evaluation ranked with."""

    run_dir: Path
    out: Path
    cfg: Config
    model: torch.nn.Module
    """Built as the run's method builds it, with model_final.safetensors, in eval mode."""
    inputs: tuple[torch.Tensor, ...]
    """The first target's query images through the test transform (and their camera ids for TMGF)."""
    eval_features: torch.Tensor
    """What ``method.evaluate`` handed to the ranking for those images."""
    query: SampleIndex

    def sidecar(self, name: str) -> dict[str, Any]:
        return dict(json.loads((self.out / f"{name}.json").read_text()))

    def onnx_features(self, inputs: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        inputs = self.inputs if inputs is None else inputs
        session = ort.InferenceSession(str(self.out / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0])

    def tolerance(self) -> float:
        _, f64 = reference_features(extractor(self.cfg, self.model), self.inputs)
        return rounding_tolerance(self.eval_features, f64)


def _evaluated(cfg: Config, run_dir: Path) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor,
                                                     SampleIndex]:
    """The run's model rebuilt by its method, the first target's query inputs, and the query features
    its ``evaluate`` ranks (recorded on their way into the ranking)."""
    method: Any = build_method(cfg)  # PAT or TMGF: both have targets and test_tf
    model = method.build_model()
    model.load_state_dict(load_file(str(run_dir / "model_final.safetensors")), strict=True)
    model.eval()
    ranked: list[torch.Tensor] = []
    rank = common.evaluate_features

    def record(qf: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        ranked.append(qf)
        return rank(qf, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "evaluate_features", record)
        method.evaluate(model)
    query = method.targets[0].query
    batches = list(build_inference_loader(query, method.test_tf, cfg.eval.batch_size, num_workers=0))
    img = torch.cat([b["img"] for b in batches])
    inputs = (img, torch.cat([b["camid"] for b in batches]).long()) if cfg.method == "tmgf" else (img,)
    return model, inputs, ranked[0], query


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    cache = tmp_path_factory.mktemp("reid-cache")
    out: dict[str, Exported] = {}
    for name in RUNS:
        run_dir = tmp_path_factory.mktemp(name)
        cfg = compose([f"exp={name}", f"data.cache_dir={cache}", f"run_dir={run_dir}", "train.epochs=1"])
        assert run(cfg).status == "finished"
        export(run_dir, ("onnx", "safetensors"))
        out[name] = Exported(run_dir, run_dir / "export", cfg, *_evaluated(cfg, run_dir))
    return out


@pytest.mark.parametrize("name", RUNS)
def test_onnx_is_valid_and_gives_the_evaluated_features(runs: dict[str, Exported], name: str) -> None:
    r = runs[name]
    onnx.checker.check_model(onnx.load(str(r.out / "model.onnx")), full_check=True)
    got = r.onnx_features()
    assert got.shape == r.eval_features.shape and got.shape[0] == r.inputs[0].shape[0] > 3
    tol = r.tolerance()
    scale = float(r.eval_features.abs().max())
    assert tol <= 1e-4 * scale, (tol, scale)  # the fp64 run is the same feature: the bound is rounding-tight
    err = float((got - r.eval_features).abs().max())
    assert err <= tol, (err, tol)
    # batch 1 (the traced example had 2): the batch axis is dynamic
    one = r.onnx_features(tuple(x[:1] for x in r.inputs))
    assert float((one - r.eval_features[:1]).abs().max()) <= tol


def _wrong_features(r: Exported) -> dict[str, torch.Tensor]:
    """Features a faulty export could have given instead: other outputs of the same model and images."""
    m: Any = r.model
    with torch.no_grad():
        if r.cfg.method == "tmgf":
            img, camid = r.inputs
            return {"part slot 1": m(img, camid)[:, 1], "pre-BN global": m.raw_features(img, camid)[:, 0]}
        (img,) = r.inputs
        tokens = m.forward_tokens(img, m.attention_mask(img.device))
        return {"BN-neck cls (neck_feat=after)": m.head.bn(tokens[:, 0]), "part token 1": tokens[:, 1]}


@pytest.mark.parametrize("name", RUNS)
def test_a_wrong_slot_or_branch_would_fail_the_comparison(runs: dict[str, Exported], name: str) -> None:
    r = runs[name]
    got, tol = r.onnx_features(), r.tolerance()
    for what, wrong in _wrong_features(r).items():
        assert float((got - wrong).abs().max()) > 100 * tol, what


@pytest.mark.parametrize("name", RUNS)
def test_sidecar_records_the_input_contract(runs: dict[str, Exported], name: str) -> None:
    r = runs[name]
    side = r.sidecar("model.onnx")
    h, w = r.cfg.model.img_size
    assert side["input_size"] == [h, w] and side["channel_order"] == "RGB"
    mean, std = NORM_PRESETS[r.cfg.data.transform.norm]
    assert side["normalization"] == {"preset": r.cfg.data.transform.norm, "mean": list(mean), "std": list(std)}
    assert side["sha256"] == hashlib.sha256((r.out / "model.onnx").read_bytes()).hexdigest()
    # the graph's signature is the recorded one, batch axis symbolic
    graph = onnx.load(str(r.out / "model.onnx")).graph
    assert [i.name for i in graph.input] == [i["name"] for i in side["inputs"]]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, h, w]
    got = r.onnx_features()
    assert side["feature_dim"] == got.shape[1] == r.model.feat_dim
    norms = got.norm(dim=1)
    # L2: unit norms to fp32 rounding of a D-term sum (D * eps); else far from it
    assert bool(((norms - 1).abs() <= got.shape[1] * EPS32).all()) is side["l2_normalized"]
    assert side["l2_normalized"] is (name == "tmgf_smoke")
    if name == "tmgf_smoke":
        tmgf: Any = r.model  # num_cams: a plain int attribute of TMGF
        assert side["inputs"][1]["range"] == [0, tmgf.num_cams - 1]
    # the recorded recipe, done by hand on a query image, is the test transform's tensor
    pil = decode(r.query.get_bytes(0)).convert(side["channel_order"])
    arr = np.asarray(pil.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    norm = side["normalization"]
    by_hand = torch.from_numpy(((arr - norm["mean"]) / norm["std"]).transpose(2, 0, 1))
    # the transform fuses x * (1 / (255 std)) + (-mean / std) in fp32: a few ulp of |x / (255 std)| + |mean / std|
    bound = 4 * EPS32 * (1 / min(std) + max(m / s for m, s in zip(mean, std)))
    assert float((by_hand - r.inputs[0][0].double()).abs().max()) <= bound


@pytest.mark.parametrize("name", RUNS)
def test_safetensors_is_the_extractor_and_loads_strictly(runs: dict[str, Exported], name: str) -> None:
    r = runs[name]
    side = r.sidecar("feature_extractor.safetensors")
    tensors = load_file(str(r.out / "feature_extractor.safetensors"))
    final = load_file(str(r.run_dir / "model_final.safetensors"))
    # PAT: the final weights less the classifier (training only); TMGF: the final weights, all of them
    dropped = {"head.classifier.weight"} if name == "pat_smoke" else set()
    assert set(tensors) == set(final) - dropped
    assert all(torch.equal(tensors[k], final[k]) for k in tensors)
    model = build_model(as_model_config(side["model_config"]), num_classes=0)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    with torch.no_grad():
        a = extractor(r.cfg, model).module(*r.inputs)
        b = extractor(r.cfg, r.model).module(*r.inputs)
    assert torch.equal(a, b)  # same weights, same ops, same batch on the CPU: bit-identical


def test_checkpoint_source_exports_the_same_weights(runs: dict[str, Exported], tmp_path: Path) -> None:
    r = runs["tmgf_smoke"]
    last = sorted((r.run_dir / "checkpoints").glob("step_*"))[-1]  # saved after the final evaluation
    written = export(r.run_dir, ("safetensors",), out=tmp_path, checkpoint=str(last))
    assert [p.name for p in written] == ["feature_extractor.safetensors", "feature_extractor.safetensors.json"]
    a = load_file(str(tmp_path / "feature_extractor.safetensors"))
    b = load_file(str(r.out / "feature_extractor.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(written[1].read_text())["source"] == str(last / "state.pt")


def test_cli_writes_onnx_and_its_sidecar_by_default(runs: dict[str, Exported], tmp_path: Path) -> None:
    r = runs["tmgf_smoke"]
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "trainer.export", str(r.run_dir), "--out", str(out)], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not proc.stderr.strip(), proc.stderr[-3000:]  # the exporter's notes on its internals stay quiet
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.json"]
    assert [line.split()[1] for line in proc.stdout.splitlines()] == [str(out / "model.onnx"),
                                                                      str(out / "model.onnx.json")]
    # the same run exported twice is the same graph
    assert (out / "model.onnx").read_bytes() == (r.out / "model.onnx").read_bytes()


def test_vit_baseline_exports_within_tolerance() -> None:
    """The ViT baseline (PAT's Table 4/5 model) goes through the same path; untrained weights suffice."""
    import dataclasses

    from trainer.export import CHECK_BATCH, TRACE_BATCH, check_onnx, example_inputs, onnx_bytes

    cfg = compose(["exp=pat_smoke", "model.name=vit"])
    model = build_model(dataclasses.replace(cfg.model, pretrained=None), num_classes=0)
    ex = extractor(cfg, model)
    size = (cfg.model.img_size[0], cfg.model.img_size[1])
    checked = check_onnx(onnx_bytes(ex, example_inputs(ex, size, TRACE_BATCH, 0)), ex,
                         example_inputs(ex, size, CHECK_BATCH, 1))
    assert checked["batch"] == CHECK_BATCH and checked["max_abs_error"] <= checked["tolerance"]
