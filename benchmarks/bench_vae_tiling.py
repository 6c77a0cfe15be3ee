"""Tiled against whole VAE decodes: image PSNR, and peak RSS and time on an SD-1.5-size decoder.

    python benchmarks/bench_vae_tiling.py psnr                  # embedded model and tests/fixtures/tiny-sd
    python benchmarks/bench_vae_tiling.py memory /tmp/sd15-vae  # [--size 512] [--runs 3] [--threads 2]

``psnr`` decodes the final latents of real generations (8 Euler steps, two seeds) whole and in
tiles, through dynamic-shape copies of the bundles' decoders (they were exported with a fixed
16x16 latent shape; needs the ``onnx`` package). ``memory`` runs each configuration in a fresh
process the way the int8-lowmem tier does (arena off, lean malloc), interleaved run by run, through
``Pipeline.decode`` with the decoder given as ``model.decoder`` (tools/make_vae_decoders.py sd15
builds one), and prints medians of peak RSS (VmHWM) and decode time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks_common import machine

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "knolling of 3 red gears and a blue battery"

CHILD = r"""
import json, sys, time
import numpy as np
from edge.bundle import load_bundle
from edge.profile import _status_bytes
from edge.memory import MB, mem_available, tier_plan
from edge.pipeline import Pipeline, gaussian, make_rng
from edge.providers import RuntimeOptions
decoder, size, threads, mode, tile, budget_mb = json.loads(sys.argv[1])
bundle = load_bundle(sys.argv[2], decoder)
pipe = Pipeline(bundle, RuntimeOptions(threads=threads, vae_tiling=mode, vae_tile_size=tile),
                tier_plan(bundle, {}, "int8-lowmem"), 0)
latents = gaussian(make_rng(0), (1, 4, size // 8, size // 8))
with pipe.vae_decoder.loaded():
    loaded = _status_bytes("VmRSS")
    if budget_mb:  # as if only this much memory were left once the decoder is loaded
        pipe.headroom = mem_available() - budget_mb * MB
    t0 = time.perf_counter()
    image = pipe.decode(latents)
    seconds = time.perf_counter() - t0
image.save(sys.argv[3])
print(json.dumps({"seconds": seconds, "peak": _status_bytes("VmHWM"), "loaded": loaded}))
"""

CONFIGS = {  # name: (runtime.vae_tiling, runtime.vae_tile_size, memory budget in MB or 0)
    "whole": ("off", 0, 0),
    "tiles 256 px": ("on", 256, 0),
    "tiles 128 px": ("on", 128, 0),
    "auto, 300 MB left after loading": ("auto", 0, 300),
}


def memory(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for name, (mode, tile, budget) in CONFIGS.items():
                png = Path(tmp) / f"{name}.png"
                out = subprocess.run([sys.executable, "-c", CHILD,
                                      json.dumps([str(args.decoder), args.size, args.threads, mode, tile, budget]),
                                      str(ROOT / "tests" / "fixtures" / "tiny-sd"), str(png)],
                                     check=True, capture_output=True, text=True)
                runs[name].append(json.loads(out.stdout.splitlines()[-1]))
        from edge.profile import psnr
        from PIL import Image
        whole = np.asarray(Image.open(Path(tmp) / "whole.png"))
        print(f"{machine()}; {args.decoder}, {args.size}x{args.size}, {args.threads} threads, {args.runs} rounds")
        print("| decode | peak RSS MB (median, range) | RSS after load MB | seconds (median, range) | PSNR vs whole |")
        print("|---|---|---|---|---|")
        for name, rs in runs.items():
            peaks, secs = [r["peak"] / 2**20 for r in rs], [r["seconds"] for r in rs]
            score = psnr(np.asarray(Image.open(Path(tmp) / f"{name}.png")), whole)
            print(f"| {name} | {statistics.median(peaks):.0f} ({min(peaks):.0f}-{max(peaks):.0f}) | "
                  f"{statistics.median(r['loaded'] / 2**20 for r in rs):.0f} | {statistics.median(secs):.2f} "
                  f"({min(secs):.2f}-{max(secs):.2f}) | {'identical' if score is None else f'{score:.1f} dB'} |")


def dynamic_copy(src: Path, dest: Path) -> None:
    """The decoder with its latent height and width (and the image's) made dynamic again."""
    import onnx
    model = onnx.load(str(src))
    for value, names in ((model.graph.input[0], ("latent_height", "latent_width")),
                         (model.graph.output[0], ("height", "width"))):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = names
    del model.graph.value_info[:]  # shapes inferred for the fixed size
    onnx.save(model, str(dest))


def psnr_table(args: argparse.Namespace) -> None:
    import onnxruntime as ort
    from edge.bundle import EMBEDDED_MODEL, load_bundle
    from edge.jobs import parse_job
    from edge.profile import psnr
    from edge.config import RuntimeOptions
    from edge.pipeline import Pipeline, record_inputs
    from edge.tiling import decode_tiled, starts
    print(f"{machine()}; final latents of 8-step Euler generations of {PROMPT!r}, seeds 1 and 2")
    print("| model | latents | tile (latent cells) | tiles | PSNR vs whole, dB (seed 1, 2) | max abs diff /255 |")
    print("|---|---|---|---|---|---|")
    fixtures = ROOT / "tests" / "fixtures"
    for name, root, decoder in (("knolling-tiny", EMBEDDED_MODEL, None), ("tiny-sd", fixtures / "tiny-sd", None),
                                ("tiny-sd + tiny-decoder", fixtures / "tiny-sd", fixtures / "tiny-decoder")):
        bundle = load_bundle(root, decoder)
        pipe = Pipeline(bundle, RuntimeOptions(threads=args.threads))
        with record_inputs(pipe) as recorded:
            for seed in (1, 2):
                pipe.generate(parse_job({"prompt": PROMPT, "seed": seed, "steps": 8}))
        with tempfile.TemporaryDirectory() as tmp:
            dynamic = Path(tmp) / "model.onnx"
            dynamic_copy(bundle.components["vae_decoder"].path, dynamic)
            session = ort.InferenceSession(str(dynamic), providers=["CPUExecutionProvider"])  # weights inline

        def run(z: np.ndarray) -> np.ndarray:
            return session.run(None, {pipe._latent_name: z})[0]

        def image(x: np.ndarray) -> np.ndarray:
            return np.round(np.clip(x / 2 + 0.5, 0, 1) * 255)

        for tile in (8, 10, 12):
            scores, worst = [], 0
            for feeds in recorded["vae_decoder"]:
                z = feeds[pipe._latent_name]
                whole, tiled = image(run(z)), image(decode_tiled(run, z, (tile, tile), bundle.vae_scale))
                scores.append(f"{psnr(tiled, whole):.1f}")
                worst = max(worst, int(np.abs(tiled - whole).max()))
            count = len(starts(16, tile, tile // 4))
            print(f"| {name} | 16x16 | {tile} | {count}x{count} | {', '.join(scores)} | {worst} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("psnr")
    p.add_argument("--threads", type=int, default=2)
    m = sub.add_parser("memory")
    m.add_argument("decoder", type=Path)
    m.add_argument("--size", type=int, default=512)
    m.add_argument("--runs", type=int, default=3)
    m.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    (psnr_table if args.command == "psnr" else memory)(args)


if __name__ == "__main__":
    main()
