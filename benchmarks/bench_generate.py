"""Time `generate` stages on a model bundle (default: the embedded one).

    python benchmarks/bench_generate.py [--model DIR] [--steps 20] [--runs 5] [--threads 0]

Prints the machine, then medians (and min/max) over the runs of: model load, tokenize, text
encoding, one UNet step, VAE decode and the whole job, plus peak RSS. Load is timed in a fresh
process each run so that file caches, not sessions, are shared. "outside the UNet" is a step's
time less the UNet session's own ``run``: the scheduler, CFG arithmetic and input conversions,
all that buffer reuse or I/O binding could save.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from benchmarks_common import machine
from edge.bundle import load_bundle
from edge.jobs import parse_job
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions, physical_cores


def load_time(model: str | None, threads: int) -> float:
    code = ("import time,sys; from edge.bundle import load_bundle; from edge.pipeline import Pipeline; "
            "from edge.providers import RuntimeOptions; t=time.perf_counter(); "
            f"Pipeline(load_bundle({model!r}), RuntimeOptions(threads={threads})); "
            "print(time.perf_counter()-t)")
    return float(subprocess.check_output([sys.executable, "-c", code]).decode().split()[-1])


class TimedSession:
    """Wraps an InferenceSession and records how long each ``run`` took."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, []

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.inner.run(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - t0)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:9.1f} ms  (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = ap.parse_args()

    loads = [load_time(args.model, args.threads) for _ in range(args.runs)]
    pipe = Pipeline(load_bundle(args.model), RuntimeOptions(threads=args.threads))
    job = parse_job({"prompt": "knolling of 2 red gears and a blue battery on white", "steps": args.steps, "seed": 1})
    pipe.generate(job)  # warm-up: first runs allocate the arenas
    rows: dict[str, list[float]] = {k: [] for k in ("tokenize", "encode", "unet step", "outside the UNet",
                                                    "decode", "total")}
    pipe.unet._session = unet = TimedSession(pipe.unet._session)
    for _ in range(args.runs):
        unet.seconds.clear()
        t = pipe.generate(job).timings
        for key in ("tokenize", "encode", "decode", "total"):
            rows[key].append(t[key])
        rows["unet step"].append(statistics.median(t["steps"]))
        rows["outside the UNet"].append((sum(t["steps"]) - sum(unet.seconds)) / len(t["steps"]))
    print(f"machine: {machine()}")
    print(f"model: {pipe.bundle.root.name}, {args.steps} steps, guidance 7.5, {args.runs} runs, "
          f"threads {args.threads or physical_cores()}, provider {pipe.provider}")
    print(f"{'load (new process)':20s}{summary(loads)}")
    for key, values in rows.items():
        print(f"{key:20s}{summary(values)}")
    print(f"{'peak RSS':20s}{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:9.1f} MB")
    if args.json:
        print(json.dumps({"load": loads, **rows}))


if __name__ == "__main__":
    main()
