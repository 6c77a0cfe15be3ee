"""Edit-job fixtures and diffusers references (dev-time only: torch, diffusers, optimum-onnx).

1. Fixtures, in the project's bundle layout, exported with Optimum's ONNX exporter:
   - ``tests/fixtures/tiny-sd/vae_encoder``: the encoder of tiny-sd's AutoencoderKL (the same seeded
     weights as make_tiny_bundle.py, whose decoder the bundle already has);
   - ``tests/fixtures/tiny-sd-inpaint/unet``: a 9-channel UNet (inpainting architecture);
   - ``tests/fixtures/tiny-sd-pix2pix/unet``: an 8-channel UNet (InstructPix2Pix architecture).
   The two UNets are small random-weight models using tiny-sd's text encoder and VAE: the tests
   assemble a bundle from tiny-sd's folders plus the UNet.
2. References: diffusers' StableDiffusionImg2ImgPipeline (strength 0.3 and 0.75, Euler; 0.75 with
   DDIM), StableDiffusionInpaintPipeline with tiny-sd's 4-channel UNet and with the 9-channel one,
   and StableDiffusionInstructPix2PixPipeline, all from the same weights, inputs and noise as
   edge-imagegen: diffusers' ``randn_tensor`` (the VAE posterior sample and the initial noise) is
   patched to return edge-imagegen's draws (PCG64 of the job's seed) in the order diffusers asks
   for them. Also each numpy scheduler's ``add_noise`` against diffusers'. Written to
   ``tests/fixtures/edit_reference.npz`` with the job of each case.

    /work/devvenv/bin/python tools/make_edit_references.py
"""

from __future__ import annotations

import inspect
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionInstructPix2PixPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from edge import images, schedulers  # noqa: E402
from edge.pipeline import gaussian, make_rng  # noqa: E402
from make_tiny_bundle import RESOLUTION, TOKENS, build_pipeline, export_optimum, fix_shapes  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TINY_SD = FIXTURES / "tiny-sd"
REFERENCE = FIXTURES / "edit_reference.npz"
LATENT = RESOLUTION // 8
LATENT_SHAPE = (1, 4, LATENT, LATENT)
BASE_JOB = {"prompt": "knolling of 2 red gears and a blue battery on white", "negative_prompt": "shadow",
            "steps": 10, "guidance": 7.5, "seed": 11}


