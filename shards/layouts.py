"""Parsers for the on-disk layouts of the person re-id datasets, and their registry.

Every parser takes the dataset root (the folder as distributed, see each parser) and returns
``{"train": [...], "query": [...], "gallery": [...]}`` of :class:`~shards.records.Record`, cameras
0-based, each list sorted by ``relpath`` (``/``-separated, relative to the root).

What is skipped, and only this:

* files whose suffix (case-insensitive) is not in ``IMAGE_EXTS`` (``Thumbs.db``, ``readme.txt``,
  sub-folders) and hidden files (names starting with ``.``, e.g. macOS ``._0002_c1s1_….jpg``);
* the documented junk: pid −1 in Market-1501, the Market-style MSMT17 and the synthetic layout.

Everything else that does not fit (a missing folder, an image name that does not parse, a pid or
camera out of range, a bad MSMT17 list line, a listed file that is not there, an empty split) is a
:class:`LayoutError` (a :class:`~shards.errors.UserError`) with one line naming the path, the
expected pattern and what to do. Misuse of the API (an unknown layout name, an option a parser does
not take) stays a plain ``ValueError``: it is a bug of the caller, not of the data.

Pid 0 (Market-1501 and synthetic) marks distractors: kept in the gallery, an error in train and
query (there are none in the real sets, so one there means the folders are mixed up).

Kept free of torch: the packer runs on a data node with only Pillow + webdataset.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from shards.errors import UserError
from shards.records import IMAGE_EXTS, SPLITS, Record

Splits = dict[str, list[Record]]

MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
"""Split → folder of the Market-1501 convention (also Duke, CUHK03-NP, converted MSMT17, synthetic)."""

_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
"""``<pid>_c<camera>`` at the start of the file name: the convention every Market-style loader uses.
The camera takes all its digits, so ``_c12`` is camera 12 (out of range for Market), never camera 1."""


@dataclass(frozen=True)
class MarketStyleRule:
    """How one dataset fills the Market-1501 folder convention."""

    dataset: str
    """Registry name, used in error messages."""
    example: str
    """A real file name of the dataset, shown in error messages."""
    max_pid: int
    """Largest valid pid (the smallest is 0)."""
    num_cams: int
    """Cameras are 1..num_cams in file names and 0..num_cams-1 in records."""
    junk_pid: int | None = None
    """Pid of junk images, dropped (Market-1501: −1); ``None``: a negative pid is an error."""
    distractor_pid: int | None = None
    """Pid of distractors, allowed in the gallery only (Market-1501: 0); ``None``: an ordinary pid."""


# Pids: every Market-style name holds a 4-digit pid; the real sets stay well below (Market <= 1501,
# CUHK03-NP <= 1467), the synthetic generator (shards/synth.py) may use all of 0..9999.
MARKET1501 = MarketStyleRule("market1501", "0002_c1s1_000451_03.jpg", 9999, 6, junk_pid=-1, distractor_pid=0)
DUKEMTMC = MarketStyleRule("dukemtmc", "0005_c2_f0046985.jpg", 9999, 8)
# CUHK03-NP (Zhong et al., CVPR 2017 release): PNGs whose names start ``<pid:04d>_c<view>_`` (e.g.
# ``0001_c1_1.png``; only that prefix is read, like every loader of the release); the camera is the
# view within a camera pair (1 or 2): the pair itself is not in the name. 1,467 identities (767
# train, 700 test).
CUHK03NP = MarketStyleRule("cuhk03np", "0001_c1_1.png", 9999, 2)
# The Market-style conversion of MSMT17 (ClusterContrast / TMGF's msmt17_v2.py): 4,101 identities,
# 15 cameras, pid −1 dropped like Market.
MSMT17_MARKET = MarketStyleRule("msmt17", "0000_c1_0303morning_0015_0.jpg", 9999, 15, junk_pid=-1)
# shards/synth.py writes the real layouts (parse them with the real names); ``synthetic`` is the
# Market convention with room for more cameras: any number of camera digits
# (``0007_c12s1_000003_00.jpg``), Market's junk (−1) and distractor (0) pids. It also reads a
# synthetic Market with 7..9 cameras, which the market1501 parser refuses (Market has 6).
SYNTHETIC = MarketStyleRule("synthetic", "0007_c12s1_000003_00.jpg", 999_999, 99, junk_pid=-1, distractor_pid=0)


class LayoutError(UserError):
    """The dataset folder does not look like its layout: a missing folder, a name that does not parse, …"""


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _require_dir(folder: Path, what: str) -> None:
    """One-line error for a missing folder, with a hint when the root is one level too high."""
    if folder.is_dir():
        return
    root = folder.parent
    fix = f"pass the {what} as the root"
    if root.is_dir():
        below = sorted(p for p in root.iterdir() if (p / folder.name).is_dir())
        if below:
            fix = f"found it under {below[0]}: pass that as the root"
    elif not root.exists():
        fix = f"the root {root} does not exist; {fix}"
    else:
        fix = f"the root {root} is not a folder; {fix}"
    raise LayoutError(f"{folder}: missing folder; {fix}")


def _image_names(folder: Path) -> list[str]:
    names = []
    with os.scandir(folder) as it:
        for entry in it:
            if not _is_image_name(entry.name):
                continue
            if not entry.is_file():
                raise LayoutError(
                    f"{folder / entry.name}: an image name that is not a regular file; rename or remove it"
                )
            names.append(entry.name)
    return sorted(names)


def parse_market_style(root: str | os.PathLike[str], rule: MarketStyleRule, subdir: str = "") -> Splits:
    """Parse ``root/subdir/{bounding_box_train,query,bounding_box_test}`` with the file names of
    ``rule``; relpaths are relative to ``root`` (so they start with ``subdir/`` when one is given)."""
    root = Path(root)
    prefix = f"{subdir}/" if subdir else ""
    what = f"{rule.dataset} folder holding bounding_box_train/, bounding_box_test/ and query/"
    pattern = f"'<pid>_c<camera>…' with pid 0..{rule.max_pid}, camera 1..{rule.num_cams} (e.g. {rule.example})"
    out: Splits = {}
    for split in SPLITS:
        sub = prefix + MARKET_FOLDERS[split]
        folder = root / sub
        _require_dir(folder, what)
        records = []
        for name in _image_names(folder):
            path = folder / name
            m = _MARKET_NAME.match(name)
            if m is None:
                raise LayoutError(
                    f"{path}: file name does not match {rule.dataset}'s pattern {pattern}; rename or remove it"
                )
            pid, cam = int(m.group(1)), int(m.group(2))
            if rule.junk_pid is not None and pid == rule.junk_pid:
                continue
            if not 0 <= pid <= rule.max_pid:
                raise LayoutError(f"{path}: pid {pid} out of range; expected {pattern}; rename or remove it")
            if not 1 <= cam <= rule.num_cams:
                raise LayoutError(f"{path}: camera {cam} out of range; expected {pattern}; rename or remove it")
            if pid == rule.distractor_pid and split != "gallery":
                raise LayoutError(
                    f"{path}: pid {pid} marks a distractor, allowed in bounding_box_test/ only "
                    f"(are the {rule.dataset} folders mixed up?); move it there or remove it"
                )
            records.append(Record(f"{sub}/{name}", pid, cam - 1, split))
        if not records:
            raise LayoutError(
                f"{folder}: no images (expected {rule.dataset} files like {rule.example}); "
                "check that the root is the complete dataset folder"
            )
        out[split] = sorted(records)
    return out


def _no_options(name: str, options: dict[str, object]) -> None:
    if options:
        raise ValueError(f"layout {name!r} takes no options, got {sorted(options)}")


def parse_market1501(root: str | os.PathLike[str], **options: object) -> Splits:
    """Market-1501: ``root`` is the distributed folder (``Market-1501-v15.09.15/``).

    12,936 train / 3,368 query / 15,913 gallery images after dropping the 3,819 junk (−1) images of
    ``bounding_box_test/``; the distractors (pid 0) stay in the gallery.
    """
    _no_options("market1501", options)
    return parse_market_style(root, MARKET1501)


def parse_dukemtmc(root: str | os.PathLike[str], **options: object) -> Splits:
    """DukeMTMC-reID: ``root`` is ``DukeMTMC-reID/``; 16,522 / 2,228 / 17,661 images, no junk."""
    _no_options("dukemtmc", options)
    return parse_market_style(root, DUKEMTMC)


def _cuhk03np(root: str | os.PathLike[str], which: str, options: dict[str, object]) -> Splits:
    _no_options(f"cuhk03np_{which}", options)
    _require_dir(Path(root) / which, "cuhk03-np folder holding detected/ and labeled/")
    return parse_market_style(root, replace(CUHK03NP, dataset=f"cuhk03np_{which}"), subdir=which)


def parse_cuhk03np_detected(root: str | os.PathLike[str], **options: object) -> Splits:
    """CUHK03-NP detected boxes: ``root`` is ``cuhk03-np/``; 7,365 / 1,400 / 5,332 images, relpaths
    start with ``detected/``."""
    return _cuhk03np(root, "detected", options)


def parse_cuhk03np_labeled(root: str | os.PathLike[str], **options: object) -> Splits:
    """CUHK03-NP hand-labelled boxes: ``root`` is ``cuhk03-np/``; 7,368 / 1,400 / 5,328 images."""
    return _cuhk03np(root, "labeled", options)


def parse_synthetic(root: str | os.PathLike[str], **options: object) -> Splits:
    """The synthetic generator's layout: Market-1501 folders and names, up to 99 cameras."""
    _no_options("synthetic", options)
    return parse_market_style(root, SYNTHETIC)


