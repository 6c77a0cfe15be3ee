"""Diffusion schedulers in numpy, one per file, checked step by step against diffusers 0.39.

A bundle's ``scheduler/scheduler_config.json`` (``_class_name`` plus fields) picks the scheduler:

    EulerDiscreteScheduler            -> euler            (euler.py)
    EulerAncestralDiscreteScheduler   -> euler_a          (euler_ancestral.py)
    DDIMScheduler                     -> ddim             (ddim.py)
    LCMScheduler                      -> lcm              (lcm.py)
    DPMSolverMultistepScheduler       -> dpmpp_2m, or dpmpp_2m_karras when use_karras_sigmas is true
                                                          (dpmpp_2m.py)

Any other class (PNDMScheduler, LMSDiscreteScheduler, ...) falls back to ``euler`` with a logged
warning naming the class: Euler is deterministic and works for every epsilon-, v- or
sample-prediction model, and the bundle's shared fields are kept.

An override name (``--scheduler``, a job's ``scheduler``, ``defaults.scheduler``) replaces the
class and keeps the fields both classes know, as diffusers' ``NewScheduler.from_config(old.config)``
does: num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
timestep_spacing, steps_offset, rescale_betas_zero_snr, ... A field the new class does not have is
dropped; one the config lacks takes the new class's diffusers default (e.g. an SD 1.5 PNDM config
has no timestep_spacing, so Euler uses "linspace" and DDIM "leading"), except ``clip_sample`` and
``set_alpha_to_one`` (:data:`LATENT_SAFE`): DDIM's defaults for them are pixel-space ones that turn
latents into noise, so an override onto a config that lacks them gets ``false``, as SD bundles ship. The two DPM++ names pin
use_karras_sigmas (``dpmpp_2m_karras`` = DPM++ 2M with use_karras_sigmas=True). An unknown name
raises ValidationError("scheduler"); a config value a scheduler does not implement raises
ConfigError naming the field.

Every scheduler follows :class:`Scheduler`. Schedules are computed with diffusers' dtypes
(float32 alpha_bar, float64 interpolation) and the sample arithmetic is float32, so results
agree with the diffusers torch path to about 1e-6 (``tests/test_schedulers.py``).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError, ValidationError
from .ddim import DDIMScheduler
from .dpmpp_2m import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler

log = logging.getLogger(__name__)


class Scheduler(Protocol):
    name: str                 # the override name, e.g. "euler_a"
    timesteps: np.ndarray     # after set_timesteps: what the UNet gets (float64 or int64, like diffusers)
    init_noise_sigma: float   # initial latents = noise * init_noise_sigma
    needs_noise: bool         # True if step() consumes fresh noise (euler_a, lcm)
    x0: np.ndarray | None     # after step(): its denoised estimate (the predicted final latents)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Build the schedule for a run and reset multistep state."""

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        """The UNet input for step ``step_index`` (0, 1, 2, ... in order)."""

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """The sample for the next step (float32), from the model output at this one."""

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """Clean latents noised to the level the sample has at step ``step_index`` (img2img's start,
        inpainting's known region), as diffusers' add_noise after set_begin_index."""


SCHEDULERS: dict[str, type] = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "lcm": LCMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "dpmpp_2m_karras": DPMSolverMultistepScheduler,
}
NAMES: tuple[str, ...] = tuple(SCHEDULERS)

# diffusers _class_name -> our name (DPM++ becomes dpmpp_2m_karras when use_karras_sigmas is true).
CLASS_NAMES: dict[str, str] = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DDIMScheduler": "ddim",
    "LCMScheduler": "lcm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
FALLBACK = "euler"
# Fields a latent-diffusion bundle's config may lack when another class wrote it (an Euler config
# has no clip_sample): the values SD bundles ship, used instead of the class's pixel-space defaults.
LATENT_SAFE: dict[str, bool] = {"clip_sample": False, "set_alpha_to_one": False}

# AUTOMATIC1111's "Sampler:" names, which image viewers and sites parse from the parameters text.
LABELS: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "lcm": "LCM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}


def from_config(config: dict[str, Any], override: str | None = None) -> Scheduler:
    """The scheduler for a bundle's scheduler_config.json, or the ``override`` name with its fields."""
    if override is not None:
        if override not in SCHEDULERS:
            raise ValidationError("scheduler", f"{override!r} is not supported; choose one of {', '.join(NAMES)}")
        name = override
    else:
        class_name = config.get("_class_name")
        if isinstance(class_name, str) and class_name in CLASS_NAMES:
            name = CLASS_NAMES[class_name]
            if name == "dpmpp_2m" and config.get("use_karras_sigmas"):
                name = "dpmpp_2m_karras"
        else:
            log.warning("scheduler %s is not supported; falling back to %s (EulerDiscreteScheduler) with the "
                        "bundle's shared fields", class_name or "(no _class_name)", FALLBACK)
            name = FALLBACK

    cls = SCHEDULERS[name]
    # Like diffusers' ConfigMixin.extract_init_dict: keep the fields the class's constructor takes,
    # skip private keys and those diffusers marks as defaults it filled in (_use_default_values).
    accepted = inspect.signature(cls).parameters
    defaulted = set(config.get("_use_default_values") or ())
    fields = {key: value for key, value in config.items()
              if key in accepted and key not in defaulted and not key.startswith("_")}
    if cls is DPMSolverMultistepScheduler:
        fields["use_karras_sigmas"] = name == "dpmpp_2m_karras"
    for key, value in LATENT_SAFE.items() if override is not None else ():
        if key in accepted and key not in config:
            # DDIM's own defaults (clip x0 to [-1, 1], final alpha 1) are for pixel-space models: on
            # latents they clip the sample and turn it to noise. SD bundles set both false.
            log.info("scheduler_config.json has no %s; using %s=%s for %s (latent diffusion)", key, key, value, name)
            fields[key] = value
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:  # e.g. "steps_offset": null or "beta_start": "x"
        raise ConfigError(f"scheduler_config.json: a field has the wrong type for {cls.__name__}: {exc}") from exc


def sampler_label(scheduler: Scheduler) -> str:
    """AUTOMATIC1111's sampler name: "Euler", "Euler a", "DDIM", "LCM", "DPM++ 2M", "DPM++ 2M Karras".

    Euler with use_karras_sigmas (a bundle config can ask for it) is "Euler Karras", in the same
    style as "DPM++ 2M Karras".
    """
    label = LABELS.get(scheduler.name, scheduler.name)
    if scheduler.name == "euler" and getattr(scheduler, "use_karras_sigmas", False):
        label += " Karras"
    return label
