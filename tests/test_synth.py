"""The synthetic generator writes the real layouts, deterministically, and is hard enough to mean
something: parts shared across identities, camera bias that defeats a global colour
descriptor (while identity signal is there for a colour-constant one), and a measurable domain gap."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.records import Record
from shards.synth.cli import main
from shards.synth.config import SUMMARY_FILE, SynthConfig, SynthSummary
from shards.synth.parts import ATTRIBUTES
from shards.synth.people import draw_people
from shards.synth.streams import domain_id
from shards.synth.style import DomainStyle
from shards.synth.write import synthesize

SMALL = dict(ids=20, test_ids=20, images_per_id_cam=2, size=(64, 32), seed=3)
CAMS = {"market1501": 4, "dukemtmc": 4, "msmt17": 4, "cuhk03np": 2}
EXTRA = {"market1501": dict(distractors=10, junk=5), "dukemtmc": dict(distractors=6), "msmt17": dict(val_fraction=0.2),
         "cuhk03np": {}}

# The real file-name conventions, restated here independently of the generator.
NAME_RE = {
    "market1501": re.compile(r"^(?P<pid>-1|\d{4})_c(?P<cam>[1-9])s[1-6]_\d{6}_\d{2}\.jpg$"),
    "dukemtmc": re.compile(r"^(?P<pid>\d{4})_c(?P<cam>[1-8])_f\d{7}\.jpg$"),
    "msmt17": re.compile(
        r"^(?P<pid>\d{4})_\d{3}_(?P<cam>0[1-9]|1[0-5])_(0113|0114|0302|0303)(morning|noon|afternoon)_\d{4}_\d\.jpg$"
    ),
    "cuhk03np": re.compile(r"^(?P<pid>\d{4})_c(?P<cam>[12])_\d+\.png$"),
}
FOLDERS = {
    "market1501": {"bounding_box_train", "bounding_box_test", "query"},
    "dukemtmc": {"bounding_box_train", "bounding_box_test", "query"},
    "msmt17": {"train", "test"},
    "cuhk03np": {"detected", "labeled"},
}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _image_files(root: Path) -> set[str]:
    return {k for k in _files(root) if k.endswith((".jpg", ".png"))}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, SynthSummary]]:
    out = {}
    for layout in CAMS:
        root = tmp_path_factory.mktemp(layout)
        cfg = SynthConfig(layout=layout, out=str(root), cams=CAMS[layout], **SMALL, **EXTRA[layout])
        out[layout] = root, synthesize(cfg)
    return out


# ------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("layout", list(CAMS))
def test_real_folders_and_names(datasets, layout: str) -> None:
    root, s = datasets[layout]
    assert {p.name for p in root.iterdir() if p.is_dir()} == FOLDERS[layout]
    files = _image_files(root)
    assert files == {r.relpath for r in s.records}
    assert s.images_written == len(files)
    split_dir = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for r in s.records:
        parts = r.relpath.split("/")
        m = NAME_RE[layout].match(parts[-1])
        assert m, f"{r.relpath} does not follow the {layout} convention"
        assert int(m["pid"]) == r.pid and int(m["cam"]) == r.camid + 1, r
        if layout == "msmt17":
            assert parts[0] == ("train" if r.split == "train" else "test") and parts[1] == m["pid"]
        elif layout == "cuhk03np":
            assert parts[0] in ("detected", "labeled")
            assert parts[1] == split_dir[r.split]
        else:
            assert parts[0] == split_dir[r.split]
    with Image.open(root / s.records[0].relpath) as im:
        assert im.size == (32, 64) and im.mode == "RGB"
        assert im.format == ("PNG" if layout == "cuhk03np" else "JPEG")


def test_msmt17_lists(datasets) -> None:
    root, s = datasets["msmt17"]
    by_rel = {r.relpath: r for r in s.records}
    listed: dict[str, list[tuple[str, int]]] = {}
    for name in ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"):
        lines = (root / name).read_text().splitlines()
        listed[name] = []
        for line in lines:
            rel, pid = line.split(" ")  # "<relpath> <pid>", relpath under train/ or test/
            folder = "train" if name in ("list_train.txt", "list_val.txt") else "test"
            rec = by_rel[f"{folder}/{rel}"]
            assert int(pid) == rec.pid == int(rel.split("/")[0]) == int(rel.split("/")[1].split("_")[0])
            assert int(rel.split("/")[1].split("_")[2]) == rec.camid + 1  # camera = third "_" field
            listed[name].append((rel, int(pid)))
    assert len(listed["list_val.txt"]) == s.counts["val"] > 0
    assert len(listed["list_train.txt"]) + len(listed["list_val.txt"]) == s.counts["train"]
    assert not {r for r, _ in listed["list_train.txt"]} & {r for r, _ in listed["list_val.txt"]}
    # Train (+val) pids are 0..N-1, test pids 0..M-1, as in the real MSMT17.
    assert {p for n in ("list_train.txt", "list_val.txt") for _, p in listed[n]} == set(range(SMALL["ids"]))
    assert {p for n in ("list_query.txt", "list_gallery.txt") for _, p in listed[n]} == set(range(SMALL["test_ids"]))


def test_cuhk03np_detected_is_misaligned_labeled(datasets) -> None:
    root, s = datasets["cuhk03np"]
    det = {r.relpath.split("/", 1)[1] for r in s.records if r.relpath.startswith("detected/")}
    lab = {r.relpath.split("/", 1)[1] for r in s.records if r.relpath.startswith("labeled/")}
    assert det == lab
    diffs, cross = [], []
    names = sorted(det)
    for a, b in zip(names[:20], names[1:21]):
        x = np.asarray(Image.open(root / "detected" / a), dtype=np.float64)
        y = np.asarray(Image.open(root / "labeled" / a), dtype=np.float64)
        z = np.asarray(Image.open(root / "labeled" / b), dtype=np.float64)
        diffs.append(np.abs(x - y).mean())
        cross.append(np.abs(x - z).mean())
    assert min(diffs) > 0.5  # never the same crop ...
    assert np.median(diffs) < np.median(cross)  # ... but the same shot, closer than another one


@pytest.mark.parametrize("layout", list(CAMS))
def test_protocol(datasets, layout: str) -> None:
    _, s = datasets[layout]
    one_variant = [r for r in s.records if not r.relpath.startswith("labeled/")]
    split = {sp: [r for r in one_variant if r.split == sp] for sp in ("train", "query", "gallery")}
    assert all(split.values())
    assert all(s.counts[sp] == len(v) for sp, v in split.items()), s.counts
    train_pids = {r.pid for r in split["train"]}
    test_pids = {r.pid for r in split["query"]}
    assert len(train_pids) == SMALL["ids"] and len(test_pids) == SMALL["test_ids"]
    if layout != "msmt17":  # MSMT17 numbers train and test identities separately (both from 0)
        assert not train_pids & {r.pid for r in split["gallery"]}
    gallery = Counter((r.pid, r.camid) for r in split["gallery"])
    same_cam = 0
    for q in split["query"]:
        assert any(p == q.pid and c != q.camid for p, c in gallery), f"query {q.relpath} has no cross-camera match"
        same_cam += gallery[(q.pid, q.camid)] > 0
    assert same_cam == len(split["query"])  # 2 images per camera: the other one is a same-camera match
    # One query per identity and camera (Market protocol).
    assert len({(q.pid, q.camid) for q in split["query"]}) == len(split["query"])
    if layout == "market1501":
        assert s.counts["distractors"] == sum(r.pid == 0 for r in split["gallery"]) == 10
        assert s.counts["junk"] == sum(r.pid == -1 for r in split["gallery"]) == 5
        assert all(r.pid > 0 for r in split["train"] + split["query"])
    if layout == "dukemtmc":  # gallery-only identities, one camera each
        only = {r.pid for r in split["gallery"]} - test_pids
        assert sum(r.pid in only for r in split["gallery"]) == 6
        assert all(len({r.camid for r in split["gallery"] if r.pid == p}) == 1 for p in only)


@pytest.mark.parametrize("layout", list(CAMS))
def test_layouts_parser_accepts_output(datasets, layout: str) -> None:
    layouts = pytest.importorskip("shards.layouts", reason="shards/layouts.py (the real-layout parsers) not there yet")
    root, s = datasets[layout]
    mine = [r for r in s.records if r.pid != -1]  # Market junk is dropped by the parser
    if layout == "cuhk03np":
        for variant in ("detected", "labeled"):
            got = layouts.parse(f"cuhk03np_{variant}", root)
            want = [r for r in mine if r.relpath.startswith(variant + "/")]
            assert sorted(r for v in got.values() for r in v) == sorted(want)
        return
    got = layouts.parse(layout, root)
    assert sorted(r for v in got.values() for r in v) == sorted(mine)
    for sp in ("train", "query", "gallery"):
        assert len(got[sp]) == s.counts[sp] - (s.counts.get("junk", 0) if sp == "gallery" else 0)
    if layout == "msmt17":
        only = layouts.parse("msmt17", root, train_only=True)
        assert len(only["train"]) == s.counts["train"] - s.counts["val"]


def test_many_cameras_market_needs_synthetic_parser(tmp_path: Path) -> None:
    s = synthesize(SynthConfig(layout="market1501", out=str(tmp_path), ids=3, test_ids=3, cams=9, images_per_id_cam=1,
                               size=(64, 32), min_cams_per_id=9, distractors=0, junk=0))
    assert {r.camid for r in s.records} == set(range(9))
    layouts = pytest.importorskip("shards.layouts", reason="shards/layouts.py not there yet")
    got = layouts.parse("synthetic", tmp_path)
    assert sorted(r for v in got.values() for r in v) == sorted(s.records)


# ------------------------------------------------------------------------------------- determinism

TINY = dict(layout="market1501", ids=5, test_ids=5, cams=3, images_per_id_cam=2, size=(64, 32), seed=11,
            distractors=3, junk=2)


def test_deterministic_and_order_free(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthesize(SynthConfig(out=str(a), **TINY))
    synthesize(SynthConfig(out=str(b), **TINY))
    synthesize(SynthConfig(out=str(c), workers=2, **TINY))  # other processes, other order
    fa = _files(a)
    assert fa == _files(b)
    assert fa == _files(c)
    assert SUMMARY_FILE in fa


def test_seed_and_domain_change_the_data(tmp_path: Path) -> None:
    base = _files(Path(synthesize(SynthConfig(out=str(tmp_path / "a"), **TINY)).out))
    for name, change in (("seed", dict(seed=12)), ("domain", dict(domain="other"))):
        other = _files(Path(synthesize(SynthConfig(out=str(tmp_path / name), **{**TINY, **change})).out))
        imgs_a = [v for k, v in sorted(base.items()) if k.endswith(".jpg")]
        imgs_b = [v for k, v in sorted(other.items()) if k.endswith(".jpg")]
        assert not set(imgs_a) & set(imgs_b), name
        px = [np.abs(_decode(x) - _decode(y)).mean() for x, y in zip(imgs_a, imgs_b)]
        assert np.mean(px) > 10, (name, np.mean(px))  # other persons/cameras, not just other noise


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


# --------------------------------------------------------------------------------------- difficulty


@pytest.mark.parametrize("n", [20, 7, 40])
def test_every_attribute_value_is_shared(n: int) -> None:
    dom = domain_id("market1501")
    style = DomainStyle.draw(dom)
    for group in (0, 1):
        people = draw_people(5, dom, group, n, style)
        combos = {tuple(p.attrs[a] for a in ATTRIBUTES) for p in people}
        assert len(combos) == n  # identities differ by their combination of parts ...
        for a in ATTRIBUTES:
            counts = Counter(p.attrs[a] for p in people)
            assert min(counts.values()) >= 2, (a, counts)  # ... never by one part value alone
        assert len({p.attrs["upper_color"] for p in people}) >= max(2, min(5, n // 4))  # and there is variety


def _market_map(qf, qp, qc, gf, gp, gc) -> float:
    """mAP, Market protocol (same pid + same camera removed, junk -1 ignored), naive loop."""
    d = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)
    aps = []
    for i in range(len(qf)):
        keep = ~((gp == qp[i]) & (gc == qc[i])) & (gp != -1)
        match = gp[keep][np.argsort(d[i][keep], kind="stable")] == qp[i]
        hits = np.nonzero(match)[0]
        aps.append(np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))
    return float(np.mean(aps))


def _load(root: Path, recs: list[Record]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(root / r.relpath).convert("RGB"), dtype=np.float64) / 255 for r in recs])


def _retrieval(root: Path, s: SynthSummary) -> dict[str, float]:
    q = [r for r in s.records if r.split == "query"]
    g = [r for r in s.records if r.split == "gallery"]
    qi, gi = _load(root, q), _load(root, g)
    qp, qc = np.array([r.pid for r in q]), np.array([r.camid for r in q])
    gp, gc = np.array([r.pid for r in g]), np.array([r.camid for r in g])

    def mean_rgb(x):
        return x.mean(axis=(1, 2))

    def parts_normalised(x):  # colour of 8 body stripes relative to the image's mean (grey world)
        w = x.shape[2]
        centre = x[:, :, w // 4: 3 * w // 4]
        ref = x.mean(axis=(1, 2))[:, None, :] + 1e-3
        stripes = np.stack([s.mean(axis=(1, 2)) for s in np.array_split(centre, 8, axis=1)], 1)
        return np.log(stripes / ref + 1e-2).reshape(len(x), -1)

    rng = np.random.default_rng(0)
    return {
        "mean_rgb": _market_map(mean_rgb(qi), qp, qc, mean_rgb(gi), gp, gc),
        "parts_normalised": _market_map(parts_normalised(qi), qp, qc, parts_normalised(gi), gp, gc),
        "random": float(np.mean([_market_map(rng.normal(size=(len(q), 3)), qp, qc, rng.normal(size=(len(g), 3)), gp, gc)
                                 for _ in range(5)])),
    }


def test_global_colour_fails_across_cameras_but_identity_signal_is_there(tmp_path: Path) -> None:
    s = synthesize(SynthConfig(layout="market1501", out=str(tmp_path), ids=2, test_ids=20, cams=4, images_per_id_cam=2,
                               seed=0, distractors=0, junk=0))  # full 128x64: the hardness is measured at real size
    m = _retrieval(tmp_path, s)
    print(m)
    # A per-image mean colour is no better than chance across cameras (camera lighting and
    # background dominate it) ...
    assert m["mean_rgb"] < 0.15 and m["mean_rgb"] < 2 * m["random"], m
    # ... while the persons' parts are there for a descriptor that discounts the camera's light.
    assert m["parts_normalised"] > 2 * m["mean_rgb"] and m["parts_normalised"] > 2 * m["random"], m


def _style_features(root: Path, s: SynthSummary) -> tuple[np.ndarray, np.ndarray]:
    """Per training image: sqrt of a 4x4x4 colour histogram + gradient energy; and its camera."""
    feats, cams = [], []
    for r in s.records:
        if r.split != "train":
            continue
        x = np.asarray(Image.open(root / r.relpath).convert("RGB"))
        q = (x // 64).astype(np.int64)
        hist = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64) / q[..., 0].size
        grad = np.abs(np.diff(x.astype(np.float64), axis=1)).mean() / 64
        feats.append(np.r_[np.sqrt(hist), grad])
        cams.append(r.camid)
    return np.array(feats), np.array(cams)


def test_domains_differ(tmp_path: Path) -> None:
    feats, cams = [], []
    for dom in ("market1501", "dukemtmc"):  # the default styles of synthetic Market and Duke
        s = synthesize(SynthConfig(layout="market1501", out=str(tmp_path / dom), ids=12, test_ids=2, cams=4,
                                   images_per_id_cam=1, seed=0, domain=dom, distractors=0, junk=0))
        f, c = _style_features(tmp_path / dom, s)
        feats.append(f)
        cams.append(c)
    # Mean colour of the two domains: measurably apart (several standard errors, several grey levels).
    a_rgb, b_rgb = (_mean_rgb(tmp_path / d) for d in ("market1501", "dukemtmc"))
    gap = np.abs(a_rgb.mean(0) - b_rgb.mean(0))
    se = np.sqrt(a_rgb.var(0) / len(a_rgb) + b_rgb.var(0) / len(b_rgb))
    assert (gap / se).max() > 3 and gap.max() > 0.04, (gap, se)
    # The style generalises across cameras: a 5-NN classifier that may only look at images of the
    # *other* cameras (of both domains) tells the domain of an image.
    x = np.concatenate(feats)
    y = np.r_[np.zeros(len(feats[0])), np.ones(len(feats[1]))]
    cam = np.concatenate(cams)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    d[cam[:, None] == cam[None, :]] = np.inf
    votes = y[np.argsort(d, axis=1)[:, :5]].mean(1)
    acc = float(((votes > 0.5) == y).mean())
    assert acc > 0.85, acc


def _mean_rgb(root: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) / 255
                     for p in sorted((root / "bounding_box_train").glob("*.jpg"))])


# -------------------------------------------------------------------------------------- config/CLI


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(layout="dukemtmc", cams=9), "cams=9"),
        (dict(layout="cuhk03np", cams=3), "cams=3: cuhk03np"),
        (dict(layout="msmt17", distractors=4), "no distractors"),
        (dict(layout="dukemtmc", junk=1), "junk"),
        (dict(layout="nope"), "layout='nope'"),
        (dict(layout="market1501", ids=0), "ids=0"),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path: Path, change: dict, message: str) -> None:
    cfg = {"layout": "market1501", "out": str(tmp_path), "cams": 4, **SMALL, **change}
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        synthesize(SynthConfig(**cfg))
    assert "\n" not in str(e.value)


def test_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "query").mkdir()
    (tmp_path / "query" / "old.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="query"):
        synthesize(SynthConfig(out=str(tmp_path), **TINY))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--layout", "dukemtmc", "--out", str(tmp_path / "d"), "--ids", "3", "--test-ids", "2", "--cams", "2",
               "--seed", "1", "--domain", "7", "--images-per-id-cam", "2", "--size", "64x32", "--distractors", "0"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    assert all(NAME_RE["dukemtmc"].match(Path(p).name) for p in _image_files(tmp_path / "d"))
    assert main(["--layout", "dukemtmc", "--out", str(tmp_path / "e"), "--cams", "12"]) == 2
    assert "cams=12" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, line",
    [
        (["--ids", "0"], "synth: error: --ids=0: expected >= 1"),
        (["--images-per-id-cam", "1", "--cams", "1"],
         "synth: error: --cams=1 needs --images-per-id-cam >= 2 to have a gallery match per query"),
        (["--size", "16x8"], "synth: error: --size=16x8: expected at least 32x16"),
        (["--val-fraction", "1.5"], "synth: error: --val-fraction=1.5: expected in [0, 1)"),
    ],
)
def test_cli_errors_name_the_flag_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], line: str
) -> None:
    out = tmp_path / "out"
    assert main(["--layout", "market1501", "--out", str(out), *args]) == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""
    assert not out.exists()
