"""DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"; numpy port of diffusers' DDIMScheduler.

Deterministic (eta = 0, the diffusers pipelines' default), so ``needs_noise`` is False. One step
from timestep t to t_prev is eq. (12) with sigma_t = 0:

    x_{t_prev} = sqrt(a_prev) * x0_pred + sqrt(1 - a_prev) * eps_pred

where a = alpha_bar (the paper's alpha), x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) is the
"predicted x0" of eq. (12), and eps_pred the noise the model saw. Samples stay in variance-
preserving space, so the initial noise is not scaled and the UNet input is the sample itself.

Config fields: num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
clip_sample, clip_sample_range, set_alpha_to_one, steps_offset, prediction_type (epsilon,
v_prediction, sample), timestep_spacing, rescale_betas_zero_snr. thresholding must be off
(dynamic thresholding is for pixel-space models).
"""

from __future__ import annotations

import numpy as np

from .common import (PREDICTION_TYPES, SPACINGS, alphas_cumprod, check_steps, choice, off, spaced_timesteps,
                     vp_add_noise)


class DDIMScheduler:
    name = "ddim"
    needs_noise = False
    x0: np.ndarray | None = None  # the denoised estimate of the last step (for previews)
    init_noise_sigma = 1.0

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 clip_sample: bool = True, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False, clip_sample_range: float = 1.0,
                 timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False) -> None:
        self.prediction_type = choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.timestep_spacing = choice("timestep_spacing", timestep_spacing, SPACINGS)
        off("thresholding", thresholding)
        self.num_train_timesteps = int(num_train_timesteps)
        self.steps_offset = int(steps_offset)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)

        # No 2^-24 floor here (unlike the sigma-space schedulers): with zero-SNR betas alpha_bar_T = 0,
        # which is fine for v_prediction and divides by zero for epsilon, exactly as in diffusers.
        self.alphas_cumprod = alphas_cumprod(self.num_train_timesteps, beta_start, beta_end, beta_schedule,
                                             trained_betas, rescale_betas_zero_snr)
        # The last step has no "previous" alpha_bar: 1 (a clean sample) or alpha_bar_0.
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

        self.timesteps = np.empty(0, dtype=np.int64)
        self.num_inference_steps = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        # Integer timesteps (linspace is rounded) because DDIM indexes alpha_bar with them.
        self.timesteps = spaced_timesteps(self.timestep_spacing, num_inference_steps, self.num_train_timesteps,
                                          self.steps_offset).round().astype(np.int64)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        return vp_add_noise(self.alphas_cumprod, int(self.timesteps[step_index]), original, noise)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        t = int(self.timesteps[step_index])
        # As diffusers: the previous timestep is t - T // n whatever the spacing, so with "trailing"
        # or "linspace" it can differ by a few from the next entry of ``timesteps``.
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        x = np.asarray(sample, dtype=np.float32)
        out = np.asarray(model_output, dtype=np.float32)

        # "predicted x0" of eq. (12), and the noise direction, from the model's parameterisation.
        if self.prediction_type == "epsilon":
            x0 = (x - np.sqrt(b_t) * out) / np.sqrt(a_t)
            eps = out
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x - np.sqrt(a_t) * x0) / np.sqrt(b_t)
        else:
            # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, sec. 4 / appendix D).
            x0 = np.sqrt(a_t) * x - np.sqrt(b_t) * out
            eps = np.sqrt(a_t) * out + np.sqrt(b_t) * x

        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)

        self.x0 = x0
        # eq. (12) with sigma_t = 0 (eta = 0, eq. 16): "direction pointing to x_t" plus rescaled x0.
        direction = np.sqrt(1 - a_prev) * eps
        return (np.sqrt(a_prev) * x0 + direction).astype(np.float32, copy=False)