def input_image() -> Image.Image:
    """A deterministic 128x128 test picture: gradient background, a few shapes."""
    y, x = np.mgrid[0:RESOLUTION, 0:RESOLUTION]
    base = np.stack([x * 2, y * 2, 255 - x - y // 2], axis=-1).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 24, 70, 74), fill=(220, 30, 40))
    draw.rectangle((76, 60, 116, 110), fill=(30, 60, 200))
    draw.line((0, 127, 127, 0), fill=(250, 250, 250), width=5)
    return image


def input_mask() -> Image.Image:
    mask = Image.new("L", (RESOLUTION, RESOLUTION), 0)
    ImageDraw.Draw(mask).rectangle((40, 32, 95, 88), fill=255)
    return mask


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def small_unet(in_channels: int, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)


def export(pipe: StableDiffusionPipeline, tmp: Path, name: str) -> Path:
    pipe.save_pretrained(tmp / f"{name}-pt")
    export_optimum(tmp / f"{name}-pt", tmp / f"{name}-onnx")
    return tmp / f"{name}-onnx"


def copy_component(onnx_dir: Path, component: str, dest: Path, dims: dict[str, int]) -> None:
    target = dest / component
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(onnx_dir / component, target)
    fix_shapes(target / "model.onnx", dims)
    config = target / "config.json"
    data = json.loads(config.read_text())
    data.pop("_name_or_path", None)
    config.write_text(json.dumps(data, indent=2) + "\n")


UNET_DIMS = {"height": LATENT, "width": LATENT, "sequence_length": TOKENS}


def write_fixtures(base: StableDiffusionPipeline, inpaint_unet, pix2pix_unet) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx_dir = export(base, tmp, "base")
        copy_component(onnx_dir, "vae_encoder", TINY_SD, {"sample_height": RESOLUTION, "sample_width": RESOLUTION,
                                                          "sample_height / 8": LATENT, "sample_width / 8": LATENT})
        for unet, folder in ((inpaint_unet, "tiny-sd-inpaint"), (pix2pix_unet, "tiny-sd-pix2pix")):
            pipe = StableDiffusionPipeline(**{**base.components, "unet": unet})
            onnx_dir = export(pipe, tmp, folder)
            copy_component(onnx_dir, "unet", FIXTURES / folder, UNET_DIMS)


class Draws:
    """diffusers' randn_tensor, answering from a list of edge-imagegen draws in diffusers' call order."""

    def __init__(self):
        self.queue: list[np.ndarray] = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        value = self.queue.pop(0)
        assert tuple(shape) == value.shape, (shape, value.shape)
        return torch.from_numpy(value.copy())


def patch_randn(draws: Draws) -> None:
    import diffusers.models.autoencoders.vae as vae
    from diffusers.pipelines.stable_diffusion import (pipeline_stable_diffusion_img2img as img2img,
                                                      pipeline_stable_diffusion_inpaint as inpaint,
                                                      pipeline_stable_diffusion_instruct_pix2pix as pix2pix)
    for module in (vae, img2img, inpaint, pix2pix):
        module.randn_tensor = draws


def our_draws(seed: int, count: int) -> list[np.ndarray]:
    rng = make_rng(seed)
    return [gaussian(rng, LATENT_SHAPE) for _ in range(count)]


DIFFUSERS_SCHEDULERS = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
                        "ddim": DDIMScheduler, "lcm": LCMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
                        "dpmpp_2m_karras": DPMSolverMultistepScheduler}


def scheduler_for(pipe, name: str | None):
    """The diffusers scheduler edge.schedulers.from_config builds for an override ``name``: the
    bundle's fields, and edge's latent-safe values for clip_sample/set_alpha_to_one it lacks."""
    if name is None:
        return pipe.scheduler
    cls = DIFFUSERS_SCHEDULERS[name]
    bundle_fields = json.loads((TINY_SD / "scheduler" / "scheduler_config.json").read_text())
    extra = {k: v for k, v in schedulers.LATENT_SAFE.items()
             if k not in bundle_fields and k in inspect.signature(cls).parameters}
    if name == "dpmpp_2m_karras":
        extra["use_karras_sigmas"] = True
    return cls.from_config(pipe.scheduler.config, **extra)


def add_noise_references(config: dict) -> dict[str, np.ndarray]:
    """Each scheduler's add_noise at step index 4 of 10, as diffusers computes it after set_begin_index."""
    out = {}
    rng = make_rng(99)
    x0, noise = gaussian(rng, LATENT_SHAPE), gaussian(rng, LATENT_SHAPE)
    out["add_noise/x0"], out["add_noise/noise"] = x0, noise
    for name, cls in DIFFUSERS_SCHEDULERS.items():
        extra = {"use_karras_sigmas": True} if name == "dpmpp_2m_karras" else {}
        sched = cls.from_config(config, **extra)
        sched.set_timesteps(10)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(4)
        t = sched.timesteps[4:5]
        out[f"add_noise/{name}"] = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        ours = schedulers.from_config(config, name)
        ours.set_timesteps(10)
        err = np.abs(ours.add_noise(x0, noise, 4) - out[f"add_noise/{name}"]).max()
        print(f"add_noise {name}: max |ours - diffusers| {err:.2e}")
    return out


def main() -> None:
    base = build_pipeline(TINY_SD / "tokenizer")
    inpaint_unet, pix2pix_unet = small_unet(9, seed=1), small_unet(8, seed=2)
    write_fixtures(base, inpaint_unet, pix2pix_unet)

    image, mask = input_image(), input_mask()
    blurred = images.prepare_mask(mask, image.size, RESOLUTION, RESOLUTION, "just_resize", 4, [])
    draws = Draws()
    patch_randn(draws)
    components = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor",
                                                                         "image_encoder")}
    common = dict(prompt=BASE_JOB["prompt"], negative_prompt=BASE_JOB["negative_prompt"],
                  num_inference_steps=BASE_JOB["steps"], guidance_scale=BASE_JOB["guidance"], output_type="np")
    seed = BASE_JOB["seed"]
    cases = []

    for strength, name in ((0.3, None), (0.75, None), (0.75, "ddim")):
        pipe = StableDiffusionImg2ImgPipeline(**components, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
        pipe.scheduler = scheduler_for(pipe, name)
        draws.queue = our_draws(seed, 2)  # posterior sample, then the initial noise
        out = pipe(image=image, strength=strength, **common).images[0]
        cases.append((f"img2img_{strength}_{name or 'euler'}", {"strength": strength, "scheduler": name}, out, False))

    for unet, label in ((base.unet, "inpaint_4ch"), (inpaint_unet, "inpaint_9ch")):
        pipe = StableDiffusionInpaintPipeline(**{**components, "unet": unet}, safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
        # 4-channel: image posterior sample, noise, (masked-image sample, unused); 9-channel: noise, masked sample.
        draws.queue = our_draws(seed, 3 if label == "inpaint_4ch" else 2)
        out = pipe(image=image, mask_image=blurred, height=RESOLUTION, width=RESOLUTION, strength=1.0,
                   **common).images[0]
        cases.append((label, {"mask_blur": 4}, out, True))

    pipe = StableDiffusionInstructPix2PixPipeline(**{**components, "unet": pix2pix_unet}, safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
    draws.queue = our_draws(seed, 1)
    out = pipe(image=image, image_guidance_scale=1.5, **{k: v for k, v in common.items()}).images[0]
    cases.append(("pix2pix", {"image_guidance": 1.5}, out, False))

    arrays: dict[str, np.ndarray] = {"image_png": np.frombuffer(png(image), np.uint8),
                                     "mask_png": np.frombuffer(png(mask), np.uint8),
                                     "base_job": np.asarray(json.dumps(BASE_JOB))}
    for label, fields, out, masked in cases:
        arrays[f"{label}/image"] = np.round(out * 255).astype(np.uint8)
        arrays[f"{label}/fields"] = np.asarray(json.dumps(fields))
        arrays[f"{label}/masked"] = np.asarray(masked)
        print(f"{label}: recorded {arrays[f'{label}/image'].shape}")
    arrays.update(add_noise_references(dict(base.scheduler.config)))
    np.savez_compressed(REFERENCE, **arrays)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
