"""Standalone VAE decoder folders (model.onnx + config.json, dynamic latent height and width).

    tiny  DEST   a small randomly initialised diffusers AutoencoderTiny (TAESD architecture,
                 fewer channels) and the reference of diffusers' decode of fixed latents, the
                 committed fixture of the tiny-decoder parity test:
                 /work/devvenv/bin/python tools/make_vae_decoders.py tiny tests/fixtures/tiny-decoder
    sd15  DEST   the SD-1.5 VAE decoder's architecture with random weights (about 200 MB, not
                 committed), for the tiled-decode benchmark:
                 /work/devvenv/bin/python tools/make_vae_decoders.py sd15 /tmp/sd15-vae
    taesd DEST   diffusers' AutoencoderTiny at its defaults (TAESD's architecture, about 1.2 M
                 decoder parameters) with random weights, for the preview benchmark:
                 /work/devvenv/bin/python tools/make_vae_decoders.py taesd /tmp/taesd

Dynamic shapes, so the folders work with ``model.decoder`` at any size and can be decoded in tiles.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny

sys.path.insert(0, str(Path(__file__).parent))

REFERENCE = "reference.npz"
TINY = dict(encoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
            decoder_block_out_channels=(32, 32, 32, 32), num_decoder_blocks=(1, 2, 2, 1))


class Decode(torch.nn.Module):
    """What the Optimum exporter exports as vae_decoder: ``vae.decode(latent_sample).sample``."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample).sample


def export(vae: torch.nn.Module, dest: Path, latent: torch.Tensor) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(Decode(vae).eval(), (latent,), str(dest / "model.onnx"), input_names=["latent_sample"],
                      output_names=["sample"], opset_version=17, dynamo=False,
                      dynamic_axes={"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                                    "sample": {0: "batch_size", 2: "height", 3: "width"}})
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vae.config.items() if not k.startswith("_")}
    (dest / "config.json").write_text(json.dumps({"_class_name": type(vae).__name__, **config}, indent=2) + "\n")


def tiny(dest: Path) -> None:
    torch.manual_seed(0)
    vae = AutoencoderTiny(**TINY).eval()
    latents = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 12, 16)).astype(np.float32))
    last = vae.decoder.layers[-1]
    with torch.no_grad():
        # Random weights put nearly every pixel at -1 (black after clipping), where parity would say
        # nothing: rescale the last convolution so the images spread over the colour range.
        pre = (vae.decode(latents).sample + 1) / 2
        last.weight *= 0.25 / pre.std()
        last.bias += 0.5 - ((vae.decode(latents).sample + 1) / 2).mean()
        images = vae.decode(latents).sample.numpy()
    export(vae, dest, latents)
    np.savez_compressed(dest / REFERENCE, latents=latents.numpy(), images=images)
    inside = float(np.mean((images > -1) & (images < 1)))
    print(f"wrote {dest}: {sum(p.numel() for p in vae.decoder.parameters())} decoder parameters, "
          f"{(dest / 'model.onnx').stat().st_size} bytes, {inside:.0%} of the reference pixels inside [-1, 1]")


def sd15(dest: Path) -> None:
    from make_sd15_bundle import build_vae
    torch.manual_seed(0)
    vae = build_vae().eval()
    export(vae, dest, torch.zeros(1, 4, 64, 64))
    print(f"wrote {dest}: {(dest / 'model.onnx').stat().st_size} bytes")


def taesd(dest: Path) -> None:
    torch.manual_seed(0)
    vae = AutoencoderTiny().eval()
    export(vae, dest, torch.zeros(1, 4, 64, 64))
    print(f"wrote {dest}: {sum(p.numel() for p in vae.decoder.parameters())} decoder parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("tiny", "sd15", "taesd"))
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    with torch.no_grad():
        {"tiny": tiny, "sd15": sd15, "taesd": taesd}[args.kind](args.dest)


if __name__ == "__main__":
    main()
