"""``python -m trainer.export RUN_DIR [--format onnx] [--format safetensors]``: a run's feature extractor.

What is exported is exactly what the run's evaluation ranks with, in eval mode:

* PAT and the ViT baseline: the model's eval forward, ``image -> [N, D]`` (the cls token after the final
  LayerNorm for ``model.neck_feat=before``, its BN-neck output for ``after``), not L2-normalised;
* TMGF: the global slot (slot 0) of ``model(image, camid)``, BN neck then L2-normalised. TMGF adds a
  learnt embedding of the camera to every token, so the camera id of each image is a second input.

Files, under ``--out`` (default ``RUN_DIR/export``); each sidecar is written after its file::

    model.onnx                           fp32 graph, dynamic batch axis
    model.onnx.json                      its contract: inputs, input size, channel order, normalisation,
                                         feature dim, L2 or not, the check made at export time
    feature_extractor.safetensors        the eval model's tensors (no classifier): loads strictly into
                                         build_model(sidecar["model_config"], num_classes=0)
    feature_extractor.safetensors.json   the same contract

The input is the test transform's output: RGB, resized (bicubic) to the model's input size, ``x / 255``,
then ``(x - mean) / std`` per channel with the run's ``data.transform.norm``. Normalisation stays out of
the graph so the graph's input is the PyTorch model's input, the one the features were checked on.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). The legacy TorchScript
exporter (``dynamo=False``) is deprecated, and it cannot export TMGF: it has no ONNX form for an adaptive
average pool whose output does not divide its input (TMGF's stripes on a grid whose height the stripe
count does not divide, e.g. 3 stripes of 4 rows). torch.export can trace every model here except one
line: TMGF checks camera ids by value (a data-dependent branch), so for the trace that check is left
out (:func:`_camid_value_check_off`); the graph's input types and shapes are fixed by its signature.

Every export is checked before anything is written: ``onnx.checker``, then onnxruntime against the
PyTorch extractor on a batch of another size than the traced one (the batch axis really is dynamic),
within the tolerance of :func:`rounding_tolerance`. A failed check is a bug (traceback, exit 1); a
user's mistake (no run dir, no weights, weights of another model, an unknown format) is one line and
exit 2, and nothing is written.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from shards.atomic import atomic_write_bytes
from shards.errors import CliParser, UserError, run_cli
from trainer.config import NORM_PRESETS, Config, ModelConfig
from trainer.visualize.rundir import read_config

if TYPE_CHECKING:  # torch and the models load after the checks that need no model code (a mistake fails at once)
    import torch
    from torch import nn

PROG = "trainer.export"
FINAL = "model_final.safetensors"
"""What the engine writes when a run finishes (``trainer/engine/loop.py``)."""
FORMATS = ("onnx", "safetensors")
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "feature_extractor.safetensors"
TRACE_BATCH = 2
"""Batch of the traced example (1 would let torch.export specialise the batch axis to a constant)."""
CHECK_BATCH = 3
"""Batch of the export-time check: another size than the traced one."""
EPS32 = 2.0**-23
"""float32's machine epsilon (the spacing of floats in [1, 2))."""


# ----------------------------------------------------------------------------------------------
# The run's weights and model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else ""


