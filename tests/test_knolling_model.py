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


def outcomes(pipeline, prompt):
    return [adherence.analyze(pipeline.generate(parse_job({"prompt": prompt, "seed": s, "steps": 20}))
                              .images[0].image) for s in SEEDS]


def test_the_embedded_model_is_knolling_tiny():
    assert load_bundle().name == "knolling-tiny"


# The shipped model binds colour only loosely (63% colour match on held-out prompts, see
# benchmarks/README.md): the initial noise often decides a neighbouring hue. So these ask for a
# plurality over 8 seeds, not for every image; random weights give no parts on white at all.
@pytest.mark.parametrize("prompt, colour", [
    ("knolling of 3 red gears", "red"),
    ("exploded view of 2 blue batteries", "blue"),
])
def test_parts_come_out_mostly_in_the_asked_colour_on_white(pipeline, prompt, colour):
    found = outcomes(pipeline, prompt)
    dominant = Counter(a.dominant_colour for a in found)
    assert dominant.most_common(1)[0][0] == colour and dominant[colour] >= 4, \
        f"{prompt!r}: dominant colours {dict(dominant)}"
    assert all(a.parts for a in found), "an image without any part"
    assert sum(a.background_share for a in found) / len(found) >= 0.95


def test_red_and_blue_prompts_differ_in_colour_not_just_noise(pipeline):
    red = outcomes(pipeline, "knolling of 2 red screws")
    blue = outcomes(pipeline, "knolling of 2 blue screws")

    def area(found, colour):
        return sum(a.colour_areas().get(colour, 0) for a in found)

    assert area(red, "red") > 3 * area(blue, "red")
    assert area(blue, "blue") > 3 * area(red, "blue")
