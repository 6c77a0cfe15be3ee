"""VAE encode cost per tier, and image to image against text to image, on a model bundle.

    python benchmarks/bench_edit.py [--model DIR] [--steps 20] [--runs 5] [--strength 0.5]
    python benchmarks/bench_edit.py --encoder-only DIR/vae_encoder --size 512

Prints the machine, then per tier the VAE encoder's variant, its encode time (median of calls in
a fresh process) and that process's peak RSS above its start (edge.profile.measure: the session's
weights, pre-packed copies and activations; the int8-lowmem tier runs it as that tier does). Then
text to image and img2img at ``--strength`` with the same steps, seed and prompt, alternated run by
run so that machine noise hits both alike: medians and their ratio. ``--encoder-only`` times a
bare encoder folder's files at ``--size`` pixels (the SD-1.5-size encoder of tools/make_sd15_encoder.py).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks_common import machine
from edge.bundle import VARIANT_FILES, load_bundle
from edge.images import b64encode
from edge.jobs import parse_job
from edge.profile import measure
from edge.memory import TIERS, tier_plan
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions, physical_cores

MB = 1024 * 1024


def encoder_row(label: str, path: Path, runtime: RuntimeOptions, size: int, lowmem: bool, calls: int) -> None:
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    if lowmem:
        runtime = replace(runtime, memory_arena=False, cfg_batch=False)
    m = measure(path, runtime, {"sample": pixels}, calls=calls, lowmem=lowmem)
    print(f"| {label} | {path.name} | {size}x{size} | {m['call_seconds'] * 1000:.1f} ms | "
          f"{m['peak_rss_bytes'] / MB:.0f} MB | {m['load_seconds'] * 1000:.0f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--encoder-only", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    runtime = RuntimeOptions(threads=args.threads or physical_cores())
    print(machine())
    print("| tier | file | size | encode (median) | peak RSS | session load |\n|---|---|---|---|---|---|")
    if args.encoder_only:  # a folder of model.onnx and its variants, picked per tier as a bundle's are
        for tier, order in TIERS.items():
            path = next(args.encoder_only / VARIANT_FILES[p] for p in order
                        if (args.encoder_only / VARIANT_FILES[p]).is_file())
            encoder_row(tier, path, runtime, args.size, tier == "int8-lowmem", calls=3)
        return
    bundle = load_bundle(args.model)
    encoder = bundle.vae_encoder
    if encoder is None:
        raise SystemExit(f"{bundle.root}: no vae_encoder/")
    side = Pipeline(bundle, runtime).default_size()[0]
    for tier in TIERS:
        precision = tier_plan(bundle, {}, tier).precisions["vae_encoder"]
        encoder_row(tier, encoder.variants[precision], runtime, side, tier == "int8-lowmem", calls=5)

    pipe = Pipeline(bundle, runtime)
    base = {"prompt": "knolling of 3 red gears and a blue battery", "steps": args.steps, "seed": 1}
    image = pipe.generate(parse_job(base)).images[0].image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    jobs = {"text to image": parse_job(base),
            f"img2img strength {args.strength:g}": parse_job({**base, "init_image": b64encode(buf.getvalue()),
                                                              "strength": args.strength})}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    encode: list[float] = []
    for _ in range(args.runs):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            result = pipe.generate(job)
            times[name].append(time.perf_counter() - t0)
            if "vae_encode" in result.timings:
                encode.append(result.timings["vae_encode"])
    print(f"\n{args.steps} steps, {args.runs} runs alternated, {runtime.threads} threads")
    print("| job | steps run | median | min | max |\n|---|---|---|---|---|")
    for name, values in times.items():
        steps = args.steps if name == "text to image" else int(args.steps * args.strength)
        print(f"| {name} | {steps} | {statistics.median(values):.3f} s | {min(values):.3f} s | {max(values):.3f} s |")
    names = list(jobs)
    print(f"img2img / text to image: {statistics.median(times[names[1]]) / statistics.median(times[names[0]]):.2f}; "
          f"encode inside img2img: median {statistics.median(encode) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
