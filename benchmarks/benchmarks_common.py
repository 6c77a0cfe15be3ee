"""What every benchmark prints first (the machine it ran on), and the fresh-process runs of
edge-imagegen's tiers that bench_tiers.py and bench_peers.py share."""

import json
import platform
import subprocess
from pathlib import Path

import onnxruntime as ort

from edge.providers import physical_cores

PROMPT = "knolling of 2 red gears and a blue battery"

# argv[1]: [model, tier[@level], job fields, threads, decoder or null]. Prints one JSON line: load s,
# median UNet step s, end-to-end s (the generate call), peak RSS bytes (VmHWM: this process's own),
# the UNet's precision (a tier falls back to what the bundle has).
EDGE_CHILD = r"""
import json, sys, time
from edge.bundle import load_bundle
from edge.jobs import parse_job
from edge.profile import _status_bytes
from edge.memory import load_manifest, tier_plan
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions
model, spec, job, threads, decoder = json.loads(sys.argv[1])
tier, _, level = spec.partition("@")  # "fp16@all": the tier at that graph optimization level
bundle = load_bundle(model, decoder=decoder)
t0 = time.perf_counter()
plan = tier_plan(bundle, load_manifest(bundle), tier)
pipe = Pipeline(bundle, RuntimeOptions(threads=threads, graph_optimization=level or "auto"), plan)
load = time.perf_counter() - t0
r = pipe.generate(parse_job(job))
print(json.dumps({"load": load, "step": sorted(r.timings["steps"])[len(r.timings["steps"]) // 2],
                  "total": r.timings["total"], "rss": _status_bytes("VmHWM"), "unet": plan.precisions["unet"]}))
"""


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model}, {physical_cores()} physical cores, {platform.machine()}, onnxruntime {ort.__version__}"


def run_child(command: list[str], code: str, args: list, name: str) -> dict:
    """Run ``code`` as ``command -c code json(args)`` in a fresh process; its last stdout line, parsed."""
    out = subprocess.run([*command, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
