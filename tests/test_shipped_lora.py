"""The LoRA shipped with the embedded model (tools/train_knolling_lora.py): it loads from the installed
package and moves images the way it was trained to (every part in blue ink), measured on hues."""

import numpy as np
import pytest
from PIL import Image

from edge.bundle import EMBEDDED_MODEL, load_bundle
from edge.config import LoraConfig
from edge.jobs import parse_job
from edge.lora_apply import LoraLibrary
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions

PROMPTS = ("knolling of 3 red gears", "exploded view of a yellow battery and 2 orange washers",
           "knolling of 4 pink nuts")


def blue_share(image: Image.Image) -> tuple[float, float]:
    """(the share of pixels that are saturated colour, the share of those whose hue is blue)."""
    hsv = np.asarray(image.convert("HSV"), np.float32)
    hue, sat, val = hsv[..., 0] * 360 / 255, hsv[..., 1] / 255, hsv[..., 2] / 255
    coloured = (sat > 0.35) & (val > 0.25)
    blue = coloured & (hue > 200) & (hue < 250)
    return float(coloured.mean()), float(blue.sum() / max(1, coloured.sum()))


@pytest.fixture(scope="module")
def pipe():
    bundle = load_bundle(EMBEDDED_MODEL)
    return Pipeline(bundle, RuntimeOptions(threads=2), lora=LoraConfig())  # lora.dir null: the bundle's loras/


def test_the_package_ships_the_blueprint_lora(pipe):
    assert "blueprint" in LoraLibrary.configured(LoraConfig(), pipe.bundle).names()
    pipe.check(parse_job({"prompt": "a gear <lora:blueprint:0.8>"}))  # every layer maps onto the shipped UNet


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_blueprint_draws_the_parts_in_blue_whatever_colour_the_prompt_names(pipe, index):
    job = {"prompt": PROMPTS[index], "seed": 40 + index, "steps": 20}
    base_coloured, base_blue = blue_share(pipe.generate(parse_job(job)).images[0].image)
    styled = parse_job({**job, "loras": [{"name": "blueprint", "strength": 0.8}]})  # the recommended strength
    pipe.check(styled)
    coloured, blue = blue_share(pipe.generate(styled).images[0].image)
    assert base_blue < 0.1  # the prompt's own colour, none of it blue
    assert blue > 0.6  # mostly blue
    assert coloured > 0.5 * base_coloured  # parts still drawn, not washed out
