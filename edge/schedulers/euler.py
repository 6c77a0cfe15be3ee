"""Euler: the first-order ODE sampler of Karras et al. 2022, numpy port of diffusers' EulerDiscreteScheduler.

"Elucidating the Design Space of Diffusion-Based Generative Models" (EDM) writes sampling as the
probability-flow ODE (eq. 1 with sigma(t) = t and the score of eq. 3, grad log p = (D - x) / sigma^2):

    dx/dsigma = (x - D(x; sigma)) / sigma

where D is the denoiser (the model's estimate of x0). Euler's method takes one step of that ODE
per model call (EDM Algorithm 1, lines 4-5, without the Heun correction; EDM's stochastic
churn is off, s_churn = 0, as in diffusers' default).

Latents live in sigma space: x = x0 + sigma * eps, so the initial noise is scaled by
``init_noise_sigma`` and the UNet, trained on unit-variance inputs, gets x / sqrt(sigma^2 + 1).

Config fields: num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
prediction_type (epsilon, v_prediction, sample), interpolation_type (linear), use_karras_sigmas,
sigma_min, sigma_max, timestep_spacing, steps_offset, rescale_betas_zero_snr,
final_sigmas_type (zero, sigma_min), timestep_type (discrete; continuous only without
v_prediction, where diffusers treats both alike). use_exponential_sigmas and use_beta_sigmas
must be off.
"""

from __future__ import annotations

import numpy as np

from .common import (PREDICTION_TYPES, SPACINGS, alphas_cumprod, check_steps, choice, karras_sigmas, noised,
                     off, sigma_to_t, spaced_timesteps)


class EulerDiscreteScheduler:
    name = "euler"
    needs_noise = False
    x0: np.ndarray | None = None  # the denoised estimate of the last step (for previews)

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", interpolation_type: str = "linear",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, sigma_min: float | None = None, sigma_max: float | None = None,
                 timestep_spacing: str = "linspace", timestep_type: str = "discrete", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, final_sigmas_type: str = "zero") -> None:
        # diffusers accepts "original_sample" as an older spelling of "sample".
        self.prediction_type = choice("prediction_type", "sample" if prediction_type == "original_sample"
                                      else prediction_type, PREDICTION_TYPES)
        self.timestep_spacing = choice("timestep_spacing", timestep_spacing, SPACINGS)
        self.final_sigmas_type = choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        # log_linear builds n + 1 sigmas in ascending order in diffusers, which looks unintended.
        choice("interpolation_type", interpolation_type, ("linear",))
        if prediction_type == "v_prediction":
            # continuous + v_prediction feeds 0.25 * log(sigma) to the model (EDM preconditioning).
            off("timestep_type", timestep_type, "discrete")
        else:
            choice("timestep_type", timestep_type, ("discrete", "continuous"))
        off("use_exponential_sigmas", use_exponential_sigmas)
        off("use_beta_sigmas", use_beta_sigmas)
        self.num_train_timesteps = int(num_train_timesteps)
        self.steps_offset = int(steps_offset)
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

        alphas_bar = alphas_cumprod(self.num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                    rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            # alpha_bar_T = 0 would make sigma_T infinite; diffusers uses 2^-24 (smallest fp16 subnormal).
            alphas_bar[-1] = 2.0 ** -24
        self.alphas_cumprod = alphas_bar
        # sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): x_t / sqrt(alpha_bar_t) = x0 + sigma_t * eps
        # (EDM Table 1, "VP" column). float32, ascending in t.
        self.train_sigmas = np.sqrt((1 - alphas_bar) / alphas_bar)

        self.timesteps = np.empty(0)
        self.sigmas = np.empty(0, dtype=np.float32)
        self.init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps, self.num_train_timesteps)
        # diffusers keeps Euler's timesteps in float32 (they may be fractional with Karras sigmas).
        timesteps = spaced_timesteps(self.timestep_spacing, num_inference_steps, self.num_train_timesteps,
                                     self.steps_offset).astype(np.float32)
        # sigma at each (possibly fractional) timestep: linear interpolation of the training sigmas.
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)

        if self.use_karras_sigmas:
            # EDM eq. (5) between the ends of the spaced schedule above (not the training schedule:
            # with "leading" spacing sigma_min is sigma at t = steps_offset), unless the config pins them.
            sigma_min = self.sigma_min if self.sigma_min is not None else float(sigmas[-1])
            sigma_max = self.sigma_max if self.sigma_max is not None else float(sigmas[0])
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
            # The UNet still wants a timestep: the fractional t whose training sigma is each sigma.
            timesteps = sigma_to_t(sigmas, np.log(self.train_sigmas)).astype(np.float32)

        # The last step goes to sigma = 0 (a clean sample) or to the smallest training sigma.
        last = 0.0 if self.final_sigmas_type == "zero" else self.train_sigmas[0]
        self.sigmas = np.append(sigmas, last).astype(np.float32)
        self.timesteps = timesteps.astype(np.float64)

        max_sigma = self.sigmas.max()
        # diffusers: with "leading" spacing the first timestep is below T-1, and its (historical)
        # choice is to scale the noise by sqrt(sigma_max^2 + 1) there, by sigma_max otherwise.
        if self.timestep_spacing == "leading":
            max_sigma = np.sqrt(max_sigma * max_sigma + np.float32(1))
        self.init_noise_sigma = float(max_sigma)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        # Var(x0 + sigma * eps) = 1 + sigma^2 for unit-variance latents: give the UNet unit variance
        # (EDM Table 1, c_in = 1 / sqrt(sigma^2 + 1)).
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

        # Denoised estimate D(x; sigma) from the model's parameterisation.
        if self.prediction_type == "epsilon":
            x0 = x - sigma * out
        elif self.prediction_type == "v_prediction":
            # v = alpha * eps - sigma_vp * x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4);
            # in sigma space: x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1).
            x0 = out * (-sigma / np.sqrt(sigma * sigma + np.float32(1))) + x / (sigma * sigma + np.float32(1))
        else:
            x0 = out

        self.x0 = x0

        # EDM eqs. (1) and (3): dx/dsigma = (x - D(x; sigma)) / sigma; one Euler step to sigma_next.
        derivative = (x - x0) / sigma
        return (x + derivative * (sigma_next - sigma)).astype(np.float32, copy=False)
