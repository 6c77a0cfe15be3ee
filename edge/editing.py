"""Edit jobs: image to image, inpainting and instruction editing, done as the diffusers pipelines do.

Which edit runs follows from the job's fields and the UNet's input channels (C: the VAE's latent
channels, 4 for every SD model):

    UNet in  job gives            kind      as diffusers'
    C        prompt               text      StableDiffusionPipeline
    C        init_image           img2img   StableDiffusionImg2ImgPipeline
    C        init_image + mask    inpaint   StableDiffusionInpaintPipeline with a 4-channel UNet: after each
                                            step the known region is reset to the encoded image noised to
                                            the next step's level
    C + 5    init_image + mask    inpaint_model  StableDiffusionInpaintPipeline with a 9-channel UNet: mask and
             (or neither: all     masked-image latents are appended to the UNet input (no mask: repaint
             masked)              everything, as AUTOMATIC1111 does for text to image on such models)
    2C       init_image           instruct  StableDiffusionInstructPix2PixPipeline: image latents appended,
                                            three-way classifier-free guidance with ``image_guidance``

Start of the schedule (img2img, inpaint): ``init = min(int(steps * strength), steps)`` steps run, the
last ``init`` of the schedule; the encoded latents are noised to the first of them with the
scheduler's ``add_noise`` (diffusers' get_timesteps + set_begin_index). Inpainting at strength 1
starts from pure noise (``noise * init_noise_sigma``), as diffusers' is_strength_max. Strength 0
runs no step: the result is the input's round trip through the VAE.

Encoded latents are, as the respective pipeline takes them: img2img and inpainting a sample of the
encoder's posterior (``mean + std * noise``, the noise drawn from the job's generator before the
initial noise: diffusers' retrieve_latents in its default "sample" mode) times scaling_factor;
InstructPix2Pix the posterior mean ("argmax" mode), unscaled. The generator's draws come in
diffusers' order, so a seed gives the same image as diffusers with the same draws; one exception:
with a 4-channel UNet diffusers also encodes the masked image (and never uses it), drawing one more
posterior sample that is skipped here, so with a noise-drawing scheduler (euler_a, lcm) the later
step noise differs from diffusers' for that case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from . import images
from .bundle import EXPORT_COMMAND
from .errors import BundleError, ValidationError
from .jobs import Job

Draw = Callable[[tuple[int, ...]], np.ndarray]  # standard normal noise of a shape, from the job's generator
DEFAULT_STRENGTH = 0.75  # AUTOMATIC1111's default denoising strength for img2img
DEFAULT_IMAGE_GUIDANCE = 1.5  # diffusers' StableDiffusionInstructPix2PixPipeline default


def model_kind(unet_channels: int, latent_channels: int) -> str:
    """``plain``, ``inpainting`` or ``instruct``, from the UNet's input channels."""
    kinds = {latent_channels: "plain", latent_channels + 5: "inpainting", 2 * latent_channels: "instruct"}
    if unet_channels not in kinds:
        raise BundleError(f"unet: takes {unet_channels} input channels; expected {latent_channels} (text to image), "
                          f"{latent_channels + 5} (inpainting) or {2 * latent_channels} (InstructPix2Pix)")
    return kinds[unet_channels]


def job_kind(job: Job, model: str, has_encoder: bool) -> str:
    """What a job asks of this model, or a ValidationError naming the field it cannot have."""
    if job.image_guidance is not None and model != "instruct":
        raise ValidationError("image_guidance", "this model does not take it: only InstructPix2Pix models "
                              "(a UNet with twice the latent channels) have an image guidance scale")
    if model == "instruct":
        if job.init_image is None:
            raise ValidationError("init_image", "is required: this model (InstructPix2Pix) edits an image")
        if job.mask is not None:
            raise ValidationError("mask", "this model edits by instruction (InstructPix2Pix) and takes no mask")
        if job.strength is not None:
            raise ValidationError("strength", "InstructPix2Pix runs the whole schedule; leave strength out")
        kind = "instruct"
    elif model == "inpainting":
        kind = "inpaint_model"
    elif job.init_image is None:
        return "text"
    else:
        kind = "inpaint" if job.mask is not None else "img2img"
    if not has_encoder:
        raise ValidationError("init_image", f"this model has no vae_encoder/: export it with `{EXPORT_COMMAND}` "
                              "(Optimum writes vae_encoder/ beside vae_decoder/) and copy the folder into the bundle")
    return kind


