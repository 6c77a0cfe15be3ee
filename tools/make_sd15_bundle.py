"""Build an SD-1.5-architecture bundle with random weights for the memory and speed benchmarks.

Same layer shapes as Stable Diffusion 1.5 (CLIP ViT-L/14 text encoder, 860M-parameter UNet,
the SD VAE), seeded random weights, 512x512 static shapes, exported with Optimum like a user's
model. About 4 GB, so it is never committed:

    /work/devenv/bin/python tools/make_sd15_bundle.py /work/sd15
    /work/devenv/bin/python tools/make_sd15_bundle.py /work/sd15d --attention-chunk 512
    /work/devvenv/bin/python tools/make_sd15_bundle.py /work/sd15-diffusers --diffusers
    /work/devvenv/bin/python tools/make_sd15_bundle.py /work/sdxs-tiny --few-step

``--diffusers`` saves the same seeded weights as a diffusers pipeline (safetensors) instead of
exporting them, for the PyTorch and stable-diffusion.cpp peers of benchmarks/bench_peers.py.
``--few-step`` builds the few-step configuration instead: an SDXS-sized UNet (316 M parameters:
three blocks of one layer each, against SD 1.5's four of two), the same text encoder, a
full-size TAESD decoder (diffusers' AutoencoderTiny, 1.2 M decoder parameters) and an Euler
scheduler with trailing timesteps, for one step without guidance.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from optimum.exporters.onnx import onnx_export_from_model
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from make_tiny_bundle import copy_bundle  # noqa: E402
from make_tokenizer_fixtures import write_clip_vocab  # noqa: E402
from make_vae_decoders import export as export_decoder  # noqa: E402

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXS_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)


def build_vae() -> AutoencoderKL:
    """The SD VAE's architecture (seed it first)."""
    return AutoencoderKL(
        sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build_pipeline(tokenizer_dir: Path, few_step: bool = False) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
                                attention_head_dim=8, **(SDXS_UNET if few_step else SD15_UNET))
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if few_step:
        # Optimum's exporter knows only AutoencoderKL: a one-block stand-in is exported, and
        # main() puts the tiny decoder in its place.
        vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4)
        scheduler = EulerDiscreteScheduler(timestep_spacing="trailing", **betas)
    else:
        vae = build_vae()
        # SD 1.5 ships PNDM; edge-imagegen falls back to Euler for it (logged), as for a user's bundle.
        scheduler = PNDMScheduler(steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False, **betas)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


class ChunkedAttnProcessor:
    """diffusers' AttnProcessor with the queries taken ``chunk`` tokens at a time.

    At 512x512 the UNet's first self-attention has 4096 tokens: the full score matrix is
    heads x 4096 x 4096 floats (512 MB per image). Exported with chunks, the ONNX graph computes
    those scores a slice at a time, and ONNX Runtime's memory planner reuses one slice's buffer
    for the next. Same numbers, a fraction of the peak memory. The loop is unrolled at export,
    so the bundle must have static spatial shapes (it does: copy_bundle fixes them).

    The scores are ``(q * scale) @ k^T``, not diffusers' ``baddbmm`` on an empty tensor: that
    exports as a zero-filled score-sized tensor, a MatMul, a Mul and an Add, three extra
    score-sized buffers per chunk that ONNX Runtime does not fuse away.
    """

    def __init__(self, chunk: int):
        self.chunk = chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        pieces = []
        query, key_t = query * attn.scale, key.transpose(1, 2)
        for start in range(0, query.shape[1], self.chunk):
            scores = torch.bmm(query[:, start:start + self.chunk], key_t).softmax(dim=-1)
            pieces.append(torch.bmm(scores, value))
        hidden_states = attn.batch_to_head_dim(torch.cat(pieces, dim=1))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def compare_unet(unet: UNet2DConditionModel, bundle: Path) -> None:
    """Run the PyTorch UNet and the bundle's ONNX UNet on one seeded input: same weights?"""
    import numpy as np
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 64, 64)).astype(np.float32)
    context = rng.standard_normal((1, 77, 768)).astype(np.float32)
    with torch.no_grad():
        ours = unet(torch.from_numpy(sample), 500, torch.from_numpy(context)).sample.numpy()
    session = ort.InferenceSession(str(bundle / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    timestep = np.array(500, dtype=np.float32)  # what Optimum's export takes: a float scalar
    theirs = session.run(None, {"sample": sample, "timestep": timestep, "encoder_hidden_states": context})[0]
    print(f"UNet against {bundle}: max abs diff {np.abs(ours - theirs).max():.2e} (outputs' std {ours.std():.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--attention-chunk", type=int, default=0,
                        help="export attention computing this many query tokens at a time (0: all at once)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--diffusers", action="store_true",
                      help="save the diffusers pipeline (same seeded weights) instead of the ONNX export")
    kind.add_argument("--few-step", action="store_true",
                      help="the SDXS-sized UNet with a TAESD decoder and trailing Euler, for 1 step")
    parser.add_argument("--compare", type=Path, metavar="BUNDLE",
                        help="with --diffusers: check the UNet against this bundle's ONNX UNet on one call")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dest.parent) as tmp:
        tmp = Path(tmp)
        write_clip_vocab(tmp / "vocab")
        pipe = build_pipeline(tmp / "vocab", few_step=args.few_step)
        if args.diffusers:
            pipe.save_pretrained(args.dest)
            print(f"wrote {args.dest}")
            if args.compare:
                compare_unet(pipe.unet, args.compare)
            return
        if args.attention_chunk:
            pipe.unet.set_attn_processor(ChunkedAttnProcessor(args.attention_chunk))
            pipe.vae.set_attn_processor(ChunkedAttnProcessor(args.attention_chunk))
        # From the loaded pipeline, not from disk: attention processors are not part of a saved config.
        onnx_export_from_model(pipe, tmp / "onnx", task="text-to-image", do_validation=False)
        copy_bundle(tmp / "onnx", args.dest, resolution=512)
    if args.few_step:
        shutil.rmtree(args.dest / "vae_decoder")
        torch.manual_seed(0)
        with torch.no_grad():
            export_decoder(AutoencoderTiny().eval(), args.dest / "vae_decoder", torch.zeros(1, 4, 64, 64))
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()
