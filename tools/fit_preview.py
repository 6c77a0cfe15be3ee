"""Fit a bundle's latent -> RGB preview coefficients (edge.preview) to its own VAE decoder.

Runs the real pipeline (ONNX Runtime, no torch) on training-style captions, takes each job's
final latents and the image the VAE decoder makes of them, averages the image over each
latent's 8x8 pixels, and solves ``rgb = latents . W + b`` by least squares (4x3 weights plus a
bias, in the decoder's [-1, 1] range). Half the samples fit, the other half check; the RMS error
of the SD 1.x coefficients on the same samples is printed beside it. Writes
``<bundle>/vae_decoder/preview.json``.

    .venv/bin/python tools/fit_preview.py                      # the embedded model
    .venv/bin/python tools/fit_preview.py --bundle DIR --samples 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import scenes  # noqa: E402

from edge.bundle import load_bundle  # noqa: E402
from edge.jobs import Job, Step  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.preview import PREVIEW_FILE, SD1_WEIGHTS  # noqa: E402
from edge.providers import RuntimeOptions  # noqa: E402


def samples(pipe: Pipeline, count: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, channels) latents and (N, 3) pooled decoder pixels, one row per latent position."""
    xs, ys = [], []
    scale = pipe.bundle.vae_scale
    for seed in range(count):
        final: list[np.ndarray] = []

        def keep(step: Step) -> None:
            if step.step == step.steps:
                final.append(step.latents)

        job = Job(prompt=scenes.scene(seed).caption, steps=steps, seed=seed, id=f"fit{seed}")
        image = pipe.generate(job, on_step=keep).images[0].image
        pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
        h, w = pixels.shape[0] // scale, pixels.shape[1] // scale
        pooled = pixels.reshape(h, scale, w, scale, 3).mean(axis=(1, 3))
        latents = final[0][0]  # (C, h, w)
        xs.append(latents.reshape(latents.shape[0], -1).T)
        ys.append(pooled.reshape(-1, 3))
    return np.concatenate(xs), np.concatenate(ys)


def rms(x: np.ndarray, y: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.clip(x @ weights + bias, -1, 1) - y) ** 2)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the embedded model)")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    pipe = Pipeline(bundle, RuntimeOptions(threads=2))
    x, y = samples(pipe, args.samples, args.steps)
    half = len(x) // 2
    design = np.hstack([x[:half], np.ones((half, 1), np.float32)])
    solution, *_ = np.linalg.lstsq(design, y[:half], rcond=None)
    weights, bias = solution[:-1], solution[-1]
    fitted = rms(x[half:], y[half:], weights, bias)
    sd1 = rms(x[half:], y[half:], np.asarray(SD1_WEIGHTS, np.float32), np.zeros(3, np.float32))
    print(f"held-out RMS error (of 2): fitted {fitted:.4f}, SD 1.x coefficients {sd1:.4f}")
    out = bundle.components["vae_decoder"].folder / PREVIEW_FILE
    out.write_text(json.dumps({
        "weights": np.round(weights.astype(float), 5).tolist(), "bias": np.round(bias.astype(float), 5).tolist(),
        "fitted": f"tools/fit_preview.py: least squares on {args.samples // 2} jobs' final latents against the "
                  f"decoder's output averaged per latent; held-out RMS {fitted:.4f} (SD 1.x's: {sd1:.4f}), "
                  f"[-1, 1] range"}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