# --------------------------------------------------------------------------------------------- MSMT17

MSMT17_CAMS = 15
_MSMT_EXAMPLE = "0000/0000_000_01_0303morning_0015_0.jpg 0"
_MSMT_VARIANTS = {"v1": ("train", "test"), "v2": ("mask_train_v2", "mask_test_v2")}


def detect_msmt17_variant(root: str | os.PathLike[str]) -> str:
    """Which MSMT17 layout ``root`` holds: ``v1`` (``MSMT17_V1/``: ``train/``, ``test/`` + the
    ``list_*.txt`` files), ``v2`` (``MSMT17_V2/``: ``mask_train_v2/``, ``mask_test_v2/`` + lists) or
    ``market`` (the Market-style conversion). The list layouts win when both are present."""
    root = Path(root)
    if (root / "list_train.txt").is_file():
        for variant, (train_dir, test_dir) in _MSMT_VARIANTS.items():
            if (root / train_dir).is_dir():
                _require_dir(root / test_dir, f"MSMT17_{variant.upper()} folder holding {train_dir}/ and {test_dir}/")
                return variant
        raise LayoutError(
            f"{root}: has list_train.txt but neither train/ (MSMT17_V1) nor mask_train_v2/ (MSMT17_V2); "
            "check that the root is the complete dataset folder"
        )
    if (root / MARKET_FOLDERS["train"]).is_dir():
        return "market"
    hint = "" if root.is_dir() else " (it does not exist)"
    raise LayoutError(
        f"{root}: not an MSMT17 root{hint}; expected list_train.txt with train/+test/ (V1) or "
        "mask_train_v2/+mask_test_v2/ (V2), or bounding_box_train/, bounding_box_test/, query/; "
        "pass the dataset folder as distributed (MSMT17_V1/, MSMT17_V2/) as the root"
    )


