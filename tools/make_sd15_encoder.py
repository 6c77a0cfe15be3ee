"""Export an SD-1.5-architecture VAE encoder alone (random weights, 512x512) for benchmarks/bench_edit.py.

The encoder of make_sd15_bundle.py's AutoencoderKL (34 M parameters), exported as Optimum exports
``vae_encoder`` (input ``sample``, output ``latent_parameters``). ``--variants`` also writes
``model.fp16.onnx`` and ``model.int8.onnx`` with edge-imagegen's own converters (edge.quantize:
FP16 where the CPU has kernels, static QDQ INT8 calibrated on a few smooth random images; random
weights make fidelity meaningless here, the files are for timing and memory). Dev-time only:

    /work/devvenv/bin/python tools/make_sd15_encoder.py /tmp/sd15-encoder --variants
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
    parser.add_argument("--variants", action="store_true", help="also write the FP16 and INT8 variants")
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
    if args.variants:
        write_variants(path)


def write_variants(path: Path) -> None:
    import numpy as np
    from PIL import Image, ImageFilter
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edge.quantize import Calibration, convert_fp16, quantize_int8
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(4):
        noise = Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(8))
        feeds.append({"sample": (np.asarray(noise, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)})
    for name, make in (("model.fp16.onnx", lambda dst: convert_fp16(path, dst, feeds[0])),
                       ("model.int8.onnx", lambda dst: quantize_int8("vae_encoder", path, dst,
                                                                     Calibration({"vae_encoder": feeds})))):
        method = make(path.parent / name)
        print(f"wrote {path.parent / name} ({(path.parent / name).stat().st_size / 1e6:.0f} MB): {method}")


if __name__ == "__main__":
    main()