def read_weights(run_dir: Path, checkpoint: str | None) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file read, the model's state dict): ``RUN_DIR/model_final.safetensors``, or the ``state.pt``
    of the checkpoint folder ``checkpoint``. Never unpickles code (safetensors, ``weights_only``)."""
    import torch

    if checkpoint is not None:
        path = Path(checkpoint) / "state.pt"
        if not path.is_file():
            raise UserError(f"--checkpoint {checkpoint}: not a checkpoint folder (no {path.absolute()}); pass a "
                            f"folder {run_dir / 'checkpoints' / 'step_...'}, or leave --checkpoint out for {FINAL}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: the reader's message names no fix
            raise UserError(f"{path}: cannot read it ({type(exc).__name__}: {_first_line(exc)}); pass another "
                            f"--checkpoint {run_dir / 'checkpoints' / 'step_...'}") from None
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise UserError(f"{path}: not a trainer checkpoint (no 'model' entry); pass another --checkpoint "
                            f"{run_dir / 'checkpoints' / 'step_...'}")
        return path, dict(state["model"])
    path = run_dir / FINAL
    if not path.is_file():
        raise UserError(f"{path}: missing (the run has not finished); finish it (train.resume=auto), or pass "
                        f"--checkpoint {run_dir / 'checkpoints' / 'step_...'} to export a checkpoint")
    from safetensors.torch import load_file

    try:
        return path, load_file(str(path), device="cpu")
    except Exception as exc:  # a truncated or foreign file: the reader's message names no fix
        raise UserError(f"{path}: cannot read it ({type(exc).__name__}: {_first_line(exc)}); pass --checkpoint "
                        f"{run_dir / 'checkpoints' / 'step_...'} to export a checkpoint instead") from None


def inference_model_config(cfg: Config, state: dict[str, torch.Tensor]) -> ModelConfig:
    """The run's model config as the weights fix it: no pretrained file (every tensor comes from the run)
    and, for TMGF, the number of cameras its embedding was sized with from the training data."""
    model_cfg = dataclasses.replace(cfg.model, pretrained=None)
    if cfg.model.name == "tmgf":
        cam = state.get("cam_embed")
        cams = int(cam.shape[0]) if cam is not None else max(1, cfg.model.num_cams)
        model_cfg = dataclasses.replace(model_cfg, num_cams=cams)
    return model_cfg


def build_inference_model(model_cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> nn.Module:
    """The eval-mode model with every tensor of ``state`` except the classifier (training only), strictly."""
    import torch

    from trainer.models import build_model
    from trainer.models.weights import fit_errors

    with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the caller's RNG as it was
        model = build_model(model_cfg, num_classes=0)
    kept = {k: v for k, v in state.items() if not k.startswith("head.classifier.")}
    misfit = fit_errors(model.state_dict(), kept)
    if misfit:
        raise UserError(f"{source}: does not fit the {model_cfg.name} model of the run's config.yaml ({misfit}); "
                        "pass this run's weights")
    model.load_state_dict(kept, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# The extractor the evaluation uses


@dataclass
class Extractor:
    """The eval-mode feature function of a run and what a caller must know to feed it."""

    module: nn.Module
    """``module(*inputs) -> [N, D]`` float32, in eval mode."""
    model: nn.Module
    """The model inside (its state dict is the safetensors export)."""
    input_names: tuple[str, ...]
    feature: str
    """What the feature is, in words."""
    l2_normalized: bool
    num_cams: int | None
    """TMGF: camera ids must lie in [0, num_cams); None: no camera input."""


def extractor(cfg: Config, model: nn.Module) -> Extractor:
    """The module the run's ``method.evaluate`` extracts with (``trainer/methods``), around ``model``."""
    from trainer.methods.tmgf import SlotView

    model.eval()
    if cfg.method == "tmgf":
        return Extractor(SlotView(model, "global").eval(), model, ("image", "camid"),
                         "global slot (slot 0): BN neck, then L2-normalised", True,
                         int(cast(int, model.num_cams)))
    if cfg.model.name == "pat" and cfg.model.test_part_regions == "random":
        raise UserError("model.test_part_regions='random' in the run's config.yaml: every forward draws new part "
                        "regions, so no fixed graph gives the run's features; evaluate with fixed regions "
                        "(model.test_part_regions=fixed) to export")
    feature = ("cls token after the BN neck (model.neck_feat=after)" if cfg.model.neck_feat == "after" else
               "cls token after the final LayerNorm, before the BN neck (model.neck_feat=before)")
    return Extractor(model, model, ("image",), feature, False, None)