def _parse_msmt_list(
    list_path: Path, image_dir: str, root: Path, split: str, seen: dict[str, str]
) -> list[Record]:
    """One ``list_*.txt``: lines ``<relpath under image_dir> <pid>``; camera = 3rd ``_`` field of the name."""
    if not list_path.is_file():
        raise LayoutError(
            f"{list_path}: missing list file (expected lines like '{_MSMT_EXAMPLE}'); "
            "check that the root is the complete dataset folder"
        )
    records = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_path}:{lineno}"
        expected = f"expected '<relpath> <pid>' like '{_MSMT_EXAMPLE}' with camera 01..{MSMT17_CAMS:02d}"
        fields = line.split()
        if len(fields) != 2 or not re.fullmatch(r"\d+", fields[1]):
            raise LayoutError(f"{where}: bad line {line.strip()!r}; {expected}; fix or remove the line")
        rel, pid = fields[0], int(fields[1])
        parts = rel.split("/")
        stem, ext = os.path.splitext(parts[-1])
        name_fields = stem.split("_")
        if (
            rel.startswith("/")
            or ".." in parts
            or ext.lower() not in IMAGE_EXTS
            or len(name_fields) < 3
            or not name_fields[2].isdigit()
        ):
            raise LayoutError(f"{where}: bad image path {rel!r}; {expected}; fix or remove the line")
        cam = int(name_fields[2])
        if not 1 <= cam <= MSMT17_CAMS:
            raise LayoutError(f"{where}: camera {cam} of {rel!r} out of range; {expected}; fix or remove the line")
        relpath = f"{image_dir}/{rel}"
        if not (root / relpath).is_file():
            raise LayoutError(f"{where}: listed image {root / relpath} does not exist; restore it or remove the line")
        if relpath in seen:
            raise LayoutError(f"{where}: {relpath} is listed twice (first at {seen[relpath]}); remove one of the lines")
        seen[relpath] = where
        records.append(Record(relpath, pid, cam - 1, split))
    return records


