"""``model.pretrained=timm:<model>[.<tag>]``: timm's weights read from timm's own caches, never downloaded here.

Every test points the Hugging Face hub cache (``HF_HUB_CACHE``) and torch hub's (``TORCH_HOME``) at a
scratch folder and writes there, in the hub cache's own layout, a file shaped like the real one (timm's
``deit_tiny_patch16_224`` state dict, random values): the loaded model must hold exactly that file's
tensors, and equal the model loaded from the same file by path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.config import ConfigError, ModelConfig, compose
from trainer.models.registry import build_model
from trainer.models.weights import (
    WeightsError,
    WeightsNotFound,
    is_timm_name,
    load_pretrained,
    locate_timm_weights,
    read_state_dict,
    resolve_weights,
)
from trainer.train import check_files

ARCH = "deit_tiny_patch16_224"
NAME = f"timm:{ARCH}.fb_in1k"
REPO = f"timm/{ARCH}.fb_in1k"
"""The hub repo timm's pretrained config names for NAME (its ``hf_hub_id``)."""
URL_FILE = "deit_tiny_patch16_224-a1311bcf.pth"
"""The file name of timm's ``url`` for NAME, as torch hub caches it."""
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty hub and torch caches under ``tmp_path``; offline, as the Makefile runs."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def timm_state(arch: str = ARCH) -> dict[str, torch.Tensor]:
    """A state dict of timm's own ``arch`` (with its 1000-way head and 14x14 position table), as the
    real file holds; seeded random values, different from any model's initialisation below."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = timm.create_model(arch, pretrained=False)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def put_in_hub_cache(root: Path, state: dict[str, torch.Tensor], *, by_ref: bool, repo: str = REPO) -> Path:
    """Write ``state`` where the hub cache keeps ``repo``'s model.safetensors: ``by_ref`` as ``hf download``
    leaves it (refs/main -> commit, snapshots/<commit>/), else in snapshots/main/ (what the error names)."""
    repo_dir = root / "hf" / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / (SHA if by_ref else "main")
    snapshot.mkdir(parents=True)
    if by_ref:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(SHA)
    save_file(state, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def pat_config(pretrained: str) -> ModelConfig:
    return ModelConfig(name="pat", backbone=ARCH, img_size=(32, 16), num_parts=2, drop_path_rate=0.0,
                       pretrained=pretrained)


def built(pretrained: str) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same initialisation for what the weights do not set
        return build_model(pat_config(pretrained), num_classes=0).state_dict()


@pytest.mark.parametrize("by_ref", [True, False], ids=["refs-main", "snapshots-main"])
def test_cached_timm_name_loads_the_cached_file(caches: Path, by_ref: bool) -> None:
    state = timm_state()
    file = put_in_hub_cache(caches, state, by_ref=by_ref)
    assert resolve_weights(NAME) == file
    assert resolve_weights(f"timm:{ARCH}") == file  # no tag: timm's default tag (fb_in1k)

    model = built(NAME)
    # copied, not computed: exact equality (the grid rows of pos_embed are resized: not compared here)
    for key, value in state.items():
        if not key.startswith(("head", "pos_embed")):
            assert torch.equal(model[f"backbone.{key}"], value), key
    assert torch.equal(model["backbone.pos_embed"][0, 0], state["pos_embed"][0, 0])  # the cls row is kept
    assert torch.equal(model["backbone.reg_token"][0, 0], state["cls_token"][0, 0])  # part tokens from cls
    by_path = built(str(file))
    assert by_path.keys() == model.keys()
    assert all(torch.equal(by_path[k], model[k]) for k in model), "timm: and its file give different models"
    assert read_state_dict(NAME).keys() == load_file(str(file)).keys()  # the path TMGF's loader reads by


def test_distilled_deit_from_timm_into_the_deit_backbone(caches: Path) -> None:
    """timm's distilled DeiT (docs/weights.md's ``timm:deit_*_distilled_patch16_224.fb_in1k``): no wrapper,
    ``dist_token`` and its position row, ``head_dist``; the distillation parts are dropped, the rest loads."""
    arch = "deit_tiny_distilled_patch16_224"
    state = timm_state(arch)
    put_in_hub_cache(caches, state, by_ref=True, repo=f"timm/{arch}.fb_in1k")
    model = built(f"timm:{arch}.fb_in1k")
    assert "backbone.dist_token" not in model
    assert torch.equal(model["backbone.pos_embed"][0, 0], state["pos_embed"][0, 0])  # cls row; dist row dropped
    assert torch.equal(model["backbone.blocks.11.attn.qkv.weight"], state["blocks.11.attn.qkv.weight"])


def test_torch_hub_cache_is_read_when_the_hub_cache_lacks_it(caches: Path) -> None:
    """timm's ``url`` download lands in torch hub's checkpoints/ under the URL's file name (DeiT's own
    ``{'model': ...}`` wrapper): found there, loaded through the same reader."""
    state = timm_state()
    file = caches / "torch" / "hub" / "checkpoints" / URL_FILE
    file.parent.mkdir(parents=True)
    torch.save({"model": state}, file)
    assert resolve_weights(NAME) == file
    report = load_pretrained(build_model(pat_config(""), num_classes=0), NAME)
    assert report.path == str(file) and "blocks.11.mlp.fc2.weight" in report.loaded


def test_uncached_offline_names_the_file_to_place(caches: Path) -> None:
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights(NAME)
    line = str(info.value)
    place = caches / "hf" / f"models--{REPO.replace('/', '--')}" / "snapshots" / "main" / "model.safetensors"
    assert "\n" not in line
    for part in (f"model.pretrained='{NAME}'", "HF_HUB_OFFLINE=1", f"place its model.safetensors at {place}",
                 f"hf download {REPO} model.safetensors", "model.pretrained=/path/to/model.safetensors"):
        assert part in line, (part, line)
    assert not (caches / "hf").exists()  # reads only
    # the named place is where it is read from
    place.parent.mkdir(parents=True)
    save_file(timm_state(), str(place))
    assert resolve_weights(NAME) == place


def test_online_and_uncached_downloads_through_the_hub(caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, an uncached name is fetched as timm fetches it: ``hf_hub_download`` of timm's repo and
    file (stood in for here: no test reaches the network), then loaded from the file it returns."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: list[tuple[str, str, dict]] = []

    def hf_hub_download(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append((repo_id, filename, kwargs))
        return str(put_in_hub_cache(caches, timm_state(), by_ref=True))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert locate_timm_weights(NAME) is None  # not cached, but downloadable: check_files lets it pass
    file = resolve_weights(NAME)
    assert [(r, f, k.get("library_name")) for r, f, k in calls] == [(REPO, "model.safetensors", "timm")]
    assert resolve_weights(NAME) == file and len(calls) == 1  # cached now


def test_failed_download_is_one_line(caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args: object, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub.\nmore")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights(NAME)
    line = str(info.value)
    assert "\n" not in line and "download failed (LocalEntryNotFoundError" in line
    assert "snapshots/main/model.safetensors" in line and "model.pretrained=/path/to/model.safetensors" in line


@pytest.mark.parametrize("value,expected", [
    ("timm:no_such_vit", "model.pretrained='timm:no_such_vit': expected timm:<model>[.<pretrained tag>] naming "
                         "a model timm"),
    (f"timm:{ARCH}.no_tag", f"model.pretrained='timm:{ARCH}.no_tag': expected a pretrained tag of {ARCH} "
                            "that timm has: fb_in1k"),
])
def test_compose_refuses_names_timm_does_not_know(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(["exp=pat_market", f"model.pretrained={value}"])
    assert str(info.value).startswith(expected), str(info.value)
    assert compose(["exp=pat_market", f"model.pretrained={NAME}"]).model.pretrained == NAME  # reads no cache


def test_check_files(caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cached: accepted. Uncached offline: one line naming where to place it. Uncached online: accepted
    without any network access (loading downloads it)."""
    import huggingface_hub
    from huggingface_hub import constants

    cfg = compose(["exp=pat_market", f"model.pretrained={NAME}"])
    with pytest.raises(ConfigError, match=r"^model.pretrained='timm:.*snapshots/main/model.safetensors"):
        check_files(cfg)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("check_files downloaded"))
    check_files(cfg)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    put_in_hub_cache(caches, timm_state(), by_ref=True)
    check_files(cfg)


def test_is_timm_name() -> None:
    assert is_timm_name(NAME) and is_timm_name(Path(NAME))
    assert not is_timm_name("pretrained/timm.pth") and not is_timm_name(None)
    with pytest.raises(WeightsError, match="expected"):
        resolve_weights("timm:")