def example_inputs(ex: Extractor, img_size: tuple[int, int], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A batch in the input's range: N(0, 1) pixels (what normalisation makes of images) and camera ids
    cycling over every camera."""
    import torch

    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, *img_size, generator=g)
    if ex.num_cams is None:
        return (img,)
    return img, torch.arange(batch, dtype=torch.int64) % ex.num_cams


# ----------------------------------------------------------------------------------------------
# ONNX


@contextmanager
def _camid_value_check_off(model: nn.Module) -> Iterator[None]:
    """Leave TMGF's camera-id range check out of the trace.

    ``TMGF._check_camid`` reads the ids' min and max as Python ints to raise a readable error: a branch on
    data that torch.export cannot trace. The graph needs no such check for its types and shapes (its
    signature fixes camid to int64 [batch]); the range [0, num_cams) is written in the sidecar."""
    if not hasattr(model, "_check_camid"):
        yield
        return
    object.__setattr__(model, "_check_camid", lambda camid, batch: None)  # this instance only
    try:
        yield
    finally:
        object.__delattr__(model, "_check_camid")


@contextmanager
def _exporter_quiet() -> Iterator[None]:
    """Silence the exporter's warnings and log notes (e.g. onnx_ir on an empty attribute list, whose INTS
    default is right): they are about its internals, not something the user can act on. The export is
    checked afterwards (:func:`check_onnx`)."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def onnx_bytes(ex: Extractor, inputs: tuple[torch.Tensor, ...]) -> bytes:
    """The extractor as a serialised ONNX model (weights inside), batch axis dynamic."""
    import torch

    batch = torch.export.Dim("batch")
    params = ("img", "camid")[: len(inputs)]  # the forward's argument names (PAT and SlotView alike)
    with _camid_value_check_off(ex.model), _exporter_quiet():
        program = torch.onnx.export(ex.module, inputs, dynamo=True, verbose=False, external_data=False,
                                    input_names=list(ex.input_names), output_names=["features"],
                                    dynamic_shapes={p: {0: batch} for p in params})
    assert program is not None
    return cast(bytes, program.model_proto.SerializeToString())


def rounding_tolerance(f32: torch.Tensor, f64: torch.Tensor) -> float:
    """How far two fp32 computations of the same features may be apart: 4x torch's own fp32 error.

    onnxruntime and torch run the same fp32 math with other kernels (other summation orders, fused
    attention and LayerNorm): each is within fp32 rounding of the exact features, so their difference is
    at most the sum of their two errors. Torch's error is measured against its fp64 run of the same
    weights and inputs (``f64``); 2x covers the two runtimes, another 2x kernels that round at other
    points than torch's. The floor of 16 ulp of the largest feature keeps a lucky-exact batch from
    making the bound zero."""
    err = float((f32.double() - f64).abs().max())
    scale = float(f64.abs().max())
    return 4.0 * err + 16.0 * EPS32 * scale


