#!/usr/bin/env python3
"""Cross-architecture reproducibility of edge-imagegen: the same seed gives the same initial
latents bit for bit, and the same prompt/seed/steps gives final images within a small tolerance,
on x86-64 and arm64.

    python tests/arm64/repro.py record --out DIR     # on each machine (tests/arm64/run.sh does arm64)
    python tests/arm64/repro.py compare DIR_A DIR_B  # exit 1 when latents differ or images exceed tolerance
    python tests/arm64/repro.py fixture              # rewrite tests/fixtures/latents_sha256.json

``record`` writes, for the embedded model:
- ``latents_seed<S>.f32``: the initial latents of seed S (raw little-endian float32, C order, shape
  in record.json), made exactly as the pipeline makes them (edge.pipeline.make_rng + gaussian);
- ``<tier>_<scheduler>_seed<S>.png``: the final image of PROMPT / STEPS for IMAGE_SEEDS at each
  precision tier the bundle supports (edge.memory.TIERS via tier_plan; int8-lowmem, which loads
  the same int8 variants one at a time, for SEED only), with
  Pipeline(bundle, RuntimeOptions(threads=1), plan), plus an ancestral-scheduler run at fp32 whose
  per-step noise comes from the same generator;
- ``<tier>_text_embeddings.f32``, ``<tier>_unet_step1.f32``: one text-encoder pass and the first
  guided UNet prediction on identical inputs, to see where image differences start;
- ``record.json``: sha256 of every file, shapes, and the machine and library versions.

Only the runtime dependencies (onnxruntime, numpy, pillow and the installed package) are needed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np

SEEDS = (0, 42, 2**32 + 7)  # 2**32 + 7: a seed above 32 bits, as the CLI accepts
PROMPT = "knolling of 2 red gears and a blue battery on a pure white background"
NEGATIVE = "shadow, blurry"
SEED = 42
IMAGE_SEEDS = (42, 7, 1234)  # images at fp32, fp16 and int8; int8-lowmem and euler_a at SEED only
STEPS = 20
GUIDANCE = 7.5
ANCESTRAL = "euler_a"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "latents_sha256.json"

# Image tolerance between architectures, per tier: (max abs difference of 255, min PSNR dB).
# Measured (benchmarks/README.md, "On arm64 (emulated)"): x86-64 (AVX-512) against an emulated
# Cortex-A76, onnxruntime 1.32.0, three seeds, 20 Euler steps, worst of each tier.
#   tiny-sd (random weights):  fp32 1 / 89 dB, fp16 3 / 52.4 dB, int8 51 / 28.8 dB
#   knolling-tiny (trained):   fp32 1 / 95 dB, fp16 12 / 52.8 dB, int8 60 / 31.8 dB
# fp32 agrees to one level. FP16 and INT8 agree only to within each variant's own error: the
# aarch64 build runs FP16 kernels where x86-64 computes in FP32 (arm64's own fp16-vs-fp32 image is
# 13 / 52.6 dB on knolling-tiny, x86-64's 1 / 64.6 dB), and re-quantizing activations after every
# layer turns an ulp of float difference into a whole quantization step now and then, which 20
# steps carry on (each architecture's int8 image sits ~33 dB, max abs 100-124, from its fp32 one).
# So max abs is bounded by about 2x the measured worst and PSNR is the real check; unrelated
# images (other seeds) score ~13 dB.
TOLERANCE = {"fp32": (2, 60.0), "fp16": (24, 45.0), "int8": (128, 25.0), "int8-lowmem": (128, 25.0)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def latent_shape(pipe) -> tuple[int, ...]:
    """The shape Pipeline.generate draws for the bundle's default size."""
    width, height = pipe.default_size()
    scale = pipe.bundle.vae_scale
    return (1, pipe.latent_channels, height // scale, width // scale)


def initial_latents(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    from edge.pipeline import gaussian, make_rng
    return gaussian(make_rng(seed), shape)


def latents_table(shape: tuple[int, ...]) -> dict[str, dict]:
    out = {}
    for seed in SEEDS:
        x = np.ascontiguousarray(initial_latents(seed, shape), dtype="<f4")
        out[str(seed)] = {"shape": list(shape), "dtype": "float32 little-endian",
                          "sha256": sha256(x.tobytes()), "first": [float(v) for v in x.ravel()[:4]]}
    return out


def first_step(pipe) -> dict[str, np.ndarray]:
    """Text embeddings of PROMPT and the guided noise prediction of the first step for SEED."""
    from edge import editing, schedulers

    scheduler = schedulers.from_config(pipe.bundle.scheduler_config, None)
    scheduler.set_timesteps(STEPS)
    with pipe.text_encoder.loaded():
        cond = pipe.encode(pipe.tokenizer.encode(PROMPT).ids)
        uncond = pipe.encode(pipe.tokenizer.encode(NEGATIVE).ids)
    x = initial_latents(SEED, latent_shape(pipe)) * scheduler.init_noise_sigma
    with pipe.unet.loaded():
        eps = pipe._predict_noise(scheduler.scale_model_input(x, 0), float(scheduler.timesteps[0]),
                                  editing.text_guide(cond, uncond, GUIDANCE))
    return {"text_embeddings": cond, "unet_step1": eps}


def versions() -> dict[str, str]:
    import onnxruntime
    import PIL
    out = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
           "onnxruntime": onnxruntime.__version__, "pillow": PIL.__version__}
    try:
        from importlib.metadata import version
        out["edge-imagegen"] = version("edge-imagegen")
    except Exception:  # noqa: BLE001 - informative only
        pass
    return out


def record(out: Path) -> dict:
    from edge.bundle import load_bundle
    from edge.jobs import Job
    from edge.memory import TIERS, load_manifest, tier_plan
    from edge.pipeline import Pipeline
    from edge.providers import RuntimeOptions

    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle()
    manifest = load_manifest(bundle)
    runtime = RuntimeOptions(threads=1)
    result = {"versions": versions(), "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED,
              "steps": STEPS, "guidance": GUIDANCE, "latents": {}, "tensors": {}, "images": {}}

    runs = [(tier, None, seed) for seed in IMAGE_SEEDS for tier in TIERS if tier != "int8-lowmem"]
    runs += [(tier, None, SEED) for tier in TIERS if tier == "int8-lowmem"] + [("fp32", ANCESTRAL, SEED)]
    pipes = {}
    for tier, scheduler, seed in runs:
        plan = tier_plan(bundle, manifest, tier)
        if tier not in pipes:
            pipes[tier] = pipe = Pipeline(bundle, runtime, plan)
            if not result["latents"]:
                shape = latent_shape(pipe)
                for s in SEEDS:
                    x = np.ascontiguousarray(initial_latents(s, shape), dtype="<f4")
                    name = f"latents_seed{s}.f32"
                    (out / name).write_bytes(x.tobytes())
                    result["latents"][str(s)] = {"file": name, "shape": list(shape), "sha256": sha256(x.tobytes())}
            # One text-encoder pass and one UNet call (step 1, CFG applied) on the same inputs:
            # where a difference in the final image starts.
            for stage, tensor in first_step(pipe).items():
                name = f"{tier}_{stage}.f32"
                data = np.ascontiguousarray(tensor, dtype="<f4")
                (out / name).write_bytes(data.tobytes())
                result["tensors"][f"{tier}_{stage}"] = {"file": name, "shape": list(data.shape),
                                                        "sha256": sha256(data.tobytes())}
        pipe = pipes[tier]
        job = Job(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=seed,
                  scheduler=scheduler)
        res = pipe.generate(job)
        image = res.images[0].image
        key = f"{tier}_{scheduler or res.scheduler}_seed{seed}"
        image.save(out / f"{key}.png")
        pixels = np.asarray(image)
        result["images"][key] = {"file": f"{key}.png", "tier": tier, "precisions": plan.precisions,
                                 "scheduler": res.scheduler, "seed": seed, "size": list(image.size),
                                 "pixels_sha256": sha256(pixels.tobytes()),
                                 "seconds": round(float(res.timings["total"]), 3)}
        print(f"{key}: {image.size[0]}x{image.size[1]} pixels sha256 {result['images'][key]['pixels_sha256'][:16]}"
              f" ({res.timings['total']:.2f} s)", flush=True)
    (out / "record.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"recorded in {out}")
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def compare(a_dir: Path, b_dir: Path, tolerance: dict = TOLERANCE) -> bool:
    from PIL import Image

    a, b = (json.loads((d / "record.json").read_text()) for d in (a_dir, b_dir))
    for name, d, v in (("A", a_dir, a["versions"]), ("B", b_dir, b["versions"])):
        print(f"{name}: {d} ({v['machine']}, numpy {v['numpy']}, onnxruntime {v['onnxruntime']}, "
              f"pillow {v['pillow']})")
    ok = True
    for seed, la in a["latents"].items():
        lb = b["latents"].get(seed)
        same = lb is not None and (a_dir / la["file"]).read_bytes() == (b_dir / lb["file"]).read_bytes()
        ok &= same
        print(f"initial latents, seed {seed} {la['shape']}: {'bit-identical' if same else 'DIFFERENT'} "
              f"(sha256 {la['sha256'][:16]} / {lb['sha256'][:16] if lb else '-'})")
    print("first step (same seed and prompt, each side its own text embeddings), max abs diff / max abs value:")
    for key, ta in a.get("tensors", {}).items():
        tb = b.get("tensors", {}).get(key)
        if tb is None:
            continue
        xa, xb = (np.frombuffer((d / t["file"]).read_bytes(), dtype="<f4") for d, t in ((a_dir, ta), (b_dir, tb)))
        diff = float(np.max(np.abs(xa.astype(np.float64) - xb))) if xa.shape == xb.shape else math.nan
        print(f"  {key:<26} {diff:.3g} / {float(np.max(np.abs(xa))):.3g}"
              + ("  (bit-identical)" if ta["sha256"] == tb["sha256"] else ""))
    print(f"final images: prompt {a['prompt']!r}, {a['steps']} steps, guidance {a['guidance']}; "
          "tolerance per tier: max abs diff <= N of 255 and PSNR >= P dB")
    worst: dict[str, tuple[int, float]] = {}
    for key, ia in a["images"].items():
        ib = b["images"].get(key)
        if ib is None:
            print(f"  {key}: missing in B")
            ok = False
            continue
        pa = np.asarray(Image.open(a_dir / ia["file"]).convert("RGB")).astype(np.int16)
        pb = np.asarray(Image.open(b_dir / ib["file"]).convert("RGB")).astype(np.int16)
        if pa.shape != pb.shape:
            print(f"  {key}: shapes differ {pa.shape} / {pb.shape}")
            ok = False
            continue
        diff = np.abs(pa - pb)
        max_abs, db = int(diff.max()), psnr(pa, pb)
        limit_abs, limit_db = tolerance[ia["tier"]]
        within = max_abs <= limit_abs and db >= limit_db
        ok &= within
        w = worst.get(ia["tier"], (0, math.inf))
        worst[ia["tier"]] = (max(w[0], max_abs), min(w[1], db))
        label = "identical" if max_abs == 0 else f"{np.count_nonzero(diff) / diff.size:.1%} of values differ"
        print(f"  {key:<28} max abs {max_abs:3d}, PSNR {fmt_db(db):>5} dB, {label}; tolerance "
              f"{limit_abs} / {limit_db:g} dB{'' if within else '  OUT OF TOLERANCE'}")
    for name, rec, d in (("A", a, a_dir), ("B", b, b_dir)):  # for scale: each variant's own error
        for tier in ("fp16", "int8"):
            pairs = [(k, k.replace(tier, "fp32", 1)) for k, i in rec["images"].items()
                     if i["tier"] == tier and k.replace(tier, "fp32", 1) in rec["images"]]
            if pairs:
                stats = [image_diff(d / rec["images"][k]["file"], d / rec["images"][f]["file"]) for k, f in pairs]
                print(f"for scale, {tier} against fp32 on {name} ({rec['versions']['machine']}) itself: max abs "
                      f"{max(m for m, _ in stats)}, PSNR {fmt_db(min(x for _, x in stats))} dB "
                      f"(worst of {len(stats)} seeds)")
    print("worst per tier: " + "; ".join(f"{t} max abs {m}, PSNR {fmt_db(d)} dB" for t, (m, d) in worst.items()))
    print("result:", "OK" if ok else "FAILED")
    return ok


def image_diff(path_a: Path, path_b: Path) -> tuple[int, float]:
    from PIL import Image
    pa, pb = (np.asarray(Image.open(p).convert("RGB")).astype(np.int16) for p in (path_a, path_b))
    return int(np.abs(pa - pb).max()), psnr(pa, pb)


def fmt_db(db: float) -> str:
    return "inf" if math.isinf(db) else f"{db:.1f}"


def write_fixture(path: Path = FIXTURE) -> None:
    from edge.bundle import load_bundle
    from edge.pipeline import Pipeline
    from edge.providers import RuntimeOptions

    shape = latent_shape(Pipeline(load_bundle(), RuntimeOptions(threads=1)))
    data = {"about": "sha256 of the initial latents (edge.pipeline.gaussian(make_rng(seed), shape), raw "
                     "little-endian float32) of the embedded model, recorded on x86-64 by "
                     "tests/arm64/repro.py fixture; every machine must reproduce them bit for bit",
            "recorded_with": versions(), "latents": latents_table(shape)}
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("record", help="write latents, images and record.json")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("compare", help="compare two recordings")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p = sub.add_parser("fixture", help="rewrite the reference latents hashes")
    p.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)
    if args.cmd == "record":
        record(args.out)
    elif args.cmd == "compare":
        return 0 if compare(args.a, args.b) else 1
    else:
        write_fixture(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
