"""Identities: persons dealt out of the shared parts, balanced within a group, unique as combinations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shards.synth.parts import ATTRS, F32
from shards.synth.streams import T_DEAL, T_PERSON, stream
from shards.synth.style import DomainStyle


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


def _balanced(r: np.random.Generator, n: int, size: int, weights: Sequence[float] | np.ndarray | None,
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
    r = stream(seed, dom, T_DEAL, group)
    cols: dict[str, np.ndarray] = {}
    for name, (size, _) in ATTRS.items():
        allowed = st.cloth_subset if name in ("upper_color", "accent_color") else None
        cols[name] = _balanced(r, n, size, st.priors[name], allowed)
    # A combination must be unique: swap one attribute with another person until it is (a swap keeps
    # every value's count, hence the balance).
    names = list(ATTRS)
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
        pr = stream(seed, dom, T_PERSON, group, i)
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
    for name, (size, _) in ATTRS.items():
        p = st.priors[name].copy()
        if name in ("upper_color", "accent_color"):
            p[[i for i in range(size) if i not in st.cloth_subset]] = 0
        attrs[name] = int(r.choice(size, p=p / p.sum()))
    return Person(attrs=attrs, height=float(r.uniform(0.92, 1.06)), width=float(r.uniform(0.85, 1.2)),
                  shade=r.normal(0, 0.025, (4, 3)).astype(F32))