def parse_msmt17(root: str | os.PathLike[str], *, train_only: bool = False, **options: object) -> Splits:
    """MSMT17 in any of its three layouts (see :func:`detect_msmt17_variant`).

    List layouts: train = ``list_train.txt`` + ``list_val.txt`` (32,621 images, 1,041 ids: the
    standard training set); ``train_only=True`` takes ``list_train.txt`` alone (30,248 images, what
    the official PAT loader trains on). Query 11,659, gallery 82,161. The Market-style conversion
    holds one training folder, so ``train_only`` is an error there.
    """
    _no_options("msmt17", options)
    root = Path(root)
    variant = detect_msmt17_variant(root)
    if variant == "market":
        if train_only:
            raise LayoutError(
                f"{root}: train_only needs the list layout (MSMT17_V1/V2); the Market-style "
                "conversion does not say which training images came from list_val.txt; "
                "drop --msmt17-train-only or pack MSMT17_V1/V2"
            )
        return parse_market_style(root, MSMT17_MARKET)
    train_dir, test_dir = _MSMT_VARIANTS[variant]
    lists = [("train", "list_train.txt", train_dir)]
    if not train_only:
        lists.append(("train", "list_val.txt", train_dir))
    lists += [("query", "list_query.txt", test_dir), ("gallery", "list_gallery.txt", test_dir)]
    out: Splits = {split: [] for split in SPLITS}
    seen: dict[str, dict[str, str]] = {split: {} for split in SPLITS}  # relpath → where first listed
    for split, list_name, image_dir in lists:
        out[split] += _parse_msmt_list(root / list_name, image_dir, root, split, seen[split])
    for split, records in out.items():
        if not records:
            raise LayoutError(f"{root}: the {split} list files name no images; check the list_*.txt files")
        records.sort()
    return out


# ------------------------------------------------------------------------------------------- registry

LAYOUTS: dict[str, Callable[..., Splits]] = {
    "market1501": parse_market1501,
    "dukemtmc": parse_dukemtmc,
    "msmt17": parse_msmt17,
    "cuhk03np_detected": parse_cuhk03np_detected,
    "cuhk03np_labeled": parse_cuhk03np_labeled,
    "synthetic": parse_synthetic,
}
"""Registry name → parser ``(root, **options) -> {split: [Record, ...]}``."""


def parse(name: str, root: str | os.PathLike[str], **options: object) -> Splits:
    """Parse the dataset ``name`` at ``root``; see the module docstring for what is an error."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {name!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[name](root, **options)
