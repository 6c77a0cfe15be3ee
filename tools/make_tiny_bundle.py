"""Build the embedded random-weight test bundle (dev-time only: needs torch, diffusers, optimum-onnx).

A tiny Stable-Diffusion-architecture pipeline (CLIP text encoder, UNet2DConditionModel with
cross-attention, AutoencoderKL) is created from configs with seeded random weights, saved in
the diffusers layout, exported with Optimum's ONNX exporter (the same path users take with
``optimum-cli export onnx --task text-to-image``), and copied into the package with the
spatial and token dimensions made static, as the product recommends for edge boards.

    /work/devenv/bin/python tools/make_tiny_bundle.py tests/fixtures/tiny-sd

The exported (dynamic-shape) Optimum folder is kept with ``--keep-export DIR``; the test suite
and ``tools/check_optimum_bundle.py`` load that layout unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from make_tokenizer_fixtures import write_clip_vocab  # noqa: E402

RESOLUTION = 128  # pixels; latents are RESOLUTION / 8
TOKENS = 77


def build_pipeline(tokenizer_dir: Path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TOKENS, projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=TOKENS)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def export_optimum(pipeline_dir: Path, onnx_dir: Path, validate: bool = True) -> None:
    from optimum.exporters.onnx import main_export
    main_export(str(pipeline_dir), str(onnx_dir), task="text-to-image", do_validation=validate,
                local_files_only=True)


def fix_shapes(model_path: Path, dims: dict[str, int]) -> None:
    """Make named dynamic dimensions static, in place (batch stays dynamic).

    External weights (model.onnx_data) are left where they are: only the graph file is rewritten.
    """
    import onnx
    model = onnx.load(str(model_path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in dims:
                dim.dim_value = dims[dim.dim_param]  # setting the value clears the oneof's dim_param
    onnx.save(model, str(model_path))
    onnx.checker.check_model(str(model_path))


def copy_bundle(onnx_dir: Path, dest: Path, resolution: int = RESOLUTION) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("model_index.json",):
        shutil.copy(onnx_dir / name, dest / name)
    for sub in ("scheduler", "tokenizer", "text_encoder", "unet", "vae_decoder"):
        shutil.copytree(onnx_dir / sub, dest / sub)
    latent = resolution // 8
    fix_shapes(dest / "text_encoder" / "model.onnx", {"sequence_length": TOKENS})
    fix_shapes(dest / "unet" / "model.onnx", {"height": latent, "width": latent, "sequence_length": TOKENS})
    fix_shapes(dest / "vae_decoder" / "model.onnx", {"latent_height": latent, "latent_width": latent,
                                                     "latent_height * 8": resolution,
                                                     "latent_width * 8": resolution})
    for config in dest.rglob("*.json"):  # drop the temp paths the exporter recorded
        data = json.loads(config.read_text())
        if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--keep-export", type=Path, help="also keep the dynamic-shape Optimum export here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_clip_vocab(tmp / "vocab")
        build_pipeline(tmp / "vocab").save_pretrained(tmp / "pt")
        export_optimum(tmp / "pt", tmp / "onnx")
        if args.keep_export:
            shutil.copytree(tmp / "onnx", args.keep_export, dirs_exist_ok=True)
        copy_bundle(tmp / "onnx", args.dest)
    total = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"wrote {args.dest} ({total / 1e6:.1f} MB)")
    print(json.dumps(json.loads((args.dest / "model_index.json").read_text()), indent=1))


if __name__ == "__main__":
    main()
