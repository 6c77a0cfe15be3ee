"""One UNet call with attention as exported, in query slices, and as MultiHeadAttention (edge.attention).

    python benchmarks/bench_attention.py UNET_DIR SCRATCH_DIR [--rounds 2] [--chunk 512] [--threads 2]

Writes the rewritten graphs into SCRATCH_DIR/{chunk,mha} with the external weights hard-linked
(ONNX Runtime refuses external data reached through a symlink; UNET_DIR is left as it is), then
runs each graph in a fresh process per round, rounds interleaved: session load, two calls at
batch 2 (batched CFG) on seeded random inputs. Prints the second call's time, the peak RSS
(VmHWM) and the peak less the RSS after loading (the call's own memory), with the largest
difference of each rewritten graph's output from the exported one's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks_common import machine
from edge.attention import lean_attention_file

CHILD = r"""
import json, sys, time
import numpy as np
from edge.profile import _status_bytes
from edge.providers import RuntimeOptions, make_session
path, threads, out = json.loads(sys.argv[1])
t0 = time.perf_counter()
session = make_session(__import__("pathlib").Path(path), RuntimeOptions(threads=threads), "unet")
load, loaded = time.perf_counter() - t0, _status_bytes("VmRSS")
rng = np.random.default_rng(0)
feed = {}
for value in session.get_inputs():
    shape = [d if isinstance(d, int) else 2 for d in value.shape]
    dtype = np.float32 if "float" in value.type else np.int64
    feed[value.name] = (np.full(shape, 500, dtype) if value.name == "timestep"
                        else np.asarray(rng.standard_normal(shape), dtype))
calls = []
for _ in range(2):
    t0 = time.perf_counter()
    result = session.run(None, feed)[0]
    calls.append(time.perf_counter() - t0)
np.save(out, result)
print(json.dumps({"load": load, "call": calls[-1], "first": calls[0], "rss": _status_bytes("VmHWM"),
                  "loaded": loaded}))
"""


def prepare(unet: Path, scratch: Path, chunk: int) -> dict[str, Path]:
    graphs = {"exported": unet / "model.onnx"}
    for mode in ("chunk", "mha"):
        folder = scratch / mode
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in unet.iterdir():
            if f.name.startswith("model.onnx"):  # the graph and its external weights
                (shutil.copy if f.name == "model.onnx" else os.link)(f, folder / f.name)
        count = lean_attention_file(folder / "model.onnx", mode, chunk)
        print(f"{mode}: {count} attentions rewritten", flush=True)
        graphs[mode] = folder / "model.onnx"
    return graphs


def main() -> None:
    import numpy as np
    ap = argparse.ArgumentParser()
    ap.add_argument("unet", type=Path)
    ap.add_argument("scratch", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    graphs = prepare(args.unet, args.scratch, args.chunk)
    results: dict[str, list[dict]] = {name: [] for name in graphs}
    for _ in range(args.rounds):
        for name, path in graphs.items():
            out = args.scratch / f"{name}.npy"
            run = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(path), args.threads, str(out)])],
                                 capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{name} failed:\n{run.stderr}")
            results[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
    reference = np.load(args.scratch / "exported.npy")
    print(f"machine: {machine()}")
    print(f"UNet {args.unet}, batch 2, {args.threads} threads, {args.rounds} rounds interleaved, medians (range)\n")
    print("| attention | load s | call s | first call s | peak RSS MB | call's own MB | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    mb = 1 << 20
    for name, rows in results.items():
        def cell(key: str, scale: float = 1.0, digits: int = 2) -> str:
            values = [r[key] / scale for r in rows]
            return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
        own = [(r["rss"] - r["loaded"]) / mb for r in rows]
        diff = float(np.abs(np.load(args.scratch / f"{name}.npy") - reference).max())
        print(f"| {name} | {cell('load')} | {cell('call')} | {cell('first')} | {cell('rss', mb, 0)} | "
              f"{statistics.median(own):.0f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
