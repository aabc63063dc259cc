"""Rendering one image: a person painted on its camera's scene, lit, blurred, noised and encoded.

Every random choice of an image comes from that image's own stream; :class:`Context` caches what
many images share (style, cameras, sessions, people) per process.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from shards.synth.config import SynthConfig
from shards.synth.parts import BAGS, F32, HAIR, SHOES, SKIN
from shards.synth.people import Person, draw_people
from shards.synth.streams import K_JUNK, T_CAMERA, T_DETECT, T_IMAGE, T_SESSION, domain_id, stream
from shards.synth.style import Camera, DomainStyle, draw_camera

_VIEWS = ("front", "back", "left", "right")


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
        mask = Image.fromarray((lab > 0).view(np.uint8) * np.uint8(255))
        cover = np.asarray(mask.reduce(_SS), dtype=F32) * F32(1 / 255)
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
        "hair": HAIR[a["hair_color"]] + p.shade[3],
        "skin": SKIN[a["skin"]],
        "shoe": SHOES[a["shoe_color"]],
        "bag": BAGS[a["bag_color"]],
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


def render_image(cfg: SynthConfig, ctx: Context, kind: int, ident: int, cam: int, k: int, session: int,
            person: Person | None, detected: bool = False) -> bytes:
    """Render and encode one image; every random choice comes from this image's own stream."""
    h, w = cfg.size
    st, camera = ctx.style, ctx.camera(cam)
    r = stream(cfg.seed, ctx.dom, T_IMAGE, kind, ident, cam, k)
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
    if kind == K_JUNK:  # a badly aligned detection: a zoomed-in part of a person
        pose.scale *= float(r.uniform(1.6, 2.6))
        pose.dy += float(r.uniform(-0.9, 0.4))
        pose.dx += float(r.uniform(-0.3, 0.3))
    if detected:  # cuhk03 detected: same shot, misaligned box
        d = stream(cfg.seed, ctx.dom, T_DETECT, kind, ident, cam, k)
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


class Context:
    """Per-process caches of the things shared by many images (style, cameras, sessions, people)."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        assert cfg.domain is not None, "Context holds a resolved config"
        self.dom = domain_id(cfg.domain)
        self.style = DomainStyle.draw(self.dom)
        self._cams: dict[int, Camera] = {}
        self._sessions: dict[tuple[int, int], np.ndarray] = {}
        self.people: dict[int, list[Person]] = {}

    def camera(self, cam: int) -> Camera:
        if cam not in self._cams:
            h, w = self.cfg.size
            self._cams[cam] = draw_camera(stream(self.cfg.seed, self.dom, T_CAMERA, cam), self.style, h, w)
        return self._cams[cam]

    def session(self, cam: int, s: int) -> np.ndarray:
        """(gain, r, g, b) multipliers of a time-of-day session at one camera."""
        if (cam, s) not in self._sessions:
            r = stream(self.cfg.seed, self.dom, T_SESSION, cam, s)
            self._sessions[(cam, s)] = np.exp(np.concatenate([r.normal(0, 0.1, 1), r.normal(0, 0.03, 3)])).astype(F32)
        return self._sessions[(cam, s)]

    def group(self, g: int, n: int) -> list[Person]:
        if g not in self.people:
            self.people[g] = draw_people(self.cfg.seed, self.dom, g, n, self.style)
        return self.people[g]
