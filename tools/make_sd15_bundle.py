"""Build an SD-1.5-architecture bundle with random weights for the memory and speed benchmarks.

Same layer shapes as Stable Diffusion 1.5 (CLIP ViT-L/14 text encoder, 860M-parameter UNet,
the SD VAE), seeded random weights, 512x512 static shapes, exported with Optimum like a user's
model. About 4 GB, so it is never committed:

    /work/devenv/bin/python tools/make_sd15_bundle.py /work/sd15
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from make_tiny_bundle import copy_bundle, export_optimum  # noqa: E402
from make_tokenizer_fixtures import write_clip_vocab  # noqa: E402


def build_pipeline(tokenizer_dir: Path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    # SD 1.5 ships PNDM; edge-imagegen falls back to Euler for it (logged), as for a user's bundle.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dest.parent) as tmp:
        tmp = Path(tmp)
        write_clip_vocab(tmp / "vocab")
        build_pipeline(tmp / "vocab").save_pretrained(tmp / "pt")
        export_optimum(tmp / "pt", tmp / "onnx", validate=False)
        copy_bundle(tmp / "onnx", args.dest, resolution=512)
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()
