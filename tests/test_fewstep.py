"""Few-step and v-prediction models read right with no job flags: parity with diffusers' images.

tools/make_fewstep_references.py ran diffusers' StableDiffusionPipeline on tiny-sd's weights with an
SD-Turbo-style scheduler config (Euler, trailing spacing; guidance off and 1 step from edge.json)
and its DDIM / DPM++ 2M overrides, and an SD 2.x v-prediction config (DDIM) and its Euler override.
"""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from conftest import TINY_SD
from edge.bundle import load_bundle
from edge.config import load_config
from edge.jobs import parse_job
from edge.loader import with_model_defaults
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions

REFERENCE = np.load(TINY_SD.parent / "fewstep_reference.npz")
META = json.loads(REFERENCE["cases"].item())
CASES = {case["id"]: case for case in META["cases"]}
MIN_PSNR = 60.0  # dB: float rounding between ONNX Runtime and torch gives 87 dB and more here


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def few_step_bundle(case: dict, dest):
    shutil.copytree(TINY_SD, dest)
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(case["config"]))
    if case["edge"]:
        (dest / "edge.json").write_text(json.dumps(case["edge"]))
    return dest


def generate(bundle, job: dict, scheduler_config: dict | None = None) -> np.ndarray:
    config = with_model_defaults(load_config(overrides={"model.path": str(bundle)}))
    parsed = parse_job({**META["prompt"], "seed": META["seed"], **job}, config.limits, config.defaults)
    loaded = load_bundle(bundle)
    if scheduler_config is not None:
        loaded = replace(loaded, scheduler_config=scheduler_config)
    return np.asarray(Pipeline(loaded, RuntimeOptions(threads=1)).generate(parsed).images[0].image)


@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_diffusers(tmp_path, case_id):
    case = CASES[case_id]
    image = generate(few_step_bundle(case, tmp_path / "bundle"), case["job"])
    assert psnr(image, REFERENCE[case_id]) >= MIN_PSNR


@pytest.mark.parametrize("case_id, field, wrong", [
    ("turbo_euler_1", "timestep_spacing", "leading"),  # 1 step from t=1 instead of t=999
    ("v_ddim_4", "prediction_type", "epsilon"),
])
def test_the_bound_tells_a_misread_config(tmp_path, case_id, field, wrong):
    """Reading the one field wrong moves the image far outside the parity bound."""
    case = CASES[case_id]
    bundle = few_step_bundle(case, tmp_path / "bundle")
    image = generate(bundle, case["job"], {**case["config"], field: wrong})
    assert psnr(image, REFERENCE[case_id]) < 30.0
