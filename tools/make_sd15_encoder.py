"""Export an SD-1.5-architecture VAE encoder alone (random weights, 512x512) for benchmarks/bench_edit.py.

The encoder of make_sd15_bundle.py's AutoencoderKL (34 M parameters), exported as Optimum exports
``vae_encoder`` (input ``sample``, output ``latent_parameters``). Dev-time only (torch, diffusers):

    /work/devvenv/bin/python tools/make_sd15_encoder.py /tmp/sd15-encoder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL

sys.path.insert(0, str(Path(__file__).parent))
from train_vae_encoder import EncoderExport  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    args.dest.mkdir(parents=True, exist_ok=True)
    path = args.dest / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(EncoderExport(vae.eval()), (torch.zeros(1, 3, 512, 512),), str(path),
                          input_names=["sample"], output_names=["latent_parameters"], opset_version=17, dynamo=False)
    params = sum(p.numel() for p in vae.encoder.parameters()) + sum(p.numel() for p in vae.quant_conv.parameters())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB, {params / 1e6:.1f} M parameters)")


if __name__ == "__main__":
    main()
