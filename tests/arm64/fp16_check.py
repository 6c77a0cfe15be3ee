#!/usr/bin/env python3
"""The FP16 tier where onnxruntime has native FP16 kernels (aarch64) against x86-64, which casts.

    python tests/arm64/fp16_check.py record --out DIR    # on each machine (emulated: see benchmarks/README.md)
    python tests/arm64/fp16_check.py compare DIR_A DIR_B

``record``, on the embedded model: the final images of repro.py's prompt and seed at the fp32 tier
and at the fp16 tier with ``runtime.graph_optimization`` auto (level "all" on aarch64) and
extended, with their wall times; and, for each FP16 component at both levels, the op types of the
graph ONNX Runtime runs (its optimized model: Cast nodes where it computes in FP32, NhwcFusedConv
where the NHWC FP16 convolution is used), when the ``onnx`` package is installed.
``compare`` prints each image's PSNR against the other machine's and against its own fp32 image,
and the op counts side by side. Timings under emulation say nothing about a board.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from repro import GUIDANCE, NEGATIVE, PROMPT, SEED, STEPS, psnr  # noqa: E402

RUNS = (("fp32", "auto"), ("fp16", "auto"), ("fp16", "extended"))
OPS = ("Cast", "Conv", "FusedConv", "NhwcFusedConv", "Transpose", "MatMul", "Gemm")


def op_census(path: Path, level: str) -> dict[str, int] | None:
    """Op types of the graph a CPU session of ``path`` runs at ``level``; None without ``onnx``."""
    try:
        import onnx
    except ImportError:
        return None
    import onnxruntime as ort
    from edge.providers import OPT_LEVELS
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = OPT_LEVELS[level]
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        nodes = Counter(node.op_type for node in onnx.load(so.optimized_model_filepath).graph.node)
    return {"nodes": sum(nodes.values()), **{op: nodes.get(op, 0) for op in OPS}}


def record(out: Path) -> None:
    import onnxruntime as ort
    from edge.bundle import COMPONENTS, load_bundle
    from edge.jobs import Job
    from edge.memory import load_manifest, tier_plan
    from edge.pipeline import Pipeline
    from edge.providers import RuntimeOptions, optimization_level

    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle()
    manifest = load_manifest(bundle)
    result = {"machine": platform.machine(), "onnxruntime": ort.__version__, "images": {}, "ops": {}}
    for tier, level in RUNS:
        runtime = RuntimeOptions(threads=1, graph_optimization=level)
        pipe = Pipeline(bundle, runtime, tier_plan(bundle, manifest, tier))
        res = pipe.generate(Job(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED))
        key = f"{tier}_{level}"
        res.images[0].image.save(out / f"{key}.png")
        levels = {c: optimization_level(runtime, bundle.components[c].variants[tier]) for c in COMPONENTS}
        result["images"][key] = {"file": f"{key}.png", "levels": levels, "seconds": round(res.timings["total"], 2)}
        print(f"{key}: levels {levels}, {res.timings['total']:.1f} s", flush=True)
    for component in COMPONENTS:
        path = bundle.components[component].variants["fp16"]
        result["ops"][component] = {level: op_census(path, level) for level in ("extended", "all")}
    (out / "fp16.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ops"], indent=1))


def compare(a_dir: Path, b_dir: Path) -> None:
    a, b = (json.loads((d / "fp16.json").read_text()) for d in (a_dir, b_dir))

    def pixels(d: Path, key: str) -> np.ndarray:
        return np.asarray(Image.open(d / f"{key}.png").convert("RGB"))

    print(f"A: {a['machine']}, onnxruntime {a['onnxruntime']}; B: {b['machine']}, onnxruntime {b['onnxruntime']}")
    for key in a["images"]:
        pa, pb = pixels(a_dir, key), pixels(b_dir, key)
        diff = int(np.abs(pa.astype(int) - pb.astype(int)).max())
        own = [f"{psnr(pixels(d, key), pixels(d, 'fp32_auto')):.1f}" for d in (a_dir, b_dir)]
        print(f"{key:14s} A vs B: max abs {diff:3d}, PSNR {psnr(pa, pb):5.1f} dB; against own fp32: "
              f"A {own[0]} dB, B {own[1]} dB; levels B {b['images'][key]['levels']}; "
              f"seconds A {a['images'][key]['seconds']}, B {b['images'][key]['seconds']}")
    for component, levels in a["ops"].items():
        for level, census in levels.items():
            print(f"{component:12s} fp16 at {level:8s} A {census}\n{'':25s} B {b['ops'][component][level]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("record").add_argument("--out", type=Path, required=True)
    p = sub.add_parser("compare")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.cmd == "record":
        record(args.out)
    else:
        compare(args.a, args.b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
