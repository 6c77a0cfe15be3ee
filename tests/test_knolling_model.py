"""The shipped model draws what it is asked for, judged by the adherence analyzer (tools/adherence.py).

A random-weight model fails these: it draws coloured noise, not parts of the asked colour on white.
"""

import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from edge.bundle import load_bundle
from edge.images import b64encode
from edge.jobs import parse_job

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import adherence  # noqa: E402
import scenes  # noqa: E402

SEEDS = range(8)
pytestmark = pytest.mark.slow  # 8 seeds x 20 steps per prompt: the whole suite runs these, the fast lane not


def outcomes(pipeline, prompt):
    return [adherence.analyze(pipeline.generate(parse_job({"prompt": prompt, "seed": s, "steps": 20}))
                              .images[0].image) for s in SEEDS]


def test_the_embedded_model_is_knolling_tiny():
    assert load_bundle().name == "knolling-tiny"


# The shipped model draws the asked colour in 98% of held-out prompts (benchmarks/README.md) and all
# 8 seeds here; one miss of 8 is allowed so that a kernel change on another CPU cannot flip the test.
# The count is within one on 80% of held-out prompts and 6 of these 8 seeds (seeds 2 and 5 draw the
# gears merged in one big stack), so 5 of 8 are asked for. Random weights give no parts on white at
# all; the first-run model (colour read from the seed's noise mean) gave "knolling of 3 red gears"
# red in only 4 of these 8 seeds.
@pytest.mark.parametrize("prompt, colour, count", [
    ("knolling of 3 red gears", "red", 3),
    ("exploded view of 2 blue batteries", "blue", 2),
])
def test_parts_come_out_in_the_asked_colour_and_count_on_white(pipeline, prompt, colour, count):
    found = outcomes(pipeline, prompt)
    dominant = Counter(a.dominant_colour for a in found)
    assert dominant[colour] >= len(SEEDS) - 1, f"{prompt!r}: dominant colours {dict(dominant)}"
    assert sum(abs(len(a.parts) - count) <= 1 for a in found) >= len(SEEDS) - 3, \
        f"{prompt!r}: part counts {[len(a.parts) for a in found]}"
    assert sum(a.background_share for a in found) / len(found) >= 0.95


def test_red_and_blue_prompts_differ_in_colour_not_just_noise(pipeline):
    red = outcomes(pipeline, "knolling of 2 red screws")
    blue = outcomes(pipeline, "knolling of 2 blue screws")

    def area(found, colour):
        return sum(a.colour_areas().get(colour, 0) for a in found)

    assert area(red, "red") > 3 * area(blue, "red")
    assert area(blue, "blue") > 3 * area(red, "blue")


@pytest.mark.parametrize("steps", [20, 50])
def test_ddim_draws_parts_on_white_not_noise(pipeline, steps):
    """DDIM's pixel-space defaults (clip x0 to [-1, 1]) once turned every image to pink noise."""
    found = [adherence.analyze(pipeline.generate(parse_job({"prompt": "knolling of 3 red gears", "seed": s,
                                                            "steps": steps, "scheduler": "ddim"})).images[0].image)
             for s in range(4)]
    assert all(a.background_share >= 0.98 for a in found), [round(a.background_share, 3) for a in found]
    assert sum(a.dominant_colour == "red" for a in found) >= 3


# --- issue 18: the second edition (tools/finetune_knolling.py) draws a layout per seed and reads filler as
# nothing; the first edition drew 1.75 layouts of 8 seeds and added parts for ", on a pure white background"


def test_eight_seeds_of_one_prompt_draw_distinct_layouts(pipeline):
    """The first edition drew 1.75 distinct layouts for 8 seeds (its renderer had 1-2 per caption)."""
    found = outcomes(pipeline, "knolling of 3 red gears")
    assert adherence.distinct_layouts(found) >= 6, [[p.centre for p in a.parts] for a in found]


def test_a_filler_phrase_keeps_the_count(pipeline):
    """", on a pure white background" drew extra parts (held-out exact count 78% -> 14%)."""
    plain = outcomes(pipeline, "knolling of 3 red gears")
    filled = outcomes(pipeline, "knolling of 3 red gears, on a pure white background")
    assert sum(len(a.parts) == len(b.parts) for a, b in zip(plain, filled)) >= 7
    assert sum(a.dominant_colour == "red" for a in filled) >= 7


# --- edits: the shipped VAE encoder (tools/train_vae_encoder.py, trained against the shipped decoder) --


def png64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return b64encode(buf.getvalue())


def red_gears(seed):
    return scenes.render((scenes.Group("red", "gear", 3),), "knolling", seed=seed)


def test_vae_round_trip_of_a_scene_is_faithful(pipeline):
    scene = red_gears(100)
    result = pipeline.generate(parse_job({"prompt": scene.caption, "seed": 0, "init_image": png64(scene.image),
                                          "strength": 0.0}))
    out, src = (np.asarray(i, dtype=np.float64) for i in (result.images[0].image, scene.image))
    assert 10 * np.log10(255.0**2 / np.mean((out - src) ** 2)) >= 22  # 25.4 dB mean on unseen scenes
    assert adherence.analyze(result.images[0].image).dominant_colour == "red"


def test_img2img_recolours_and_keeps_the_layout(pipeline):
    hits = 0
    for seed in range(4):
        scene = red_gears(seed)
        result = pipeline.generate(parse_job({"prompt": "knolling of 3 blue gears", "seed": seed, "steps": 20,
                                              "init_image": png64(scene.image), "strength": 0.6}))
        found = adherence.analyze(result.images[0].image)
        hits += found.dominant_colour == "blue" and len(found.parts) == 3
    assert hits >= 3


def test_inpainting_draws_in_the_mask_and_keeps_the_rest(pipeline):
    """The prompt names the whole picture, as inpainting prompts are written for SD models: the second
    edition places "a yellow nut" alone anywhere in the frame (5 of 8 seeds inside the mask with the
    whole-picture prompt, measured; 1 of 8 with "knolling of a yellow nut")."""
    inside_yellow = 0
    for seed in SEEDS:
        scene = red_gears(seed)
        x0, y0, x1, y1 = scene.parts[0].bbox
        mask = Image.new("L", scene.image.size, 0)
        ImageDraw.Draw(mask).rectangle((x0 - 4, y0 - 4, x1 + 3, y1 + 3), fill=255)
        result = pipeline.generate(parse_job({"prompt": "knolling of 2 red gears and a yellow nut", "seed": seed,
                                              "steps": 20, "init_image": png64(scene.image), "mask": png64(mask)}))
        out = result.images[0].image
        inside = adherence.analyze(Image.composite(out, Image.new("RGB", out.size, "white"), mask))
        inside_yellow += inside.dominant_colour == "yellow"
        outside = np.asarray(mask.filter(ImageFilter.MaxFilter(29))) == 0  # beyond mask_blur 4's reach
        assert np.array_equal(np.asarray(out)[outside], np.asarray(scene.image)[outside])
    assert inside_yellow >= 4
