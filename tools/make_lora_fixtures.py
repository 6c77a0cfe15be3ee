"""Record the LoRA reference (dev-time: torch, diffusers, peft, safetensors).

A small LoRA is made with PEFT on the test fixture model (``tests/fixtures/tiny-sd``, whose torch
weights ``make_tiny_bundle.build_pipeline`` rebuilds from seeds): rank 4, alpha 8 (scale 2, so the
alpha handling is exercised), on the UNet's attention projections (linear), ``proj_in`` (1x1 conv)
and the resnets' ``conv1`` (3x3 conv, LoCon), and on the text encoder's attention and MLP. lora_B is
seeded non-zero so the LoRA changes the image. It is saved three ways:

- ``peft.safetensors``: diffusers' ``save_lora_weights`` (``unet.<path>.lora_A.weight`` / ``lora_B``,
  ``text_encoder.<path>...``, rank and alpha in the ``lora_adapter_metadata`` header entry);
- ``kohya.safetensors``: kohya/A1111 keys (``lora_unet_<path with _>.lora_down.weight`` / ``lora_up`` /
  ``.alpha``, ``lora_te_...``) with diffusers' module names;
- ``kohya_sgm.safetensors``: the same with the UNet keys named after the original SD checkpoint's
  blocks (``input_blocks_3_1_...``, ``middle_block_1_...``, ``output_blocks_0_1_...``).

Each file is loaded into a fresh diffusers pipeline with ``load_lora_weights`` and fused with
``fuse_lora(lora_scale=s)`` for s in {0.5, 1.0}; the images, from the project's initial latents for
the reference job, go to ``tests/fixtures/lora/reference.npz`` (one image per strength: the script
checks that the three files give diffusers the same image).

    /work/devvenv/bin/python tools/make_lora_fixtures.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from check_optimum_bundle import REFERENCE_JOB, TINY_SD  # noqa: E402
from edge.pipeline import gaussian, make_rng  # noqa: E402
from make_tiny_bundle import build_pipeline  # noqa: E402

DEST = ROOT / "tests" / "fixtures" / "lora"
RANK, ALPHA = 4, 8
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1"]
STRENGTHS = (0.5, 1.0)


def seeded_lora(model: torch.nn.Module, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Add a PEFT adapter and give it seeded weights whose product is about as large as each base weight."""
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                base = module.base_layer.weight
                a.copy_(torch.randn(a.shape, generator=gen) / a[0].numel() ** 0.5)
                b.copy_(torch.randn(b.shape, generator=gen) * 1.5 * base.std() / (ALPHA / RANK))
    return get_peft_model_state_dict(model)


def sgm_name(path: str, layers_per_block: int) -> str:
    """A diffusers UNet module path in the original SD checkpoint's block names."""
    parts = path.split(".")
    if parts[0] == "down_blocks":
        block, kind, layer = int(parts[1]), parts[2], int(parts[3])
        index = 1 + block * (layers_per_block + 1) + layer
        return ".".join(["input_blocks", str(index), "0" if kind == "resnets" else "1", *parts[4:]])
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        return ".".join(["middle_block", str(index), *parts[3:]])
    if parts[0] == "up_blocks":
        block, kind, layer = int(parts[1]), parts[2], int(parts[3])
        index = block * (layers_per_block + 1) + layer
        return ".".join(["output_blocks", str(index), "0" if kind == "resnets" else "1", *parts[4:]])
    return path


def resnet_sgm_inner(name: str) -> str:
    return name.replace(".conv1", ".in_layers.2").replace(".conv2", ".out_layers.3")


def to_kohya(peft: dict[str, torch.Tensor], sgm: bool, unet_config) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in peft.items():
        component, rest = key.split(".", 1)
        module, _, kind = rest.rpartition(".lora_")
        if component == "unet" and sgm:
            renamed = sgm_name(module, unet_config.layers_per_block)
            module = resnet_sgm_inner(renamed) if ".resnets." in module else renamed
        prefix = "lora_unet_" if component == "unet" else "lora_te_"
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(ALPHA))
    return out


def run(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> np.ndarray:
    job = REFERENCE_JOB
    out = pipe(job["prompt"], negative_prompt=job["negative_prompt"], num_inference_steps=job["steps"],
               guidance_scale=job["guidance"], latents=latents.clone(), output_type="np").images[0]
    return np.round(out * 255).astype(np.uint8)


def main() -> None:
    DEST.mkdir(parents=True, exist_ok=True)
    latents = torch.from_numpy(gaussian(make_rng(REFERENCE_JOB["seed"]), (1, 4, 16, 16)))
    trained = build_pipeline(TINY_SD / "tokenizer")
    unet_sd = seeded_lora(trained.unet, UNET_TARGETS, 1)
    te_sd = seeded_lora(trained.text_encoder, TE_TARGETS, 2)
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, weight_name="peft.safetensors",
            unet_lora_adapter_metadata=trained.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=trained.text_encoder.peft_config["default"].to_dict())
        (DEST / "peft.safetensors").write_bytes((Path(tmp) / "peft.safetensors").read_bytes())
    peft = load_file(DEST / "peft.safetensors")
    for sgm, name in ((False, "kohya"), (True, "kohya_sgm")):
        save_file(to_kohya(peft, sgm, trained.unet.config), DEST / f"{name}.safetensors")
    images: dict[str, np.ndarray] = {"base": run(build_pipeline(TINY_SD / "tokenizer"), latents)}
    for style in ("peft", "kohya", "kohya_sgm"):
        for scale in STRENGTHS:
            pipe = build_pipeline(TINY_SD / "tokenizer")
            # SD-1.x pipelines map SGM block names only when given the UNet config (SDXL's pass it)
            pipe.load_lora_weights(DEST, weight_name=f"{style}.safetensors",
                                   **({"unet_config": pipe.unet.config} if style == "kohya_sgm" else {}))
            pipe.fuse_lora(lora_scale=scale)
            images[f"{style}_{scale}"] = run(pipe, latents)
    for scale in STRENGTHS:  # the three files hold one LoRA: diffusers must draw one image from them
        for style in ("kohya", "kohya_sgm"):
            assert np.array_equal(images.pop(f"{style}_{scale}"), images[f"peft_{scale}"]), (style, scale)
        images[f"lora_{scale}"] = images.pop(f"peft_{scale}")
        diff = np.abs(images[f"lora_{scale}"].astype(int) - images["base"].astype(int))
        print(f"strength {scale}: mean abs difference from the base image {diff.mean():.2f} / 255")
    np.savez_compressed(DEST / "reference.npz", **images)
    (DEST / "reference.json").write_text(json.dumps({"job": REFERENCE_JOB, "rank": RANK, "alpha": ALPHA,
                                                     "unet_targets": UNET_TARGETS, "text_encoder_targets": TE_TARGETS,
                                                     "strengths": STRENGTHS}, indent=2) + "\n")
    print(f"wrote {DEST}: " + ", ".join(f"{p.name} {p.stat().st_size} B" for p in sorted(DEST.iterdir())))


if __name__ == "__main__":
    main()
