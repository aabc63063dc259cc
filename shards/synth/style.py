"""Domain style and cameras: what makes one domain, and one camera in it, look unlike another."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shards.synth.parts import ATTRS, CLOTH, F32, LOWER
from shards.synth.streams import T_DOMAIN, stream


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
    """Clothing colours in fashion in this domain (indices into ``CLOTH``)."""
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
    def draw(dom: int) -> DomainStyle:
        r = stream(dom, T_DOMAIN)
        cloth = _rotate_hue(CLOTH, r.uniform(-0.45, 0.45), r.uniform(0.6, 1.25), r.uniform(0.8, 1.1))
        lower = _rotate_hue(LOWER, r.uniform(-0.3, 0.3), r.uniform(0.7, 1.2), r.uniform(0.8, 1.1))
        subset = tuple(sorted(r.choice(len(CLOTH), size=int(r.integers(8, 12)), replace=False).tolist()))
        priors = {}
        for name, (size, weights) in ATTRS.items():
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


def draw_camera(r: np.random.Generator, st: DomainStyle, h: int, w: int) -> Camera:
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
    big = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
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
        col = st.props[int(r.integers(len(st.props)))] if r.random() < 0.6 else st.cloth[int(r.integers(len(CLOTH)))]
        a, b = max(0, int(y0)), min(hs, int(y1) + 1)
        c0, c1 = max(0, int(cx - cw / 2)), min(ws, int(cx + cw / 2) + 1)
        if a < b and c0 < c1:
            img[a:b, c0:c1] = col * float(r.uniform(0.6, 1.1))
    img += 0.04 * _smooth_noise(r, hs, ws, 3)
    return np.clip(img, 0.0, 1.0).astype(F32)
