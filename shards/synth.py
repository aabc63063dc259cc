"""Synthetic person re-identification datasets, written in the *real* on-disk layouts.

``python -m shards.synth --layout market1501 --out DIR --ids 100 --cams 6 --seed 0`` writes a folder
that the real parsers, the packer and the whole training pipeline accept as if it were Market-1501
(likewise ``dukemtmc``, ``msmt17`` (V1 list layout) and ``cuhk03np`` (detected + labeled)).

The persons are meant to be hard enough to mean something (DESIGN §7):

* **Parts shared across identities.** A person is a combination of hair (style, colour), upper
  clothes (colour, pattern, sleeves, a front print), lower clothes (colour, trousers/shorts/skirt),
  shoes, a bag (none/backpack/handbag/shoulder bag, side, colour), skin tone and body proportions.
  Each attribute value is dealt out in a *balanced* way within the train and the test identities, so
  every value is worn by several persons: identities differ by combinations of parts only.
* **Cameras** have their own viewpoint statistics (front/back/side decide which parts are visible: a
  backpack is a big patch from the back and two straps from the front, a chest print is front-only),
  their own lighting (gain, colour cast, gamma, side light, blur, noise), framing (scale, aspect) and
  their own background scene with clutter.
* **Domains** (``--domain``) have their own style: a hue/saturation shift of the clothing palette,
  the colours in fashion and the attribute priors (sleeves, skirts, bags, ...), background texture
  families and colours, illumination statistics, blur (optics/resolution), noise, JPEG quality,
  occlusion rate and framing. The style depends on the domain alone (not on the seed), so "domain A"
  is the same style for every seed; by default the domain is the layout name, so synthetic Market
  and synthetic Duke differ in style the way the real ones do.
* **Per image**: view, pose (position, scale, shear, arm swing, stride), a time-of-day session
  (Market's ``s`` field, MSMT17's time slot) that modulates the light, occluders, a JPEG quality.

Protocol: train and test identities are disjoint; each identity visits a random subset of at least
``min_cams_per_id`` cameras; per test identity, one image of every camera it visits is a query and the
other images are gallery (so same-camera matches exist, and every query has a cross-camera match).

Every image is drawn from its own ``numpy.random.Generator`` derived from
(seed, domain, kind, identity, camera, image): the output does not depend on iteration order or on
the number of worker processes, and the same arguments give byte-identical files. ``OUT/synth.json``
(config and counts) is written last: its presence means the dataset is complete.

Only numpy and Pillow are used (no torch): this module runs where the packer runs.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import math
import os
import re
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from shards.errors import CliParser, UserError, run_cli
from shards.records import Record, atomic_write_bytes

LAYOUTS = ("market1501", "dukemtmc", "msmt17", "cuhk03np")
MAX_CAMS = {"market1501": 9, "dukemtmc": 8, "msmt17": 15, "cuhk03np": 2}
"""Camera limits of each naming convention (Market/Duke names hold one camera digit)."""
MSMT_SLOTS = tuple(f"{day}{part}" for day in ("0113", "0114", "0302", "0303") for part in ("morning", "noon", "afternoon"))
"""MSMT17's time slots (the 4th name field); the slot of an image is its lighting session."""
SUMMARY_FILE = "synth.json"

F32 = np.float32

# Stream tags: the first entropy words after (seed, domain) say what a generator is for.
_T_DOMAIN, _T_CAMERA, _T_SESSION, _T_SPLIT, _T_DEAL, _T_PERSON, _T_IMAGE, _T_DETECT = range(1, 9)
# Identity kinds inside image streams.
_K_ID, _K_DISTRACTOR, _K_JUNK = 0, 1, 2


