"""Record diffusers' images for few-step and v-prediction configurations (dev-time: torch, diffusers).

    /work/devvenv/bin/python tools/make_fewstep_references.py

The tiny pipeline of ``make_tiny_bundle.py`` (the seeded weights of ``tests/fixtures/tiny-sd``)
runs in diffusers' StableDiffusionPipeline with each case's scheduler config, from the initial
latents edge-imagegen draws for the seed (``edge.pipeline.gaussian``): an SD-Turbo-style config
(Euler, trailing spacing, guidance off, 1 step) and its DDIM and DPM++ 2M overrides, and an
SD 2.x-style v-prediction config (DDIM as stabilityai/stable-diffusion-2-1 ships it) plus its
Euler override. The weights are random, so nothing here looks like anything: what is compared is
the arithmetic (timesteps, input scaling, v -> x0, guidance off), which a wrong spacing or a
missed prediction_type changes far beyond the bound of the test.

Written: ``tests/fixtures/fewstep_reference.npz`` with ``cases`` (JSON: id, scheduler config,
edge.json, job) and one ``<id>`` uint8 image per case. Then each case is run in edge-imagegen
(from a bundle copy carrying the config, no job flags) and the PSNR against diffusers printed.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from check_optimum_bundle import TINY_SD, psnr  # noqa: E402
from edge.bundle import load_bundle  # noqa: E402
from edge.jobs import parse_job  # noqa: E402
from edge.loader import with_model_defaults  # noqa: E402
from edge.config import load_config  # noqa: E402
from edge.pipeline import Pipeline, gaussian, make_rng  # noqa: E402
from edge.providers import RuntimeOptions  # noqa: E402
from make_scheduler_fixtures import SD2_V, TURBO  # noqa: E402
from make_tiny_bundle import build_pipeline  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "fewstep_reference.npz"
PROMPT = {"prompt": "knolling of 2 red gears and a blue battery on white", "negative_prompt": "shadow"}
DIFFUSERS = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}

# edge.json carries a turbo model's steps and guidance; the v-prediction model runs on config
# defaults. job: the fields a user sends (beyond the prompt and seed); what is left out comes from
# edge.json / the config.
CASES = [
    dict(id="turbo_euler_1", config=TURBO, edge={"steps": 1, "guidance": 0.0}, job={}, scheduler="euler"),
    dict(id="turbo_ddim_1", config=TURBO, edge={"steps": 1, "guidance": 0.0, "scheduler": "ddim"}, job={},
         scheduler="ddim"),
    dict(id="turbo_dpmpp_2m_2", config=TURBO, edge={"steps": 1, "guidance": 0.0}, job={"steps": 2,
                                                                                       "scheduler": "dpmpp_2m"},
         scheduler="dpmpp_2m"),
    dict(id="v_ddim_4", config=SD2_V, edge={}, job={"steps": 4}, scheduler="ddim"),
    dict(id="v_euler_4", config=SD2_V, edge={}, job={"steps": 4, "scheduler": "euler"}, scheduler="euler"),
]
SEED = 11


def write_bundle(case: dict, dest: Path) -> Path:
    """tiny-sd with the case's scheduler config and edge.json: what a user's few-step bundle holds."""
    shutil.copytree(TINY_SD, dest)
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(case["config"], indent=1))
    if case["edge"]:
        (dest / "edge.json").write_text(json.dumps(case["edge"]))
    return dest


def ours(bundle: Path, job: dict) -> np.ndarray:
    config = with_model_defaults(load_config(overrides={"model.path": str(bundle)}))
    parsed = parse_job({**PROMPT, "seed": SEED, **job}, config.limits, config.defaults)
    result = Pipeline(load_bundle(bundle), RuntimeOptions(threads=1)).generate(parsed)
    return np.asarray(result.images[0].image)


def reference(case: dict) -> np.ndarray:
    pipe = build_pipeline(TINY_SD / "tokenizer")  # the same seeded weights as the bundle
    pipe.scheduler = DIFFUSERS[case["scheduler"]].from_config(case["config"])
    fields = {"steps": 20, "guidance": 7.5, **case["edge"], **case["job"]}
    latents = torch.from_numpy(gaussian(make_rng(SEED), (1, 4, 16, 16)))
    out = pipe(PROMPT["prompt"], negative_prompt=PROMPT["negative_prompt"], num_inference_steps=fields["steps"],
               guidance_scale=fields["guidance"], latents=latents, output_type="np").images[0]
    return np.round(out * 255).astype(np.uint8)


def main() -> None:
    images = {case["id"]: reference(case) for case in CASES}
    meta = [{k: case[k] for k in ("id", "config", "edge", "job")} for case in CASES]
    np.savez_compressed(FIXTURE, cases=np.asarray(json.dumps({"seed": SEED, "prompt": PROMPT, "cases": meta})),
                        **images)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1024:.0f} KiB)")
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            mine = ours(write_bundle(case, Path(tmp) / case["id"]), case["job"])
            diff = np.abs(mine.astype(int) - images[case["id"]].astype(int))
            print(f"{case['id']:18s} max abs diff {diff.max():3d} / 255, mean {diff.mean():.4f}, "
                  f"PSNR {psnr(mine, images[case['id']]):.1f} dB")


if __name__ == "__main__":
    main()
