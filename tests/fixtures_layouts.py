"""Tiny fixture trees in the real dataset layouts, made of real 16×8 JPEG/PNG images."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image


def tiny_image(seed: int, fmt: str = "JPEG") -> bytes:
    """A 16×8 RGB image of random pixels: different seeds give different bytes."""
    rng = random.Random(seed)
    im = Image.new("RGB", (16, 8))
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(16 * 8)])
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def write_images(root: Path, relpaths: list[str], seed: int = 0) -> None:
    """Write an image (JPEG or PNG by suffix) at each relpath under ``root``."""
    for i, rel in enumerate(relpaths):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiny_image(seed * 100_003 + i, "PNG" if rel.endswith(".png") else "JPEG"))


def write_clutter(root: Path, folders: list[str]) -> None:
    """The non-images real folders carry: Thumbs.db, a text file, a macOS AppleDouble twin."""
    for folder in folders:
        (root / folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not an image")
        (root / folder / "readme.txt").write_text("not an image\n")
        (root / folder / "._0002_c1s1_000451_03.jpg").write_bytes(b"\x00\x05\x16\x07 apple double")


MARKET_FILES = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c6s4_002202_02.jpg"],
    "query": ["0002_c3s1_000301_00.jpg", "0007_c5s3_001001_00.jpg"],
    "bounding_box_test": [
        "-1_c1s1_000401_03.jpg",  # junk: dropped
        "0000_c2s1_000126_01.jpg",  # distractor: kept
        "0002_c4s2_000801_02.jpg",
        "0007_c1s6_011111_01.jpg",
    ],
}


def make_market(root: Path, files: dict[str, list[str]] | None = None, clutter: bool = True) -> Path:
    """A Market-1501 tree (``Market-1501-v15.09.15/`` style) under ``root``."""
    files = MARKET_FILES if files is None else files
    for seed, (folder, names) in enumerate(sorted(files.items())):
        (root / folder).mkdir(parents=True, exist_ok=True)
        write_images(root, [f"{folder}/{n}" for n in names], seed=seed + 1)
    if clutter:
        write_clutter(root, list(files))
    return root


DUKE_FILES = {
    "bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c8_f0050001.jpg", "0008_c1_f0000101.jpg"],
    "query": ["0011_c3_f0099999.jpg"],
    "bounding_box_test": ["0011_c7_f0100001.jpg", "0012_c4_f0000200.jpg"],
}

CUHK_FILES = {
    "bounding_box_train": ["0001_c1_1.png", "0001_c2_2.png", "0003_c1_1.png"],
    "query": ["1400_c1_1.png"],
    "bounding_box_test": ["1400_c2_2.png", "1467_c1_3.png"],
}


def make_cuhk03np(root: Path, which: tuple[str, ...] = ("detected", "labeled")) -> Path:
    """``cuhk03-np/`` with ``detected/`` and/or ``labeled/`` (PNGs)."""
    for k, sub in enumerate(which):
        make_market(root / sub, CUHK_FILES, clutter=False)
        write_images(root / sub, [f"bounding_box_train/000{5 + k}_c2_1.png"], seed=50 + k)
    return root


MSMT_LISTS = {
    # list file: (image folder role, [(relpath under the folder, pid)])
    "list_train.txt": ("train", [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                 ("0001/0001_011_15_0303noon_0996_1.jpg", 1)]),
    "list_val.txt": ("train", [("0000/0000_004_07_0303morning_0029_1.jpg", 0)]),
    "list_query.txt": ("test", [("0000/0000_000_05_0303afternoon_0002_0.jpg", 0)]),
    "list_gallery.txt": ("test", [("0000/0000_003_02_0303noon_0100_0.jpg", 0),
                                  ("0003/0003_001_11_0113morning_0900_1.jpg", 3)]),
}


def make_msmt_lists(root: Path, variant: str = "v1", lists: dict | None = None) -> Path:
    """``MSMT17_V1/`` (``train/``, ``test/``) or ``MSMT17_V2/`` (``mask_*_v2/``) with list files."""
    dirs = {"v1": {"train": "train", "test": "test"}, "v2": {"train": "mask_train_v2", "test": "mask_test_v2"}}[variant]
    lists = MSMT_LISTS if lists is None else lists
    for d in dirs.values():
        (root / d).mkdir(parents=True, exist_ok=True)
    for seed, (list_name, (role, entries)) in enumerate(sorted(lists.items())):
        write_images(root / dirs[role], [rel for rel, _ in entries], seed=10 + seed)
        (root / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries))
    return root


MSMT_MARKET_FILES = {
    "bounding_box_train": ["0000_c1_0303morning_0015_0.jpg", "0001_c15_0303noon_0996_1.jpg"],
    "query": ["1041_c5_0303afternoon_0002_0.jpg"],
    "bounding_box_test": ["-1_c2_0303noon_0001_0.jpg", "1041_c12_0303noon_0100_0.jpg"],
}
