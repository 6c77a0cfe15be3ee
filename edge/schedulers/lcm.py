"""LCM: multistep consistency sampling (Luo et al. 2023, "Latent Consistency Models").

A numpy port of diffusers' LCMScheduler.

A consistency model maps a noisy x_t straight to a clean estimate, with the skip/output
parameterisation of Song et al. 2023, "Consistency Models" (section 3), as adapted by LCM:

    f(x_t, t) = c_skip(t) * x_t + c_out(t) * x0_pred(x_t, t)

with c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2),
sigma_data = 0.5 and s = ``timestep_scaling`` (LCM's discrete-time boundary condition). The
multistep sampler (LCM's "Multistep Latent Consistency Sampling" algorithm) alternates: denoise
to f(x_t, t), then re-noise to the next timestep with fresh noise,
x_{t'} = sqrt(a_{t'}) f + sqrt(1 - a_{t'}) z; the last step returns f.
So ``needs_noise`` is True (noise is used on every step but the last).

Timesteps are a subset of the distillation schedule: ``original_inference_steps`` (default 50)
evenly spaced training timesteps k-1, 2k-1, ..., T-1 (k = T // original_inference_steps), of
which ``num_inference_steps`` are taken at evenly spaced indices, starting at T-1.

Config fields: num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
original_inference_steps, clip_sample, clip_sample_range, prediction_type (epsilon,
v_prediction, sample), timestep_scaling, rescale_betas_zero_snr. Like diffusers, timestep_spacing,
steps_offset and set_alpha_to_one are accepted and have no effect. thresholding must be off.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .common import PREDICTION_TYPES, alphas_cumprod, check_steps, choice, off, vp_add_noise


class LCMScheduler:
    name = "lcm"
    needs_noise = True
    x0: np.ndarray | None = None  # the denoised estimate of the last step (for previews)
    init_noise_sigma = 1.0
    sigma_data = 0.5  # the consistency-models default

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 original_inference_steps: int = 50, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, timestep_spacing: str = "leading", timestep_scaling: float = 10.0,
                 rescale_betas_zero_snr: bool = False) -> None:
        self.prediction_type = choice("prediction_type", prediction_type, PREDICTION_TYPES)
        off("thresholding", thresholding)
        self.num_train_timesteps = int(num_train_timesteps)
        self.original_inference_steps = int(original_inference_steps)
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise ConfigError(f"scheduler_config.json: original_inference_steps={original_inference_steps!r} "
                              f"must be between 1 and num_train_timesteps ({self.num_train_timesteps})")
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.timestep_scaling = float(timestep_scaling)
        # set_alpha_to_one would only matter for a previous timestep below 0, which LCM never has.
        self.alphas_cumprod = alphas_cumprod(self.num_train_timesteps, beta_start, beta_end, beta_schedule,
                                             trained_betas, rescale_betas_zero_snr)
        self.timesteps = np.empty(0, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps, self.original_inference_steps,
                    "the original_inference_steps the model was distilled with")
        k = self.num_train_timesteps // self.original_inference_steps
        # The distillation schedule k-1, 2k-1, ..., original*k - 1, from the noisiest down.
        origin = (np.arange(1, self.original_inference_steps + 1) * k - 1)[::-1]
        # n indices evenly spaced over it (floored), so the first step is always the noisiest.
        indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[indices].astype(np.int64)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        return vp_add_noise(self.alphas_cumprod, int(self.timesteps[step_index]), original, noise)

    def _boundary_scalings(self, t: int) -> tuple[np.float32, np.float32]:
        """c_skip(t), c_out(t) of the consistency parameterisation; float32 like diffusers."""
        st = np.float32(t) * np.float32(self.timestep_scaling)
        sd2 = np.float32(self.sigma_data ** 2)
        c_skip = sd2 / (st * st + sd2)
        c_out = st / np.sqrt(st * st + sd2)
        return c_skip, c_out

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        t = int(self.timesteps[step_index])
        last = step_index == len(self.timesteps) - 1
        prev_t = t if last else int(self.timesteps[step_index + 1])
        a_t, a_prev = self.alphas_cumprod[t], self.alphas_cumprod[prev_t]
        b_t, b_prev = 1 - a_t, 1 - a_prev
        x = np.asarray(sample, dtype=np.float32)
        out = np.asarray(model_output, dtype=np.float32)

        # x0 estimate from the model's parameterisation (DDIM eq. 12 for epsilon, Salimans & Ho for v).
        if self.prediction_type == "epsilon":
            x0 = (x - np.sqrt(b_t) * out) / np.sqrt(a_t)
        elif self.prediction_type == "sample":
            x0 = out
        else:
            x0 = np.sqrt(a_t) * x - np.sqrt(b_t) * out
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)

        # Consistency function f(x_t, t) = c_skip x_t + c_out x0 (Consistency Models, section 3).
        c_skip, c_out = self._boundary_scalings(t)
        denoised = c_out * x0 + c_skip * x
        self.x0 = denoised
        if last:
            return denoised.astype(np.float32, copy=False)
        # Multistep sampling: re-noise the estimate to the next timestep with fresh noise.
        if noise is None:
            raise ValueError("lcm: step() needs noise (needs_noise is True)")
        return (np.sqrt(a_prev) * denoised + np.sqrt(b_prev) * np.asarray(noise, dtype=np.float32)).astype(
            np.float32, copy=False)
