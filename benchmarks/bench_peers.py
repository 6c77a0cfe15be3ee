"""edge-imagegen side by side with its peers on the same SD-1.5-architecture weights (issue 19, item 6).

    cd benchmarks && ../.venv/bin/python bench_peers.py [--rounds 3] [--steps 4] [--systems a,b,...]

Systems (each run in its own fresh process, so peak RSS, read from VmHWM, is its own; rounds
interleaved system by system, so machine noise hits them alike):

    pytorch        diffusers' StableDiffusionPipeline, fp32 (--pytorch: the diffusers pipeline folder)
    optimum        Optimum's ORTStableDiffusionPipeline, fp32 (--optimum: the standard Optimum export)
    edge-TIER      edge-imagegen's tiers fp32, int8, int8-lowmem, fp16 (--ours: a bundle with their variants)
    edge-few-step-fp32, -int8  the 1-step SDXS-sized UNet with a TAESD decoder, guidance off (--few-step)
    sdcpp-WTYPE    stable-diffusion.cpp through stable-diffusion-cpp-python, weights converted at load
                   to q8_0 (or f16, f32) from one original-layout checkpoint (--checkpoint)

The bundles come from tools/make_sd15_bundle.py (the export, ``--diffusers``, ``--few-step``, same
seeded weights) and the checkpoint from tools/make_sd_checkpoint.py. Every system gets the same
prompt, 512x512, --steps Euler steps at guidance --guidance, --threads threads. PyTorch and Optimum
run in --dev-python (torch, diffusers, optimum-onnx), stable-diffusion.cpp in --sdcpp-python (its own
venv), ours in this interpreter. With --lock, each child takes that flock first (the machine's
lock for jobs over ~8 GB), so no other heavy job overlaps a measurement.

Printed per system: load s, UNet step s (the median call; for stable-diffusion.cpp its sampling
time over the steps, which runs the conditional and unconditional passes one after the other),
end-to-end s (the generate call, load excluded) and peak RSS, as median and min-max over the
rounds; then the issue's goals as measured ratios. --json keeps every round's figures. --once
names systems too slow for every round (stable-diffusion.cpp on a loaded machine): they run in the
first round only, between the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks_common import EDGE_CHILD, PROMPT, machine, run_child

SIZE = 512
EDGE_TIERS = ("fp32", "int8", "int8-lowmem", "fp16")

# argv[1]: [model, job, threads]; the peers' child scripts end with TIMED_RUN, which times the
# pipeline's UNet calls and the whole call the way EDGE_CHILD does.
PYTORCH = r"""
import json, sys, time
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
model, job, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
t0 = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
"""
OPTIMUM = r"""
import json, sys, time
import onnxruntime as ort
import torch
from diffusers import EulerDiscreteScheduler
from optimum.onnxruntime import ORTStableDiffusionPipeline
model, job, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
options = ort.SessionOptions()
options.intra_op_num_threads = threads
t0 = time.perf_counter()
pipe = ORTStableDiffusionPipeline.from_pretrained(model, provider="CPUExecutionProvider", session_options=options)
"""
TIMED_RUN = r"""
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
load = time.perf_counter() - t0
calls, forward = [], pipe.unet.forward
def timed(*args, **kwargs):
    start = time.perf_counter()
    out = forward(*args, **kwargs)
    calls.append(time.perf_counter() - start)
    return out
pipe.unet.forward = timed
t1 = time.perf_counter()
pipe(job["prompt"], num_inference_steps=job["steps"], guidance_scale=job["guidance"], height=%d, width=%d,
     generator=torch.Generator().manual_seed(job["seed"]))
total = time.perf_counter() - t1
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"load": load, "step": sorted(calls)[len(calls) // 2], "total": total, "rss": hwm,
                  "unet": "fp32"}))
""" % (SIZE, SIZE)
# argv[1]: [checkpoint, wtype, job, threads]
SDCPP = r"""
import io, json, re, sys, time
from stable_diffusion_cpp import StableDiffusion
model, wtype, job, threads = json.loads(sys.argv[1])
class Tee(io.StringIO):  # the binding prints the library's log to sys.stderr: keep a copy to read
    def write(self, text):
        sys.__stderr__.write(text)
        return super().write(text)
sys.stderr = log = Tee()
t0 = time.perf_counter()
sd = StableDiffusion(model_path=model, wtype=wtype, n_threads=threads, verbose=True)
load = time.perf_counter() - t0
t1 = time.perf_counter()
sd.generate_image(prompt=job["prompt"], width=%d, height=%d, sample_steps=job["steps"], cfg_scale=job["guidance"],
                  sample_method="euler", seed=job["seed"])
total = time.perf_counter() - t1
sampling = re.findall(r"sampling completed, taking ([0-9.]+) ?s", log.getvalue())
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"load": load, "step": float(sampling[-1]) / job["steps"] if sampling else float("nan"),
                  "total": total, "rss": hwm, "unet": wtype}))
