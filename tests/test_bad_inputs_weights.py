"""Bad inputs of ``model.pretrained=timm:...``: one line, exit 2, nothing written (``tests/badinput.py``).

The command runs offline (``HF_HUB_OFFLINE=1``) against an empty hub cache in the scratch folder
(``HF_HUB_CACHE=hf``, relative to it): nothing may be downloaded, and nothing is created there."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.badinput import BadInput, check

TRAIN = ["-m", "trainer.train", "exp=pat_smoke", "run_dir={tmp}/run"]
VIT = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "hf"}

ROWS = [
    BadInput("timm-not-cached-offline", [*TRAIN, f"model.pretrained=timm:{VIT}"],
             names=(f"model.pretrained='timm:{VIT}'", "HF_HUB_OFFLINE=1",
                    f"hf/models--timm--{VIT}/snapshots/main/model.safetensors"),
             fix=("place its model.safetensors at", f"hf download timm/{VIT} model.safetensors",
                  "model.pretrained=/path/to/model.safetensors"),
             env=OFFLINE),
    BadInput("timm-unknown-model", [*TRAIN, "model.pretrained=timm:vit_nonexistent_patch16"],
             names=("model.pretrained='timm:vit_nonexistent_patch16'",),
             fix=("timm:<model>[.<pretrained tag>]", "timm.list_pretrained('vit_*')"),
             env=OFFLINE),
    BadInput("timm-unknown-tag", [*TRAIN, "model.pretrained=timm:vit_base_patch16_224.in22k"],
             names=("model.pretrained='timm:vit_base_patch16_224.in22k'",),
             fix=("a pretrained tag of vit_base_patch16_224 that timm has:", "augreg2_in21k_ft_in1k"),
             env=OFFLINE),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row: BadInput, tmp_path: Path) -> None:
    check(row, tmp_path)