# ---------------------------------------------------------------------------------------------------
# Configuration and summary
# ---------------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """What to synthesize. ``None`` fields take the layout's own default (see ``resolved``)."""

    layout: str
    """One of ``market1501``, ``dukemtmc``, ``msmt17``, ``cuhk03np``."""
    out: str
    """Output root; created if missing, must not already hold the layout's folders with files."""
    ids: int = 50
    """Number of training identities."""
    cams: int = 6
    """Number of cameras (1-based in file names): market1501 <= 9 (the real set has 6; parse 7..9 with
    the ``synthetic`` layout), dukemtmc <= 8, msmt17 <= 15, cuhk03np exactly 2."""
    seed: int = 0
    """Seed of everything that is not domain style: identities, cameras, images."""
    domain: str | int | None = None
    """Style domain, a name or a non-negative int; None = the layout name."""
    images_per_id_cam: int = 4
    """Images of an identity in each camera it visits."""
    size: tuple[int, int] = (128, 64)
    """Image height and width in pixels."""
    test_ids: int | None = None
    """Number of test (query/gallery) identities, disjoint from the training ones; None = ``ids``."""
    min_cams_per_id: int = 2
    """Each identity visits a random subset of between this many and all cameras (at least 2 when
    ``cams`` >= 2 so that every query has a cross-camera match)."""
    distractors: int | None = None
    """Gallery distractor images (Market: pid 0000; Duke: gallery-only identities seen by one camera);
    None = the layout default (Market 10 %, Duke 5 % of the test images, others 0)."""
    junk: int | None = None
    """Gallery junk images (Market only: pid -1, partial bodies); None = 5 % of the test images."""
    val_fraction: float = 0.07
    """msmt17: fraction of training images listed in ``list_val.txt`` instead of ``list_train.txt``."""
    workers: int = 1
    """Worker processes; the output is identical for any number."""

    def resolved(self) -> "SynthConfig":
        """A copy with defaults filled in and every field checked (one-line errors naming the field)."""
        c = SynthConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        if c.layout not in LAYOUTS:
            raise ValueError(f"layout={c.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if c.domain is None:
            c.domain = c.layout
        domain_id(c.domain)  # a bad domain is an error here, not in a worker
        if c.test_ids is None:
            c.test_ids = c.ids
        h, w = (int(v) for v in c.size)
        c.size = (h, w)
        checks = [
            (c.ids >= 1, f"ids={c.ids}: expected >= 1"),
            (c.test_ids >= 1, f"test_ids={c.test_ids}: expected >= 1"),
            (1 <= c.cams <= MAX_CAMS[c.layout], f"cams={c.cams}: {c.layout} names hold cameras 1..{MAX_CAMS[c.layout]}"),
            (c.layout != "cuhk03np" or c.cams == 2, f"cams={c.cams}: cuhk03np has exactly 2 cameras"),
            (c.images_per_id_cam >= 1, f"images_per_id_cam={c.images_per_id_cam}: expected >= 1"),
            (c.cams >= 2 or c.images_per_id_cam >= 2,
             "cams=1 needs images_per_id_cam >= 2 to have a gallery match per query"),
            (h >= 32 and w >= 16, f"size={h}x{w}: expected at least 32x16"),
            (c.seed >= 0, f"seed={c.seed}: expected >= 0"),
            (0.0 <= c.val_fraction < 1.0, f"val_fraction={c.val_fraction}: expected in [0, 1)"),
            (c.workers >= 1, f"workers={c.workers}: expected >= 1"),
            (1 <= c.min_cams_per_id, f"min_cams_per_id={c.min_cams_per_id}: expected >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        n_test_images = c.test_ids * c.images_per_id_cam * c.cams
        default_distr = {"market1501": 0.10, "dukemtmc": 0.05}.get(c.layout, 0.0)
        default_junk = 0.05 if c.layout == "market1501" else 0.0
        if c.distractors is None:
            c.distractors = int(round(default_distr * n_test_images))
        if c.junk is None:
            c.junk = int(round(default_junk * n_test_images))
        if c.distractors < 0 or c.junk < 0:
            raise ValueError(f"distractors={c.distractors}, junk={c.junk}: expected >= 0")
        if c.distractors and c.layout not in ("market1501", "dukemtmc"):
            raise ValueError(f"distractors={c.distractors}: the {c.layout} layout has no distractors")
        if c.junk and c.layout != "market1501":
            raise ValueError(f"junk={c.junk}: only the market1501 layout has junk images (pid -1)")
        # Names hold 4-digit pids; MSMT17 numbers train and test from 0, the others share 1..9999
        # (Duke's gallery-only distractor identities included).
        if c.layout == "msmt17":
            n_pids = max(c.ids, c.test_ids) - 1
        else:
            n_pids = c.ids + c.test_ids + (math.ceil(c.distractors / c.images_per_id_cam) if c.layout == "dukemtmc" else 0)
        if n_pids > 9999:
            raise ValueError(f"ids={c.ids}, test_ids={c.test_ids}: {c.layout} names hold 4-digit pids (<= 9999)")
        # Frame / index fields have fixed widths (see _plan's names()).
        per_id = c.images_per_id_cam * c.cams
        limit = {"market1501": 24_999, "dukemtmc": 166_000, "msmt17": 999}.get(c.layout)
        if limit is not None and per_id > limit:
            raise ValueError(f"images_per_id_cam*cams={per_id}: {c.layout} names hold at most {limit} images per identity")
        if c.layout == "market1501" and max(c.junk, c.distractors) > 24_999:
            raise ValueError(f"junk={c.junk}, distractors={c.distractors}: Market names hold at most 24999 of each")
        return c


@dataclass
class SynthSummary:
    """What ``synthesize`` wrote."""

    layout: str
    out: str
    domain: int
    """Numeric domain id the style was drawn from (see ``domain_id``)."""
    counts: dict[str, int]
    """Images per split (``train``/``query``/``gallery``; msmt17 adds ``val`` (a subset of train),
    Market adds ``distractors``/``junk`` (inside gallery); cuhk03np counts one variant)."""
    num_train_ids: int
    num_test_ids: int
    """Query/gallery identities (Duke's gallery-only distractor identities not included)."""
    num_cams: int
    images_written: int
    """Files written (cuhk03np: both variants)."""
    seconds: float
    records: list[Record] = field(repr=False)
    """Every image written: relpath relative to ``out``, pid as the dataset states it (Market junk
    -1, distractors 0; msmt17 list pids), 0-based camid, split (msmt17 val images are ``train``)."""

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("records")
        return json.dumps(d, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------------
# Random streams
# ---------------------------------------------------------------------------------------------------


def domain_id(domain: str | int) -> int:
    """A non-negative int for a domain name (stable crc32) or an int-like value (itself)."""
    if isinstance(domain, (int, np.integer)):
        if domain < 0:
            raise ValueError(f"domain={domain}: expected a name or an int >= 0")
        return int(domain)
    text = str(domain).strip()
    if text.isdigit():
        return int(text)
    if not text:
        raise ValueError("domain='': expected a name or an int >= 0")
    return zlib.crc32(text.encode("utf-8"))


def _stream(*key: int) -> np.random.Generator:
    """An independent generator for one key tuple (order of creation never matters)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


# ---------------------------------------------------------------------------------------------------
# Vocabulary of parts
# ---------------------------------------------------------------------------------------------------

_CLOTH = np.array(
    [  # black, white, grey, red, blue, navy, green, yellow, pink, purple, brown, orange, teal, beige
        [0.07, 0.07, 0.08], [0.88, 0.88, 0.86], [0.48, 0.48, 0.50], [0.72, 0.12, 0.13],
        [0.16, 0.30, 0.72], [0.10, 0.12, 0.32], [0.20, 0.50, 0.24], [0.88, 0.78, 0.20],
        [0.88, 0.52, 0.66], [0.44, 0.22, 0.56], [0.42, 0.28, 0.17], [0.90, 0.48, 0.12],
        [0.10, 0.52, 0.52], [0.80, 0.72, 0.56],
    ], F32)
_LOWER = np.array(
    [  # jeans, black, grey, khaki, navy, brown, white, olive, light jeans
        [0.24, 0.32, 0.50], [0.08, 0.08, 0.09], [0.40, 0.40, 0.42], [0.70, 0.62, 0.45],
        [0.12, 0.14, 0.30], [0.36, 0.25, 0.16], [0.86, 0.86, 0.84], [0.38, 0.40, 0.20],
        [0.50, 0.60, 0.76],
    ], F32)
_SHOES = np.array([[0.06, 0.06, 0.06], [0.92, 0.92, 0.92], [0.40, 0.26, 0.14], [0.50, 0.50, 0.52], [0.75, 0.15, 0.15]], F32)
_BAGS = np.array(
    [[0.08, 0.08, 0.08], [0.38, 0.24, 0.12], [0.12, 0.15, 0.34], [0.46, 0.46, 0.48], [0.70, 0.14, 0.14],
     [0.72, 0.60, 0.40], [0.22, 0.38, 0.20]], F32)
_HAIR = np.array([[0.05, 0.04, 0.04], [0.20, 0.12, 0.07], [0.38, 0.24, 0.12], [0.80, 0.66, 0.38],
                  [0.62, 0.62, 0.62], [0.50, 0.20, 0.10]], F32)
_SKIN = np.array([[0.96, 0.80, 0.68], [0.88, 0.68, 0.52], [0.74, 0.54, 0.38], [0.54, 0.36, 0.24],
                  [0.34, 0.22, 0.15]], F32)

# Attribute name -> (vocabulary size or the palette it indexes, prior weights or None for uniform).
_ATTRS: dict[str, tuple[int, tuple[float, ...] | None]] = {
    "skin": (len(_SKIN), (0.25, 0.25, 0.2, 0.15, 0.15)),
    "hair_style": (5, (0.34, 0.26, 0.12, 0.14, 0.14)),  # short, long, bun, buzz, cap
    "hair_color": (len(_HAIR), (0.3, 0.25, 0.15, 0.1, 0.1, 0.1)),
    "upper_color": (len(_CLOTH), None),
    "upper_pattern": (5, (0.4, 0.18, 0.12, 0.15, 0.15)),  # plain, h-stripes, v-stripes, checks, colour block
    "accent_color": (len(_CLOTH), None),  # pattern's 2nd colour, front print, cap
    "sleeves": (2, (0.45, 0.55)),  # short, long
    "front_print": (2, (0.6, 0.4)),  # none, chest print (visible from the front only)
    "lower_color": (len(_LOWER), None),
    "lower_type": (3, (0.6, 0.2, 0.2)),  # trousers, shorts, skirt
    "shoe_color": (len(_SHOES), None),
    "bag": (4, (0.4, 0.3, 0.15, 0.15)),  # none, backpack, handbag, shoulder bag
    "bag_side": (2, None),  # the person's left, right
    "bag_color": (len(_BAGS), None),
}
ATTRIBUTES = tuple(_ATTRS)
"""Names of the discrete attributes of a person (the parts identities share)."""


@dataclass(frozen=True)
class Person:
    """One identity: discrete part attributes (indices into the vocabularies) + body proportions."""

    attrs: dict[str, int]
    height: float
    """Body height relative to the frame (about 1)."""
    width: float
    """Body width factor (about 1)."""
    shade: np.ndarray
    """(4, 3) small per-identity colour offsets of upper, accent, lower, hair (same fabric, other dye lot)."""

    def value(self, name: str) -> int:
        return self.attrs[name]


# ---------------------------------------------------------------------------------------------------
# Domain style and cameras
# ---------------------------------------------------------------------------------------------------


def _rotate_hue(rgb: np.ndarray, angle: float, sat: float, val: float) -> np.ndarray:
    """Rotate colours about the grey axis by ``angle`` rad, scale chroma by ``sat`` and value by ``val``."""
    k = np.full(3, 1 / math.sqrt(3), F32)
    grey = (rgb @ k)[:, None] * k[None, :]
    chroma = rgb - grey
    rot = chroma * math.cos(angle) + np.cross(k, chroma) * math.sin(angle)  # Rodrigues, chroma ⟂ k
    return np.clip((grey + sat * rot) * val, 0.02, 0.98).astype(F32)


@dataclass(frozen=True)
class DomainStyle:
    """Everything that makes one domain look unlike another (drawn from the domain id alone)."""

    cloth: np.ndarray
    lower: np.ndarray
    cloth_subset: tuple[int, ...]
    """Clothing colours in fashion in this domain (indices into ``_CLOTH``)."""
    priors: dict[str, np.ndarray]
    """Attribute priors of this domain's population (the global ones, perturbed: fashion, season)."""
    wall: np.ndarray
    floor: np.ndarray
    props: np.ndarray
    """(6, 3) colours of the street furniture and signs in this domain's scenes."""
    textures: tuple[int, int]
    """Two background texture families (0 bricks, 1 panels, 2 blotches, 3 tiles/stripes)."""
    clutter: float
    gain: float
    gain_spread: float
    cast: np.ndarray
    cast_spread: float
    gamma: float
    saturation: float
    """Colour grading of the whole image (1 = as lit; Duke-like washed-out < 1 < vivid)."""
    fill: float
    """Mean person height as a fraction of the image height (detector tightness)."""
    blur: float
    """Mean strength of the optics/resolution blur (passes of a 1-2-1 filter)."""
    noise: float
    quality: tuple[int, int]
    occlusion: float

    @staticmethod
    def draw(dom: int) -> "DomainStyle":
        r = _stream(dom, _T_DOMAIN)
        cloth = _rotate_hue(_CLOTH, r.uniform(-0.45, 0.45), r.uniform(0.6, 1.25), r.uniform(0.8, 1.1))
        lower = _rotate_hue(_LOWER, r.uniform(-0.3, 0.3), r.uniform(0.7, 1.2), r.uniform(0.8, 1.1))
        subset = tuple(sorted(r.choice(len(_CLOTH), size=int(r.integers(8, 12)), replace=False).tolist()))
        priors = {}
        for name, (size, weights) in _ATTRS.items():
            w = np.ones(size) if weights is None else np.asarray(weights, np.float64)
            w = w * np.exp(r.normal(0, 0.5, size))
            priors[name] = w / w.sum()
        base = r.uniform(0.2, 0.75)
        tint = r.normal(0, 0.2, 3)
        wall = np.clip(base * (1 + tint), 0.05, 0.95).astype(F32)
        floor = np.clip(r.uniform(0.2, 0.7) * (1 + r.normal(0, 0.08, 3)), 0.05, 0.95).astype(F32)
        t = r.choice(4, size=2, replace=False)
        props = np.clip(r.uniform(0.05, 0.95, 3) + r.normal(0, 0.15, (6, 3)), 0.03, 0.97).astype(F32)
        sat = float(r.uniform(0.45, 1.35))
        q_lo = int(r.integers(55, 90))
        return DomainStyle(
            cloth=cloth, lower=lower, cloth_subset=subset, priors=priors, wall=wall, floor=floor, props=props,
            textures=(int(t[0]), int(t[1])), clutter=float(r.uniform(2, 9)),
            gain=float(np.exp(r.uniform(-0.3, 0.3))), gain_spread=float(r.uniform(0.12, 0.25)),
            cast=np.exp(r.normal(0, 0.2, 3)).astype(F32), cast_spread=float(r.uniform(0.05, 0.12)),
            gamma=float(np.exp(r.normal(0, 0.15))), saturation=sat, fill=float(r.uniform(0.78, 0.92)),
            blur=float(r.uniform(0.0, 1.6)), noise=float(r.uniform(1.0, 6.0)),
            quality=(q_lo, min(98, q_lo + 10)), occlusion=float(r.uniform(0.08, 0.25)),
        )


_VIEWS = ("front", "back", "left", "right")


@dataclass(frozen=True)
class Camera:
    """One camera of one dataset: viewpoint statistics, framing, lighting and its scene."""

    views: np.ndarray
    """Probabilities of front, back, facing-left, facing-right."""
    fill: float
    aspect: float
    gain: float
    cast: np.ndarray
    gamma: float
    contrast: float
    v_light: float
    """Top-to-bottom illumination slope."""
    side_light: float
    """Left-to-right shading slope on the person (light direction)."""
    blur: float
    noise: float
    lut: np.ndarray
    """uint8 -> uint8 tone curve (gamma and contrast)."""
    scene: np.ndarray
    """(Hs, Ws, 3) float32 background the crops are cut from."""
    noise_field: np.ndarray
    """(2H, 2W, 3) float32 sensor noise (0..255 scale); each image adds a random window of it."""


def _draw_camera(r: np.random.Generator, st: DomainStyle, h: int, w: int) -> Camera:
    views = 0.8 * r.dirichlet(np.full(4, 0.5)) + 0.05
    gamma = st.gamma * float(np.exp(r.normal(0, 0.15)))
    contrast = float(np.exp(r.normal(0, 0.15)))
    x = np.arange(256, dtype=np.float64) / 255.0
    lut = np.round(np.clip(0.5 + (x ** gamma - 0.5) * contrast, 0, 1) * 255).astype(np.uint8)
    fill = st.fill * float(np.exp(r.normal(0, 0.05)))
    aspect = float(np.exp(r.normal(0, 0.07)))
    gain = float(np.clip(st.gain * np.exp(r.normal(0, st.gain_spread)), 0.5, 1.8))  # auto-exposure limits
    cast = (st.cast * np.exp(r.normal(0, st.cast_spread, 3))).astype(F32)
    v_light, side_light = float(r.normal(0, 0.2)), float(r.normal(0, 0.25))
    blur = st.blur * float(r.uniform(0.75, 1.25))
    noise = st.noise * float(r.uniform(0.75, 1.25))
    scene = _draw_scene(r, st, h, w)
    noise_field = (r.standard_normal((2 * h, 2 * w, 3)) * noise).astype(F32)
    return Camera(views=views / views.sum(), fill=fill, aspect=aspect, gain=gain, cast=cast, gamma=gamma,
                  contrast=contrast, v_light=v_light, side_light=side_light, blur=blur, noise=noise, lut=lut,
                  scene=scene, noise_field=noise_field)


def _smooth_noise(r: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """(h, w, 3) smooth random field in [-1, 1] (low-res noise upsampled bicubically)."""
    small = r.integers(0, 256, size=(max(2, h // cell), max(2, w // cell), 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    return np.asarray(big, dtype=F32) / 127.5 - 1.0


def _draw_scene(r: np.random.Generator, st: DomainStyle, h: int, w: int) -> np.ndarray:
    """The background one camera looks at: wall/floor, a texture family, clutter objects, passers-by."""
    hs, ws = int(h * 1.25), w * 6
    yy = (np.arange(hs, dtype=F32) / hs)[:, None, None]
    xx = (np.arange(ws, dtype=F32) / hs)[None, :, None]
    wall = np.clip(st.wall * np.exp(r.normal(0, 0.08, 3)), 0.03, 0.97).astype(F32)
    floor = np.clip(st.floor * np.exp(r.normal(0, 0.08, 3)), 0.03, 0.97).astype(F32)
    horizon = float(r.uniform(0.45, 0.85))
    is_wall = yy < horizon
    img = np.where(is_wall, wall, floor * (0.8 + 0.4 * (yy - horizon))).astype(F32)
    fam = st.textures[int(r.integers(0, 2))]
    if fam == 0:  # bricks
        rh = float(r.uniform(0.025, 0.06))
        row = np.floor(yy / rh)
        bx = (xx / (2.2 * rh) + 0.5 * (row % 2)) % 1.0
        mortar = ((yy / rh) % 1.0 < 0.15) | (bx < 0.07)
        img = np.where(mortar & is_wall, img * 0.6 + 0.3, img)
    elif fam == 1:  # panels / shop fronts
        pw = float(r.uniform(0.08, 0.3))
        other = np.clip(wall * np.exp(r.normal(0, 0.3, 3)), 0, 1).astype(F32)
        img = np.where(((xx / pw) % 2.0 < 1.0) & is_wall, other, img)
    elif fam == 2:  # foliage-like blotches
        img = img * (1 + 0.3 * _smooth_noise(r, hs, ws, 12)[..., :1]) + 0.05 * _smooth_noise(r, hs, ws, 16)
    else:  # tiles on the floor, horizontal bands on the wall
        tw = float(r.uniform(0.05, 0.12))
        chk = ((np.floor(xx / tw) + np.floor(yy / tw)) % 2 == 0) & ~is_wall
        band = ((yy / float(r.uniform(0.05, 0.15))) % 1.0 < 0.3) & is_wall
        img = np.where(chk | band, img * 0.75, img)
    img = np.broadcast_to(img, (hs, ws, 3)).astype(F32, copy=True)
    n_obj = int(r.poisson(st.clutter * ws / hs))
    for _ in range(n_obj):  # poles, signs, bins, cars, passers-by: colour mass the person must beat
        kind = int(r.integers(0, 3))
        cx, cw = r.uniform(0, ws), r.uniform(0.02, 0.35) * hs
        if kind == 0:
            y0, y1 = r.uniform(0, 0.6) * hs, r.uniform(0.6, 1.0) * hs
            cw *= 0.3
        elif kind == 1:
            y0 = r.uniform(0.1, 0.7) * hs
            y1 = y0 + r.uniform(0.05, 0.3) * hs
        else:
            y0, y1 = r.uniform(0.55, 0.85) * hs, hs
        # Street furniture in the domain's own colours, passers-by in its clothing palette.
        col = st.props[int(r.integers(len(st.props)))] if r.random() < 0.6 else st.cloth[int(r.integers(len(_CLOTH)))]
        a, b = max(0, int(y0)), min(hs, int(y1) + 1)
        c0, c1 = max(0, int(cx - cw / 2)), min(ws, int(cx + cw / 2) + 1)
        if a < b and c0 < c1:
            img[a:b, c0:c1] = col * float(r.uniform(0.6, 1.1))
    img += 0.04 * _smooth_noise(r, hs, ws, 3)
    return np.clip(img, 0.0, 1.0).astype(F32)


# ---------------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------------


def _balanced(r: np.random.Generator, n: int, size: int, weights: Sequence[float] | None,
              allowed: Sequence[int] | None = None, min_share: int = 2) -> np.ndarray:
    """``n`` values of one attribute with counts proportional to ``weights`` (largest remainder), every
    value used at least ``min_share`` times: the rarest values are dropped until that holds."""
    vals = np.array(allowed if allowed is not None else range(size))
    w = np.ones(len(vals)) if weights is None else np.asarray(weights, np.float64)[vals]
    order = np.argsort(-w + r.uniform(0, 1e-6, len(w)), kind="stable")  # ties broken at random
    vals, w = vals[order], w[order]
    keep = len(vals)
    while keep > 1 and n * w[keep - 1] / w[:keep].sum() < min_share:
        keep -= 1
    vals, w = vals[:keep], w[:keep] / w[:keep].sum()
    exact = n * w
    counts = np.floor(exact).astype(int)
    rest = n - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    out = np.repeat(vals, counts)
    return r.permutation(out)


def draw_people(seed: int, dom: int, group: int, n: int, st: DomainStyle) -> list[Person]:
    """``n`` identities of one group (0 train, 1 test, 2 Duke gallery-only distractors): each attribute
    value dealt out balanced over the group, then duplicates of the whole combination re-dealt."""
    r = _stream(seed, dom, _T_DEAL, group)
    cols: dict[str, np.ndarray] = {}
    for name, (size, _) in _ATTRS.items():
        allowed = st.cloth_subset if name in ("upper_color", "accent_color") else None
        cols[name] = _balanced(r, n, size, st.priors[name], allowed)
    # A combination must be unique: swap one attribute with another person until it is (a swap keeps
    # every value's count, hence the balance).
    names = list(_ATTRS)
    for _ in range(50 * n):
        keys = {}
        dup = -1
        for i in range(n):
            k = tuple(int(cols[a][i]) for a in names)
            if k in keys:
                dup = i
                break
            keys[k] = i
        if dup < 0:
            break
        a = names[int(r.integers(len(names)))]
        j = int(r.integers(n))
        cols[a][dup], cols[a][j] = cols[a][j], cols[a][dup]
    people = []
    for i in range(n):
        pr = _stream(seed, dom, _T_PERSON, group, i)
        people.append(Person(
            attrs={a: int(cols[a][i]) for a in names},
            height=float(np.clip(pr.normal(1.0, 0.035), 0.9, 1.08)),
            width=float(np.clip(pr.normal(1.0, 0.08), 0.8, 1.25)),
            shade=pr.normal(0, 0.025, (4, 3)).astype(F32),
        ))
    return people


def random_person(r: np.random.Generator, st: DomainStyle) -> Person:
    """An independent person (distractors, junk, passers-by): attributes drawn from the priors."""
    attrs = {}
    for name, (size, _) in _ATTRS.items():
        p = st.priors[name].copy()
        if name in ("upper_color", "accent_color"):
            p[[i for i in range(size) if i not in st.cloth_subset]] = 0
        attrs[name] = int(r.choice(size, p=p / p.sum()))
    return Person(attrs=attrs, height=float(r.uniform(0.92, 1.06)), width=float(r.uniform(0.85, 1.2)),
                  shade=r.normal(0, 0.025, (4, 3)).astype(F32))


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


@dataclass
class Pose:
    """Per-image placement of the person in the crop (body units: 1 = body height)."""

    view: int
    dx: float
    dy: float
    scale: float
    shear: float
    swing: float
    stride: float


_SS = 2
"""Supersampling of the label map: shapes are rasterized at 2x and box-filtered down (anti-aliasing)."""
_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 20, endpoint=False)),
                    np.sin(np.linspace(0, 2 * np.pi, 20, endpoint=False))]).astype(np.float64)
_HALF = np.linspace(-np.pi / 2, np.pi / 2, 7)


@dataclass(frozen=True)
class Fill:
    """A patterned fill: ``c1`` with ``c2`` where the pattern says (stripes/checks move with the body)."""

    pattern: int
    c1: np.ndarray
    c2: np.ndarray


def _pattern_mask(pattern: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where a patterned fill takes its second colour (body coordinates)."""
    if pattern == 1:
        return (v / 0.045) % 1.0 >= 0.5
    if pattern == 2:
        return (u / 0.04) % 1.0 >= 0.5
    if pattern == 3:
        return ((u / 0.05) % 1.0 < 0.5) ^ ((v / 0.05) % 1.0 < 0.5)
    return v >= 0.33


class _Canvas:
    """Rasterizes body-coordinate polygons into a label map with Pillow (C speed), one label per
    painted shape; colours, patterns and anti-aliasing are resolved once at the end.

    Body coordinates: ``v`` from the top of the head (0) to the soles (1), ``u`` horizontal in the
    same unit; an image pixel is ``x = cx + (u + shear (v - 1/2)) hpx aspect``, ``y = top + v hpx``.
    """

    def __init__(self, h: int, w: int, top: float, hpx: float, cx: float, aspect: float, shear: float) -> None:
        self.h, self.w = h, w
        self.top, self.hpx, self.cx, self.aspect, self.shear = top, hpx, cx, aspect, shear
        self.labels = Image.new("L", (w * _SS, h * _SS), 0)
        self._draw = ImageDraw.Draw(self.labels)
        self.colors: list[np.ndarray] = [np.zeros(3, F32)]
        self.patterns: list[tuple[int, int, int]] = []

    def _label(self, color: np.ndarray | Fill) -> int:
        if isinstance(color, Fill):
            lab = self._label(color.c1)
            if color.pattern:
                self.patterns.append((lab, color.pattern, self._label(color.c2)))
            return lab
        if len(self.colors) >= 256:
            raise RuntimeError("more than 255 shapes in one image")
        self.colors.append(color)
        return len(self.colors) - 1

    def poly(self, u: np.ndarray, v: np.ndarray, color: np.ndarray | Fill) -> None:
        xy = np.empty(2 * len(u))
        xy[0::2] = self.cx * _SS + (u + self.shear * (v - 0.5)) * (self.hpx * self.aspect * _SS)
        xy[1::2] = self.top * _SS + v * (self.hpx * _SS)
        self._draw.polygon(xy.tolist(), fill=self._label(color))

    def box(self, u0: float, u1: float, v0: float, v1: float, color) -> None:
        self.poly(np.array([u0, u1, u1, u0]), np.array([v0, v0, v1, v1]), color)

    def trap(self, uc: float, v0: float, v1: float, hw0: float, hw1: float, color) -> None:
        self.poly(np.array([uc - hw0, uc + hw0, uc + hw1, uc - hw1]), np.array([v0, v0, v1, v1]), color)

    def ellipse(self, uc: float, vc: float, ru: float, rv: float, color, v_max: float | None = None,
                u_side: float = 0.0) -> None:
        """Ellipse; ``v_max`` keeps only its part above a line, ``u_side`` (+-1) only one half."""
        u, v = uc + ru * _CIRCLE[0], vc + rv * _CIRCLE[1]
        if v_max is not None:
            v = np.minimum(v, v_max)
        if u_side > 0:
            u = np.maximum(u, uc)
        elif u_side < 0:
            u = np.minimum(u, uc)
        self.poly(u, v, color)

    def seg(self, ua: float, va: float, ub: float, vb: float, r: float, color) -> None:
        """A capsule (limb) of radius ``r`` from a to b."""
        ang = math.atan2(vb - va, ub - ua)
        tb, ta = ang + _HALF, ang + np.pi + _HALF
        u = np.concatenate([ub + r * np.cos(tb), ua + r * np.cos(ta)])
        v = np.concatenate([vb + r * np.sin(tb), va + r * np.sin(ta)])
        self.poly(u, v, color)

    def resolve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(colour premultiplied by coverage (h, w, 3), coverage (h, w), u at pixel centres (h, w))."""
        lab = np.array(self.labels)
        # Patterned fills are clothes on the torso and arms: search their labels in those rows only.
        r0 = max(0, int((self.top + 0.1 * self.hpx) * _SS))
        r1 = min(self.h * _SS, int((self.top + 0.62 * self.hpx) * _SS) + 1)
        for label, pattern, second in self.patterns:
            ys, xs = np.nonzero(lab[r0:r1] == label) if r0 < r1 else (np.zeros(0, int),) * 2
            ys = ys + r0
            if len(ys):
                v = ((ys + 0.5) / _SS - self.top) / self.hpx
                u = ((xs + 0.5) / _SS - self.cx) / (self.hpx * self.aspect) - self.shear * (v - 0.5)
                m = _pattern_mask(pattern, u, v)
                lab[ys[m], xs[m]] = second
        # Label 0 (no person) is black, so box-averaging gives colour premultiplied by coverage.
        pal = np.zeros((256, 3), np.uint8)
        pal[1: len(self.colors)] = np.round(np.clip(np.stack(self.colors[1:]), 0, 1) * 255)
        img = Image.fromarray(lab, "P")
        img.putpalette(pal.ravel().tobytes())
        rgb = np.asarray(img.convert("RGB").reduce(_SS), dtype=F32) * F32(1 / 255)
        cover = np.asarray(Image.fromarray((lab > 0).view(np.uint8) * np.uint8(255)).reduce(_SS), dtype=F32) * F32(1 / 255)
        v1 = ((np.arange(self.h, dtype=F32) + F32(0.5)) - F32(self.top)) / F32(self.hpx)
        x1 = ((np.arange(self.w, dtype=F32) + F32(0.5)) - F32(self.cx)) / F32(self.hpx * self.aspect)
        u1 = x1[None, :] - F32(self.shear) * (v1[:, None] - F32(0.5))
        return rgb, cover, u1


def _colors(p: Person, st: DomainStyle) -> dict[str, np.ndarray]:
    a = p.attrs
    c = {
        "upper": st.cloth[a["upper_color"]] + p.shade[0],
        "accent": st.cloth[a["accent_color"]] + p.shade[1],
        "lower": st.lower[a["lower_color"]] + p.shade[2],
        "hair": _HAIR[a["hair_color"]] + p.shade[3],
        "skin": _SKIN[a["skin"]],
        "shoe": _SHOES[a["shoe_color"]],
        "bag": _BAGS[a["bag_color"]],
    }
    return {k: np.clip(v, 0.01, 0.99).astype(F32) for k, v in c.items()}


def _draw_person(cv: _Canvas, p: Person, st: DomainStyle, pose: Pose) -> None:
    """Paint one person (painter's order, view-dependent visibility of parts)."""
    a, c = p.attrs, _colors(p, st)
    view = _VIEWS[pose.view]
    side = view in ("left", "right")
    face = -1.0 if view == "left" else 1.0  # image direction the person faces in a side view
    wf = p.width * (0.6 if side else 1.0)
    upper = Fill(a["upper_pattern"], c["upper"], c["accent"])
    # Image x of the person's own left (-1) / right (+1) side: mirrored between front and back.
    bag_side = -1.0 if a["bag_side"] == 0 else 1.0
    img_side = {"front": -bag_side, "back": bag_side}.get(view, 0.0)
    near = side and (bag_side == face)  # a side view shows the person's right side when facing right
    hip = 0.5
    sh_u, sh_v = 0.115 * wf, 0.175

    lower_end = {0: 0.95, 1: 0.68, 2: 0.72}[a["lower_type"]]  # trousers, shorts, skirt

    def leg(ua: float, ub: float, r: float) -> None:
        if lower_end < 0.95:  # bare leg below shorts / skirt
            cv.seg(ua, hip, ub, 0.95, r, c["skin"])
        t = (lower_end - hip) / (0.95 - hip)
        cv.seg(ua, hip, ua + t * (ub - ua), lower_end, r * 1.08, c["lower"])

    # Far-side things first (hidden behind the body where they overlap).
    if side:
        cv.seg(0.0, sh_v, -face * pose.swing, 0.49, 0.028, c["upper"] if a["sleeves"] else c["skin"])
        if a["bag"] == 1:  # a backpack sticks out behind the back
            ends = sorted((-face * 0.05, -face * 0.16 * p.width))
            cv.box(ends[0], ends[1], 0.19, 0.42, c["bag"])
        if a["bag"] in (2, 3) and not near:
            cv.box(-0.04, 0.04, 0.46, 0.58, c["bag"] * 0.8)
    if view == "front" and a["hair_style"] == 1:  # long hair falls behind the shoulders
        cv.box(-0.065, 0.065, 0.04, 0.24, c["hair"])
    # Legs and lower clothes.
    if side:
        for s in (-1.0, 1.0):
            leg(0.0, face * s * pose.stride, 0.042 * p.width)
            cv.ellipse(face * (s * pose.stride + 0.018), 0.965, 0.042, 0.022, c["shoe"])
    else:
        for s in (-1.0, 1.0):
            ux = s * (0.05 + 0.3 * pose.stride) * p.width
            leg(s * 0.05 * wf, ux, 0.042 * p.width)
            cv.ellipse(ux, 0.965, 0.038, 0.022, c["shoe"])
    if a["lower_type"] == 2:
        cv.trap(0.0, 0.48, 0.72, 0.10 * wf, 0.16 * wf, c["lower"])
    else:
        cv.trap(0.0, 0.47, 0.57, 0.105 * wf, 0.11 * wf, c["lower"])
    # Torso, print, arms.
    cv.trap(0.0, 0.15, 0.52, 0.125 * wf, 0.105 * wf, upper)
    if view == "front" and a["front_print"]:
        cv.box(-0.035, 0.035, 0.23, 0.31, c["accent"] * 0.9 + 0.05)
    sleeve = c["upper"] if a["upper_pattern"] in (0, 2, 4) else upper
    arms = [(face, face * pose.swing)] if side else [(-1.0, -0.135 * wf), (1.0, 0.135 * wf)]
    for s, hand_u in arms:
        u0 = 0.0 if side else s * sh_u
        if a["sleeves"] == 1:
            cv.seg(u0, sh_v, hand_u, 0.49, 0.03, sleeve)
        else:
            cv.seg(u0, sh_v, hand_u, 0.49, 0.027, c["skin"])
            cv.seg(u0, sh_v, u0 + 0.35 * (hand_u - u0), sh_v + 0.35 * (0.49 - sh_v), 0.032, sleeve)
        cv.ellipse(hand_u, 0.505, 0.022, 0.022, c["skin"])
    # Bags in front of the body.
    if a["bag"] == 1:
        if view == "back":
            cv.box(-0.085 * wf, 0.085 * wf, 0.19, 0.43, c["bag"])
            cv.box(-0.06 * wf, 0.06 * wf, 0.33, 0.41, c["bag"] * 0.75)
        elif view == "front":
            for s in (-1.0, 1.0):
                cv.seg(s * 0.07, 0.16, s * 0.08, 0.36, 0.012, c["bag"])
    elif a["bag"] == 2 and (img_side or near):
        ux = img_side * 0.15 * wf if img_side else face * pose.swing
        cv.box(ux - 0.045, ux + 0.045, 0.47, 0.6, c["bag"])
    elif a["bag"] == 3 and not side:
        cv.seg(img_side * 0.1 * wf, 0.17, -img_side * 0.09 * wf, 0.47, 0.012, c["bag"])
        cv.box(-img_side * 0.13 * wf - 0.05, -img_side * 0.13 * wf + 0.05, 0.44, 0.55, c["bag"])
    elif a["bag"] == 3 and near:
        cv.box(-0.05, 0.05, 0.44, 0.55, c["bag"])
    # Neck, head, hair.
    cv.box(-0.022, 0.022, 0.12, 0.165, c["skin"])
    hs = a["hair_style"]
    head_u = face * 0.008 if side else 0.0
    hair = c["hair"] if hs != 3 else (0.5 * c["hair"] + 0.5 * c["skin"])
    if view == "back":
        cv.ellipse(head_u, 0.075, 0.05, 0.068, hair)
        if hs == 1:
            cv.box(-0.06, 0.06, 0.06, 0.25, c["hair"])
    else:
        cv.ellipse(head_u, 0.075, 0.048, 0.068, c["skin"])
        if side:
            cv.ellipse(head_u, 0.075, 0.05, 0.07, hair, u_side=-face)  # back of the head
        if hs != 4:
            cv.ellipse(head_u, 0.06, 0.052, 0.06, hair, v_max=0.045 if hs != 3 else 0.03)
        if side and hs == 1:
            cv.box(-face * 0.055 - 0.03, -face * 0.055 + 0.03, 0.05, 0.22, c["hair"])
    if hs == 2:
        cv.ellipse(-face * 0.045 if side else 0.0, 0.015 if not side else 0.03, 0.025, 0.022, c["hair"])
    if hs == 4:  # cap in the accent colour
        cv.ellipse(head_u, 0.05, 0.054, 0.05, c["accent"], v_max=0.045)
        if view != "back":
            brim = face * 0.04 if side else 0.0
            cv.box(brim - 0.05, brim + 0.05, 0.04, 0.055, c["accent"] * 0.8)


def _render(cfg: SynthConfig, ctx: "_Context", kind: int, ident: int, cam: int, k: int, session: int,
            person: Person | None, detected: bool = False) -> bytes:
    """Render and encode one image; every random choice comes from this image's own stream."""
    h, w = cfg.size
    st, camera = ctx.style, ctx.camera(cam)
    r = _stream(cfg.seed, ctx.dom, _T_IMAGE, kind, ident, cam, k)
    view = int(r.choice(4, p=camera.views))
    pose = Pose(view=view, dx=float(r.normal(0, 0.035)), dy=float(r.normal(0, 0.02)),
                scale=float(np.exp(r.normal(0, 0.04))), shear=float(r.normal(0, 0.04)),
                swing=float(r.uniform(-0.09, 0.09)), stride=float(r.uniform(0.0, 0.09)))
    hs_, ws_ = camera.scene.shape[:2]
    oy, ox = int(r.integers(0, hs_ - h + 1)), int(r.integers(0, ws_ - w + 1))
    gain_jit = float(np.exp(r.normal(0, 0.06)))
    occl = r.random() < st.occlusion
    occ = (int(r.integers(0, 3)), float(r.uniform(0.15, 0.4)), int(r.integers(0, ws_ - w + 1)))
    blur_jit = float(r.uniform(0.7, 1.3))
    quality = int(r.integers(st.quality[0], st.quality[1] + 1))
    ny, nx = int(r.integers(0, h + 1)), int(r.integers(0, w + 1))
    if kind == _K_JUNK:  # a badly aligned detection: a zoomed-in part of a person
        pose.scale *= float(r.uniform(1.6, 2.6))
        pose.dy += float(r.uniform(-0.9, 0.4))
        pose.dx += float(r.uniform(-0.3, 0.3))
    if detected:  # cuhk03 detected: same shot, misaligned box
        d = _stream(cfg.seed, ctx.dom, _T_DETECT, kind, ident, cam, k)
        pose.dx += float(d.normal(0, 0.06))
        pose.dy += float(d.normal(0, 0.035))
        pose.scale *= float(np.exp(d.normal(0, 0.07)))
        ox = int(np.clip(ox + d.integers(-3, 4), 0, ws_ - w))

    img = camera.scene[oy:oy + h, ox:ox + w].copy()
    if person is not None:
        hpx = h * camera.fill * pose.scale * person.height
        cv = _Canvas(h, w, (h - hpx) * 0.5 + pose.dy * h, hpx, w * 0.5 + pose.dx * w, camera.aspect, pose.shear)
        _draw_person(cv, person, st, pose)
        rgb, cover, u = cv.resolve()
        # Cylindrical shading and the camera's side light, on the person only.
        u /= F32(0.13)
        shade = np.clip(1 - F32(0.3) * u * u + F32(camera.side_light) * u, 0.45, 1.25)
        img *= (1 - cover)[..., None]
        img += rgb * shade[..., None]
    if occl:  # something of the scene in front of the person: bottom, left or right
        side, frac, oxo = occ
        patch = camera.scene[hs_ - h:hs_, oxo:oxo + w]
        if side == 0:
            n = int(frac * h)
            img[h - n:] = patch[h - n:] * 0.9
        else:
            n = max(1, int(frac * w))
            cols = slice(0, n) if side == 1 else slice(w - n, w)
            img[:, cols] = patch[:, cols] * 0.9
    sess = ctx.session(cam, session)
    light = (camera.gain * gain_jit * sess[0] * 255.0) * (camera.cast * sess[1:])
    ramp = 1 + F32(camera.v_light) * (np.arange(h, dtype=F32) / F32(h) - F32(0.5))
    img *= ramp[:, None, None] * light[None, None, :]
    if abs(st.saturation - 1.0) > 0.02:  # the domain's colour grading
        grey = img.mean(axis=2, keepdims=True)
        img -= grey
        img *= F32(st.saturation)
        img += grey
    img = _blur(img, camera.blur * blur_jit)  # optics and sensor resolution
    img += camera.noise_field[ny:ny + h, nx:nx + w]  # sensor noise: a window of the camera's own field
    np.clip(img, 0, 255, out=img)
    pil = Image.fromarray(np.take(camera.lut, img.astype(np.uint8)))
    buf = io.BytesIO()
    if cfg.layout == "cuhk03np":
        pil.save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)  # 2x faster, smaller than default
    else:
        pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _blur(img: np.ndarray, amount: float) -> np.ndarray:
    """Separable 1-2-1 blur, ``amount`` passes (the fractional part blends the last pass in)."""
    while amount > 0.05:
        b = img.copy()
        b[1:-1] = F32(0.5) * img[1:-1] + F32(0.25) * (img[:-2] + img[2:])
        c = b.copy()
        c[:, 1:-1] = F32(0.5) * b[:, 1:-1] + F32(0.25) * (b[:, :-2] + b[:, 2:])
        t = min(amount, 1.0)
        img = c if t >= 1.0 else img + F32(t) * (c - img)
        amount -= 1.0
    return img


class _Context:
    """Per-process caches of the things shared by many images (style, cameras, sessions, people)."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        self.dom = domain_id(cfg.domain)
        self.style = DomainStyle.draw(self.dom)
        self._cams: dict[int, Camera] = {}
        self._sessions: dict[tuple[int, int], np.ndarray] = {}
        self.people: dict[int, list[Person]] = {}

    def camera(self, cam: int) -> Camera:
        if cam not in self._cams:
            h, w = self.cfg.size
            self._cams[cam] = _draw_camera(_stream(self.cfg.seed, self.dom, _T_CAMERA, cam), self.style, h, w)
        return self._cams[cam]

    def session(self, cam: int, s: int) -> np.ndarray:
        """(gain, r, g, b) multipliers of a time-of-day session at one camera."""
        if (cam, s) not in self._sessions:
            r = _stream(self.cfg.seed, self.dom, _T_SESSION, cam, s)
            self._sessions[(cam, s)] = np.exp(np.concatenate([r.normal(0, 0.1, 1), r.normal(0, 0.03, 3)])).astype(F32)
        return self._sessions[(cam, s)]

    def group(self, g: int, n: int) -> list[Person]:
        if g not in self.people:
            self.people[g] = draw_people(self.cfg.seed, self.dom, g, n, self.style)
        return self.people[g]


# ---------------------------------------------------------------------------------------------------
# Dataset plan: which images, which names
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    """One image to write: who, where, and its file names (several for cuhk03np's two variants)."""

    kind: int
    group: int
    ident: int
    """Index inside the group (train/test/duke-distractor) or the distractor/junk number."""
    cam: int
    """0-based camera."""
    k: int
    session: int
    """Time-of-day session (Market's ``s`` field, MSMT17's time slot): modulates the light."""
    relpaths: tuple[str, ...]
    pid: int
    split: str
    val: bool = False


def _plan(cfg: SynthConfig, dom: int) -> list[Shot]:
    c = cfg
    r = _stream(c.seed, dom, _T_SPLIT)
    n_tr, n_te = c.ids, int(c.test_ids)
    k_img = c.images_per_id_cam
    # Duke's gallery distractors are gallery-only identities, one camera each.
    n_dd = math.ceil(c.distractors / k_img) if c.layout == "dukemtmc" else 0
    # Dataset pids are interleaved between train and test like the real sets (relabelling is tested).
    pool = r.permutation(np.arange(1, n_tr + n_te + n_dd + 1))
    pids = {0: np.sort(pool[:n_tr]), 1: np.sort(pool[n_tr:n_tr + n_te]), 2: np.sort(pool[n_tr + n_te:])}
    if c.layout == "msmt17":  # MSMT17 numbers train and test identities separately from 0
        pids = {0: np.arange(n_tr), 1: np.arange(n_te), 2: np.arange(0)}

    shots: list[Shot] = []
    counters: dict[int, int] = {}  # msmt17/cuhk03: running image index per (group, ident)
    n_sessions = len(MSMT_SLOTS) if c.layout == "msmt17" else 6

    def add(kind: int, group: int, ident: int, pid: int, cam: int, k: int, slot: int, folder: str, split: str,
            ir: np.random.Generator, val: bool = False) -> None:
        """Append one image; ``slot`` is unique among the images sharing ``pid`` (frames of different
        slots fall in disjoint ranges, so names never collide)."""
        key = group * 1_000_000 + ident
        n = counters.get(key, 0)
        counters[key] = n + 1
        session = int(ir.integers(0, n_sessions))
        if c.layout == "market1501":
            frame = 1 + 40 * slot + int(ir.integers(0, 40))
            p = "-1" if pid < 0 else f"{pid:04d}"
            rel = (f"{folder}/{p}_c{cam + 1}s{session + 1}_{frame:06d}_{int(ir.integers(1, 9)):02d}.jpg",)
        elif c.layout == "dukemtmc":
            frame = 1 + 60 * slot + int(ir.integers(0, 60))
            rel = (f"{folder}/{pid:04d}_c{cam + 1}_f{frame:07d}.jpg",)
        elif c.layout == "msmt17":
            frame = int(ir.integers(0, 10000))
            rel = (f"{folder}/{pid:04d}/{pid:04d}_{n:03d}_{cam + 1:02d}_{MSMT_SLOTS[session]}_{frame:04d}_"
                   f"{int(ir.integers(0, 10))}.jpg",)
        else:
            rel = tuple(f"{v}/{folder}/{pid:04d}_c{cam + 1}_{n + 1}.png" for v in ("detected", "labeled"))
        shots.append(Shot(kind, group, ident, cam, k, session, rel, pid, split, val))

    def id_cams(group: int, ident: int) -> list[int]:
        ir = _stream(c.seed, dom, _T_SPLIT, 1, group, ident)
        lo = min(c.cams, max(c.min_cams_per_id, 2 if c.cams >= 2 else 1))
        m = int(ir.integers(lo, c.cams + 1))
        return sorted(ir.choice(c.cams, size=m, replace=False).tolist())

    train_dir = "train" if c.layout == "msmt17" else "bounding_box_train"
    query_dir, gallery_dir = ("test", "test") if c.layout == "msmt17" else ("query", "bounding_box_test")
    for i in range(n_tr):
        for cam in id_cams(0, i):
            for k in range(k_img):
                ir = _stream(c.seed, dom, _T_SPLIT, 2, 0, i, cam, k)
                val = c.layout == "msmt17" and ir.random() < c.val_fraction
                add(_K_ID, 0, i, int(pids[0][i]), cam, k, k + k_img * cam, train_dir, "train", ir, val)
    for i in range(n_te):
        cams = id_cams(1, i)
        ir = _stream(c.seed, dom, _T_SPLIT, 3, 1, i)
        # Query: one image per camera the identity visits (Market protocol); with one image per
        # camera, one camera stays gallery-only so each query keeps a cross-camera match.
        qcams = cams if k_img >= 2 else cams[:-1] if len(cams) > 1 else []
        qk = {cam: int(ir.integers(0, k_img)) for cam in qcams}
        for cam in cams:
            for k in range(k_img):
                is_q = qk.get(cam) == k
                add(_K_ID, 1, i, int(pids[1][i]), cam, k, k + k_img * cam, query_dir if is_q else gallery_dir,
                    "query" if is_q else "gallery", _stream(c.seed, dom, _T_SPLIT, 2, 1, i, cam, k))
    for i in range(n_dd):  # Duke: gallery-only identities, one camera
        cam = int(_stream(c.seed, dom, _T_SPLIT, 4, i).integers(0, c.cams))
        for k in range(min(k_img, c.distractors - i * k_img)):
            ir = _stream(c.seed, dom, _T_SPLIT, 2, 2, i, cam, k)
            add(_K_ID, 2, i, int(pids[2][i]), cam, k, k, gallery_dir, "gallery", ir)
    if c.layout == "market1501":
        for kind, n, pid in ((_K_DISTRACTOR, c.distractors, 0), (_K_JUNK, c.junk, -1)):
            for j in range(n):
                ir = _stream(c.seed, dom, _T_SPLIT, 5, kind, j)
                add(kind, -1 - kind, j, pid, int(ir.integers(0, c.cams)), 0, j, gallery_dir, "gallery", ir)
    return shots


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

_WORKER_CTX: _Context | None = None


def _write_file(path: Path, data: bytes) -> None:
    """Temp file + rename: a crash never leaves a truncated image under a real name (no fsync per
    image: the dataset is complete when ``synth.json`` exists, which is written atomically last)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _person_for(ctx: _Context, shot: Shot) -> Person | None:
    c = ctx.cfg
    if shot.kind == _K_ID:
        n = {0: c.ids, 1: int(c.test_ids), 2: math.ceil(c.distractors / c.images_per_id_cam)}[shot.group]
        return ctx.group(shot.group, n)[shot.ident]
    r = _stream(c.seed, ctx.dom, _T_PERSON, 10 + shot.kind, shot.ident)
    if shot.kind == _K_DISTRACTOR and r.random() < 0.5:
        return None  # a false detection: background only
    return random_person(r, ctx.style)


def _work(args: tuple[SynthConfig, list[Shot]]) -> int:
    global _WORKER_CTX
    cfg, shots = args
    if _WORKER_CTX is None or _WORKER_CTX.cfg != cfg:
        _WORKER_CTX = _Context(cfg)
    ctx = _WORKER_CTX
    root = Path(cfg.out)
    for s in shots:
        person = _person_for(ctx, s)
        for v, rel in enumerate(s.relpaths):
            data = _render(cfg, ctx, s.kind, s.group * 1_000_000 + s.ident if s.kind == _K_ID else s.ident,
                           s.cam, s.k, s.session, person, detected=(cfg.layout == "cuhk03np" and v == 0))
            _write_file(root / rel, data)
    return sum(len(s.relpaths) for s in shots)


def synthesize(cfg: SynthConfig) -> SynthSummary:
    """Write a synthetic dataset in ``cfg.layout``'s real layout under ``cfg.out``; return what was written."""
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    dom = domain_id(cfg.domain)
    root = Path(cfg.out)
    shots = _plan(cfg, dom)
    n_files = sum(len(s.relpaths) for s in shots)
    if len({rel for s in shots for rel in s.relpaths}) != n_files:  # would silently overwrite images
        raise RuntimeError(f"{cfg.layout}: the plan names two images alike (a bug in shards/synth.py)")
    dirs = sorted({str(Path(rel).parent) for s in shots for rel in s.relpaths})
    tops = sorted({rel.split("/")[0] for s in shots for rel in s.relpaths})
    for t in tops:
        if (root / t).exists() and any((root / t).iterdir()):
            raise FileExistsError(f"{root / t}: already exists and is not empty (choose an empty --out)")
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    if cfg.workers == 1:
        written = _work((cfg, shots))
    else:
        import multiprocessing as mp

        chunks = [(cfg, shots[i::cfg.workers * 8]) for i in range(cfg.workers * 8)]
        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            written = sum(pool.map(_work, chunks))
    if cfg.layout == "msmt17":
        lists = {"list_train.txt": [], "list_val.txt": [], "list_query.txt": [], "list_gallery.txt": []}
        for s in shots:
            rel = s.relpaths[0].split("/", 1)[1]  # lists are relative to train/ or test/
            name = {"train": "list_val.txt" if s.val else "list_train.txt", "query": "list_query.txt",
                    "gallery": "list_gallery.txt"}[s.split]
            lists[name].append(f"{rel} {s.pid}")
        for name, lines in lists.items():
            atomic_write_bytes(root / name, ("\n".join(sorted(lines)) + "\n" if lines else "").encode())
    records = sorted(Record(rel, s.pid, s.cam, s.split) for s in shots for rel in s.relpaths)
    counts = {sp: sum(1 for s in shots if s.split == sp) for sp in ("train", "query", "gallery")}
    if cfg.layout == "msmt17":
        counts["val"] = sum(1 for s in shots if s.val)
    if cfg.layout == "market1501":
        counts["distractors"] = sum(1 for s in shots if s.kind == _K_DISTRACTOR)
        counts["junk"] = sum(1 for s in shots if s.kind == _K_JUNK)
    summary = SynthSummary(
        layout=cfg.layout, out=str(root), domain=dom, counts=counts, num_train_ids=cfg.ids,
        num_test_ids=int(cfg.test_ids), num_cams=cfg.cams, images_written=written,
        seconds=time.perf_counter() - t0, records=records,
    )
    meta = json.loads(summary.to_json())
    meta.pop("seconds")  # keep the folder byte-identical between runs (and between places)
    meta.pop("out")
    meta["config"] = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")}
    atomic_write_bytes(root / SUMMARY_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return summary


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        return h, w
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HxW, e.g. 128x64") from None


_FIELD = re.compile(r"\b(" + "|".join(f.name for f in fields(SynthConfig)) + r")(?=[=*]| >=)")
"""A config field named in a :meth:`SynthConfig.resolved` message (``ids=0: …``)."""
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
"""Write failures under ``--out`` that the user fixes (space, quota, permissions, a file in the way)."""


def _as_flags(message: str) -> str:
    """A config message in the CLI's terms: ``images_per_id_cam=0`` → ``--images-per-id-cam=0``."""
    return _FIELD.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def _run(cfg: SynthConfig) -> int:
    try:
        cfg.resolved()  # every argument checked before anything is written
    except ValueError as exc:
        raise UserError(_as_flags(str(exc))) from None
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose an empty or new folder")
    try:
        s = synthesize(cfg)
    except FileExistsError as exc:
        if exc.filename is not None:  # a file in the way of a folder to create
            raise UserError(f"{exc.filename}: exists and is not a folder; choose an empty or new --out") from None
        raise UserError(str(exc)) from None  # synthesize's own refusal: names the folder and the fix
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS:
            raise
        raise UserError(f"{exc.filename or out}: {exc.strerror}; choose a writable --out with room") from None
    rate = s.images_written / max(s.seconds, 1e-9)
    print(f"{s.layout}: wrote {s.images_written} images to {s.out} in {s.seconds:.1f} s ({rate:.0f} img/s); "
          f"counts {s.counts}; domain {s.domain}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = CliParser("synth", prog="python -m shards.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument("--out", required=True)
    p.add_argument("--ids", type=int, default=50, help="training identities")
    p.add_argument("--cams", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain", default=None, help="style domain: a name or an int (default: the layout name)")
    p.add_argument("--images-per-id-cam", type=int, default=4)
    p.add_argument("--size", type=_parse_size, default=(128, 64), help="HxW (default 128x64)")
    p.add_argument("--test-ids", type=int, default=None, help="test identities (default: --ids)")
    p.add_argument("--min-cams-per-id", type=int, default=2)
    p.add_argument("--distractors", type=int, default=None, help="gallery distractor images (layout default)")
    p.add_argument("--junk", type=int, default=None, help="gallery junk images, market1501 only (layout default)")
    p.add_argument("--val-fraction", type=float, default=0.07, help="msmt17: share of train images in list_val")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    cfg = SynthConfig(layout=a.layout, out=a.out, ids=a.ids, cams=a.cams, seed=a.seed, domain=a.domain,
                      images_per_id_cam=a.images_per_id_cam, size=a.size, test_ids=a.test_ids,
                      min_cams_per_id=a.min_cams_per_id, distractors=a.distractors, junk=a.junk,
                      val_fraction=a.val_fraction, workers=a.workers)
    return run_cli("synth", lambda: _run(cfg))


if __name__ == "__main__":
    raise SystemExit(main())
