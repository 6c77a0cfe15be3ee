"""Train a VAE encoder for a bundle whose decoder is fixed (dev-time only: torch, diffusers, onnx).

The embedded model (edge/models/knolling-tiny) shipped without ``vae_encoder/`` and its training
checkpoints are gone. Its decoder is read back from ``vae_decoder/model.onnx`` into the diffusers
AutoencoderKL of tools/train_knolling.py, frozen, and only the encoder (+ quant_conv) is trained so
that decode(encode(x)) ~ x on the scenes of tools/scenes.py. Because the decoder is the shipped
one, the encoder learns exactly the latent space the UNet was trained in (including the channel
mean that train_knolling's export folded into quant_conv / post_quant_conv).

Optimum exports GroupNorm as InstanceNorm + Mul + Add, so the norm weights have no names in the
ONNX file (``onnx::Mul_548``): they are matched to the torch GroupNorms in execution order, and the
loaded decoder is checked against ONNX Runtime before training starts.

    nice -n 10 /work/devvenv/bin/python tools/train_vae_encoder.py --bundle edge/models/knolling-tiny \
        --work /tmp/knolling-enc --max-minutes 15

Writes ``vae_encoder/model.onnx`` (input ``sample``, output ``latent_parameters``: mean and log
variance, as Optimum's exporter) and ``vae_encoder/config.json`` into the bundle.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from train_knolling import CROP, RESOLUTION, WHITE_LEVEL, build_vae, to_tensor, vae_images  # noqa: E402


def load_decoder(vae: torch.nn.Module, onnx_path: Path) -> None:
    """Copy the ONNX decoder's weights into ``vae.decoder`` / ``vae.post_quant_conv``."""
    model = onnx.load(str(onnx_path))
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    state = vae.state_dict()
    named = {k: v for k, v in weights.items() if k in state}
    # GroupNorm affine parameters, in the order the graph uses them: (Mul, Add) pairs.
    anonymous = sorted((k for k in weights if k.startswith("onnx::")), key=lambda k: int(k.rsplit("_", 1)[1]))
    norms: list[torch.nn.GroupNorm] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: norms.append(mod))
             for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    with torch.no_grad():
        vae.decode(torch.zeros(1, 4, RESOLUTION // 8, RESOLUTION // 8))
    for h in hooks:
        h.remove()
    if len(anonymous) != 2 * len(norms):
        raise SystemExit(f"{onnx_path}: {len(anonymous)} unnamed initializers for {len(norms)} GroupNorms")
    with torch.no_grad():
        for key, value in named.items():
            state[key].copy_(value.reshape(state[key].shape))
        for norm, (mul, add) in zip(norms, zip(anonymous[0::2], anonymous[1::2])):
            norm.weight.copy_(weights[mul].flatten())
            norm.bias.copy_(weights[add].flatten())
    # The check that matters: the torch decoder now computes what the shipped ONNX file computes.
    z = torch.randn(2, 4, RESOLUTION // 8, RESOLUTION // 8, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = np.concatenate([session.run(None, {session.get_inputs()[0].name: z[i:i + 1].numpy()})[0]
                               for i in range(2)])
    with torch.no_grad():
        got = vae.decode(z).sample.numpy()
    err = float(np.abs(got - expected).max())
    if err > 1e-3:
        raise SystemExit(f"the torch decoder differs from {onnx_path} by {err} (weights mismatched)")
    print(f"[encoder] decoder loaded from {onnx_path}: max |torch - onnx| = {err:.2e}")


class EncoderExport(torch.nn.Module):
    """sample -> latent_parameters (mean, logvar), the output Optimum's vae_encoder export has."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.parameters


def export(vae: torch.nn.Module, bundle: Path) -> Path:
    dest = bundle / "vae_encoder"
    dest.mkdir(exist_ok=True)
    path = dest / "model.onnx"
    sample = torch.zeros(1, 3, RESOLUTION, RESOLUTION)
    torch.onnx.export(EncoderExport(vae.eval()), (sample,), str(path), input_names=["sample"],
                      output_names=["latent_parameters"], dynamic_axes={"sample": {0: "batch_size"},
                                                                        "latent_parameters": {0: "batch_size"}},
                      opset_version=17, dynamo=False)
    onnx.checker.check_model(str(path))
    shutil.copy(bundle / "vae_decoder" / "config.json", dest / "config.json")
    return path


def check(bundle: Path, n: int = 32) -> float:
    """PSNR of decode(mean(encode(x))) on unseen scenes, through ONNX Runtime."""
    import scenes
    enc = ort.InferenceSession(str(bundle / "vae_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(bundle / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    errs = []
    for seed in range(3_000_000, 3_000_000 + n):
        x = np.asarray(scenes.scene(seed).image).astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
        mean = enc.run(None, {"sample": x})[0][:, :4]
        y = np.clip(dec.run(None, {dec.get_inputs()[0].name: mean})[0], -1, 1)
        errs.append(np.mean(((y - x) * 127.5) ** 2))
    return float(10 * np.log10(255.0 ** 2 / np.mean(errs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="rendered scenes cache and checkpoint")
    parser.add_argument("--max-minutes", type=float, default=15)
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--kl-weight", type=float, default=1e-5, help="as train_knolling's VAE stage")
    parser.add_argument("--part-weight", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="continue from WORK/vae_encoder.pt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vae = build_vae()
    load_decoder(vae, args.bundle / "vae_decoder" / "model.onnx")
    checkpoint = args.work / "vae_encoder.pt"
    if args.resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        vae.encoder.load_state_dict(state["encoder"])
        vae.quant_conv.load_state_dict(state["quant_conv"])
        print(f"[encoder] resumed from {checkpoint} at step {state['step']}")
    for p in list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()):
        p.requires_grad_(False)
    trained = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    images = vae_images(args.work, args.scenes)
    deadline = time.monotonic() + args.max_minutes * 60
    step, losses = state["step"] if args.resume and checkpoint.is_file() else 0, []
    vae.encoder.train()
    while time.monotonic() < deadline:
        idx = rng.integers(0, len(images), args.batch)
        y, x = rng.integers(0, RESOLUTION - CROP + 1, 2)
        batch = to_tensor(images[idx, y:y + CROP, x:x + CROP], "cpu")
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        weight = 1 + args.part_weight * (batch.amin(dim=1, keepdim=True) < WHITE_LEVEL).float()
        err = recon - batch
        rec = ((err.abs() + err ** 2) * weight).mean() / weight.mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        losses.append(rec.item())
        if step % 100 == 0:
            print(f"[encoder] step {step} reconstruction loss {np.mean(losses):.4f}", flush=True)
            losses = []
    torch.save({"encoder": vae.encoder.state_dict(), "quant_conv": vae.quant_conv.state_dict(), "step": step},
               checkpoint)
    path = export(vae, args.bundle)
    print(f"[encoder] {step} steps -> {path} ({path.stat().st_size / 1e6:.2f} MB); "
          f"round trip PSNR on 32 unseen scenes {check(args.bundle):.1f} dB")
    (args.work / "summary.json").write_text(json.dumps({"steps": step, "minutes": args.max_minutes}))


if __name__ == "__main__":
    main()
