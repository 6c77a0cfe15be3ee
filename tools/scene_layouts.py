"""Where the parts of a scene go (tools/scenes.py): many arrangements for one caption.

The first knolling-tiny was trained on scenes whose layout followed from the caption alone (n parts:
one fixed grid, or one centred line), so it learnt one layout per caption and ignored the seed: 8
seeds of a prompt gave 1.75 distinct layouts. Here the seed picks the arrangement (grid of any
fitting shape, one row or column, a row per group, a loose scatter; for exploded views a vertical,
horizontal or diagonal axis), its extent, its offset in the frame, the fill order and the part size,
so that one caption covers many layouts and the model has to take the layout from the noise.

Every arrangement keeps parts apart by at least ``GAP`` output pixels (the adherence analyzer
counts 8-connected components, so touching parts would count as one) and at least ``MIN_SIDE``
pixels wide (smaller ones are mostly outline).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SIZE = 128  # output pixels (the model's resolution)
EDGE = 0.06 * SIZE  # least distance of a part from the image border
MIN_SIDE = 11.0  # smallest part side, output pixels (as the first edition's six-part exploded views)
MAX_SIDE = 0.5 * SIZE
GAP = 4.0  # least gap between the boxes of two parts
KNOLLING_ARRANGEMENTS = ("grid", "grid", "line", "rows", "scatter")

Point = tuple[float, float]


@dataclass(frozen=True)
class Placement:
    """Part centres (output pixels, in the order of the caption's parts), the common part side, and
    for an exploded view the guide line's two ends."""

    centres: list[Point]
    size: float
    guide: tuple[Point, Point] | None = None


def _grid_shapes(n: int) -> list[tuple[int, int]]:
    """(rows, cols) with room for n parts and a last row that is not empty."""
    return [(r, -(-n // r)) for r in range(1, n + 1) if (r - 1) * -(-n // r) < n]


def _cells(rows: int, cols: int, n: int, rng: random.Random) -> tuple[list[Point], float] | None:
    """A rows x cols grid of n parts somewhere in the frame, or None when its parts would be too small."""
    room = SIZE - 2 * EDGE
    width, height = room * rng.uniform(0.7, 1.0), room * rng.uniform(0.7, 1.0)
    cell_w, cell_h = width / cols, height / rows
    size = min(min(cell_w, cell_h) * rng.uniform(0.6, 0.78), MAX_SIDE)
    if size < MIN_SIDE or min(cell_w, cell_h) - size < GAP:
        return None
    # The parts' outer boxes span less than the grid: the free margin moves the whole grid.
    span_w, span_h = (cols - 1) * cell_w + size, (rows - 1) * cell_h + size
    x0 = EDGE + rng.uniform(0, room - span_w) + size / 2
    y0 = EDGE + rng.uniform(0, room - span_h) + size / 2
    slots = [(r, c) for r in range(rows) for c in range(cols)]
    if rng.random() < 0.3:
        slots.sort(key=lambda rc: (rc[1], rc[0]))  # column by column
    if rng.random() < 0.5:
        slots.reverse()
    # The cells left empty (n < rows x cols) are the last in fill order: a short row or column at any end.
    centres = [(x0 + c * cell_w, y0 + r * cell_h) for r, c in slots[:n]]
    return centres, size


def _scatter(n: int, rng: random.Random) -> tuple[list[Point], float]:
    """Non-overlapping random positions (rejection sampling; shrinks the parts until they fit)."""
    size = min(MAX_SIDE, 0.8 * (SIZE - 2 * EDGE) / math.ceil(math.sqrt(n))) * rng.uniform(0.75, 1.0)
    while True:
        lo, hi = EDGE + size / 2, SIZE - EDGE - size / 2
        centres: list[Point] = []
        for _ in range(400):
            x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
            if all(max(abs(x - a), abs(y - b)) >= size + GAP for a, b in centres):
                centres.append((x, y))
                if len(centres) == n:
                    return centres, size
        size = max(MIN_SIDE, size * 0.9)


def knolling(counts: list[int], rng: random.Random) -> Placement:
    """Parts of groups with these counts, in one of ``KNOLLING_ARRANGEMENTS``."""
    n = sum(counts)
    while True:
        arrangement = rng.choice(KNOLLING_ARRANGEMENTS)
        if arrangement == "scatter" and n > 1:
            return Placement(*_scatter(n, rng))
        if arrangement == "rows" and len(counts) > 1:
            found = _rows(counts, rng)
        else:
            shapes = [(1, n), (n, 1)] if arrangement == "line" else _grid_shapes(n)
            found = _cells(*rng.choice(shapes), n, rng)
        if found is not None:
            return Placement(*found)


def _rows(counts: list[int], rng: random.Random) -> tuple[list[Point], float] | None:
    """One row (or column) per group, as knolling sorts like with like."""
    found = _cells(len(counts), max(counts), len(counts) * max(counts), rng)
    if found is None:
        return None
    grid, size = found
    grid.sort(key=lambda p: (round(p[1]), p[0]))  # row-major, whatever order _cells filled it in
    cols = max(counts)
    centres = [grid[g * cols + k] for g, count in enumerate(counts) for k in range(count)]
    if rng.random() < 0.5:  # columns instead of rows
        centres = [(y, x) for x, y in centres]
    return centres, size


def exploded(n: int, rng: random.Random) -> Placement:
    """Parts along one axis (vertical, horizontal or diagonal) with a dashed guide line through them."""
    angle = rng.choice((90.0, 90.0, 0.0, 0.0, 45.0, -45.0))
    ux, uy = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    diagonal = angle not in (0.0, 90.0)
    room = SIZE - 2 * EDGE
    for attempt in range(100):  # the last attempts use the whole frame, which always fits
        length = room * (rng.uniform(0.7, 1.0) if attempt < 90 else 1.0) * (1.3 if diagonal else 1.0)
        spacing = length / n
        # Along a diagonal the boxes are spacing/sqrt(2) apart in x and in y.
        apart = spacing / math.sqrt(2) if diagonal else spacing
        size = min(apart * (rng.uniform(0.62, 0.75) if attempt < 90 else 0.62), MAX_SIDE)
        reach_x, reach_y = abs(ux) * (length - spacing) / 2 + size / 2, abs(uy) * (length - spacing) / 2 + size / 2
        if size >= MIN_SIDE and apart - size >= GAP and reach_x <= SIZE / 2 - EDGE and reach_y <= SIZE / 2 - EDGE:
            break
    cx = rng.uniform(EDGE + reach_x, SIZE - EDGE - reach_x)
    cy = rng.uniform(EDGE + reach_y, SIZE - EDGE - reach_y)
    sign = rng.choice((1, -1))
    centres = [(cx + sign * ux * (k + 0.5 - n / 2) * spacing, cy + sign * uy * (k + 0.5 - n / 2) * spacing)
               for k in range(n)]
    pad = size * 0.8  # the guide runs a little past both end parts
    (fx, fy), (lx, ly) = centres[0], centres[-1]
    guide = ((fx - sign * ux * pad, fy - sign * uy * pad), (lx + sign * ux * pad, ly + sign * uy * pad))
    return Placement(centres, size, guide)
