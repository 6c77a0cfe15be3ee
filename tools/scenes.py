"""Procedural product-part scenes for training and checking ``knolling-tiny`` (Pillow + numpy only).

A scene is 1 to 6 parts drawn in a technical-illustration style (flat fills, thin dark outlines,
no shadows) on pure white, laid out either as *knolling* (parts aligned in a grid, a row, a row per
group, or loosely scattered) or as an *exploded view* (stacked along one axis, joined by a dashed
guide line); the seed picks the arrangement, its extent and its place in the frame
(tools/scene_layouts.py), so that one caption has many layouts. Each scene carries its caption and
its ground truth (part type, colour name and bounding box of every part). Training captions are
written as people write prompts (``user_caption``: filler phrases, case, punctuation).

    scene(seed)                      the training distribution; never uses a held-out combination
    render(groups, layout, seed)     a scene with given content (the adherence check uses this)
    HELD_OUT                         the (colour, part, count) triples no training caption contains
    parse_caption(text)              the groups a caption asks for

Parts are drawn at ``SCALE`` times the output size and box-downsampled, which anti-aliases the
edges while far-from-part pixels stay exactly (255, 255, 255).

    /work/devenv/bin/python tools/scenes.py /tmp/scenes.png    # a grid of sample scenes
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

import scene_layouts

SIZE = scene_layouts.SIZE  # output pixels (the model's resolution)
SCALE = 4  # drawing supersampling factor
WHITE = (255, 255, 255)
OUTLINE = (40, 40, 48)
GUIDE = (120, 120, 130)
MAX_PARTS = 6
LAYOUTS = ("knolling", "exploded")

# Hues spread around the wheel (red 0, orange 29, yellow 49, green 129, teal 180, blue 223,
# purple 270, pink 330 degrees) so the analyzer and a small model can tell them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 130, 20),
    "yellow": (245, 205, 20),
    "green": (40, 170, 60),
    "teal": (20, 170, 170),
    "blue": (40, 90, 220),
    "purple": (130, 60, 200),
    "pink": (240, 100, 170),
}
PLURALS = {"gear": "gears", "screw": "screws", "nut": "nuts", "washer": "washers", "spring": "springs",
           "battery": "batteries", "circuit board": "circuit boards", "chip": "chips", "lens": "lenses",
           "bearing": "bearings"}
PARTS = tuple(PLURALS)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

KNOLLING_TEMPLATES = ("knolling of {}", "flat lay of {}", "parts laid out: {}", "{}, knolling, white background",
                      "top-down knolling of {} on white", "{} laid out in a grid")
EXPLODED_TEMPLATES = ("exploded view of {}", "exploded diagram of {}", "{}, exploded view",
                      "exploded view: {} on white", "technical illustration, exploded view of {}")
TEMPLATES = {"knolling": KNOLLING_TEMPLATES, "exploded": EXPLODED_TEMPLATES}
# Training captions also come as people write prompts (``user_caption``): more templates, and filler
# phrases that change nothing in these scenes (always on white, seen from above, evenly lit). The
# held-out evaluation prompts (adherence.evaluation_cases) use the templates above only.
EXTRA_TEMPLATES = {
    "knolling": ("knolling photo of {}", "{}, flat lay", "{} neatly laid out", "a flat lay of {}", "knolling: {}",
                 "{}, parts laid out on white", "{} arranged in knolling style", "flat lay photo of {}"),
    "exploded": ("an exploded view of {}", "{} in exploded view", "exploded view drawing of {}",
                 "{}, exploded diagram", "exploded view of {} on white"),
}
FILLERS = ("on a pure white background", "on a white background", "white background", "pure white background",
           "on white", "on a white table", "on a plain white table", "high quality", "best quality", "studio photo",
           "studio photography", "product photo", "professional product shot", "isometric", "isometric view",
           "top view", "top-down view", "overhead view", "seen from above", "studio lighting", "soft lighting",
           "soft light", "even lighting", "bright light", "natural light", "no shadows", "sharp focus",
           "highly detailed", "detailed", "clean", "minimal", "simple", "4k", "8k", "hd")

HELD_OUT_MODULUS = 8  # about one triple in eight is held out


@dataclass(frozen=True)
class Group:
    """``count`` parts of one type and colour: one phrase of a caption ("2 red gears")."""

    colour: str
    part: str
    count: int


@dataclass(frozen=True)
class PartTruth:
    part: str
    colour: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in output pixels, x1/y1 exclusive


@dataclass
class Scene:
    image: Image.Image
    caption: str
    parts: list[PartTruth]
    groups: tuple[Group, ...]
    layout: str
    seed: int


def is_held_out(colour: str, part: str, count: int) -> bool:
    """A fixed, platform-independent choice of triples (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(f"{colour}|{part}|{count}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % HELD_OUT_MODULUS == 0


HELD_OUT: frozenset[tuple[str, str, int]] = frozenset(
    (c, p, n) for c in COLOURS for p in PARTS for n in range(1, MAX_PARTS + 1) if is_held_out(c, p, n))


# --- drawing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shades:
    """A part's fills: all of one hue, so a part reads as one colour."""

    base: tuple[int, int, int]
    dark: tuple[int, int, int]
    light: tuple[int, int, int]

    @classmethod
    def of(cls, rgb: tuple[int, int, int]) -> "Shades":
        dark = tuple(round(v * 0.62) for v in rgb)
        light = tuple(round(v * 0.55 + 255 * 0.45) for v in rgb)
        return cls(rgb, dark, light)  # type: ignore[arg-type]


def outline_width(side: int) -> int:
    """Outline width in drawing pixels: one output pixel, thinner on small parts so that their
    fill, not their outline, is what one sees (an 11-pixel bearing is otherwise mostly lines)."""
    return max(2, min(SCALE, round(side / 40)))


def _circle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill, ow: int) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=OUTLINE, width=ow)


