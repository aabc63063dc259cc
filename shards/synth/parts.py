"""The vocabulary of parts a person is built from: palettes and the discrete attributes.

Each attribute value is dealt out to several identities (``people``): identities differ by
combinations of these parts only.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32

CLOTH = np.array(
    [  # black, white, grey, red, blue, navy, green, yellow, pink, purple, brown, orange, teal, beige
        [0.07, 0.07, 0.08], [0.88, 0.88, 0.86], [0.48, 0.48, 0.50], [0.72, 0.12, 0.13],
        [0.16, 0.30, 0.72], [0.10, 0.12, 0.32], [0.20, 0.50, 0.24], [0.88, 0.78, 0.20],
        [0.88, 0.52, 0.66], [0.44, 0.22, 0.56], [0.42, 0.28, 0.17], [0.90, 0.48, 0.12],
        [0.10, 0.52, 0.52], [0.80, 0.72, 0.56],
    ], F32)
LOWER = np.array(
    [  # jeans, black, grey, khaki, navy, brown, white, olive, light jeans
        [0.24, 0.32, 0.50], [0.08, 0.08, 0.09], [0.40, 0.40, 0.42], [0.70, 0.62, 0.45],
        [0.12, 0.14, 0.30], [0.36, 0.25, 0.16], [0.86, 0.86, 0.84], [0.38, 0.40, 0.20],
        [0.50, 0.60, 0.76],
    ], F32)
SHOES = np.array(
    [[0.06, 0.06, 0.06], [0.92, 0.92, 0.92], [0.40, 0.26, 0.14], [0.50, 0.50, 0.52], [0.75, 0.15, 0.15]], F32
)
BAGS = np.array(
    [[0.08, 0.08, 0.08], [0.38, 0.24, 0.12], [0.12, 0.15, 0.34], [0.46, 0.46, 0.48], [0.70, 0.14, 0.14],
     [0.72, 0.60, 0.40], [0.22, 0.38, 0.20]], F32)
HAIR = np.array([[0.05, 0.04, 0.04], [0.20, 0.12, 0.07], [0.38, 0.24, 0.12], [0.80, 0.66, 0.38],
                  [0.62, 0.62, 0.62], [0.50, 0.20, 0.10]], F32)
SKIN = np.array([[0.96, 0.80, 0.68], [0.88, 0.68, 0.52], [0.74, 0.54, 0.38], [0.54, 0.36, 0.24],
                  [0.34, 0.22, 0.15]], F32)

# Attribute name -> (vocabulary size or the palette it indexes, prior weights or None for uniform).
ATTRS: dict[str, tuple[int, tuple[float, ...] | None]] = {
    "skin": (len(SKIN), (0.25, 0.25, 0.2, 0.15, 0.15)),
    "hair_style": (5, (0.34, 0.26, 0.12, 0.14, 0.14)),  # short, long, bun, buzz, cap
    "hair_color": (len(HAIR), (0.3, 0.25, 0.15, 0.1, 0.1, 0.1)),
    "upper_color": (len(CLOTH), None),
    "upper_pattern": (5, (0.4, 0.18, 0.12, 0.15, 0.15)),  # plain, h-stripes, v-stripes, checks, colour block
    "accent_color": (len(CLOTH), None),  # pattern's 2nd colour, front print, cap
    "sleeves": (2, (0.45, 0.55)),  # short, long
    "front_print": (2, (0.6, 0.4)),  # none, chest print (visible from the front only)
    "lower_color": (len(LOWER), None),
    "lower_type": (3, (0.6, 0.2, 0.2)),  # trousers, shorts, skirt
    "shoe_color": (len(SHOES), None),
    "bag": (4, (0.4, 0.3, 0.15, 0.15)),  # none, backpack, handbag, shoulder bag
    "bag_side": (2, None),  # the person's left, right
    "bag_color": (len(BAGS), None),
}
ATTRIBUTES = tuple(ATTRS)
"""Names of the discrete attributes of a person (the parts identities share)."""
