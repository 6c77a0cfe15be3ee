"""Record diffusers' schedulers step by step, as reference fixtures for edge/schedulers (dev-time only).

    /work/devenv/bin/python tools/make_scheduler_fixtures.py [tests/fixtures/schedulers]

For every case below (a scheduler_config.json-style dict, an optional override name and a step
count) the diffusers scheduler is built the way edge.schedulers.from_config promises to build
its numpy twin: ``TargetClass.from_config(config)`` (DPM++ with use_karras_sigmas pinned by the
override name; unsupported classes -> EulerDiscreteScheduler). It is then driven like
StableDiffusionPipeline drives it: latents = noise * init_noise_sigma, and per timestep
scale_model_input -> fake model -> step. The fake model is a fixed smooth function of the
scaled input and the timestep (no UNet needed). Noise that a scheduler draws inside step()
(Euler a, LCM) comes from monkeypatched ``randn_tensor``, which returns arrays pre-drawn here and
saved with the case, so the numpy scheduler can be fed the same noise.

Written: ``cases.json`` (id, config, override, steps, expected name) and one ``<id>.npz`` per
case with timesteps, sigmas (Euler, Euler a, DPM++), init_noise_sigma, the initial noise, and per
step model_inputs (only where scale_model_input is not the identity), model_outputs, step_noise
(only for schedulers that draw noise) and prev_samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import diffusers
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler)
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

SHAPE = (1, 4, 8, 8)

DIFFUSERS_CLASSES = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "lcm": LCMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "dpmpp_2m_karras": DPMSolverMultistepScheduler,
}
CLASS_TO_NAME = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                 "DDIMScheduler": "ddim", "LCMScheduler": "lcm", "DPMSolverMultistepScheduler": "dpmpp_2m"}

# --- configs as they appear in real bundles ------------------------------------------------------
SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "trained_betas": None}
# runwayml/stable-diffusion-v1-5: PNDM, no timestep_spacing (so each class uses its own default).
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
# The embedded tiny-sd bundle / many SD 1.5 exports: Euler, leading spacing, steps_offset 1.
SD15_EULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.39.0", **SD,
              "final_sigmas_type": "zero", "interpolation_type": "linear", "prediction_type": "epsilon",
              "rescale_betas_zero_snr": False, "sigma_max": None, "sigma_min": None, "steps_offset": 1,
              "timestep_spacing": "leading", "timestep_type": "discrete", "use_beta_sigmas": False,
              "use_exponential_sigmas": False, "use_karras_sigmas": False}
SD15_EULER_A = {"_class_name": "EulerAncestralDiscreteScheduler", **SD, "prediction_type": "epsilon",
                "steps_offset": 1, "timestep_spacing": "leading", "rescale_betas_zero_snr": False}
# stabilityai/stable-diffusion-2-1 (768, v-prediction): DDIM.
SD2_V = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", **SD, "clip_sample": False,
         "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}
# stabilityai/sd-turbo: Euler, trailing spacing.
TURBO = {"_class_name": "EulerDiscreteScheduler", **SD, "clip_sample": False, "interpolation_type": "linear",
         "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
         "steps_offset": 1, "timestep_spacing": "trailing", "use_karras_sigmas": False}
# SimianLuo/LCM_Dreamshaper_v7.
LCM = {"_class_name": "LCMScheduler", **SD, "clip_sample": False, "clip_sample_range": 1.0,
       "dynamic_thresholding_ratio": 0.995, "original_inference_steps": 50, "prediction_type": "epsilon",
       "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "set_alpha_to_one": True, "steps_offset": 1,
       "thresholding": False, "timestep_scaling": 10.0, "timestep_spacing": "leading"}
# A typical "DPM++ 2M Karras" SD 1.5 export.
DPM = {"_class_name": "DPMSolverMultistepScheduler", **SD, "algorithm_type": "dpmsolver++",
       "dynamic_thresholding_ratio": 0.995, "lower_order_final": True, "prediction_type": "epsilon",
       "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint", "steps_offset": 1,
       "thresholding": False, "timestep_spacing": "linspace", "use_karras_sigmas": False,
       "final_sigmas_type": "zero", "lambda_min_clipped": float("-inf"), "euler_at_final": False}
# DDIMScheduler's own defaults (linear betas, clip_sample, set_alpha_to_one, leading, offset 0).
DDIM_DEFAULT = {"_class_name": "DDIMScheduler"}


def cfg(base: dict, **changes) -> dict:
    return {**base, **changes}


# Short trained_betas schedule (num_train_timesteps=100) to exercise both fields.
TRAINED = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 100,
           "trained_betas": [round(float(b), 8) for b in np.linspace(0.001, 0.05, 100)],
           "timestep_spacing": "leading", "steps_offset": 1}

CASES: list[dict] = [
    # Euler
    dict(id="euler_sd15_leading_20", config=SD15_EULER, override=None, steps=20),
    dict(id="euler_sd15_leading_1", config=SD15_EULER, override=None, steps=1),
    dict(id="euler_pndm_fallback_25", config=SD15_PNDM, override=None, steps=25),
    dict(id="euler_sd2_v_override_4", config=SD2_V, override="euler", steps=4),
    dict(id="euler_turbo_trailing_1", config=TURBO, override=None, steps=1),
    dict(id="euler_turbo_trailing_4", config=TURBO, override=None, steps=4),
    dict(id="euler_karras_leading_20", config=cfg(SD15_EULER, use_karras_sigmas=True), override=None, steps=20),
    dict(id="euler_karras_sigma_range_8", config=cfg(SD15_EULER, use_karras_sigmas=True, sigma_min=0.1,
                                                     sigma_max=10.0, timestep_spacing="trailing"),
         override=None, steps=8),
    dict(id="euler_sigma_min_linspace_10", config=cfg(SD15_EULER, final_sigmas_type="sigma_min",
                                                      timestep_spacing="linspace"), override=None, steps=10),
    dict(id="euler_zero_snr_v_trailing_4", config=cfg(TURBO, rescale_betas_zero_snr=True,
                                                      prediction_type="v_prediction"), override=None, steps=4),
    dict(id="euler_cosine_sample_linspace_10", config=cfg(SD15_EULER, beta_schedule="squaredcos_cap_v2",
                                                          prediction_type="sample", timestep_spacing="linspace"),
         override=None, steps=10),
    dict(id="euler_trained_betas_4", config=TRAINED, override=None, steps=4),
    # Euler a
    dict(id="euler_a_sd15_leading_20", config=SD15_EULER_A, override=None, steps=20),
    dict(id="euler_a_turbo_trailing_1", config=TURBO, override="euler_a", steps=1),
    dict(id="euler_a_turbo_trailing_4", config=TURBO, override="euler_a", steps=4),
    dict(id="euler_a_sd2_v_override_25", config=SD2_V, override="euler_a", steps=25),
    dict(id="euler_a_linear_linspace_6", config=cfg(DDIM_DEFAULT, timestep_spacing="linspace"),
         override="euler_a", steps=6),
    # DDIM
    dict(id="ddim_pndm_override_25", config=SD15_PNDM, override="ddim", steps=25),
    dict(id="ddim_sd2_v_20", config=SD2_V, override=None, steps=20),
    dict(id="ddim_defaults_clip_4", config=cfg(DDIM_DEFAULT, clip_sample_range=0.8), override=None, steps=4),
    dict(id="ddim_turbo_trailing_1", config=TURBO, override="ddim", steps=1),
    dict(id="ddim_zero_snr_v_trailing_4", config=cfg(SD2_V, rescale_betas_zero_snr=True,
                                                     timestep_spacing="trailing"), override=None, steps=4),
    dict(id="ddim_cosine_sample_linspace_10", config=cfg(SD2_V, beta_schedule="squaredcos_cap_v2",
                                                         prediction_type="sample", timestep_spacing="linspace",
                                                         set_alpha_to_one=True), override=None, steps=10),
    # LCM
    dict(id="lcm_dreamshaper_4", config=LCM, override=None, steps=4),
    dict(id="lcm_dreamshaper_1", config=LCM, override=None, steps=1),
    dict(id="lcm_dreamshaper_8", config=LCM, override=None, steps=8),
    dict(id="lcm_euler_override_4", config=SD15_EULER, override="lcm", steps=4),
    dict(id="lcm_v_clip_orig100_6", config=cfg(LCM, prediction_type="v_prediction", clip_sample=True,
                                               original_inference_steps=100, timestep_scaling=5.0),
         override=None, steps=6),
    # DPM++ 2M
    dict(id="dpm_linspace_20", config=DPM, override=None, steps=20),
    dict(id="dpm_leading_25", config=cfg(DPM, timestep_spacing="leading"), override=None, steps=25),
    dict(id="dpm_karras_20", config=cfg(DPM, use_karras_sigmas=True), override=None, steps=20),
    dict(id="dpm_karras_4", config=cfg(DPM, use_karras_sigmas=True), override=None, steps=4),
    dict(id="dpm_karras_euler_override_25", config=SD15_EULER, override="dpmpp_2m_karras", steps=25),
    dict(id="dpm_plain_from_karras_override_10", config=cfg(DPM, use_karras_sigmas=True), override="dpmpp_2m",
         steps=10),
    dict(id="dpm_sd2_v_override_10", config=SD2_V, override="dpmpp_2m", steps=10),
    dict(id="dpm_sigma_min_heun_8", config=cfg(DPM, final_sigmas_type="sigma_min", solver_type="heun",
                                               lower_order_final=False), override=None, steps=8),
    dict(id="dpm_euler_at_final_trailing_8", config=cfg(DPM, final_sigmas_type="sigma_min", euler_at_final=True,
                                                        timestep_spacing="trailing"), override=None, steps=8),
    dict(id="dpm_1", config=DPM, override=None, steps=1),
    dict(id="dpm_cosine_lambda_clip_10", config=cfg(DPM, beta_schedule="squaredcos_cap_v2",
                                                    lambda_min_clipped=-5.1), override=None, steps=10),
    # Not recorded: squaredcos_cap_v2 with Karras sigmas. diffusers truncates those timesteps to
    # [998, 998, 998, 998, 997, ...] (10 steps) and, finding 998 twice, starts at step index 1 and
    # runs off the end of its sigmas (IndexError).
    dict(id="dpm_zero_snr_v_trailing_6", config=cfg(DPM, rescale_betas_zero_snr=True,
                                                    prediction_type="v_prediction", timestep_spacing="trailing"),
         override=None, steps=6),
]


def expected_name(config: dict, override: str | None) -> str:
    if override is not None:
        return override
    name = CLASS_TO_NAME.get(config.get("_class_name"), "euler")
    return "dpmpp_2m_karras" if name == "dpmpp_2m" and config.get("use_karras_sigmas") else name


def build(config: dict, override: str | None):
    """What edge.schedulers.from_config promises: diffusers' from_config onto the target class."""
    name = expected_name(config, override)
    cls = DIFFUSERS_CLASSES[name]
    kwargs = {"use_karras_sigmas": name == "dpmpp_2m_karras"} if cls is DPMSolverMultistepScheduler else {}
    return name, cls.from_config(config, **kwargs)


