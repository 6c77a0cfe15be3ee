"""Euler a: Euler with ancestral sampling, numpy port of diffusers' EulerAncestralDiscreteScheduler.

The ancestral step of k-diffusion (Crowson, ``sample_euler_ancestral`` / ``get_ancestral_step``):
going from sigma to sigma_next, the DDPM posterior (Ho et al. 2020, eq. 6-7) in sigma space
splits sigma_next into a deterministic part sigma_down and fresh noise sigma_up:

    sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
    sigma_down = sqrt(sigma_next^2 - sigma_up^2)

take an Euler step of the probability-flow ODE (Karras et al. 2022, eqs. 1 and 3) to sigma_down, then
add ``noise * sigma_up``. Every step consumes fresh noise (``needs_noise``); on the last step
sigma_next = 0 so sigma_up = 0 and the noise has no effect, but diffusers still draws it.

Config fields: num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
prediction_type (epsilon, v_prediction; diffusers does not implement "sample" here),
timestep_spacing, steps_offset, rescale_betas_zero_snr.
"""

from __future__ import annotations

import numpy as np

from .common import SPACINGS, alphas_cumprod, check_steps, choice, noised, spaced_timesteps


class EulerAncestralDiscreteScheduler:
    name = "euler_a"
    needs_noise = True
    x0: np.ndarray | None = None  # the denoised estimate of the last step (for previews)

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False) -> None:
        self.prediction_type = choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        self.timestep_spacing = choice("timestep_spacing", timestep_spacing, SPACINGS)
        self.num_train_timesteps = int(num_train_timesteps)
        self.steps_offset = int(steps_offset)

        alphas_bar = alphas_cumprod(self.num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                    rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            # alpha_bar_T = 0 would make sigma_T infinite; diffusers uses 2^-24 (smallest fp16 subnormal).
            alphas_bar[-1] = 2.0 ** -24
        self.alphas_cumprod = alphas_bar
        # sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float32, ascending in t.
        self.train_sigmas = np.sqrt((1 - alphas_bar) / alphas_bar)

        self.timesteps = np.empty(0)
        self.sigmas = np.empty(0, dtype=np.float32)
        self.init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps, self.num_train_timesteps)
        timesteps = spaced_timesteps(self.timestep_spacing, num_inference_steps, self.num_train_timesteps,
                                     self.steps_offset).astype(np.float32)
        # sigma at each timestep by linear interpolation, then 0 for the final clean sample.
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        self.timesteps = timesteps.astype(np.float64)

        max_sigma = self.sigmas.max()
        # As diffusers: sqrt(sigma_max^2 + 1) with "leading" spacing, sigma_max otherwise.
        if self.timestep_spacing == "leading":
            max_sigma = np.sqrt(max_sigma * max_sigma + np.float32(1))
        self.init_noise_sigma = float(max_sigma)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        # Unit-variance UNet input: c_in = 1 / sqrt(sigma^2 + 1) (Karras et al. 2022, Table 1).
        sigma = self.sigmas[step_index]
        return (sample / np.sqrt(sigma * sigma + np.float32(1))).astype(np.float32, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        # Sigma space: x = x0 + sigma * eps at this step's sigma.
        return noised(original, noise, 1, self.sigmas[step_index])

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        sigma, sigma_next = self.sigmas[step_index], self.sigmas[step_index + 1]
        x = np.asarray(sample, dtype=np.float32)
        out = np.asarray(model_output, dtype=np.float32)

        if self.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:
            # v-prediction (Salimans & Ho 2022, sec. 4) in sigma space.
            x0 = out * (-sigma / np.sqrt(sigma * sigma + np.float32(1))) + x / (sigma * sigma + np.float32(1))

        self.x0 = x0

        # Ancestral split of sigma_next (k-diffusion get_ancestral_step with eta = 1).
        sigma_up = np.sqrt(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma))
        sigma_down = np.sqrt(sigma_next * sigma_next - sigma_up * sigma_up)

        # Euler step of dx/dsigma = (x - x0) / sigma down to sigma_down ...
        derivative = (x - x0) / sigma
        prev = x + derivative * (sigma_down - sigma)
        # ... then fresh noise brings the sample back up to noise level sigma_next.
        if sigma_up > 0:
            if noise is None:
                raise ValueError("euler_a: step() needs noise (needs_noise is True)")
            prev = prev + np.asarray(noise, dtype=np.float32) * sigma_up
        return prev.astype(np.float32, copy=False)