def _gear(d: ImageDraw.ImageDraw, s: int, c: Shades, ow: int) -> None:
    teeth, r_tip, r_root = 8, 0.48 * s, 0.37 * s
    step = 2 * math.pi / teeth
    points = []
    for i in range(teeth):
        a = i * step
        for r, da in ((r_root, -0.27), (r_tip, -0.14), (r_tip, 0.14), (r_root, 0.27)):
            points.append((s / 2 + r * math.cos(a + da * step), s / 2 + r * math.sin(a + da * step)))
    d.polygon(points, fill=c.base, outline=OUTLINE, width=ow)
    _circle(d, s / 2, s / 2, 0.2 * s, c.light, ow)
    _circle(d, s / 2, s / 2, 0.09 * s, WHITE, ow)


def _screw(d: ImageDraw.ImageDraw, s: int, c: Shades, ow: int) -> None:
    x0, x1 = 0.38 * s, 0.62 * s
    d.polygon([(x0, 0.2 * s), (x1, 0.2 * s), (x1, 0.84 * s), (s / 2, 0.97 * s), (x0, 0.84 * s)],
              fill=c.base, outline=OUTLINE, width=ow)
    for y in range(round(0.28 * s), round(0.84 * s), max(3 * ow, round(0.09 * s))):
        d.line([(x0 + ow, y + 0.04 * s), (x1 - ow, y)], fill=c.dark, width=ow)
    d.rounded_rectangle((0.2 * s, 0.03 * s, 0.8 * s, 0.22 * s), radius=0.06 * s, fill=c.light, outline=OUTLINE,
                        width=ow)
    d.line([(s / 2, 0.06 * s), (s / 2, 0.19 * s)], fill=OUTLINE, width=ow)


def _nut(d: ImageDraw.ImageDraw, s: int, c: Shades, ow: int) -> None:
    hexagon = [(s / 2 + 0.48 * s * math.cos(a), s / 2 + 0.48 * s * math.sin(a))
               for a in (math.pi / 3 * i + math.pi / 6 for i in range(6))]
    d.polygon(hexagon, fill=c.base, outline=OUTLINE, width=ow)
    _circle(d, s / 2, s / 2, 0.33 * s, c.light, ow)
    _circle(d, s / 2, s / 2, 0.19 * s, WHITE, ow)


def _washer(d: ImageDraw.ImageDraw, s: int, c: Shades, ow: int) -> None:
    _circle(d, s / 2, s / 2, 0.46 * s, c.base, ow)
    _circle(d, s / 2, s / 2, 0.21 * s, WHITE, ow)


