"""The shipped model draws what it is asked for, judged by the adherence analyzer (tools/adherence.py).

A random-weight model fails these: it draws coloured noise, not parts of the asked colour on white.
"""

import sys
from collections import Counter
from pathlib import Path

import pytest

from edge.bundle import load_bundle
from edge.jobs import parse_job

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import adherence  # noqa: E402

SEEDS = range(8)
pytestmark = pytest.mark.slow  # 8 seeds x 20 steps per prompt: the whole suite runs these, the fast lane not


def outcomes(pipeline, prompt):
    return [adherence.analyze(pipeline.generate(parse_job({"prompt": prompt, "seed": s, "steps": 20}))
                              .images[0].image) for s in SEEDS]


def test_the_embedded_model_is_knolling_tiny():
    assert load_bundle().name == "knolling-tiny"


# The shipped model draws the asked colour in 99% of held-out prompts (benchmarks/README.md) and all
# 8 seeds here; one miss of 8 is allowed so that a kernel change on another CPU cannot flip the test.
# Random weights give no parts on white at all; the first-run model (colour read from the seed's
# noise mean) gave "knolling of 3 red gears" red in only 4 of these 8 seeds.
@pytest.mark.parametrize("prompt, colour, count", [
    ("knolling of 3 red gears", "red", 3),
    ("exploded view of 2 blue batteries", "blue", 2),
])
def test_parts_come_out_in_the_asked_colour_and_count_on_white(pipeline, prompt, colour, count):
    found = outcomes(pipeline, prompt)
    dominant = Counter(a.dominant_colour for a in found)
    assert dominant[colour] >= len(SEEDS) - 1, f"{prompt!r}: dominant colours {dict(dominant)}"
    assert sum(abs(len(a.parts) - count) <= 1 for a in found) >= len(SEEDS) - 1, \
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
