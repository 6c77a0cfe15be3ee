"""Prompt adherence: does an image show the asked parts, in the asked colour and number, on white?

The analyzer (numpy + Pillow only, so the test suite can use it):

1. *near-white*: a pixel whose three channels are all >= ``NEAR_WHITE`` (230);
2. *parts*: the other pixels, morphologically opened with a 3x3 square so that lines up to two
   pixels wide (dashed guide lines, stray outlines) drop out, then split into 8-connected
   components; a component of ``MIN_PART_AREA`` to ``MAX_PART_SHARE`` of the image is a part
   (a larger one is a non-white background, not a part);
3. *colour of a part*: each of its pixels with HSV saturation and value >= 0.25 (outlines, greys
   and anti-aliased edges do not vote) votes for the palette colour with the nearest hue; the
   part's colour is the winner. A component where fewer than a tenth of the pixels vote is grey
   or black: every palette colour is saturated, so that is a smudge, not a part, and it stays in
   the background;
4. *background share*: among the pixels outside the parts, each part grown by 2 pixels to leave
   out its outline and anti-aliased rim, the share that is near-white.

Per generated image, for a request of ``count`` parts of one ``colour``:

* colour match: the asked colour is the *dominant colour*: the colour with the largest summed
  area over the detected parts (an image with no detected part does not match);
* count within one: ``|detected parts - count| <= 1`` and at least one part (an empty white
  image must not pass for "a red gear");
* background: ``background share >= 0.95``; the table also gives the mean share.

    python tools/adherence.py validate [--n 300]        # analyzer vs renderer ground truth
    python tools/adherence.py evaluate --model DIR [--precision fp32 int8] [--n 100] [--scheduler euler ddim ...]
                                       [--filler]   # also with filler phrases appended to every prompt
    python tools/adherence.py diversity --model DIR [--precision fp32 int8] [--seeds 8] [--filler] [--scheduler ...]

``evaluate`` prompts with (colour, part, count) triples from ``scenes.HELD_OUT``, which the
training sampler never draws, so it measures generalisation rather than recall of captions.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
import random
import sys
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenes  # noqa: E402

log = logging.getLogger(__name__)

NEAR_WHITE = 230
MIN_PART_AREA = 16  # pixels at 128x128, after opening; the smallest rendered part has 34
MAX_PART_SHARE = 0.4  # of the image; the largest rendered part covers 17%
MIN_CHROMA = 0.25  # HSV saturation and value a pixel needs to vote for a colour
MIN_VOTING_SHARE = 0.1  # small parts are mostly outline and rim: a tenth of fill must do
BACKGROUND_GOAL = 0.95
GOALS = {"colour_match": 0.80, "count_within_one": 0.70, "background_share": BACKGROUND_GOAL}

# Palette hues in degrees, from the renderer's own colours so the two cannot drift apart.
HUES = {name: colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360 for name, rgb in scenes.COLOURS.items()}


@dataclass(frozen=True)
class DetectedPart:
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1, exclusive ends
    area: int  # pixels after opening
    colour: str
    colour_share: float  # of the voting pixels, the share for ``colour``

    @property
    def centre(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2


@dataclass(frozen=True)
class Analysis:
    parts: list[DetectedPart]
    background_share: float  # near-white share of the background (0 when there is none)

    def colour_areas(self) -> dict[str, int]:
        areas: dict[str, int] = {}
        for part in self.parts:
            areas[part.colour] = areas.get(part.colour, 0) + part.area
        return areas

    @property
    def dominant_colour(self) -> str | None:
        areas = self.colour_areas()
        return max(areas, key=areas.get) if areas else None


def _filter(mask: np.ndarray, f: ImageFilter.Filter) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(f)) > 127


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an array of flat pixel indices."""
    h, w = mask.shape
    todo = mask.ravel().copy()
    found = []
    for start in np.flatnonzero(todo):
        if not todo[start]:
            continue
        todo[start] = False
        queue, members = deque([start]), [start]
        while queue:
            i = queue.popleft()
            y, x = divmod(i, w)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and todo[ny * w + nx]:
                        todo[ny * w + nx] = False
                        queue.append(ny * w + nx)
                        members.append(ny * w + nx)
        found.append(np.asarray(members))
    return found


def _part_colour(hsv: np.ndarray, pixels: np.ndarray) -> tuple[str | None, float]:
    h, s, v = (hsv[..., k].ravel()[pixels].astype(np.float64) for k in range(3))
    voting = (s >= MIN_CHROMA * 255) & (v >= MIN_CHROMA * 255)
    if voting.sum() < MIN_VOTING_SHARE * len(pixels):
        return None, 0.0
    names = list(HUES)
    hues = np.asarray([HUES[n] for n in names])
    diff = np.abs(h[voting, None] * 360 / 255 - hues[None, :])  # Pillow stores hue as 0..255
    nearest = np.argmin(np.minimum(diff, 360 - diff), axis=1)
    votes = np.bincount(nearest, minlength=len(names))
    return names[int(votes.argmax())], float(votes.max() / votes.sum())


