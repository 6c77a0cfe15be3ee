"""What a per-step preview costs with a tiny decoder, side by side with the linear map, at SD-1.5's size.

4x64x64 latents (a 512x512 image), interleaved rounds of: the linear latent -> RGB map
(edge.preview.LatentPreview, SD 1.x coefficients) to PNG; the tiny decoder's preview
(edge.preview.DecoderPreview: latents pooled to a 256-pixel side, decoded, PNG); and, for scale,
the tiny decoder's whole 512x512 decode (edge.pipeline.Pipeline.decode), what the image itself
costs with that decoder. The decoder is TAESD's architecture with random weights (same cost):

    /work/devvenv/bin/python tools/make_vae_decoders.py taesd /tmp/taesd
    nice -n 10 .venv/bin/python benchmarks/bench_preview.py /tmp/taesd --rounds 9 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks_common import machine
from edge.bundle import load_bundle
from edge.pipeline import Pipeline
from edge.preview import DecoderPreview, load_preview, make_preview
from edge.providers import RuntimeOptions

TINY_SD = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-sd"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoder", type=Path, help="a tiny decoder folder (tools/make_vae_decoders.py taesd)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runtime = RuntimeOptions(threads=args.threads)
    bundle = load_bundle(TINY_SD, args.decoder)  # only the decoder is used: its shapes are dynamic
    tiny = make_preview(bundle, 4, runtime)
    assert isinstance(tiny, DecoderPreview)
    linear = load_preview(TINY_SD / "vae_decoder", 4)
    pipe = Pipeline(bundle, runtime)
    latents = np.random.default_rng(0).standard_normal((1, 4, 64, 64)).astype(np.float32)
    cases = {"linear map -> PNG": lambda: linear.png(latents),
             "tiny decoder preview (256x256) -> PNG": lambda: tiny.png(latents),
             "tiny decoder, whole 512x512 decode": lambda: pipe.decode(latents)}
    for fn in cases.values():  # warm-up: session creation, first-run allocations
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    print(machine(), f"threads {args.threads}, {args.rounds} interleaved rounds")
    for name, values in times.items():
        print(f"{name:40s} median {statistics.median(values) * 1000:8.2f} ms  "
              f"(min {min(values) * 1000:.2f}, max {max(values) * 1000:.2f})")


if __name__ == "__main__":
    main()