def start_index(steps: int, strength: float) -> int:
    """The first step that runs: diffusers' get_timesteps (scheduler order 1)."""
    return steps - min(int(steps * strength), steps)


@dataclass(frozen=True)
class Moments:
    """A VAE encoder's diagonal Gaussian posterior (diffusers' DiagonalGaussianDistribution)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_output(cls, output: np.ndarray, latent_channels: int) -> "Moments":
        """From ``latent_parameters`` (mean and log variance, Optimum's export); an encoder that
        outputs the latents alone is taken as a posterior of zero width."""
        if output.shape[1] == latent_channels:
            return cls(output, np.zeros_like(output))
        mean, logvar = output[:, :latent_channels], np.clip(output[:, latent_channels:], -30.0, 20.0)
        return cls(mean, np.exp(np.float32(0.5) * logvar))

    def sample(self, draw: Draw) -> np.ndarray:
        return (self.mean + self.std * draw(self.mean.shape)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Guide:
    """The UNet passes of one step besides the latents, and how their noise predictions combine."""

    contexts: tuple[np.ndarray, ...]  # text embeddings, one per pass
    extras: tuple[np.ndarray | None, ...]  # channels appended to the scaled latents, one per pass
    combine: Callable[[list[np.ndarray]], np.ndarray]


def text_guide(cond: np.ndarray, uncond: np.ndarray | None, guidance: float,
               extra: np.ndarray | None = None) -> Guide:
    if uncond is None:
        return Guide((cond,), (extra,), lambda eps: eps[0])
    # Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + w * (eps_c - eps_u)
    return Guide((uncond, cond), (extra, extra), lambda eps: eps[0] + guidance * (eps[1] - eps[0]))


def instruct_guide(cond: np.ndarray, uncond: np.ndarray | None, image_latents: np.ndarray, guidance: float,
                   image_guidance: float) -> Guide:
    if uncond is None:
        return Guide((cond,), (image_latents,), lambda eps: eps[0])
    # InstructPix2Pix (Brooks et al. 2023), eq. 3: passes (text, image), (no text, image), (neither).
    none = np.zeros_like(image_latents)
    return Guide((cond, uncond, uncond), (image_latents, image_latents, none),
                 lambda eps: eps[2] + guidance * (eps[0] - eps[1]) + image_guidance * (eps[1] - eps[2]))


@dataclass(frozen=True)
class KnownRegion:
    """The 4-channel inpainting step hook: outside the mask, the encoded image at the next step's noise level."""

    latents: np.ndarray
    noise: np.ndarray
    mask: np.ndarray  # (1, 1, h, w), 1 = repaint
    scheduler: object

    def __call__(self, latents: np.ndarray, index: int) -> np.ndarray:
        last = index + 1 >= len(self.scheduler.timesteps)
        known = self.latents if last else self.scheduler.add_noise(self.latents, self.noise, index + 1)
        return (1 - self.mask) * known + self.mask * latents


@dataclass(frozen=True)
class Start:
    index: int  # first step index that runs
    latents: np.ndarray
    guide: Guide
    after_step: Callable[[np.ndarray, int], np.ndarray] | None = None


@dataclass
class Edit:
    """One job's inputs at the job's size, and how its denoising starts."""

    kind: str
    job: Job
    image: Image.Image | None = None  # RGB init image, resized
    mask: Image.Image | None = None  # greyscale mask, resized and blurred (white = repaint)
    notes: list[str] = field(default_factory=list)
    moments: dict[str, Moments] = field(default_factory=dict)  # encoded "image" and/or "masked"

    @classmethod
    def load(cls, job: Job, kind: str, width: int, height: int) -> "Edit":
        edit = cls(kind, job)
        if job.init_image is not None:
            original = images.open_image("init_image", images.b64decode("init_image", job.init_image), None)
            edit.image = images.resize(original.convert("RGB"), width, height, job.resize_mode)
            if job.mask is not None:
                mask = images.open_image("mask", images.b64decode("mask", job.mask), None)
                edit.mask = images.prepare_mask(mask, original.size, width, height, job.resize_mode,
                                                job.mask_blur, edit.notes)
        if kind == "inpaint_model" and edit.mask is None:  # repaint everything
            if edit.image is None:
                edit.image = Image.new("RGB", (width, height), (127, 127, 127))
            edit.mask = Image.new("L", (width, height), 255)
        return edit

    @property
    def strength(self) -> float:
        if self.job.strength is not None:
            return self.job.strength
        return 1.0 if self.mask is not None else DEFAULT_STRENGTH

    @property
    def image_guidance(self) -> float:
        return DEFAULT_IMAGE_GUIDANCE if self.job.image_guidance is None else self.job.image_guidance

    def to_encode(self) -> dict[str, np.ndarray]:
        """Pixels (1, 3, H, W) in [-1, 1] the VAE encoder must see, by name."""
        if self.kind == "text":
            return {}
        pixels = {"image": images.to_pixels(self.image)}
        if self.kind == "inpaint_model":
            masked = pixels["image"] * (images.binary_mask(self.mask) < 0.5)
            pixels = {"masked": masked} if self.strength == 1.0 else {**pixels, "masked": masked}
        return pixels

    def parameters(self) -> dict[str, str]:
        """AUTOMATIC1111's settings for this edit, in the order it writes them."""
        settings = {}
        if self.kind in ("img2img", "inpaint", "inpaint_model") and self.job.init_image is not None:
            settings["Denoising strength"] = f"{self.strength:g}"
        if self.job.mask is not None:
            settings["Mask blur"] = str(self.job.mask_blur)
        if self.kind == "instruct":
            settings["Image CFG scale"] = f"{self.image_guidance:g}"
        return settings

    def start(self, scheduler, draw: Draw, shape: tuple[int, ...], cond: np.ndarray, uncond: np.ndarray | None,
              scaling: float, shift: float) -> Start:
        """Initial latents, the UNet passes and the step hook for one image (its own ``draw``)."""
        guidance = self.job.guidance
        if self.kind == "text":
            return Start(0, draw(shape) * scheduler.init_noise_sigma, text_guide(cond, uncond, guidance))
        if self.kind == "instruct":
            latents = draw(shape) * scheduler.init_noise_sigma
            return Start(0, latents, instruct_guide(cond, uncond, self.moments["image"].mean, guidance,
                                                    self.image_guidance))

        def encoded(name: str) -> np.ndarray:
            return ((self.moments[name].sample(draw) - np.float32(shift)) * np.float32(scaling)).astype(np.float32)

        n = len(scheduler.timesteps)
        index = start_index(n, self.strength)
        clean = encoded("image") if "image" in self.moments else None  # drawn before the noise, as diffusers
        noise = draw(shape)
        if self.kind != "img2img" and self.strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = clean if index == n else scheduler.add_noise(clean, noise, index)
        # The mask at latent size by nearest neighbour (torch's interpolate default): every scale-th pixel.
        scale = self.mask.size[1] // shape[2] if self.mask is not None else 1
        mask = images.binary_mask(self.mask)[:, :, ::scale, ::scale] if self.mask is not None else None
        if self.kind == "inpaint_model":
            extra = np.concatenate([mask, encoded("masked")], axis=1)
            return Start(index, latents, text_guide(cond, uncond, guidance, extra))
        hook = KnownRegion(clean, noise, mask, scheduler) if self.kind == "inpaint" else None
        return Start(index, latents, text_guide(cond, uncond, guidance), hook)

    def finish(self, image: Image.Image) -> Image.Image:
        """Inpainting: the original pixels back wherever the blurred mask is black (AUTOMATIC1111's overlay)."""
        if self.mask is None or self.job.mask is None:
            return image
        return images.composite(image, self.image, self.mask)
