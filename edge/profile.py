"""``edge-imagegen profile``: measure what each variant of a bundle costs on this machine, and how
faithful it is, into ``variants.json`` (:mod:`edge.variants`); ``quantize`` uses the fidelity check.

Peak RSS is measured in a fresh process per variant: the resident set after loading and running
the session, minus what the process held before loading it. The variants the int8-lowmem tier
picks are measured a second time the way that tier runs them (``lowmem_peak_rss_bytes``: batch 1,
no arena, lean malloc), since that is what decides whether a small board fits.
"""

from __future__ import annotations

import multiprocessing
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from .bundle import COMPONENTS, Bundle
from .images import png_base64
from .jobs import parse_job
from .memory import fixed_plan, lean_malloc, tier_plan
from .onnx_files import model_bytes
from .pipeline import Pipeline, record_inputs
from .providers import RuntimeOptions, make_session
from .variants import update_manifest

FIDELITY_JOBS = (
    ("knolling of 2 red gears and a blue battery on a pure white background", 11),
    ("exploded view of a green circuit board and four screws", 12),
    ("flat lay of a yellow spring and a purple lens", 13),
)


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two uint8 images; None when they are identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * np.log10(255.0**2 / mse)


class Fidelity:
    """Final images of fixed prompts and seeds, compared with the all-FP32 pipeline's."""

    def __init__(self, bundle: Bundle, steps: int = 8):
        self.bundle, self.steps = bundle, steps
        self.edit_input: str | None = None  # with a VAE encoder: the FP32 first image, edited by img2img
        self.reference = self._images({})
        if bundle.vae_encoder is not None:
            self.edit_input = png_base64(Image.fromarray(self.reference[0]))
            self.reference = self._images({})

    def _images(self, precisions: dict[str, str]) -> list[np.ndarray]:
        pipe = Pipeline(self.bundle, RuntimeOptions(), fixed_plan(precisions, "fidelity check"))
        jobs = [{"prompt": p, "seed": s, "steps": self.steps} for p, s in FIDELITY_JOBS]
        if self.edit_input is not None:
            jobs.append({**jobs[0], "init_image": self.edit_input, "strength": 0.5})
        return [np.asarray(pipe.generate(parse_job(job)).images[0].image) for job in jobs]

    def score(self, precisions: dict[str, str]) -> dict[str, Any]:
        images = self._images(precisions)
        scores = [psnr(a, b) for a, b in zip(images, self.reference)]
        finite = [s for s in scores if s is not None]
        return {
            "psnr_db": round(min(finite), 2) if finite else None,  # the worst image counts
            "max_abs_diff": int(max(np.abs(a.astype(int) - b.astype(int)).max()
                                    for a, b in zip(images, self.reference))),
        }


def _status_bytes(key: str) -> int:
    """VmRSS / VmHWM of this process. Not getrusage's ru_maxrss: that survives execve, so a
    spawned child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def _measure(path: str, runtime: RuntimeOptions, feeds: dict[str, np.ndarray], calls: int,
             lowmem: bool = False) -> dict[str, float]:
    """Runs in a fresh process: load one session, call it, report memory and time."""
    if lowmem:
        lean_malloc()
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    session = make_session(Path(path), runtime)
    load = time.perf_counter() - t0
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    peak = _status_bytes("VmHWM")
    return {"peak_rss_bytes": peak - before, "load_seconds": round(load, 4),
            "call_seconds": round(float(np.median(times)), 5)}


def measure(path: Path, runtime: RuntimeOptions, feeds: dict[str, np.ndarray], calls: int = 3,
            lowmem: bool = False) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: its peak RSS is this session's alone
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (str(path), runtime, feeds, calls, lowmem))


def single_items(feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Split batched feeds (the CFG batch of 2) into batch-1 feeds, as the int8-lowmem tier runs
    them; calibration uses them too, for half the activations per run."""
    items = []
    for feed in feeds:
        batch = max((v.shape[0] for v in feed.values() if v.ndim), default=1)
        for i in range(batch):
            items.append({k: v[i:i + 1] if v.ndim and v.shape[0] == batch else v for k, v in feed.items()})
    return items


def measure_lowmem(path: Path, runtime: RuntimeOptions, feeds: dict[str, np.ndarray]) -> int:
    """Peak RSS of one variant run as the int8-lowmem tier runs it: CFG passes one at a time."""
    lean = replace(runtime, memory_arena=False, cfg_batch=False)
    return measure(path, lean, single_items([feeds])[0], calls=1, lowmem=True)["peak_rss_bytes"]


def sample_feeds(bundle: Bundle, runtime: RuntimeOptions) -> dict[str, dict[str, np.ndarray]]:
    """One real input per component, captured from a short FP32 generation at the native size."""
    pipe = Pipeline(bundle, runtime, fixed_plan(reason="profile"))
    job = {"prompt": FIDELITY_JOBS[0][0], "seed": 0, "steps": 1, "guidance": 7.5}
    with record_inputs(pipe) as recorded:
        image = pipe.generate(parse_job(job)).images[0].image
        if pipe.vae_encoder is not None:  # the encoder's input: that image, as an img2img job gives it
            pipe.generate(parse_job({**job, "steps": 2, "init_image": png_base64(image), "strength": 0.5}))
    return {name: feeds[-1] for name, feeds in recorded.items()}


def profile_bundle(bundle: Bundle, runtime: RuntimeOptions = RuntimeOptions(), calls: int = 3,
                   components: tuple[str, ...] | None = None) -> dict:
    """Measure every variant of ``components`` (None: all) on this machine and record it in variants.json."""
    feeds = sample_feeds(bundle, runtime)
    check = Fidelity(bundle)
    results: dict[str, dict[str, dict]] = {}
    lowmem = tier_plan(bundle, {}, "int8-lowmem").precisions
    for comp in components or tuple(bundle.components):
        results[comp] = {}
        for precision, path in bundle.components[comp].variants.items():
            entry = {"bytes": model_bytes(path),
                     **measure(path, runtime, feeds[comp], calls)}
            if precision == lowmem[comp]:
                entry["lowmem_peak_rss_bytes"] = measure_lowmem(path, runtime, feeds[comp])
            if precision != "fp32":
                entry.update(check.score({comp: precision}))
            results[comp][precision] = entry

    def record(manifest: dict) -> None:
        manifest["profiled_on"] = {"machine": platform.machine(), "onnxruntime": ort.__version__,
                                   "threads": runtime.threads, "providers": list(runtime.providers),
                                   "date": time.strftime("%Y-%m-%d")}
        for comp, variants in results.items():
            for precision, entry in variants.items():
                manifest.setdefault("components", {}).setdefault(comp, {}).setdefault(precision, {}).update(entry)

    return update_manifest(bundle.root, record)
