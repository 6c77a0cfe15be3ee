"""Which stage of one generation sets a tier's peak RSS: text encoder and UNet steps, or the VAE decode.

    python benchmarks/bench_stage_peaks.py --model DIR [--tier int8-lowmem] [--steps 4]

A thread samples VmRSS every 5 ms while the pipeline generates; samples are split at the last
step's callback (after it only the VAE decode runs). Prints the largest sample of each part and
the process's VmHWM (exact; a sampled maximum can miss a peak shorter than the interval).
"""

from __future__ import annotations

import argparse
import threading
import time

from benchmarks_common import machine
from edge.bundle import load_bundle
from edge.jobs import parse_job
from edge.memory import load_manifest, tier_plan
from edge.pipeline import Pipeline
from edge.profile import _status_bytes
from edge.providers import RuntimeOptions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tier", default="int8-lowmem")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    bundle = load_bundle(args.model)
    pipe = Pipeline(bundle, RuntimeOptions(threads=args.threads), tier_plan(bundle, load_manifest(bundle), args.tier))
    loaded = _status_bytes("VmRSS")
    peaks = {"steps": 0, "decode": 0}
    stage, done = ["steps"], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks[stage[0]] = max(peaks[stage[0]], _status_bytes("VmRSS"))
            time.sleep(0.005)

    def on_step(step) -> None:
        if step.step == step.steps:  # the last: only the decode is left
            stage[0] = "decode"

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    pipe.generate(parse_job({"prompt": "knolling of 2 red gears and a blue battery", "seed": 1, "steps": args.steps}),
                  on_step=on_step)
    done.set()
    sampler.join()
    mb = 1 << 20
    print(f"machine: {machine()}")
    print(f"{args.model}, tier {args.tier}, {args.steps} steps: RSS after load {loaded / mb:.0f} MB, "
          f"text encoder and steps {peaks['steps'] / mb:.0f} MB, VAE decode {peaks['decode'] / mb:.0f} MB, "
          f"VmHWM {_status_bytes('VmHWM') / mb:.0f} MB")


if __name__ == "__main__":
    main()
