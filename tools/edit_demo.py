"""Before/after of edit jobs on the embedded model, for the README (dev-time: needs tools/scenes.py only).

A rendered scene (3 red gears) is edited by the runtime itself (edge.pipeline, FP32):
image to image to "3 blue gears" at strength 0.6, and inpainting of one gear's box with "a yellow
nut". Writes a strip input | img2img | mask | inpainted to ``benchmarks/knolling-tiny-edit.png``
and prints what tools/adherence.py reads in each result.

    python tools/edit_demo.py [--out benchmarks/knolling-tiny-edit.png]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))
import adherence  # noqa: E402
import scenes  # noqa: E402
from edge.bundle import load_bundle  # noqa: E402
from edge.images import b64encode  # noqa: E402
from edge.jobs import parse_job  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.providers import RuntimeOptions  # noqa: E402


def png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return b64encode(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TOOLS.parent / "benchmarks" / "knolling-tiny-edit.png")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    pipe = Pipeline(load_bundle(), RuntimeOptions(threads=2))
    scene = scenes.render((scenes.Group("red", "gear", 3),), "knolling", seed=args.seed)
    source = scene.image
    x0, y0, x1, y1 = scene.parts[0].bbox
    mask = Image.new("L", source.size, 0)
    ImageDraw.Draw(mask).rectangle((x0 - 4, y0 - 4, x1 + 3, y1 + 3), fill=255)

    base = {"steps": 20, "seed": args.seed, "init_image": png(source)}
    recolour = pipe.generate(parse_job({**base, "prompt": "knolling of 3 blue gears", "strength": 0.6}))
    inpaint = pipe.generate(parse_job({**base, "prompt": "knolling of a yellow nut", "mask": png(mask)}))
    a, b = recolour.images[0].image, inpaint.images[0].image

    found = adherence.analyze(a)
    print(f"img2img 'knolling of 3 blue gears' (strength 0.6, {len(recolour.timings['steps'])} steps): "
          f"dominant colour {found.dominant_colour}, {len(found.parts)} parts (input: red, {len(scene.parts)})")
    inside = adherence.analyze(Image.composite(b, Image.new("RGB", b.size, "white"), mask))
    reach = 2 * (3 * 4 + 2) + 1  # the default mask_blur 4 reaches < 3 * 4 + 2 pixels
    outside = np.asarray(mask.filter(ImageFilter.MaxFilter(reach))) == 0
    same = np.array_equal(np.asarray(b)[outside], np.asarray(source)[outside])
    print(f"inpaint 'a yellow nut' in one gear's box: inside the mask {inside.dominant_colour}; "
          f"pixels beyond the mask's blur identical to the input: {same}")
    overlay = Image.composite(Image.new("RGB", source.size, (60, 60, 60)), source, mask)
    scenes.grid([source, a, overlay, b], cols=4).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