class NoiseFeed:
    """Stands in for diffusers' randn_tensor: hands out the noise pre-drawn for the current step."""

    def __init__(self) -> None:
        self.current: np.ndarray | None = None
        self.draws = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None, **_) -> torch.Tensor:
        assert tuple(shape) == SHAPE and self.current is not None
        self.draws += 1
        return torch.from_numpy(self.current.copy()).to(dtype=dtype or torch.float32)


def fake_model(x: torch.Tensor, t: float, phase: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for the UNet: depends on the scaled input and on the timestep."""
    return 0.8 * torch.tanh(x) + 0.3 * torch.cos(0.013 * t + phase)


def run_case(case: dict, seed: int, feed: NoiseFeed) -> dict[str, np.ndarray]:
    name, sched = build(case["config"], case["override"])
    sched.set_timesteps(case["steps"])
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    phase = torch.from_numpy(rng.uniform(0, 2 * np.pi, SHAPE).astype(np.float32))
    latents = torch.from_numpy(noise) * sched.init_noise_sigma

    inputs, outputs, step_noise, prevs = [], [], [], []
    draws = []
    for t in sched.timesteps:
        x_in = sched.scale_model_input(latents, t)
        out = fake_model(x_in, float(t), phase)
        feed.current = rng.standard_normal(SHAPE).astype(np.float32)
        before = feed.draws
        latents = sched.step(out, t, latents, return_dict=False)[0]
        draws.append(feed.draws - before)
        inputs.append(x_in.numpy().copy())
        outputs.append(out.numpy().copy())
        step_noise.append(feed.current)
        prevs.append(latents.numpy().copy())

    data = {
        "timesteps": sched.timesteps.numpy(),
        "init_noise_sigma": np.array(float(sched.init_noise_sigma)),
        "noise": noise,
        "model_outputs": np.stack(outputs),
        "prev_samples": np.stack(prevs),
    }
    if hasattr(sched, "sigmas") and name != "ddim" and name != "lcm":
        data["sigmas"] = sched.sigmas.numpy()
    if name in ("euler", "euler_a"):  # the only ones whose scale_model_input is not the identity
        data["model_inputs"] = np.stack(inputs)
    if any(draws):
        data["step_noise"] = np.stack(step_noise)
    case_info = {"name": name, "diffusers_class": type(sched).__name__, "noise_draws": draws}
    return data, case_info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=str(Path(__file__).parent.parent / "tests/fixtures/schedulers"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)

    feed = NoiseFeed()
    scheduling_euler_ancestral_discrete.randn_tensor = feed
    scheduling_lcm.randn_tensor = feed

    index = []
    for seed, case in enumerate(CASES):
        data, info = run_case(case, seed, feed)
        np.savez_compressed(out / f"{case['id']}.npz", **data)
        index.append({"id": case["id"], "config": case["config"], "override": case["override"],
                      "steps": case["steps"], "seed": seed, **info})
        print(f"{case['id']:40s} {info['diffusers_class']:34s} timesteps {data['timesteps'][:6].tolist()}")
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "shape": list(SHAPE), "cases": index}
    # NaN/inf (lambda_min_clipped = -inf) are not JSON: write them as diffusers' JSON does.
    (out / "cases.json").write_text(json.dumps(meta, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"{len(index)} cases, {total / 1024:.0f} KiB in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
