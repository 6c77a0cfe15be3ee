"""Precision tiers side by side: load time, UNet time per step, end-to-end time, peak RSS.

    python benchmarks/bench_tiers.py [--model DIR] [--steps 20] [--runs 3] [--tiers fp32,int8,...]

A tier may name a graph optimization level after an @ (``fp16@extended,fp16@all``; without one:
``runtime.graph_optimization: auto``), to compare levels side by side. Each tier runs in its own fresh process (so peak RSS, read from VmHWM, is that tier's alone),
tiers interleaved run by run so that machine noise hits them alike. Prints medians and the
ratio of each tier's UNet step to FP32's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchmarks_common import machine
from edge.memory import TIERS

CHILD = r"""
import json, sys, time
from edge.bundle import load_bundle
from edge.jobs import parse_job
from edge.profile import _status_bytes
from edge.memory import load_manifest, tier_plan
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions
model, spec, steps, threads = json.loads(sys.argv[1])
tier, _, level = spec.partition("@")
bundle = load_bundle(model)
t0 = time.perf_counter()
pipe = Pipeline(bundle, RuntimeOptions(threads=threads, graph_optimization=level or "auto"),
                tier_plan(bundle, load_manifest(bundle), tier))
load = time.perf_counter() - t0
r = pipe.generate(parse_job({"prompt": "knolling of 2 red gears and a blue battery", "seed": 1, "steps": steps}))
print(json.dumps({"load": load, "step": sorted(r.timings["steps"])[len(r.timings["steps"]) // 2],
                  "total": r.timings["total"], "rss": _status_bytes("VmHWM")}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tiers", default=",".join(TIERS))
    args = ap.parse_args()
    tiers = args.tiers.split(",")
    results: dict[str, list[dict]] = {t: [] for t in tiers}
    for _ in range(args.runs):
        for tier in tiers:
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([args.model, tier, args.steps, args.threads])],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{tier} failed:\n{out.stderr}")
            results[tier].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"machine: {machine()}")
    print(f"model: {args.model or 'embedded knolling-tiny'}, {args.steps} steps, {args.runs} runs per tier, medians\n")
    print("| tier | load s | UNet step s | step vs fp32 | end-to-end s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    med = {t: {k: statistics.median(r[k] for r in rs) for k in ("load", "step", "total", "rss")}
           for t, rs in results.items()}
    base = med.get("fp32", {}).get("step")
    for tier, m in med.items():
        ratio = f"{m['step'] / base:.2f}x" if base else "-"
        print(f"| {tier} | {m['load']:.2f} | {m['step']:.3f} | {ratio} | {m['total']:.2f} | {m['rss'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