def analyze(image: Image.Image) -> Analysis:
    rgb = np.asarray(image.convert("RGB"))
    hsv = np.asarray(image.convert("RGB").convert("HSV"))
    h, w = rgb.shape[:2]
    near_white = rgb.min(axis=2) >= NEAR_WHITE
    solid = _filter(_filter(~near_white, ImageFilter.MinFilter(3)), ImageFilter.MaxFilter(3))
    parts, part_mask = [], np.zeros(h * w, dtype=bool)
    for pixels in _components(solid):
        if not MIN_PART_AREA <= len(pixels) <= MAX_PART_SHARE * h * w:
            continue
        colour, share = _part_colour(hsv, pixels)
        if colour is None:
            continue
        ys, xs = np.divmod(pixels, w)
        parts.append(DetectedPart((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                                  len(pixels), colour, share))
        part_mask[pixels] = True
    background = ~_filter(part_mask.reshape(h, w), ImageFilter.MaxFilter(5))
    share = float(near_white[background].mean()) if background.any() else 0.0
    return Analysis(parts, share)


# --- validation on renderer ground truth ------------------------------------------------------
@dataclass
class Validation:
    scenes: int
    count_exact: float  # share of scenes with exactly the true number of parts
    part_colour: float  # share of true parts matched to a detected part of the right colour
    scene_colour: float  # share of scenes where every part is matched with the right colour
    background_min: float  # lowest background share over the scenes (truth: nearly 1)


def _matches(truth: scenes.PartTruth, part: DetectedPart) -> bool:
    x, y = part.centre
    x0, y0, x1, y1 = truth.bbox
    return x0 <= x <= x1 and y0 <= y <= y1


def validate(n: int, first_seed: int = 1_000_000) -> Validation:
    """Compare the analyzer with the renderer's ground truth on ``n`` fresh scenes (held-out
    combinations included: the analyzer must read those too)."""
    count_ok = colour_ok = scene_ok = total_parts = 0
    background_min = 1.0
    for seed in range(first_seed, first_seed + n):
        rng = random.Random(f"validate:{seed}")
        s = scenes.render(scenes.sample_groups(rng, allow_held_out=True), rng.choice(scenes.LAYOUTS), seed)
        found = analyze(s.image)
        count_ok += len(found.parts) == len(s.parts)
        right = sum(any(_matches(t, p) and p.colour == t.colour for p in found.parts) for t in s.parts)
        colour_ok += right
        scene_ok += right == len(s.parts)
        total_parts += len(s.parts)
        background_min = min(background_min, found.background_share)
        if len(found.parts) != len(s.parts) or right != len(s.parts):
            log.info("seed %d (%s): %d parts found, %d true, %d colours right", seed, s.caption,
                     len(found.parts), len(s.parts), right)
    return Validation(n, count_ok / n, colour_ok / total_parts, scene_ok / n, background_min)


# --- evaluation of a model --------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    prompt: str
    seed: int
    colour: str
    part: str
    count: int


@dataclass(frozen=True)
class Outcome:
    case: Case
    parts: int
    dominant_colour: str | None
    background_share: float

    @property
    def colour_match(self) -> bool:
        return self.dominant_colour == self.case.colour

    @property
    def count_exact(self) -> bool:
        return self.parts == self.case.count

    @property
    def count_within_one(self) -> bool:
        return self.parts >= 1 and abs(self.parts - self.case.count) <= 1

    @property
    def background_ok(self) -> bool:
        return self.background_share >= BACKGROUND_GOAL


def evaluation_cases(n: int) -> list[Case]:
    """``n`` prompts, each one held-out triple, cycling through all of them and both layouts."""
    triples = sorted(scenes.HELD_OUT)
    cases = []
    for i in range(n):
        colour, part, count = triples[i % len(triples)]
        layout = scenes.LAYOUTS[(i + i // len(triples)) % 2]  # each triple gets both layouts in turn
        prompt = scenes.caption_for((scenes.Group(colour, part, count),), layout, random.Random(f"eval:{i}"))
        cases.append(Case(prompt, i, colour, part, count))
    return cases


def judge(case: Case, image: Image.Image) -> Outcome:
    found = analyze(image)
    return Outcome(case, len(found.parts), found.dominant_colour, found.background_share)


def summarize(outcomes: list[Outcome]) -> dict[str, float]:
    n = len(outcomes)
    return {"colour_match": sum(o.colour_match for o in outcomes) / n,
            "count_exact": sum(o.count_exact for o in outcomes) / n,
            "count_within_one": sum(o.count_within_one for o in outcomes) / n,
            "background_share": float(np.mean([o.background_share for o in outcomes])),
            "background_ok": sum(o.background_ok for o in outcomes) / n}


def _pipeline(model: Path, precision: str, threads: int):
    """The bundle at one precision tier, and the job parser (imported here: the analyzer needs no runtime)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from edge.bundle import load_bundle
    from edge.jobs import parse_job
    from edge.memory import load_manifest, tier_plan
    from edge.pipeline import Pipeline
    from edge.providers import RuntimeOptions

    bundle = load_bundle(model)
    plan = tier_plan(bundle, load_manifest(bundle), precision)
    if precision != "fp32" and set(plan.precisions.values()) == {"fp32"}:
        raise SystemExit(f"{model} has no {precision} variants (run `edge-imagegen quantize` first)")
    return Pipeline(bundle, RuntimeOptions(threads=threads), plan), parse_job


def generate_outcomes(model: Path, precision: str, cases: list[Case], steps: int, guidance: float,
                      threads: int, save: Path | None, scheduler: str | None = None) -> list[Outcome]:
    pipe, parse_job = _pipeline(model, precision, threads)
    outcomes, images = [], []
    for case in cases:
        job = parse_job({"prompt": case.prompt, "seed": case.seed, "steps": steps, "guidance": guidance,
                         "scheduler": scheduler})
        image = pipe.generate(job).images[0].image
        outcomes.append(judge(case, image))
        images.append(image)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        for case, image in zip(cases, images):
            image.save(save / f"{precision}-{case.seed:04d}.png")
        scenes.grid(images[:48], cols=8).save(save / f"{precision}-grid.png")
        (save / f"{precision}-outcomes.json").write_text(json.dumps(
            [dict(asdict(o), colour_match=o.colour_match, count_within_one=o.count_within_one) for o in outcomes],
            indent=1) + "\n")
    return outcomes


# --- diversity across seeds ------------------------------------------------------------------
LAYOUT_TOLERANCE = 6.0  # pixels at 128x128: parts whose centres are this close on average are in the same place
FILLERS = (", on a pure white background", ", high quality studio photo, top view")
DIVERSITY_PROMPTS = ("knolling of 3 red gears", "exploded view of 2 blue batteries", "flat lay of 4 green screws",
                     "parts laid out: 2 yellow springs and a purple lens")


def same_layout(a: Analysis, b: Analysis) -> bool:
    """Same number of parts, each near a part of the other (greedy nearest match of centres)."""
    if len(a.parts) != len(b.parts):
        return False
    others, total = [p.centre for p in b.parts], 0.0
    for part in a.parts:
        x, y = part.centre
        j = min(range(len(others)), key=lambda k: (others[k][0] - x) ** 2 + (others[k][1] - y) ** 2)
        ox, oy = others.pop(j)
        total += ((ox - x) ** 2 + (oy - y) ** 2) ** 0.5
    return not a.parts or total / len(a.parts) < LAYOUT_TOLERANCE


def distinct_layouts(analyses: list[Analysis]) -> int:
    """How many of the images are not the same layout as an earlier one."""
    kept: list[Analysis] = []
    for analysis in analyses:
        if not any(same_layout(analysis, k) for k in kept):
            kept.append(analysis)
    return len(kept)


def diversity(model: Path, precision: str, prompts: tuple[str, ...], seeds: int, steps: int, guidance: float,
              threads: int, scheduler: str | None = None) -> dict[str, float]:
    """Per prompt, the distinct layouts among ``seeds`` seeds and the mean pixel difference between seeds."""
    pipe, parse_job = _pipeline(model, precision, threads)
    layouts, differences = [], []
    for prompt in prompts:
        images = [np.asarray(pipe.generate(parse_job({"prompt": prompt, "seed": seed, "steps": steps,
                                                       "guidance": guidance, "scheduler": scheduler}))
                             .images[0].image, dtype=np.float64) for seed in range(seeds)]
        layouts.append(distinct_layouts([analyze(Image.fromarray(i.astype(np.uint8))) for i in images]))
        differences.append(np.mean([np.abs(images[i] - images[j]).mean()
                                    for i in range(seeds) for j in range(i + 1, seeds)]))
    return {"distinct_layouts": float(np.mean(layouts)), "min_distinct_layouts": float(min(layouts)),
            "pixel_difference": float(np.mean(differences)), "seeds": seeds}


def zero_mean_starting_noise() -> None:
    """Patch the runtime's noise so that each latent channel has mean 0 and std 1 (the starting latents;
    an ancestral scheduler's step noise too)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import edge.pipeline

    plain = edge.pipeline.gaussian

    def gaussian(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        x = plain(rng, shape)
        if len(shape) == 4:
            x = x - x.mean(axis=(2, 3), keepdims=True)
            x = x / x.std(axis=(2, 3), keepdims=True)
        return x

    edge.pipeline.gaussian = gaussian


def print_table(results: dict[str, dict[str, float]], n: int) -> None:
    rows = (("colour match", "colour_match", GOALS["colour_match"]),
            ("count exact", "count_exact", None),
            ("count within one", "count_within_one", GOALS["count_within_one"]),
            ("background near-white (mean share)", "background_share", GOALS["background_share"]),
            ("images with background >= 95%", "background_ok", None))
    names = list(results)
    print(f"| metric ({n} held-out prompt/seed pairs) | " + " | ".join(names) + " | goal |")
    print("|---|" + "---|" * len(names) + "---|")
    for label, key, goal in rows:
        cells = " | ".join(f"{100 * results[p][key]:.1f}%" for p in names)
        print(f"| {label} | {cells} | {'>= %d%%' % round(100 * goal) if goal else ''} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="analyzer accuracy on renderer ground truth")
    v.add_argument("--n", type=int, default=300)
    e = sub.add_parser("evaluate", help="adherence of a model bundle on held-out combinations")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "fp16", "int8", "int8-lowmem"))
    e.add_argument("--n", type=int, default=100)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=7.5)
    e.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: physical cores)")
    e.add_argument("--save", type=Path, help="write the images, a grid and per-image outcomes here")
    e.add_argument("--scheduler", nargs="+", default=[None], help="schedulers to compare (default: the bundle's)")
    e.add_argument("--filler", action="store_true", help="also with each of FILLERS appended to every prompt")
    d = sub.add_parser("diversity", help="distinct layouts across seeds of the same prompt")
    d.add_argument("--model", type=Path, required=True)
    d.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "fp16", "int8", "int8-lowmem"))
    d.add_argument("--seeds", type=int, default=8)
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--guidance", type=float, default=7.5)
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--scheduler", nargs="+", default=[None])
    d.add_argument("--filler", action="store_true", help="also with each of FILLERS appended to every prompt")
    e.add_argument("--zero-mean-noise", action="store_true",
                   help="diagnostic: remove the per-channel mean of the starting noise (does the model read "
                        "colour from the seed's noise mean? see benchmarks/README.md)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.command == "validate":
        result = validate(args.n)
        print(f"analyzer vs renderer ground truth, {result.scenes} scenes:")
        print(f"  part count exact     {100 * result.count_exact:.1f}%")
        print(f"  part colour right    {100 * result.part_colour:.1f}% of parts")
        print(f"  all colours right    {100 * result.scene_colour:.1f}% of scenes")
        print(f"  background share min {100 * result.background_min:.1f}%")
        sys.exit(0 if min(result.count_exact, result.part_colour) >= 0.95 else 1)
    if args.command == "diversity":
        for suffix in ("",) + (FILLERS if args.filler else ()):
            for p in args.precision:
                for sched in args.scheduler:
                    found = diversity(args.model, p, tuple(q + suffix for q in DIVERSITY_PROMPTS), args.seeds,
                                      args.steps, args.guidance, args.threads, sched)
                    print(f"{p} {sched or 'bundle'}{' +' + repr(suffix) if suffix else ''}: distinct layouts of "
                          f"{args.seeds} seeds, mean over {len(DIVERSITY_PROMPTS)} prompts "
                          f"{found['distinct_layouts']:.2f} (lowest {found['min_distinct_layouts']:.0f}); "
                          f"mean pixel difference {found['pixel_difference']:.1f}/255", flush=True)
        return
    if args.zero_mean_noise:
        zero_mean_starting_noise()
    cases = evaluation_cases(args.n)
    variants = {"": cases}
    if args.filler:
        variants.update({f: [replace(c, prompt=c.prompt + f) for c in cases] for f in FILLERS})
    results = {}
    for suffix, chosen in variants.items():
        for sched in args.scheduler:
            for p in args.precision:
                label = " ".join(filter(None, (p, sched, f"+'{suffix.strip(', ')}'" if suffix else "")))
                save = args.save / label.replace(" ", "_").replace("'", "") if args.save else None
                results[label] = summarize(generate_outcomes(args.model, p, chosen, args.steps, args.guidance,
                                                             args.threads, save, sched))
                print(label, json.dumps({k: round(v, 3) for k, v in results[label].items()}), flush=True)
    print_table(results, args.n)


if __name__ == "__main__":
    main()