def _spring(d: ImageDraw.ImageDraw, s: int, c: Shades, ow: int) -> None:
    coils, width = 5, max(3 * ow, round(0.13 * s))
    ys = [0.12 * s + i * (0.76 * s) / (2 * coils) for i in range(2 * coils + 1)]
    points = [(0.22 * s if i % 2 else 0.78 * s, y) for i, y in enumerate(ys)]
    d.line(points, fill=OUTLINE, width=width + 2 * ow, joint="curve")
    d.line(points, fill=c.base, width=width, joint="curve")
    for y in (ys[0], ys[-1]):
        d.rounded_rectangle((0.18 * s, y - 0.06 * s, 0.82 * s, y + 0.06 * s), radius=0.03 * s, fill=c.light,
                            outline=OUTLINE, width=ow)


def _battery(d: ImageDraw.ImageDraw, s: int, c: Shades, ow: int) -> None:
    d.rounded_rectangle((0.41 * s, 0.03 * s, 0.59 * s, 0.14 * s), radius=0.03 * s, fill=c.light,
                        outline=OUTLINE, width=ow)
    d.rounded_rectangle((0.28 * s, 0.12 * s, 0.72 * s, 0.97 * s), radius=0.06 * s, fill=c.base,
                        outline=OUTLINE, width=ow)
    d.rectangle((0.28 * s + ow, 0.16 * s, 0.72 * s - ow, 0.38 * s), fill=c.light)
    d.line([(0.42 * s, 0.27 * s), (0.58 * s, 0.27 * s)], fill=OUTLINE, width=ow)
    d.line([(s / 2, 0.2 * s), (s / 2, 0.34 * s)], fill=OUTLINE, width=ow)


def _circuit_board(d: ImageDraw.ImageDraw, s: int, c: Shades, ow: int) -> None:
    d.rounded_rectangle((0.03 * s, 0.17 * s, 0.97 * s, 0.83 * s), radius=0.04 * s, fill=c.base, outline=OUTLINE,
                        width=ow)
    d.line([(0.2 * s, 0.35 * s), (0.45 * s, 0.35 * s), (0.55 * s, 0.5 * s), (0.8 * s, 0.5 * s)], fill=c.dark,
           width=ow)
    d.line([(0.2 * s, 0.66 * s), (0.6 * s, 0.66 * s), (0.7 * s, 0.72 * s)], fill=c.dark, width=ow)
    d.rectangle((0.55 * s, 0.27 * s, 0.75 * s, 0.42 * s), fill=c.light, outline=OUTLINE, width=ow)
    for x, y in ((0.11, 0.26), (0.89, 0.26), (0.11, 0.74), (0.89, 0.74)):
        _circle(d, x * s, y * s, 0.045 * s, WHITE, ow)


def _chip(d: ImageDraw.ImageDraw, s: int, c: Shades, ow: int) -> None:
    pin = 0.07 * s
    for i in range(4):
        t = 0.3 * s + i * 0.13 * s
        for box in ((t, 0.08 * s, t + pin, 0.25 * s), (t, 0.75 * s, t + pin, 0.92 * s),
                    (0.08 * s, t, 0.25 * s, t + pin), (0.75 * s, t, 0.92 * s, t + pin)):
            d.rectangle(box, fill=c.light, outline=OUTLINE, width=ow)
    d.rectangle((0.2 * s, 0.2 * s, 0.8 * s, 0.8 * s), fill=c.base, outline=OUTLINE, width=ow)
    _circle(d, 0.32 * s, 0.32 * s, 0.05 * s, c.light, ow)


def _lens(d: ImageDraw.ImageDraw, s: int, c: Shades, ow: int) -> None:
    def vesica(half_width: float, half_height: float) -> list[tuple[float, float]]:
        # Two circular arcs meeting at the top and bottom: a biconvex lens seen side-on.
        radius = (half_height ** 2 + half_width ** 2) / (2 * half_width)
        span = math.asin(half_height / radius)
        arc = [radius * math.cos(a) - (radius - half_width) for a in
               (span * (2 * k / 24 - 1) for k in range(25))]
        ys = [radius * math.sin(span * (2 * k / 24 - 1)) for k in range(25)]
        right = [(s / 2 + x, s / 2 + y) for x, y in zip(arc, ys)]
        left = [(s / 2 - x, s / 2 - y) for x, y in zip(arc, ys)]
        return right + left

    d.polygon(vesica(0.2 * s, 0.47 * s), fill=c.base, outline=OUTLINE, width=ow)
    d.polygon(vesica(0.08 * s, 0.3 * s), fill=c.light)


