"""DPM++ 2M: Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Algorithm 2 (multistep second order); numpy port of diffusers' DPMSolverMultistepScheduler
with algorithm_type="dpmsolver++", solver_order=2.

DPM-Solver++ integrates the diffusion ODE in lambda = log(alpha_t / sigma_t) (half log-SNR) using
the data prediction x0 = x_theta(x_t, t). With h = lambda_t - lambda_s:

    first order (= DDIM):  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s
    second order (2M):     D = x0_s0 + (1 / (2 r)) (x0_s0 - x0_s1),  r = h_prev / h,
                           x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^{-h} - 1) D

("midpoint", Algorithm 2; "heun" is the alternative weighting diffusers also offers). The
second-order step reuses the previous step's x0, so the scheduler keeps that one output between
calls; ``set_timesteps`` clears it. The first step is always first order, and so is the last
when it goes to sigma = 0 (final_sigmas_type "zero"), or with lower_order_final and fewer than
15 steps, or with euler_at_final.

The schedule is kept as sigma = sqrt((1 - alpha_bar) / alpha_bar) like the Euler schedulers, and
alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma * alpha_t (variance-preserving). Samples are in
variance-preserving space: no input scaling, init_noise_sigma = 1.

Config fields: num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
solver_order (2), prediction_type (epsilon, v_prediction, sample), algorithm_type (dpmsolver++),
solver_type (midpoint, heun), lower_order_final, euler_at_final, use_karras_sigmas,
final_sigmas_type (zero, sigma_min), lambda_min_clipped, timestep_spacing, steps_offset,
rescale_betas_zero_snr. Off only: thresholding, variance_type, use_exponential_sigmas,
use_beta_sigmas, use_lu_lambdas, use_flow_sigmas, use_dynamic_shifting.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .common import (PREDICTION_TYPES, SPACINGS, alphas_cumprod, check_steps, choice, karras_sigmas, noised,
                     off, sigma_to_t)


class DPMSolverMultistepScheduler:
    needs_noise = False
    x0: np.ndarray | None = None  # the denoised estimate of the last step (for previews)
    init_noise_sigma = 1.0

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
                 use_flow_sigmas: bool = False, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: str | None = None,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False) -> None:
        # diffusers maps DEIS's "deis" to dpmsolver++, and DEIS/UniPC solver types to midpoint, so
        # that DPMSolverMultistepScheduler.from_config(deis_or_unipc.config) works; so do we.
        self.algorithm_type = choice("algorithm_type", "dpmsolver++" if algorithm_type == "deis" else algorithm_type,
                                     ("dpmsolver++",))
        self.solver_type = choice("solver_type", "midpoint" if solver_type in ("logrho", "bh1", "bh2")
                                  else solver_type, ("midpoint", "heun"))
        if solver_order != 2:
            raise ConfigError(f"scheduler_config.json: solver_order={solver_order!r} is not supported; "
                              "dpmpp_2m is second order (use 2)")
        self.prediction_type = choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.timestep_spacing = choice("timestep_spacing", timestep_spacing, SPACINGS)
        self.final_sigmas_type = choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        for field, value in (("thresholding", thresholding), ("use_exponential_sigmas", use_exponential_sigmas),
                             ("use_beta_sigmas", use_beta_sigmas), ("use_lu_lambdas", use_lu_lambdas),
                             ("use_flow_sigmas", use_flow_sigmas), ("use_dynamic_shifting", use_dynamic_shifting)):
            off(field, value)
        off("variance_type", variance_type, None)
        self.num_train_timesteps = int(num_train_timesteps)
        self.steps_offset = int(steps_offset)
        self.lower_order_final = bool(lower_order_final)
        self.euler_at_final = bool(euler_at_final)
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self.lambda_min_clipped = float(lambda_min_clipped)
        self.beta_schedule = beta_schedule
        self.name = "dpmpp_2m_karras" if self.use_karras_sigmas else "dpmpp_2m"

        alphas_bar = alphas_cumprod(self.num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                    rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            # alpha_bar_T = 0 would make sigma_T infinite; diffusers uses 2^-24 (smallest fp16 subnormal).
            alphas_bar[-1] = 2.0 ** -24
        self.alphas_cumprod = alphas_bar
        # lambda_t = log(alpha_t) - log(sigma_t) of the training schedule, only for lambda_min_clipped.
        self.train_lambdas = np.log(np.sqrt(alphas_bar)) - np.log(np.sqrt(1 - alphas_bar))
        # sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float32, ascending in t.
        self.train_sigmas = np.sqrt((1 - alphas_bar) / alphas_bar)

        self.timesteps = np.empty(0, dtype=np.int64)
        self.sigmas = np.empty(0, dtype=np.float32)
        self._previous_x0: np.ndarray | None = None  # x0 of the last step: the multistep state

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_steps(num_inference_steps, self.num_train_timesteps)
        n, T = num_inference_steps, self.num_train_timesteps
        # lambda_min_clipped (for cosine schedules) cuts the noisiest timesteps whose lambda is below it.
        clipped = int(np.searchsorted(self.train_lambdas[::-1], self.lambda_min_clipped))
        last_timestep = T - clipped

        # Spacing as Lin et al. 2023, Table 2, but diffusers' DPM variant differs from the other
        # schedulers: linspace and leading make n + 1 points and drop the one at 0 (so "leading" uses
        # step T // (n + 1), not T // n), trailing is the same as elsewhere.
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            step_ratio = last_timestep // (n + 1)
            timesteps = (np.arange(0, n + 1) * step_ratio)[::-1][:-1].astype(np.int64) + self.steps_offset
        else:
            # As in common.spaced_timesteps: keep n values where np.arange's float step gives n + 1.
            timesteps = (np.arange(last_timestep, 0, -T / n).round()[:n] - 1).astype(np.int64)

        if self.use_karras_sigmas:
            # EDM eq. (5) over the whole training range, then the nearest timestep of each sigma
            # (rounded, except for the cosine schedule where diffusers truncates to int instead).
            sigmas = karras_sigmas(float(self.train_sigmas[0]), float(self.train_sigmas[-1]), n)
            t = sigma_to_t(sigmas, np.log(self.train_sigmas))
            timesteps = (t if self.beta_schedule == "squaredcos_cap_v2" else t.round()).astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)

        last = 0.0 if self.final_sigmas_type == "zero" else self.train_sigmas[0]
        self.sigmas = np.append(sigmas, last).astype(np.float32)
        self.timesteps = timesteps
        self._previous_x0 = None

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        return noised(original, noise, *self._alpha_sigma(self.sigmas[step_index]))

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        """alpha_t, sigma_t of the variance-preserving process at noise level sigma (float32)."""
        alpha_t = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
        return alpha_t, sigma * alpha_t

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        n = len(self.timesteps)
        x = np.asarray(sample, dtype=np.float32)
        out = np.asarray(model_output, dtype=np.float32)
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[step_index])

        # DPM-Solver++ works with the data prediction x0 (Lu et al. 2022, sec. 4).
        if self.prediction_type == "epsilon":
            x0 = (x - sigma_s0 * out) / alpha_s0
        elif self.prediction_type == "v_prediction":
            x0 = alpha_s0 * x - sigma_s0 * out  # v = alpha eps - sigma x0 (Salimans & Ho 2022)
        else:
            x0 = out
        previous_x0, self._previous_x0 = self._previous_x0, x0
        self.x0 = x0

        sigma_next = self.sigmas[step_index + 1]
        if sigma_next == 0:
            # The final step of final_sigmas_type "zero": lambda_t = +inf, and the first-order step
            # (which diffusers always takes there) tends to x_t = x0 as h -> inf.
            return x0.astype(np.float32, copy=False)
        # First order on the first step (no previous x0) and, as diffusers decides, on the last.
        first_order = previous_x0 is None or (step_index == n - 1 and (
            self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"))
        alpha_t, sigma_t = self._alpha_sigma(sigma_next)
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
        lambda_s0 = np.log(alpha_s0) - np.log(sigma_s0)
        h = lambda_t - lambda_s0
        decay = alpha_t * (np.exp(-h) - np.float32(1))  # alpha_t (e^{-h} - 1)

        if first_order:
            # DPM-Solver++(1), eq. above: identical to DDIM with eta = 0.
            prev = (sigma_t / sigma_s0) * x - decay * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[step_index - 1])
            lambda_s1 = np.log(alpha_s1) - np.log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            # Backward difference of x0 in lambda, scaled to this step's h (Algorithm 2, D_i).
            d1 = (np.float32(1) / r0) * (x0 - previous_x0)
            if self.solver_type == "midpoint":
                prev = (sigma_t / sigma_s0) * x - decay * x0 - np.float32(0.5) * decay * d1
            else:
                # "heun": the exact integral of a linear-in-lambda x0 (DPM-Solver++ appendix).
                prev = (sigma_t / sigma_s0) * x - decay * x0 + (
                    alpha_t * ((np.exp(-h) - np.float32(1)) / h + np.float32(1))) * d1
        return prev.astype(np.float32, copy=False)
