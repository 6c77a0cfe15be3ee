"""LoRA switch cost against a cold start of the UNet session, and the memory the session cache takes.

    python benchmarks/bench_lora.py [--model DIR] [--runs 5] [--rank 8] [--precision fp32] [--cache-sets N]

A seeded kohya LoRA of the given rank on every attention projection, feed-forward and resnet conv1 of
the UNet (and the text encoder's attention) is written for the model; then, run by run and interleaved:
a cold UNet session (``make_session``, with no LoRA set cached), a switch to a LoRA set not seen before
(weights fused, new UNet and text encoder sessions), back to no LoRA, back to that set (cached), and a
switch of strength only (also a new set); then the UNet's fusing alone (W' computed, re-quantized for
INT8: the arithmetic of a switch without its sessions). RSS (VmRSS) is read before the first set, after it, and at the
end with the sets the cache holds (``--cache-sets``, default all of them: 1 for a bundle of GBs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks_common import machine  # noqa: E402
from edge.bundle import load_bundle  # noqa: E402
from edge.config import LoraConfig  # noqa: E402
from edge.jobs import LoraRef  # noqa: E402
from edge.lora_apply import fused_initializers  # noqa: E402
from edge.lora_graph import weight_map  # noqa: E402
from edge.memory import MB, fixed_plan, load_manifest, lora_set_bytes  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.providers import RuntimeOptions, make_session  # noqa: E402
from lora_files import random_kohya_lora  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "q_proj", "v_proj")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    parser.add_argument("--cache-sets", type=int, help="LoRA sets kept (default: every set of the run)")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    runtime = RuntimeOptions(threads=args.threads)
    modules = {}
    for component in ("unet", "text_encoder"):
        path = bundle.components[component].path
        for module in weight_map(path)[1]:
            if module.endswith(TARGETS):
                modules[module] = (component, path)
    precisions = {c: args.precision if args.precision in comp.variants else "fp32"
                  for c, comp in bundle.components.items()}
    unet_file = bundle.components["unet"].variants[args.precision]
    cache = args.runs * 2 if args.cache_sets is None else args.cache_sets
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(("a", "b")):
            random_kohya_lora(Path(tmp) / f"{name}.safetensors", modules, seed=i, rank=args.rank, alpha=args.rank)
        size = (Path(tmp) / "a.safetensors").stat().st_size
        pipe = Pipeline(bundle, runtime, fixed_plan(precisions), lora=LoraConfig(dir=tmp, cache_sessions=cache))
        pipe.lora.check((LoraRef("a"), LoraRef("b")))
        times: dict[str, list[float]] = {k: [] for k in ("cold UNet session", "new LoRA set", "back to no LoRA",
                                                         "cached set", "strength change", "UNet fusing only")}
        rss = {"before": rss_mb()}
        for run in range(args.runs):
            if args.cache_sets is not None:  # a bundle of GBs: only the base sessions while the cold one is built
                pipe.lora.activate(())
                pipe.lora.drop_cache()
            t0 = time.perf_counter()
            make_session(unet_file, runtime, "unet")
            times["cold UNet session"].append(time.perf_counter() - t0)
            strength = 0.5 + run * 0.1
            for key, loras in (("new LoRA set", (LoraRef("a", strength),)), ("back to no LoRA", ()),
                               ("cached set", (LoraRef("a", strength),)),
                               ("strength change", (LoraRef("a", strength + 0.05),))):
                t0 = time.perf_counter()
                pipe.lora.activate(loras)
                times[key].append(time.perf_counter() - t0)
                if run == 0 and key == "new LoRA set":
                    rss["first set"] = rss_mb()
            t0 = time.perf_counter()  # the arithmetic of a switch, without the sessions
            fused_initializers(unet_file, bundle.components["unet"].path, pipe.lora._active(loras, "unet"))
            times["UNet fusing only"].append(time.perf_counter() - t0)
        rss["end"], cached = rss_mb(), len(pipe.lora._sessions)
    print(f"machine: {machine()}")
    print(f"model: {bundle.root.name} {args.precision}; LoRA rank {args.rank} on {len(modules)} layers, "
          f"{size / 1e6:.1f} MB; {args.runs} runs, {args.threads} threads")
    cold = statistics.median(times["cold UNet session"])
    for key, values in times.items():
        median = statistics.median(values)
        print(f"  {key:20s} median {median * 1000:8.1f} ms  ({median / cold:.2f}x a cold UNet session)")
    estimate = lora_set_bytes(bundle, load_manifest(bundle), precisions) / MB
    print(f"  RSS: {rss['before']:.0f} MB before, {rss['first set']:.0f} MB with the first set "
          f"({rss['first set'] - rss['before']:.0f} MB), {rss['end']:.0f} MB at the end with {cached} cached "
          f"({(rss['end'] - rss['before']) / max(1, cached):.1f} MB a set); the memory plan's estimate "
          f"{estimate:.1f} MB a set")


if __name__ == "__main__":
    main()
