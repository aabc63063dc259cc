"""Layout parsers on tiny fixture trees in the real layouts, and every kind of bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shards.layouts import LAYOUTS, detect_msmt17_variant, parse
from shards.records import SPLITS, Record
from tests.fixtures_layouts import (
    CUHK_FILES,
    DUKE_FILES,
    MSMT_MARKET_FILES,
    make_cuhk03np,
    make_market,
    make_msmt_lists,
    write_images,
)

ROOT = Path(__file__).resolve().parents[1]


def _one_line_naming(exc: pytest.ExceptionInfo, path: Path | str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg, msg
    return msg


def test_market1501(tmp_path: Path) -> None:
    root = make_market(tmp_path / "Market-1501-v15.09.15")
    got = parse("market1501", root)
    R = Record
    assert got == {
        "train": [
            R("bounding_box_train/0002_c1s1_000451_03.jpg", 2, 0, "train"),
            R("bounding_box_train/0002_c2s1_000551_01.jpg", 2, 1, "train"),
            R("bounding_box_train/0007_c6s4_002202_02.jpg", 7, 5, "train"),
        ],
        "query": [
            R("query/0002_c3s1_000301_00.jpg", 2, 2, "query"),
            R("query/0007_c5s3_001001_00.jpg", 7, 4, "query"),
        ],
        "gallery": [  # -1 junk dropped, 0 distractor kept; Thumbs.db, readme.txt, ._* ignored
            R("bounding_box_test/0000_c2s1_000126_01.jpg", 0, 1, "gallery"),
            R("bounding_box_test/0002_c4s2_000801_02.jpg", 2, 3, "gallery"),
            R("bounding_box_test/0007_c1s6_011111_01.jpg", 7, 0, "gallery"),
        ],
    }
    for records in got.values():
        assert [r.relpath for r in records] == sorted(r.relpath for r in records)


def test_market_upper_case_suffix_is_an_image(tmp_path: Path) -> None:
    root = make_market(tmp_path / "m")
    write_images(root, ["query/0009_c2s1_000001_00.JPG"], seed=9)
    assert "query/0009_c2s1_000001_00.JPG" in [r.relpath for r in parse("market1501", root)["query"]]


@pytest.mark.parametrize("folder", ["bounding_box_train", "query"])
def test_market_distractor_outside_gallery_is_an_error(tmp_path: Path, folder: str) -> None:
    root = make_market(tmp_path / "m")
    write_images(root, [f"{folder}/0000_c1s1_000001_00.jpg"])
    with pytest.raises(ValueError, match="distractor") as exc:
        parse("market1501", root)
    _one_line_naming(exc, root / folder / "0000_c1s1_000001_00.jpg")


@pytest.mark.parametrize(
    "name, what",
    [
        ("0002_c7s1_000001_00.jpg", "camera 7 out of range"),
        ("0002_c0s1_000001_00.jpg", "camera 0 out of range"),
        ("0002_c12s1_000001_00.jpg", "camera 12 out of range"),
        ("10000_c1s1_000001_00.jpg", "pid 10000 out of range"),
        ("-2_c1s1_000001_00.jpg", "pid -2 out of range"),
        ("person_0002.jpg", "does not match"),
        ("0002c1s1_000001_00.jpg", "does not match"),
    ],
)
def test_market_bad_names(tmp_path: Path, name: str, what: str) -> None:
    root = make_market(tmp_path / "m")
    write_images(root, [f"bounding_box_test/{name}"])
    with pytest.raises(ValueError, match=what) as exc:
        parse("market1501", root)
    msg = _one_line_naming(exc, root / "bounding_box_test" / name)
    assert "<pid>_c<camera>" in msg and "0002_c1s1_000451_03.jpg" in msg


@pytest.mark.parametrize("folder", ["bounding_box_train", "bounding_box_test", "query"])
def test_market_missing_folder(tmp_path: Path, folder: str) -> None:
    root = make_market(tmp_path / "m")
    for p in (root / folder).iterdir():
        p.unlink()
    (root / folder).rmdir()
    with pytest.raises(ValueError, match="missing folder") as exc:
        parse("market1501", root)
    _one_line_naming(exc, root / folder)


def test_market_root_one_level_too_high_gets_a_hint(tmp_path: Path) -> None:
    make_market(tmp_path / "Market-1501-v15.09.15")
    with pytest.raises(ValueError, match="pass that as the root") as exc:
        parse("market1501", tmp_path)
    assert str(tmp_path / "Market-1501-v15.09.15") in str(exc.value)
    with pytest.raises(ValueError, match="does not exist"):
        parse("market1501", tmp_path / "nowhere")


def test_market_empty_split_is_an_error(tmp_path: Path) -> None:
    root = make_market(tmp_path / "m", {**{k: ["0002_c1s1_000451_03.jpg"] for k in ("bounding_box_train", "query")},
                                        "bounding_box_test": []})
    with pytest.raises(ValueError, match="no images") as exc:
        parse("market1501", root)
    _one_line_naming(exc, root / "bounding_box_test")


def test_dukemtmc(tmp_path: Path) -> None:
    root = make_market(tmp_path / "DukeMTMC-reID", DUKE_FILES)
    got = parse("dukemtmc", root)
    assert [(r.pid, r.camid) for r in got["train"]] == [(5, 1), (5, 7), (8, 0)]
    assert [(r.pid, r.camid) for r in got["query"]] == [(11, 2)]
    assert [(r.pid, r.camid, r.relpath) for r in got["gallery"]] == [
        (11, 6, "bounding_box_test/0011_c7_f0100001.jpg"),
        (12, 3, "bounding_box_test/0012_c4_f0000200.jpg"),
    ]
    write_images(root, ["query/0011_c9_f0000001.jpg"])
    with pytest.raises(ValueError, match="camera 9 out of range") as exc:
        parse("dukemtmc", root)
    _one_line_naming(exc, root / "query" / "0011_c9_f0000001.jpg")


def test_duke_has_no_junk_convention(tmp_path: Path) -> None:
    root = make_market(tmp_path / "d", DUKE_FILES)
    write_images(root, ["bounding_box_test/-1_c1_f0000001.jpg"])
    with pytest.raises(ValueError, match="pid -1 out of range"):
        parse("dukemtmc", root)


def _msmt_expected(d_train: str, d_test: str, train_only: bool) -> dict[str, list[tuple[str, int, int]]]:
    train = [(f"{d_train}/0000/0000_000_01_0303morning_0015_0.jpg", 0, 0),
             (f"{d_train}/0001/0001_011_15_0303noon_0996_1.jpg", 1, 14)]
    if not train_only:
        train.insert(1, (f"{d_train}/0000/0000_004_07_0303morning_0029_1.jpg", 0, 6))
    return {
        "train": train,
        "query": [(f"{d_test}/0000/0000_000_05_0303afternoon_0002_0.jpg", 0, 4)],
        "gallery": [(f"{d_test}/0000/0000_003_02_0303noon_0100_0.jpg", 0, 1),
                    (f"{d_test}/0003/0003_001_11_0113morning_0900_1.jpg", 3, 10)],
    }


def _triples(splits: dict[str, list[Record]]) -> dict[str, list[tuple[str, int, int]]]:
    for split, records in splits.items():
        assert all(r.split == split for r in records)
    return {s: [(r.relpath, r.pid, r.camid) for r in rs] for s, rs in splits.items()}


@pytest.mark.parametrize("variant, dirs", [("v1", ("train", "test")), ("v2", ("mask_train_v2", "mask_test_v2"))])
@pytest.mark.parametrize("train_only", [False, True])
def test_msmt17_lists(tmp_path: Path, variant: str, dirs: tuple[str, str], train_only: bool) -> None:
    root = make_msmt_lists(tmp_path / f"MSMT17_{variant.upper()}", variant)
    (root / dirs[0] / "Thumbs.db").write_bytes(b"x")
    assert detect_msmt17_variant(root) == variant
    got = parse("msmt17", root, train_only=train_only)
    assert _triples(got) == _msmt_expected(*dirs, train_only)


def test_msmt17_market_style(tmp_path: Path) -> None:
    root = make_market(tmp_path / "MSMT17", MSMT_MARKET_FILES)
    assert detect_msmt17_variant(root) == "market"
    got = _triples(parse("msmt17", root))
    assert got == {
        "train": [("bounding_box_train/0000_c1_0303morning_0015_0.jpg", 0, 0),
                  ("bounding_box_train/0001_c15_0303noon_0996_1.jpg", 1, 14)],
        "query": [("query/1041_c5_0303afternoon_0002_0.jpg", 1041, 4)],
        "gallery": [("bounding_box_test/1041_c12_0303noon_0100_0.jpg", 1041, 11)],  # -1 dropped
    }
    with pytest.raises(ValueError, match="train_only needs the list layout"):
        parse("msmt17", root, train_only=True)
    write_images(root, ["query/0005_c16_0303noon_0001_0.jpg"])
    with pytest.raises(ValueError, match="camera 16 out of range"):
        parse("msmt17", root)


def test_msmt17_not_a_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an MSMT17 root") as exc:
        parse("msmt17", tmp_path)
    _one_line_naming(exc, tmp_path)
    (tmp_path / "list_train.txt").write_text("")
    with pytest.raises(ValueError, match="neither train/"):
        parse("msmt17", tmp_path)


@pytest.mark.parametrize(
    "line, what",
    [
        ("0000/0000_000_01_0303morning_0015_0.jpg", "bad line"),
        ("0000/0000_000_01_0303morning_0015_0.jpg 0 extra", "bad line"),
        ("0000/0000_000_01_0303morning_0015_0.jpg zero", "bad line"),
        ("0000/0000_000_01_0303morning_0015_0.jpg -1", "bad line"),
        ("0000/0000_000.jpg 0", "bad image path"),
        ("0000/0000_000_xx_0303morning_0015_0.jpg 0", "bad image path"),
        ("0000/0000_000_01_0303morning_0015_0.txt 0", "bad image path"),
        ("../train/0000/0000_000_01_0303morning_0015_0.jpg 0", "bad image path"),
        ("0000/0000_000_16_0303morning_0015_0.jpg 0", "camera 16 .* out of range"),
        ("0000/0000_000_00_0303morning_0015_0.jpg 0", "camera 0 .* out of range"),
        ("0000/0000_009_01_0303morning_0099_0.jpg 0", "does not exist"),
        ("0000/0000_004_07_0303morning_0029_1.jpg 0", "listed twice"),  # already in list_val.txt
    ],
)
def test_msmt17_bad_list_lines(tmp_path: Path, line: str, what: str) -> None:
    root = make_msmt_lists(tmp_path / "MSMT17_V1")
    lst = root / "list_train.txt"
    lst.write_text(lst.read_text() + "\n" + line + "\n")  # an empty line (skipped), then the bad one
    with pytest.raises(ValueError, match=what) as exc:
        parse("msmt17", root)
    msg = _one_line_naming(exc, f"{lst}:4")  # listed twice: names both places
    if what not in ("does not exist", "listed twice"):
        assert "'<relpath> <pid>'" in msg


def test_msmt17_missing_list_or_folder(tmp_path: Path) -> None:
    root = make_msmt_lists(tmp_path / "MSMT17_V1")
    (root / "list_gallery.txt").unlink()
    with pytest.raises(ValueError, match="missing list file") as exc:
        parse("msmt17", root)
    _one_line_naming(exc, root / "list_gallery.txt")
    root2 = make_msmt_lists(tmp_path / "MSMT17_V2", "v2")
    for p in sorted((root2 / "mask_test_v2").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (root2 / "mask_test_v2").rmdir()
    with pytest.raises(ValueError, match="missing folder") as exc:
        parse("msmt17", root2)
    _one_line_naming(exc, root2 / "mask_test_v2")


@pytest.mark.parametrize("which", ["detected", "labeled"])
def test_cuhk03np(tmp_path: Path, which: str) -> None:
    root = make_cuhk03np(tmp_path / "cuhk03-np")
    got = _triples(parse(f"cuhk03np_{which}", root))
    extra = {"detected": ("0005_c2_1.png", 5), "labeled": ("0006_c2_1.png", 6)}[which]
    names = CUHK_FILES["bounding_box_train"] + [extra[0]]
    train = sorted((f"{which}/bounding_box_train/{n}", int(n[:4]), int(n[6]) - 1) for n in names)
    assert got == {
        "train": train,
        "query": [(f"{which}/query/1400_c1_1.png", 1400, 0)],
        "gallery": [(f"{which}/bounding_box_test/1400_c2_2.png", 1400, 1),
                    (f"{which}/bounding_box_test/1467_c1_3.png", 1467, 0)],
    }


def test_cuhk03np_errors(tmp_path: Path) -> None:
    root = make_cuhk03np(tmp_path / "cuhk03-np", which=("detected",))
    with pytest.raises(ValueError, match="missing folder") as exc:
        parse("cuhk03np_labeled", root)
    _one_line_naming(exc, root / "labeled")
    write_images(root, ["detected/query/0009_c3_1.png"])
    with pytest.raises(ValueError, match="camera 3 out of range") as exc:
        parse("cuhk03np_detected", root)
    msg = _one_line_naming(exc, root / "detected" / "query" / "0009_c3_1.png")
    assert "cuhk03np_detected" in msg or "0001_c1_1.png" in msg


def test_synthetic_allows_two_digit_cameras(tmp_path: Path) -> None:
    files = {
        "bounding_box_train": ["0001_c12s1_000001_00.jpg", "0001_c3s1_000002_00.jpg"],
        "query": ["0002_c1s1_000003_00.jpg"],
        "bounding_box_test": ["-1_c2s1_000004_00.jpg", "0000_c2s1_000005_00.jpg", "0002_c99s1_000006_00.jpg"],
    }
    root = make_market(tmp_path / "synth", files)
    got = _triples(parse("synthetic", root))
    assert [(p, c) for _, p, c in got["train"]] == [(1, 11), (1, 2)]
    assert [(p, c) for _, p, c in got["gallery"]] == [(0, 1), (2, 98)]
    write_images(root, ["query/0002_c100s1_000007_00.jpg"])
    with pytest.raises(ValueError, match="camera 100 out of range"):
        parse("synthetic", root)


def test_registry(tmp_path: Path) -> None:
    assert set(LAYOUTS) == {"market1501", "dukemtmc", "msmt17", "cuhk03np_detected", "cuhk03np_labeled", "synthetic"}
    with pytest.raises(ValueError, match="unknown dataset layout 'market'"):
        parse("market", tmp_path)
    root = make_market(tmp_path / "m")
    with pytest.raises(ValueError, match=re.escape("takes no options, got ['train_only']")):
        parse("market1501", root, train_only=True)
    assert set(parse("market1501", root)) == set(SPLITS)


def test_shards_import_no_torch() -> None:
    code = (
        "import sys, shards.layouts, shards.pack, shards.verify\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'webdataset', 'numpy', 'PIL'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PATH": ""})


def test_layout_mistakes_are_user_errors_and_api_misuse_is_not(tmp_path: Path) -> None:
    from shards.errors import UserError
    from shards.layouts import LayoutError

    root = make_market(tmp_path / "m")
    write_images(root, ["query/person_0002.jpg"])
    with pytest.raises(LayoutError, match="rename or remove it$") as exc:
        parse("market1501", root)
    assert isinstance(exc.value, UserError) and str(root / "query" / "person_0002.jpg") in str(exc.value)
    with pytest.raises(LayoutError, match="nowhere does not exist; pass the market1501 folder holding .* as the root$"):
        parse("market1501", tmp_path / "nowhere")
    msmt = make_msmt_lists(tmp_path / "MSMT17_V1")
    (msmt / "list_query.txt").write_text("0000/0000_000_05_0303afternoon_0002_0.jpg x\n")
    with pytest.raises(LayoutError, match="fix or remove the line$"):
        parse("msmt17", msmt)
    for bad_call in (lambda: parse("market", root), lambda: parse("market1501", root, train_only=True)):
        with pytest.raises(ValueError) as exc:  # a caller's bug, not the user's data: keeps its traceback
            bad_call()
        assert not isinstance(exc.value, UserError)
