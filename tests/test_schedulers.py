"""The numpy schedulers against diffusers 0.39, step by step, plus from_config's mapping rules.

Fixtures come from ``tools/make_scheduler_fixtures.py`` (diffusers + torch, dev-time only); this
file needs numpy alone. Every case starts from the recorded initial noise, feeds each step the
recorded model output (and the recorded step noise for Euler a / LCM) and compares our own chain
of samples with diffusers' at every step.

Tolerance: ``|ours - diffusers| <= 1e-5 + 1e-5 * |diffusers|`` (numpy's ``assert_allclose`` with
rtol = atol = 1e-5): absolute 1e-5 for values of order 1, relative 1e-5 for the large values of
sigma-space samples (Euler latents start at sigma_max ~ 14.6, up to ~4096 with zero-SNR betas).
Integer timesteps must match exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edge import schedulers
from edge.errors import ConfigError, ValidationError
from edge.schedulers import NAMES, from_config, sampler_label
from edge.schedulers.common import spaced_timesteps

FIXTURES = Path(__file__).parent / "fixtures" / "schedulers"
META = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))
CASES = META["cases"]
TOL = {"rtol": 1e-5, "atol": 1e-5}

SD15_EULER = json.loads((Path(__file__).parent / "fixtures" / "tiny-sd" / "scheduler"
                         / "scheduler_config.json").read_text(encoding="utf-8"))
SD2_DDIM_V = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
              "prediction_type": "v_prediction", "set_alpha_to_one": False, "steps_offset": 1}


def run_case(case: dict, data, sched) -> None:
    """One full run of ``sched`` compared against the recorded diffusers run."""
    sched.set_timesteps(case["steps"])
    timesteps = data["timesteps"]
    if timesteps.dtype.kind == "i":
        assert sched.timesteps.dtype == np.int64
        np.testing.assert_array_equal(sched.timesteps, timesteps)
    else:
        np.testing.assert_allclose(sched.timesteps, timesteps, **TOL)
    if "sigmas" in data:
        np.testing.assert_allclose(sched.sigmas, data["sigmas"], **TOL)
    assert isinstance(sched.init_noise_sigma, float)
    np.testing.assert_allclose(sched.init_noise_sigma, float(data["init_noise_sigma"]), **TOL)

    sample = data["noise"] * sched.init_noise_sigma
    assert sample.dtype == np.float32
    for i in range(len(timesteps)):
        model_input = sched.scale_model_input(sample, i)
        if "model_inputs" in data:
            np.testing.assert_allclose(model_input, data["model_inputs"][i], **TOL, err_msg=f"input of step {i}")
        else:
            np.testing.assert_array_equal(model_input, sample)
        noise = data["step_noise"][i] if "step_noise" in data else None
        sample = sched.step(data["model_outputs"][i], i, sample, noise)
        assert sample.dtype == np.float32
        np.testing.assert_allclose(sample, data["prev_samples"][i], **TOL, err_msg=f"prev_sample of step {i}")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_matches_diffusers_step_by_step(case):
    data = np.load(FIXTURES / f"{case['id']}.npz")
    sched = from_config(case["config"], case["override"])
    assert sched.name == case["name"]
    # needs_noise must be set wherever diffusers drew noise in step(); LCM draws none on its last
    # step, so a 1-step LCM run draws nothing.
    assert sched.needs_noise == (case["name"] in ("euler_a", "lcm"))
    assert any(case["noise_draws"]) <= sched.needs_noise
    run_case(case, data, sched)
    # set_timesteps resets everything, DPM++'s multistep state included: a second run is identical.
    run_case(case, data, sched)


def test_fixtures_cover_every_scheduler_and_stay_small():
    assert {c["name"] for c in CASES} == set(NAMES)
    assert sum(p.stat().st_size for p in FIXTURES.iterdir()) < 2_000_000


# --- from_config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("class_name, name", [
    ("EulerDiscreteScheduler", "euler"),
    ("EulerAncestralDiscreteScheduler", "euler_a"),
    ("DDIMScheduler", "ddim"),
    ("LCMScheduler", "lcm"),
    ("DPMSolverMultistepScheduler", "dpmpp_2m"),
])
def test_class_name_maps_to_scheduler(class_name, name, caplog):
    with caplog.at_level(logging.WARNING):
        sched = from_config({**SD2_DDIM_V, "_class_name": class_name})
    assert sched.name == name
    assert caplog.records == []


def test_dpm_karras_config_maps_to_dpmpp_2m_karras():
    sched = from_config({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True})
    assert sched.name == "dpmpp_2m_karras" and sched.use_karras_sigmas
    assert sampler_label(sched) == "DPM++ 2M Karras"


def test_embedded_bundle_is_euler_leading():
    sched = from_config(SD15_EULER)
    sched.set_timesteps(4)
    assert sched.name == "euler"
    assert sched.timesteps.tolist() == [751.0, 501.0, 251.0, 1.0]


def test_override_keeps_shared_fields():
    sched = from_config({**SD2_DDIM_V, "timestep_spacing": "trailing"}, "euler_a")
    assert sched.name == "euler_a"
    assert (sched.prediction_type, sched.timestep_spacing, sched.steps_offset) == ("v_prediction", "trailing", 1)
    sched = from_config(SD2_DDIM_V, "dpmpp_2m_karras")
    assert sched.name == "dpmpp_2m_karras" and sched.prediction_type == "v_prediction"
    # Fields the new class lacks are dropped; missing ones take the new class's default: the SD 2.1
    # DDIM config has no timestep_spacing, so DDIM uses "leading" and Euler "linspace".
    assert from_config(SD2_DDIM_V).timestep_spacing == "leading"
    sched = from_config(SD2_DDIM_V, "euler")
    assert not hasattr(sched, "clip_sample") and sched.timestep_spacing == "linspace"


def test_dpm_override_names_pin_karras():
    karras = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert from_config(karras, "dpmpp_2m").use_karras_sigmas is False
    assert from_config({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m_karras").use_karras_sigmas


def test_default_values_marked_by_diffusers_are_not_carried():
    # diffusers' in-memory configs list fields it defaulted in _use_default_values; from_config skips them.
    config = {"_class_name": "DDIMScheduler", "timestep_spacing": "leading",
              "_use_default_values": ["timestep_spacing"]}
    assert from_config(config, "euler").timestep_spacing == "linspace"


@pytest.mark.parametrize("class_name", ["PNDMScheduler", "LMSDiscreteScheduler", None])
def test_unsupported_class_falls_back_to_euler_with_warning(class_name, caplog):
    config = {**SD2_DDIM_V, "_class_name": class_name}
    if class_name is None:
        del config["_class_name"]
    with caplog.at_level(logging.WARNING, logger="edge.schedulers"):
        sched = from_config(config)
    assert sched.name == "euler" and sched.prediction_type == "v_prediction"
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert str(class_name or "no _class_name") in record.getMessage() and "euler" in record.getMessage()


def test_override_of_unsupported_class_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING):
        assert from_config({"_class_name": "PNDMScheduler"}, "ddim").name == "ddim"
    assert caplog.records == []


def test_unknown_override_names_the_field():
    with pytest.raises(ValidationError) as info:
        from_config(SD15_EULER, "heun")
    assert info.value.field == "scheduler"
    assert "choose one of euler, euler_a, ddim, lcm, dpmpp_2m, dpmpp_2m_karras" in str(info.value)


@pytest.mark.parametrize("override, fields, field", [
    ("euler", {"beta_schedule": "sigmoid"}, "beta_schedule"),
    ("ddim", {"beta_schedule": "exp"}, "beta_schedule"),
    ("euler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("euler_a", {"prediction_type": "sample"}, "prediction_type"),
    ("euler", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("euler", {"prediction_type": "v_prediction", "timestep_type": "continuous"}, "timestep_type"),
    ("euler", {"final_sigmas_type": "one"}, "final_sigmas_type"),
    ("ddim", {"thresholding": True}, "thresholding"),
    ("lcm", {"thresholding": True}, "thresholding"),
    ("lcm", {"original_inference_steps": 2000}, "original_inference_steps"),
    ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpmpp_2m", {"solver_order": 3}, "solver_order"),
    ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("dpmpp_2m", {"variance_type": "learned_range"}, "variance_type"),
    ("euler", {"trained_betas": [0.01, 0.02]}, "trained_betas"),
    ("euler", {"steps_offset": None}, "scheduler_config.json"),
])
def test_unsupported_config_value_names_the_field(override, fields, field):
    with pytest.raises(ConfigError, match=field):
        from_config({"_class_name": "EulerDiscreteScheduler", **fields}, override)


def test_deis_and_unipc_settings_map_to_dpmpp_like_diffusers():
    sched = from_config({"_class_name": "DEISMultistepScheduler", "algorithm_type": "deis", "solver_type": "logrho"},
                        "dpmpp_2m")
    assert (sched.algorithm_type, sched.solver_type) == ("dpmsolver++", "midpoint")


@pytest.mark.parametrize("name, label", [
    ("euler", "Euler"), ("euler_a", "Euler a"), ("ddim", "DDIM"), ("lcm", "LCM"),
    ("dpmpp_2m", "DPM++ 2M"), ("dpmpp_2m_karras", "DPM++ 2M Karras"),
])
def test_sampler_label(name, label):
    assert sampler_label(from_config(SD15_EULER, name)) == label


def test_euler_with_karras_sigmas_is_labelled_euler_karras():
    assert sampler_label(from_config({**SD15_EULER, "use_karras_sigmas": True})) == "Euler Karras"


# --- steps and noise -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_bad_step_counts_name_the_steps_field(name):
    sched = from_config(SD15_EULER, name)
    for steps in (0, -1, 1001, 2.5):
        with pytest.raises(ValidationError) as info:
            sched.set_timesteps(steps)
        assert info.value.field == "steps"


def test_lcm_steps_are_limited_by_original_inference_steps():
    sched = from_config({"_class_name": "LCMScheduler", "original_inference_steps": 50})
    sched.set_timesteps(50)
    with pytest.raises(ValidationError, match="between 1 and 50"):
        sched.set_timesteps(51)


@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_trailing_spacing_gives_exactly_the_steps_asked_for(name):
    # diffusers' np.arange(T, 0, -T / n) yields n + 1 values ending at t = -1 for n = 61, 103, 121, 122.
    assert len(np.arange(1000, 0, -1000 / 61)) == 62
    sched = from_config({**SD15_EULER, "timestep_spacing": "trailing"}, name)
    for steps in (61, 103, 121, 122):
        sched.set_timesteps(steps)
        assert len(sched.timesteps) == steps and sched.timesteps.min() >= 0
        assert sched.timesteps[0] == 999


def test_spacings_match_lin_et_al_table_2():
    # Table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed", T = 1000, n = 10.
    assert spaced_timesteps("linspace", 10, 1000, 0).round().tolist() == [999, 888, 777, 666, 555, 444, 333, 222,
                                                                           111, 0]
    assert spaced_timesteps("leading", 10, 1000, 1).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert spaced_timesteps("trailing", 10, 1000, 0).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


@pytest.mark.parametrize("name", ["euler_a", "lcm"])
def test_noise_is_required_when_used(name):
    sched = from_config(SD15_EULER, name)
    sched.set_timesteps(2)
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="needs noise"):
        sched.step(x, 0, x, None)
    assert sched.needs_noise


def test_deterministic_schedulers_ignore_noise():
    x = np.ones((1, 4, 8, 8), np.float32)
    for name in ("euler", "ddim", "dpmpp_2m", "dpmpp_2m_karras"):
        a, b = from_config(SD15_EULER, name), from_config(SD15_EULER, name)
        a.set_timesteps(3)
        b.set_timesteps(3)
        assert not a.needs_noise
        np.testing.assert_array_equal(a.step(x * 0.1, 0, x), b.step(x * 0.1, 0, x, np.full_like(x, 5.0)))


def test_float16_model_output_gives_float32_samples():
    sched = from_config(SD15_EULER, "dpmpp_2m")
    sched.set_timesteps(3)
    x = np.ones((1, 4, 8, 8), np.float32)
    for i in range(3):
        x = sched.step(np.full(x.shape, 0.1, np.float16), i, x)
        assert x.dtype == np.float32


def test_an_override_onto_a_config_without_ddims_fields_gets_latent_safe_values():
    euler = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "steps_offset": 1}
    ddim = from_config(euler, "ddim")
    assert (ddim.clip_sample, float(ddim.final_alpha_cumprod)) == (False, float(ddim.alphas_cumprod[0]))
    kept = from_config({**euler, "clip_sample": True, "set_alpha_to_one": True}, "ddim")  # what a config says wins
    assert (kept.clip_sample, float(kept.final_alpha_cumprod)) == (True, 1.0)
    native = from_config({**euler, "_class_name": "DDIMScheduler"})  # not an override: DDIM's own defaults
    assert native.clip_sample is True
