"""Check edge-imagegen against the reference stack (dev-time: torch, diffusers, optimum-onnx).

1. Optimum's exporter: a diffusers pipeline exported with ``optimum.exporters.onnx.main_export``
   (dynamic shapes, exactly what ``optimum-cli export onnx --task text-to-image`` writes) loads in
   edge-imagegen and generates at its native size and at another multiple of 8.
2. The whole pipeline against diffusers: the tiny pipeline of ``make_tiny_bundle.py`` (same seeded
   weights as the embedded bundle) runs in diffusers' StableDiffusionPipeline from the same initial
   latents; the final images are compared, and the diffusers image is stored as
   ``tests/fixtures/pipeline_reference.npz`` for the test suite.

    /work/devenv/bin/python tools/check_optimum_bundle.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from edge.bundle import load_bundle  # noqa: E402
from edge.jobs import parse_job  # noqa: E402
from edge.pipeline import Pipeline, gaussian, make_rng  # noqa: E402
from edge.providers import RuntimeOptions  # noqa: E402
from make_tiny_bundle import build_pipeline, export_optimum  # noqa: E402

REFERENCE_JOB = {"prompt": "knolling of 2 red gears and a blue battery on white", "negative_prompt": "shadow",
                 "steps": 8, "guidance": 7.5, "seed": 7, "scheduler": "euler"}
FIXTURE = ROOT / "tests" / "fixtures" / "pipeline_reference.npz"
TINY_SD = ROOT / "tests" / "fixtures" / "tiny-sd"  # the random-weight bundle of make_tiny_bundle.py


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def check_optimum_export(tmp: Path) -> None:
    build_pipeline(TINY_SD / "tokenizer").save_pretrained(tmp / "pt")
    export_optimum(tmp / "pt", tmp / "onnx")
    pipe = Pipeline(load_bundle(tmp / "onnx"), RuntimeOptions())
    for width, height in ((128, 128), (192, 128)):
        result = pipe.generate(parse_job({"prompt": "exploded view of a lens", "steps": 4, "seed": 3,
                                          "width": width, "height": height}))
        image = result.images[0].image
        assert image.size == (width, height), image.size
        print(f"optimum export: generated {image.size[0]}x{image.size[1]} in {result.timings['total']:.2f} s "
              f"(inputs: {list(pipe.unet.inputs)})")


def check_against_diffusers() -> None:
    job = parse_job(REFERENCE_JOB)
    ours = np.asarray(Pipeline(load_bundle(TINY_SD), RuntimeOptions()).generate(job).images[0].image)
    reference_pipe = build_pipeline(TINY_SD / "tokenizer")  # same seeded weights as the bundle
    latents = torch.from_numpy(gaussian(make_rng(job.seed), (1, 4, 16, 16)))
    out = reference_pipe(job.prompt, negative_prompt=job.negative_prompt, num_inference_steps=job.steps,
                         guidance_scale=job.guidance, latents=latents, output_type="np").images[0]
    reference = np.round(out * 255).astype(np.uint8)
    diff = np.abs(ours.astype(int) - reference.astype(int))
    print(f"against diffusers: max abs diff {diff.max()} / 255, mean {diff.mean():.4f}, PSNR {psnr(ours, reference):.1f} dB")
    np.savez_compressed(FIXTURE, image=reference, **{k: np.asarray(v) for k, v in REFERENCE_JOB.items()})
    print(f"wrote {FIXTURE}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check_optimum_export(Path(tmp))
    check_against_diffusers()


if __name__ == "__main__":
    main()