def _bearing(d: ImageDraw.ImageDraw, s: int, c: Shades, ow: int) -> None:
    _circle(d, s / 2, s / 2, 0.47 * s, c.base, ow)
    _circle(d, s / 2, s / 2, 0.37 * s, c.light, ow)
    for i in range(8):
        a = i * math.pi / 4
        _circle(d, s / 2 + 0.29 * s * math.cos(a), s / 2 + 0.29 * s * math.sin(a), 0.065 * s, c.base, ow)
    _circle(d, s / 2, s / 2, 0.21 * s, c.base, ow)
    _circle(d, s / 2, s / 2, 0.12 * s, WHITE, ow)


DRAW: dict[str, Callable[[ImageDraw.ImageDraw, int, Shades, int], None]] = {
    "gear": _gear, "screw": _screw, "nut": _nut, "washer": _washer, "spring": _spring, "battery": _battery,
    "circuit board": _circuit_board, "chip": _chip, "lens": _lens, "bearing": _bearing}
ELONGATED = frozenset({"screw", "spring", "battery", "lens", "circuit board"})  # may lie turned by 90 degrees


def _tile(part: str, colour: str, size: int, quarter_turns: int) -> Image.Image:
    """One part on a transparent square tile, in drawing pixels."""
    tile = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    DRAW[part](ImageDraw.Draw(tile), size, Shades.of(COLOURS[colour]), outline_width(size))
    return tile.rotate(90 * quarter_turns, expand=True) if quarter_turns else tile


# --- layout (where the parts go: tools/scene_layouts.py) --------------------------------------
def _dashed_line(d: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float]) -> None:
    dash, gap = 4 * SCALE, 3 * SCALE
    length = math.dist(start, end)
    ux, uy = (end[0] - start[0]) / length, (end[1] - start[1]) / length
    t = 0.0
    while t < length:
        t1 = min(t + dash, length)
        d.line([(start[0] + ux * t, start[1] + uy * t), (start[0] + ux * t1, start[1] + uy * t1)],
               fill=GUIDE, width=SCALE)
        t = t1 + gap


# --- captions ---------------------------------------------------------------------------------
def _phrase(group: Group, rng: random.Random, training: bool = False) -> str:
    noun = group.part if group.count == 1 else PLURALS[group.part]
    if group.count == 1:
        r = rng.random()
        number = "1" if training and r < 0.1 else "one" if r < 0.2 else ("an" if group.colour[0] in "aeiou" else "a")
    else:
        number = NUMBER_WORDS[group.count] if rng.random() < 0.3 else str(group.count)
    return f"{number} {group.colour} {noun}"


def caption_for(groups: tuple[Group, ...], layout: str, rng: random.Random, training: bool = False) -> str:
    phrases = [_phrase(g, rng, training) for g in groups]
    listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    templates = TEMPLATES[layout] + (EXTRA_TEMPLATES[layout] if training else ())
    return rng.choice(templates).format(listing)


def user_caption(groups: tuple[Group, ...], layout: str, rng: random.Random) -> str:
    """A training caption: ``caption_for``'s, often with filler phrases, in varied case and punctuation."""
    text = caption_for(groups, layout, rng, training=True)
    if rng.random() < 0.6:
        filler = ", ".join(rng.sample(FILLERS, rng.choice((1, 1, 2, 3))))
        text = f"{text}, {filler}" if rng.random() < 0.8 else f"{filler}, {text}"
    case = rng.random()
    if case < 0.15:
        text = text[0].upper() + text[1:]
    elif case < 0.2:
        text = text.upper()
    elif case < 0.25:
        text = text.title()
    return text + rng.choice(("",) * 6 + (".", " .", "!", "..."))


_NUMBER = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()}, **{str(n): n for n in range(1, 10)}}
_NOUN = {**{p: p for p in PARTS}, **{pl: p for p, pl in PLURALS.items()}}
_GROUP_RE = re.compile(r"\b({})\s+({})\s+({})\b".format(
    "|".join(map(re.escape, _NUMBER)), "|".join(COLOURS),
    "|".join(sorted(map(re.escape, _NOUN), key=len, reverse=True))))


def parse_caption(text: str) -> list[Group]:
    """The "<number> <colour> <part>" phrases of a caption, in order."""
    return [Group(colour, _NOUN[noun], _NUMBER[number])
            for number, colour, noun in _GROUP_RE.findall(text.lower())]


