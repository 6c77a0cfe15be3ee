"""Precision tiers side by side: load time, UNet time per step, end-to-end time, peak RSS.

    python benchmarks/bench_tiers.py [--model DIR] [--steps 20] [--runs 3] [--tiers fp32,int8,...]

A tier may name a graph optimization level after an @ (``fp16@extended,fp16@all``; without one:
``runtime.graph_optimization: auto``), to compare levels side by side. Each tier runs in its own
fresh process (so peak RSS, read from VmHWM, is that tier's alone),
tiers interleaved run by run so that machine noise hits them alike. Prints medians and the
ratio of each tier's UNet step to FP32's.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks_common import EDGE_CHILD, PROMPT, machine, run_child
from edge.memory import TIERS


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
            job = {"prompt": PROMPT, "seed": 1, "steps": args.steps}
            child_args = [args.model, tier, job, args.threads, None]
            results[tier].append(run_child([sys.executable], EDGE_CHILD, child_args, tier))
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
