"""Bad inputs of ``trainer.train``, the demos and the benches: one line, exit 2, nothing written
(the contract of ``tests/badinput.py``); and the demos' exit status when a run misses its bar."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest

from tests.badinput import REPO, BadInput, check

TRAIN = ["-m", "trainer.train", "exp=pat_smoke", "run_dir={tmp}/run"]

# A port held by a listening socket for as long as this module is loaded: the row's command runs while
# it is taken (the port must be known when the row is written, so it is bound at import).
_BUSY = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
_BUSY.bind(("127.0.0.1", 0))
BUSY_PORT = _BUSY.getsockname()[1]


def _listen(tmp: Path) -> None:
    _BUSY.listen(1)


def _a_file(tmp: Path) -> None:
    (tmp / "notes.txt").write_text("a file where the run dir's parent should be\n")


def _misfit_weights(tmp: Path) -> None:
    """The tiny ViT of pat_smoke with one key dropped, one added and one of another shape."""
    import torch
    from safetensors.torch import save_file

    from trainer.models.backbones import build_vit

    sd = {k: v.detach().clone().contiguous() for k, v in build_vit("vit_test", (64, 32), drop_path_rate=0.0)
          .state_dict().items()}
    del sd["norm.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(128, 64)
    save_file(sd, str(tmp / "vit.safetensors"))


def _pickled_module(tmp: Path) -> None:
    import torch

    torch.save(torch.nn.Linear(2, 2), tmp / "vit.pth")  # a whole module: refused, never unpickled


def _checkpoint(tmp: Path) -> Path:
    """A real (tiny) checkpoint of this trainer's format in the row's run dir."""
    import torch

    from trainer.engine.checkpoint import save_checkpoint
    from trainer.engine.loop import STATE_KEYS

    return save_checkpoint(tmp / "run" / "checkpoints", 4, {k: torch.zeros(1) for k in STATE_KEYS})


def _checkpoint_of_another_format(tmp: Path) -> None:
    from trainer.engine.checkpoint import FORMAT_VERSION, META

    meta_file = _checkpoint(tmp) / META
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    meta_file.write_text(json.dumps(meta))


def _checkpoint_without_version(tmp: Path) -> None:
    from trainer.engine.checkpoint import META

    (_checkpoint(tmp) / META).unlink()  # the layout written before formats were versioned


def _checkpoint_of_two_ranks_mid_epoch(tmp: Path) -> None:
    import shutil

    from trainer.engine.checkpoint import META

    folder = _checkpoint(tmp)
    meta = json.loads((folder / META).read_text())
    meta.update(world_size=2, epoch=0, step_in_epoch=2)
    (folder / META).write_text(json.dumps(meta))
    shutil.copy(folder / "rng_rank0.pt", folder / "rng_rank1.pt")


def _next_format() -> int:
    from trainer.engine.checkpoint import FORMAT_VERSION

    return FORMAT_VERSION + 1


ROWS = [
    BadInput("run-dir-under-a-file", ["-m", "trainer.train", "exp=pat_smoke", "run_dir={tmp}/notes.txt/run"],
             names=("run_dir=", "notes.txt is not a folder"), fix=("pass another run_dir",), setup=_a_file),
    BadInput("metrics-port-taken", [*TRAIN, f"train.metrics_port={BUSY_PORT}"],
             names=(f"train.metrics_port={BUSY_PORT}", f"127.0.0.1:{BUSY_PORT}"),
             fix=("another train.metrics_port", "train.metrics_port=0 for any free port", "train.metrics_port=-1"),
             setup=_listen),
    BadInput("pretrained-missing", [*TRAIN, "model.pretrained={tmp}/vit.safetensors"],
             names=("model.pretrained=", "vit.safetensors", "no such file"), fix=("model.pretrained=''",)),
    BadInput("pretrained-does-not-fit", [*TRAIN, "model.pretrained={tmp}/vit.safetensors"],
             names=("vit.safetensors: weights do not fit", "1 missing: norm.weight", "1 unexpected: extra.weight",
                    "1 shape mismatch: blocks.0.mlp.fc1.weight (expected (256, 64), found (128, 64))"),
             fix=("pass model.pretrained=FILE holding weights of this architecture", "model.pretrained=''"),
             setup=_misfit_weights),
    BadInput("pretrained-pickled-module", [*TRAIN, "model.pretrained={tmp}/vit.pth"],
             names=("vit.pth: not a plain tensor checkpoint", "torch.nn.modules.linear.Linear"),
             fix=("state_dict()",), setup=_pickled_module),
    BadInput("checkpoint-of-another-format", TRAIN,
             names=("run/checkpoints/step_000000004", f"format {_next_format()}"),
             fix=("train.resume=never", "another run_dir"), setup=_checkpoint_of_another_format),
    BadInput("checkpoint-without-format", TRAIN,
             names=("run/checkpoints/step_000000004", "format 1 (no meta.json"),
             fix=("train.resume=never", "another run_dir"), setup=_checkpoint_without_version),
    BadInput("per-rank-batch-resumed-mid-epoch-on-other-ranks", [*TRAIN, "data.batch_scope=per_rank"],
             names=("run/checkpoints/step_000000004", "written by 2 ranks at step 2 of an epoch",
                    "data.batch_scope=per_rank"),
             fix=("resume it on 2 ranks", "a checkpoint at an epoch boundary", "data.batch_scope=global"),
             setup=_checkpoint_of_two_ranks_mid_epoch),
    BadInput("resume-not-a-checkpoint", [*TRAIN, "train.resume={tmp}/nowhere"],
             names=("train.resume=", "nowhere", "no state.pt"), fix=("train.resume=auto",)),
    BadInput("bench-bad-argument", [str(REPO / "bench" / "bank.py"), "--batch", "0"],
             names=("bench/bank.py: error:", "--batch", "'0'"), fix=("expected an integer >= 1",)),
    BadInput("tmgf-demo-flag", ["-m", "demo.tmgf", "--epochs", "3"],
             names=("demo.tmgf: error:", "--epochs"), fix=("key=value", "train.epochs=")),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row: BadInput, tmp_path: Path) -> None:
    check(row, tmp_path)


# -- the demos' exit status (their runs take minutes: the deciding functions are tested) -----------


@pytest.mark.parametrize(("gain", "ratio", "ok"), [
    (32.3, 0.86, True), (15.0, 0.8, True), (15.0, 1.2, True),  # the bars are inclusive
    (14.9, 1.0, False), (20.0, 0.79, False), (20.0, 1.21, False), (math.nan, 1.0, False), (20.0, math.nan, False),
])
def test_tmgf_demo_exits_3_when_an_acceptance_bar_fails(gain: float, ratio: float, ok: bool,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from demo.tmgf import ACCEPTANCE_FAILED, acceptance, demo_status

    numbers = {"mAP_gain_points": gain, "clusters_over_true_ids": ratio}
    passed, text = acceptance(numbers)
    assert passed is ok and text.startswith("acceptance: mAP gain") and ("FAIL" in text) is (not ok)
    assert demo_status(numbers) == (0 if ok else ACCEPTANCE_FAILED) and ACCEPTANCE_FAILED not in (0, 1, 2)
    err = capsys.readouterr().err
    assert (err == "") is ok and (ok or err.startswith("tmgf_demo: acceptance failed") and err.count("\n") == 1)


def test_pat_demo_labels_the_target_selected_epoch_as_an_oracle() -> None:
    from demo.pat import results_table

    m = {"mAP": 0.35, "R1": 0.42, "R5": 0.73, "mINP": 0.19}
    end = {"initial": {"demo_b": dict(m, mAP=0.04)}, "last": {"demo_b": dict(m, mAP=0.30)},
           "best": {"demo_b": dict(m, epoch=15)}}
    lines = results_table(end).splitlines()
    assert [ln.split("|")[2].strip() for ln in lines[2:]] == [
        "untrained", "trained (last)", "best on target (oracle, epoch 16)"]
    assert "| 30.0 |" in lines[3] and "| 35.0 |" in lines[4]


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False)])
def test_only_rank_0_prints_a_user_error_and_every_rank_exits_2(rank: str, printed: bool, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.train import main

    monkeypatch.setenv("RANK", rank)  # as torchrun sets it; the error is the same on every rank
    (tmp_path / "notes.txt").write_text("")
    assert main(["exp=pat_smoke", f"run_dir={tmp_path / 'notes.txt' / 'run'}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"trainer.train: error: run_dir={tmp_path / 'notes.txt' / 'run'}: "
                                 f"{tmp_path / 'notes.txt'} is not a folder; pass another run_dir\n" if printed else "")
