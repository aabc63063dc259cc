"""Random streams of the generator: every generator is keyed by what it is for, never by order.

Every image is drawn from its own ``numpy.random.Generator`` derived from
(seed, domain, tag, identity, camera, image): the output does not depend on iteration order or on
the number of worker processes.
"""

from __future__ import annotations

import zlib

import numpy as np

# Stream tags: the first entropy words after (seed, domain) say what a generator is for.
T_DOMAIN, T_CAMERA, T_SESSION, T_SPLIT, T_DEAL, T_PERSON, T_IMAGE, T_DETECT = range(1, 9)
# Identity kinds inside image streams.
K_ID, K_DISTRACTOR, K_JUNK = 0, 1, 2


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


def stream(*key: int) -> np.random.Generator:
    """An independent generator for one key tuple (order of creation never matters)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))