""" % (SIZE, SIZE)


def systems(args: argparse.Namespace) -> dict[str, tuple[list[str], str, list]]:
    """name -> (interpreter, child code, child args), for every system this machine can run."""
    job = {"prompt": PROMPT, "seed": 1, "steps": args.steps, "guidance": args.guidance}
    few = {**job, "steps": 1, "guidance": 0.0}
    table = {"pytorch": ([args.dev_python], PYTORCH + TIMED_RUN, [args.pytorch, job, args.threads]),
             "optimum": ([args.dev_python], OPTIMUM + TIMED_RUN, [args.optimum, job, args.threads])}
    for tier in EDGE_TIERS:
        table[f"edge-{tier}"] = ([sys.executable], EDGE_CHILD, [args.ours, tier, job, args.threads, None])
    for tier in ("fp32", "int8"):
        table[f"edge-few-step-{tier}"] = ([sys.executable], EDGE_CHILD, [args.few_step, tier, few, args.threads, None])
    for wtype in args.sdcpp_types.split(","):
        table[f"sdcpp-{wtype}"] = ([args.sdcpp_python], SDCPP, [args.checkpoint, wtype, job, args.threads])
    return table


def spread(values: list[float], fmt: str) -> str:
    median = format(statistics.median(values), fmt)
    return median if len(values) == 1 else f"{median} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def goals(med: dict[str, dict[str, float]]) -> list[str]:
    """The issue's goals, each as its measured ratio (or what is missing to compute it)."""
    def ratio(label: str, num: str, den: str, key: str, bound: float) -> str:
        if num not in med or den not in med:
            return f"{label}: not measured ({num} or {den} missing)"
        value = med[num][key] / med[den][key]
        return f"{label}: {value:.2f}x (goal <= {bound}x) {'met' if value <= bound else 'MISSED'}"
    lines = [ratio("int8 end-to-end / Optimum fp32", "edge-int8", "optimum", "total", 0.5),
             ratio("fp32 peak / Optimum fp32 peak", "edge-fp32", "optimum", "rss", 0.6)]
    lines += [ratio(f"1-step tiny decoder ({tier}) / 4-step int8 end-to-end", f"edge-few-step-{tier}", "edge-int8",
                    "total", 0.1) for tier in ("fp32", "int8")]
    if "edge-int8-lowmem" in med:
        peak = med["edge-int8-lowmem"]["rss"]
        lines.append(f"int8-lowmem peak: {peak / 1e9:.2f} GB = {peak / 2**20:.0f} MB (goal <= 1.0 GB, stretch 0.7) "
                     f"{'met' if peak <= 1e9 else 'MISSED'}")
    return lines


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pytorch", default="/work/sd15-diffusers")
    ap.add_argument("--optimum", default="/work/sd15o")
    ap.add_argument("--ours", default="/work/sd15a")
    ap.add_argument("--few-step", default="/work/sdxs-tiny")
    ap.add_argument("--checkpoint", default="/work/sd15.safetensors")
    ap.add_argument("--sdcpp-types", default="q8_0")
    ap.add_argument("--dev-python", default="/work/devvenv/bin/python")
    ap.add_argument("--sdcpp-python", default="/work/sdcppvenv/bin/python")
    ap.add_argument("--systems", help="comma-separated names (default: all)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--once", default="", help="comma-separated systems run in the first round only (the slowest)")
    ap.add_argument("--lock", help="flock this file around each child (e.g. /work/heavy.lock)")
    ap.add_argument("--json", type=Path,
                    help="write every round's figures here (after each run: a run cut short keeps its rounds)")
    ap.add_argument("--table-from", type=Path, metavar="JSON", help="print the table of an earlier --json and exit")
    return ap.parse_args()


def run_rounds(args: argparse.Namespace) -> dict[str, list[dict]]:
    table = systems(args)
    names = args.systems.split(",") if args.systems else list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        sys.exit(f"--systems: unknown {unknown}; known: {', '.join(table)}")
    lock = ["flock", args.lock] if args.lock else []
    results: dict[str, list[dict]] = {name: [] for name in names}
    once = set(args.once.split(",")) - {""}
    for round_no in range(args.rounds):
        for name in [n for n in names if round_no == 0 or n not in once]:
            command, code, child_args = table[name]
            results[name].append(run_child(lock + command, code, child_args, name))
            print(f"round {round_no + 1} {name}: {json.dumps(results[name][-1])}", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps({"args": vars(args), "results": results}, default=str, indent=1))
    return results


def print_table(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    print(f"machine: {machine()}")
    print(f"{SIZE}x{SIZE}, {args.steps} steps (few-step: 1, guidance 0), guidance {args.guidance}, Euler, "
          f"{args.threads} threads, {args.rounds} interleaved rounds (first only: {args.once or 'none'}): "
          "median (min-max)\n")
    print("| system | UNet weights | runs | load s | UNet step s | end-to-end s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, rounds in results.items():
        cells = [spread([r[k] for r in rounds], ".2f") for k in ("load", "step", "total")]
        cells.append(spread([r["rss"] / 2**20 for r in rounds], ".0f"))
        print(f"| {name} | {rounds[0]['unet']} | {len(rounds)} | {' | '.join(cells)} |")
    med = {name: {k: statistics.median(r[k] for r in rounds) for k in ("total", "rss")}
           for name, rounds in results.items()}
    print("\n" + "\n".join(goals(med)))


def main() -> None:
    args = parse_args()
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print_table(argparse.Namespace(**saved["args"]), {k: v for k, v in saved["results"].items() if v})
    else:
        print_table(args, run_rounds(args))


if __name__ == "__main__":
    main()
