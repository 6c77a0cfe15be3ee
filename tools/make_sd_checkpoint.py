"""One checkpoint in the original Stable Diffusion key layout from a diffusers SD 1.x pipeline folder.

    /work/devvenv/bin/python tools/make_sd_checkpoint.py /work/sd15-diffusers /work/sd15.safetensors

For peers that read only the original layout (stable-diffusion.cpp, through
stable-diffusion-cpp-python, in benchmarks/bench_peers.py): the same weights under the names of
CompVis' ``ldm`` modules (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``). The renaming follows diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, for the SD 1.x UNet (four blocks of two
layers) and VAE; the CLIP text encoder keeps its transformers names. ``--half`` stores float16.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_FIXED = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out.",
                 "query.": "q.", "key.": "k.", "value.": "v.", "proj_attn.": "proj_out."}


def unet_prefixes() -> dict[str, str]:
    """diffusers block prefix -> ldm prefix, SD 1.x layout (input_blocks 1..11, output_blocks 0..11)."""
    prefixes = {"mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    for i in range(4):
        for j in range(2):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{3 * i + j + 1}.0."
            if i < 3:
                prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{3 * i + j + 1}.1."
        for j in range(3):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{3 * i + j}.0."
            if i > 0:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{3 * i + j}.1."
        if i < 3:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{3 * (i + 1)}.0.op."
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."
    return prefixes


def vae_prefixes() -> dict[str, str]:
    prefixes = {"mid_block.attentions.0.": "mid.attn_1.", "mid_block.resnets.0.": "mid.block_1.",
                "mid_block.resnets.1.": "mid.block_2.", "conv_norm_out.": "norm_out."}
    for i in range(4):
        for j in range(2):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(3):  # diffusers counts the decoder's blocks from the latent side, ldm from the image
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{3 - i}.block.{j}."
        if i < 3:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{3 - i}.upsample."
    return prefixes


def rename(name: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if old in name:
            return name.replace(old, new, 1)
    return name


def unet_key(name: str) -> str:
    for old, new in UNET_FIXED.items():
        if name.startswith(old):
            return new + name[len(old):]
    if "resnets" in name:
        for old, new in RESNET.items():
            name = name.replace(f".{old}.", f".{new}.")
    return rename(name, unet_prefixes())


def vae_key(name: str) -> str:
    name = rename(name, vae_prefixes()).replace("conv_shortcut", "nin_shortcut")
    if "mid.attn_1." in name:
        for old, new in VAE_ATTENTION.items():
            name = name.replace(old, new)
    return name


def convert(pipeline: Path) -> dict[str, torch.Tensor]:
    unet = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(pipeline / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(pipeline / "text_encoder" / "model.safetensors")
    out = {f"model.diffusion_model.{unet_key(k)}": v for k, v in unet.items()}
    for k, v in vae.items():
        key = vae_key(k)
        if "mid.attn_1." in key and key.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # ldm's VAE attention projections are 1x1 convolutions
        out[f"first_stage_model.{key}"] = v
    out.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    if len(out) != len(unet) + len(vae) + len(text):
        raise SystemExit("two weights were given one name: the pipeline is not SD 1.x-shaped")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=Path, help="diffusers pipeline folder (safetensors weights)")
    parser.add_argument("dest", type=Path, help="the .safetensors checkpoint to write")
    parser.add_argument("--half", action="store_true", help="store float16 weights")
    args = parser.parse_args()
    state = convert(args.pipeline)
    dtype = torch.float16 if args.half else torch.float32
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(args.dest))
    print(f"wrote {args.dest}: {len(state)} tensors, {args.dest.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