def caption_words() -> set[str]:
    """Every word a caption can contain (what the model's BPE vocabulary should keep whole)."""
    words: set[str] = set()
    for text in KNOLLING_TEMPLATES + EXPLODED_TEMPLATES + sum(EXTRA_TEMPLATES.values(), ()) + FILLERS:
        words.update(re.findall(r"[a-z]+", text))
    for part, plural in PLURALS.items():
        words.update(part.split() + plural.split())
    words.update(COLOURS, NUMBER_WORDS.values(), ("a", "an", "and"))
    return words


# --- scenes -----------------------------------------------------------------------------------
def render(groups: tuple[Group, ...], layout: str, seed: int, caption: str | None = None,
           ink: str | None = None) -> Scene:
    """Draw the given groups (parts placed group by group) in the given layout; ``ink``: every part
    in that one colour whatever the caption says (a style to train a LoRA on)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rng = random.Random(f"render:{seed}")
    items = [(g.part, g.colour) for g in groups for _ in range(g.count)]
    if not 1 <= len(items) <= MAX_PARTS:
        raise ValueError(f"a scene has 1 to {MAX_PARTS} parts, got {len(items)}")
    counts = [g.count for g in groups]
    placement = scene_layouts.knolling(counts, rng) if layout == "knolling" else scene_layouts.exploded(len(items), rng)
    centres, size = placement.centres, placement.size
    canvas = Image.new("RGB", (SIZE * SCALE, SIZE * SCALE), WHITE)
    draw = ImageDraw.Draw(canvas)
    if placement.guide is not None:  # the guide line runs behind the parts
        (x0, y0), (x1, y1) = placement.guide
        _dashed_line(draw, (x0 * SCALE, y0 * SCALE), (x1 * SCALE, y1 * SCALE))
    turns = {part: rng.choice((0, 1)) if part in ELONGATED else 0 for part in PARTS}  # like parts lie alike
    truth = []
    side = round(size * SCALE)
    for (part, colour), (cx, cy) in zip(items, centres):
        colour = ink or colour
        tile = _tile(part, colour, side, turns[part])
        x, y = round(cx * SCALE - tile.width / 2), round(cy * SCALE - tile.height / 2)
        canvas.paste(tile, (x, y), tile)
        bx0, by0, bx1, by1 = tile.getbbox()
        truth.append(PartTruth(part, colour, ((x + bx0) // SCALE, (y + by0) // SCALE,
                                              -(-(x + bx1) // SCALE), -(-(y + by1) // SCALE))))
    image = canvas.reduce(SCALE)  # box filter: exact averages, so untouched areas stay pure white
    return Scene(image, caption or caption_for(groups, layout, rng), truth, groups, layout, seed)


def sample_groups(rng: random.Random, allow_held_out: bool = False) -> tuple[Group, ...]:
    """1 to 3 groups of distinct (colour, part), 1 to 6 parts in all; held-out triples are skipped."""
    while True:
        total = rng.randint(1, MAX_PARTS)
        n_groups = min(total, rng.choices((1, 2, 3), weights=(0.45, 0.35, 0.2))[0])
        cuts = sorted(rng.sample(range(1, total), n_groups - 1))
        counts = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
        kinds = rng.sample([(c, p) for c in COLOURS for p in PARTS], n_groups)
        groups = tuple(Group(c, p, n) for (c, p), n in zip(kinds, counts))
        if allow_held_out or not any((g.colour, g.part, g.count) in HELD_OUT for g in groups):
            return groups


def scene(seed: int, ink: str | None = None) -> Scene:
    """The training distribution: deterministic in ``seed``, never a held-out combination."""
    rng = random.Random(f"scene:{seed}")
    groups = sample_groups(rng)
    layout = rng.choice(LAYOUTS)
    return render(groups, layout, seed, user_caption(groups, layout, rng), ink=ink)


def grid(images: list[Image.Image], cols: int, pad: int = 4) -> Image.Image:
    rows = -(-len(images) // cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (200, 200, 200))
    for i, im in enumerate(images):
        sheet.paste(im, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a grid of sample scenes and print their captions.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args()
    scenes = [scene(s) for s in range(args.first_seed, args.first_seed + args.n)]
    grid([s.image for s in scenes], cols=6).save(args.out)
    for s in scenes:
        print(f"{s.seed:4d} {s.layout:9s} {s.caption}")
    print(f"wrote {args.out}; {len(HELD_OUT)} held-out (colour, part, count) triples")


if __name__ == "__main__":
    main()
