"""Math that every scheduler shares: the training noise schedule, timestep spacing, Karras sigmas.

Only what would otherwise be copied into each scheduler file lives here. Dtypes follow the
diffusers torch path on purpose: betas and ``alphas_cumprod`` are float32 tensors there (torch's
CPU cumprod accumulates in double and rounds each output, which ``np.cumprod`` in float64 followed
by a cast to float32 reproduces bit for bit), while spacing and interpolation happen in float64
numpy. Matching those cast points is what lets the numpy schedulers agree with diffusers to 1e-5.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, ValidationError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --- config checks ------------------------------------------------------------------------------
def choice(field: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise ConfigError naming the field."""
    if value not in allowed:
        raise ConfigError(f"scheduler_config.json: {field}={value!r} is not supported; "
                          f"use one of {', '.join(allowed)}")
    return value  # type: ignore[return-value]


def off(field: str, value: object, default: object = False) -> None:
    """Reject a diffusers feature this port does not implement unless it is left at its default."""
    if value is not None and value != default:
        raise ConfigError(f"scheduler_config.json: {field}={value!r} is not supported by edge-imagegen "
                          f"(only {default!r}); pick another scheduler with --scheduler")


def check_steps(num_inference_steps: int, maximum: int, why: str = "the training timesteps") -> None:
    """Steps come from the job, so a bad count is the job's fault: ValidationError("steps")."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValidationError("steps", f"must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= maximum:
        raise ValidationError("steps", f"must be between 1 and {maximum} ({why}), got {num_inference_steps}")


# --- training noise schedule --------------------------------------------------------------------
def alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                   trained_betas: list[float] | None = None,
                   rescale_betas_zero_snr: bool = False) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), DDPM (Ho et al. 2020) eq. (4) notation; float32.

    ``rescale_betas_zero_snr`` applies Algorithm 1 of Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", so that alpha_bar at the last step is exactly 0.
    """
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        if betas.shape != (num_train_timesteps,):
            raise ConfigError(f"scheduler_config.json: trained_betas has {betas.size} values but "
                              f"num_train_timesteps is {num_train_timesteps}")
    elif beta_schedule == "linear":
        # DDPM's schedule: betas linear in t.
        betas = np.linspace(beta_start, beta_end, num_train_timesteps).astype(np.float32)
    elif beta_schedule == "scaled_linear":
        # Latent Diffusion / Stable Diffusion: linear in sqrt(beta), squared in float32 like diffusers.
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps).astype(np.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        # Improved DDPM (Nichol & Dhariwal 2021) eq. (17): alpha_bar(t) = cos((t/T + s)/(1 + s) * pi/2)^2
        # with s = 0.008, betas = 1 - alpha_bar(t2)/alpha_bar(t1) capped at 0.999; float64, then float32.
        def alpha_bar(t: np.ndarray) -> np.ndarray:
            return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

        t = np.arange(num_train_timesteps, dtype=np.float64)
        betas = np.minimum(1 - alpha_bar((t + 1) / num_train_timesteps) / alpha_bar(t / num_train_timesteps),
                           0.999).astype(np.float32)
    else:
        choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        raise AssertionError("unreachable")

    if rescale_betas_zero_snr:
        # Lin et al. 2023, Algorithm 1: shift sqrt(alpha_bar) so the last one is 0, scale so the
        # first one is unchanged, then undo the cumprod to get betas back. float32 like diffusers.
        sqrt_ab = np.sqrt(_cumprod32(np.float32(1) - betas))
        first, last = sqrt_ab[0], sqrt_ab[-1]
        sqrt_ab = (sqrt_ab - last) * (first / (first - last))
        ab = sqrt_ab ** 2
        alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
        betas = np.float32(1) - alphas

    return _cumprod32(np.float32(1) - betas)


def _cumprod32(x: np.ndarray) -> np.ndarray:
    """float32 cumprod accumulated in float64, as torch's CPU kernel does."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


# --- timestep spacing ---------------------------------------------------------------------------
def spaced_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int,
                     steps_offset: int) -> np.ndarray:
    """Descending inference timesteps (float64; linspace not rounded), Lin et al. 2023, Table 2.

    - linspace: evenly from T-1 down to 0, both ends included.
    - leading:  0, r, 2r, ... with r = T // n, reversed, plus ``steps_offset`` (SD 1.x uses 1):
      the last step is at t = steps_offset, the first is far from T-1 for small n.
    - trailing: T, T - T/n, ... rounded, minus 1: the first step is T-1 (needed by few-step models).
    """
    n, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        # diffusers' np.arange with a float step gives n + 1 values for some n (61, 103, 121, 122
        # with T = 1000), the extra one at t = -1; keep the n timesteps that were asked for.
        return np.arange(T, 0, -T / n).round()[:n] - 1
    choice("timestep_spacing", spacing, SPACINGS)
    raise AssertionError("unreachable")


# --- forward process (img2img, inpainting) ------------------------------------------------------
def noised(original: np.ndarray, noise: np.ndarray, signal: np.floating, noise_scale: np.floating) -> np.ndarray:
    """signal * x0 + noise_scale * eps in float32: every scheduler's ``add_noise`` (diffusers' arithmetic)."""
    x0, eps = np.asarray(original, dtype=np.float32), np.asarray(noise, dtype=np.float32)
    return (np.float32(signal) * x0 + np.float32(noise_scale) * eps).astype(np.float32, copy=False)


def vp_add_noise(alphas_bar: np.ndarray, t: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), DDPM (Ho et al. 2020) eq. (4)."""
    a = alphas_bar[t]
    return noised(original, noise, a ** np.float32(0.5), (np.float32(1) - a) ** np.float32(0.5))


# --- sigma-space helpers (Euler, DPM++) ---------------------------------------------------------
def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Karras et al. 2022 (EDM) eq. (5): sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    rho = 7.0  # the paper's choice
    ramp = np.linspace(0, 1, num_inference_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation in log sigma.

    ``log_sigmas`` is log of the training sigmas, ascending in t. Same arithmetic as diffusers'
    ``_sigma_to_t``, vectorised over ``sigmas``.
    """
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high