def reference_features(ex: Extractor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32, fp64) features of the PyTorch extractor; the fp64 one from a copy, the extractor is unchanged."""
    import torch

    with torch.no_grad():
        f32 = ex.module(*inputs)
        wide = copy.deepcopy(ex.module).double()
        f64 = wide(*(x.double() if x.is_floating_point() else x for x in inputs))
    return f32, f64


def check_onnx(data: bytes, ex: Extractor, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """``onnx.checker`` passes and onnxruntime gives the PyTorch features within :func:`rounding_tolerance`
    on ``inputs``; returns the measured figures. A failure is a bug of the export: it raises (exit 1)."""
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(ex.input_names, inputs)})[0])
    f32, f64 = reference_features(ex, inputs)
    if got.shape != f32.shape:
        raise RuntimeError(f"onnxruntime gives features of shape {tuple(got.shape)}, PyTorch {tuple(f32.shape)}")
    tol = rounding_tolerance(f32, f64)
    err = float((got - f32).abs().max())
    if not err <= tol:
        raise RuntimeError(f"onnxruntime's features differ from PyTorch's by {err:.3g} > tolerance {tol:.3g}")
    return {"batch": int(inputs[0].shape[0]), "input": "N(0, 1) pixels", "max_abs_error": err, "tolerance": tol,
            "torch_fp32_vs_fp64": float((f32.double() - f64).abs().max())}


# ----------------------------------------------------------------------------------------------
# Sidecars and files


def contract(cfg: Config, ex: Extractor, model_cfg: ModelConfig, source: Path, feat_dim: int) -> dict[str, Any]:
    """What a caller needs to feed the exported extractor and read its output (both sidecars)."""
    h, w = (int(s) for s in cfg.model.img_size)
    mean, std = NORM_PRESETS[cfg.data.transform.norm]
    inputs: list[dict[str, Any]] = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, h, w]}]
    if ex.num_cams is not None:
        inputs.append({"name": "camid", "dtype": "int64", "shape": ["batch"], "range": [0, ex.num_cams - 1],
                       "meaning": "0-based camera id of the image, as in training; the graph does not check the range "
                       "(onnxruntime refuses ids >= num_cams, a negative id wraps like a Python index)"})
    return {
        "run": cfg.name, "method": cfg.method, "model": cfg.model.name, "backbone": cfg.model.backbone,
        "source": str(source),
        "inputs": inputs,
        "input_size": [h, w],
        "channel_order": "RGB",
        "preprocess": "resize to input_size (bicubic), x / 255, then (x - mean) / std per channel",
        "normalization": {"preset": cfg.data.transform.norm, "mean": list(mean), "std": list(std)},
        "output": {"name": "features", "dtype": "float32", "shape": ["batch", feat_dim]},
        "feature_dim": feat_dim,
        "feature": ex.feature,
        "l2_normalized": ex.l2_normalized,
        "ranking": "cosine: the evaluation L2-normalises the features, then ranks by Euclidean distance",
        "model_config": dataclasses.asdict(model_cfg),
    }


def _json(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file or cannot be written, before any work."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder; pass a folder for the exported files")
    if not probe.is_dir():
        raise UserError(f"--out {out}: {probe} is not a folder; pass another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {probe}; pass a writable --out FOLDER")


def export(run_dir: Path, formats: tuple[str, ...], out: Path | None = None, checkpoint: str | None = None,
           seed: int = 0) -> list[Path]:
    """Export the run's feature extractor in ``formats``; returns the files written (sidecars last).

    Every check (the user's inputs, then the export's own) runs before the first file is written."""
    cfg = read_config(run_dir)
    out = out if out is not None else run_dir / "export"
    check_out(out)
    import torch  # only now: the mistakes above are reported without loading it

    source, state = read_weights(run_dir, checkpoint)
    model_cfg = inference_model_config(cfg, state)
    ex = extractor(cfg, build_inference_model(model_cfg, state, source))
    img_size = (int(cfg.model.img_size[0]), int(cfg.model.img_size[1]))
    feat_dim = int(cast(int, ex.model.feat_dim))
    info = contract(cfg, ex, model_cfg, source, feat_dim)
    files: list[tuple[Path, bytes]] = []
    sidecars: list[tuple[Path, bytes]] = []
    if "onnx" in formats:
        traced = example_inputs(ex, img_size, TRACE_BATCH, seed)
        data = onnx_bytes(ex, traced)
        checked = check_onnx(data, ex, example_inputs(ex, img_size, CHECK_BATCH, seed + 1))
        import onnx

        opset = next(o.version for o in onnx.load_from_string(data).opset_import if o.domain in ("", "ai.onnx"))
        files.append((out / ONNX_FILE, data))
        sidecars.append((out / f"{ONNX_FILE}.json", _json({
            "file": ONNX_FILE, "format": "onnx", "opset": opset, "sha256": hashlib.sha256(data).hexdigest(),
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}", **info,
            "batch_axis": "dynamic", "check": checked})))
    if "safetensors" in formats:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in ex.model.state_dict().items()}
        data = save(tensors)
        files.append((out / WEIGHTS_FILE, data))
        sidecars.append((out / f"{WEIGHTS_FILE}.json", _json({
            "file": WEIGHTS_FILE, "format": "safetensors", "sha256": hashlib.sha256(data).hexdigest(),
            "load": "trainer.models.build_model(ModelConfig(**model_config), num_classes=0)"
                    ".load_state_dict(tensors, strict=True), then .eval()",
            **info})))
    out.mkdir(parents=True, exist_ok=True)
    for path, data in files + sidecars:  # a sidecar only once its file is complete
        atomic_write_bytes(path, data)
    return [p for p, _ in files + sidecars]


def main(argv: list[str] | None = None) -> int:
    ap = CliParser(PROG, prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a trainer.train run directory (config.yaml and weights)")
    ap.add_argument("--format", action="append", choices=FORMATS, dest="formats",
                    help="onnx (model.onnx, default) or safetensors (feature_extractor.safetensors); repeat for both")
    ap.add_argument("--checkpoint", metavar="DIR", default=None,
                    help=f"export this checkpoint folder (RUN_DIR/checkpoints/step_...) instead of {FINAL}")
    ap.add_argument("--out", metavar="DIR", default=None, help="output folder (default: RUN_DIR/export)")
    args = ap.parse_args(argv)
    formats = tuple(dict.fromkeys(args.formats or ["onnx"]))

    def body() -> int:
        written = export(Path(args.run_dir), formats, Path(args.out) if args.out else None, args.checkpoint)
        for path in written:
            print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
