"""Train a LoRA for the embedded model (dev-time: torch, diffusers, peft, safetensors).

``blueprint``: a single-ink style for technical documents: every part drawn in blue (fills, shades
and dark outlines as usual) whatever colour the prompt names. The scenes of ``tools/scenes.py`` (the
embedded model's own training distribution, same captions) are rendered in that one ink, encoded with
the knolling-tiny VAE encoder (ONNX, through onnxruntime: ``--encoder``, by default the bundle's
``vae_encoder/model.onnx``), and a rank-8 LoRA on the UNet's attention projections,
``proj_in``/``proj_out`` and resnet convs is trained on them with PEFT, the UNet itself frozen. The UNet
is a diffusers UNet2DConditionModel of the bundle's config.json with the weights of the shipped
``unet/model.onnx`` (loaded through ``edge.lora_graph``'s map of module paths to initializers, checked
against onnxruntime); text embeddings come from the shipped text encoder through onnxruntime.

Why not black line drawings: knolling-tiny's VAE only knows the scenes' saturated fills. Black
outlines on white, grey scenes and pale fills all come back from an encode/decode round trip as
coloured blobs (``--round-trip`` draws that check), so a UNet LoRA trained on them learns coloured
blobs; what the decoder cannot draw, no UNet LoRA can ask it for.

    nice -n 10 /work/devvenv/bin/python tools/train_knolling_lora.py --minutes 20 \\
        --dest edge/models/knolling-tiny/loras/blueprint.safetensors --preview docs/lora-blueprint.png

It writes kohya keys (``lora_unet_...``, with ``.alpha``), so A1111-style tools read the file too (also
every ``--save-minutes`` while training), and the before/after preview is drawn with edge-imagegen itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageFilter, ImageOps
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import scenes  # noqa: E402
from edge.bundle import EMBEDDED_MODEL, load_bundle  # noqa: E402
from edge.lora_graph import module_of, weight_map  # noqa: E402
from edge.tokenizer import ClipTokenizer  # noqa: E402
from make_lora_fixtures import to_kohya  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]
PREVIEW_PROMPTS = ("knolling of 3 red gears", "exploded view of a yellow battery and 2 orange washers",
                   "flat lay of a green chip and a purple spring")


def unet_from_onnx(bundle) -> UNet2DConditionModel:
    """The shipped UNet's weights in a diffusers UNet of its config: named initializers by name,
    the generated-name (transposed) Linear weights and GroupNorm affines by the module path in their
    node names."""
    comp = bundle.components["unet"]
    config = {k: v for k, v in comp.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(config)
    graph, weights = weight_map(comp.path)
    # GroupNorm exports as InstanceNormalization, then Mul by its weight and Add of its bias
    affine = {}
    for node in graph.nodes:
        if node.op_type in ("Mul", "Add") and node.name.endswith(("/Mul", "/Add")):
            init = next((i for i in node.inputs if i in graph.initializers), None)
            if init is not None and module_of(node):
                affine[f"{module_of(node)}.{'weight' if node.op_type == 'Mul' else 'bias'}"] = init
    state = {}
    for key, param in unet.state_dict().items():
        module, _, kind = key.rpartition(".")
        if key in graph.initializers:
            value = graph.array(key)
        elif kind == "weight" and module in weights:
            ref = weights[module]
            value = graph.array(ref.name)
            value = value.T if ref.layout == "in_out" else value
        elif key in affine:
            value = graph.array(affine[key])
        else:
            raise SystemExit(f"{comp.path}: no initializer for {key}")
        state[key] = torch.from_numpy(np.ascontiguousarray(value).reshape(param.shape))
    unet.load_state_dict(state)
    return unet.eval()


def check_against_onnx(unet: UNet2DConditionModel, bundle) -> float:
    session = ort.InferenceSession(str(bundle.components["unet"].path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    context = rng.standard_normal((1, 77, 64)).astype(np.float32)
    t = np.array([500], np.int64)
    rank = len(session.get_inputs()[1].shape)  # a scalar timestep, or one per batch item
    ours = session.run(None, {names[0]: x, names[1]: t.astype(np.float32).reshape((1,) * rank), names[2]: context})[0]
    with torch.no_grad():
        theirs = unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context)).sample
    return float(np.abs(ours - theirs.numpy()).max())


def encode_images(encoder: Path, images: list[Image.Image], scaling: float) -> np.ndarray:
    session = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    pixels = np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1 for im in images])
    out = [session.run(None, {session.get_inputs()[0].name: pixels[i:i + 32]})[0][:, :4] for i in range(0, len(pixels), 32)]
    return np.concatenate(out) * scaling


def text_embeddings(bundle, captions: list[str]) -> np.ndarray:
    tokenizer = ClipTokenizer.from_dir(bundle.tokenizer_dir)
    session = ort.InferenceSession(str(bundle.components["text_encoder"].path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: np.asarray([tokenizer.encode(c).ids], np.int64)})[0]
                           for c in captions])


def save(unet: UNet2DConditionModel, args: argparse.Namespace, step: int, loss: float) -> None:
    peft = {f"unet.{k}": v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    tensors = to_kohya(peft, sgm=False, unet_config=unet.config)
    for key in [k for k in tensors if k.endswith(".alpha")]:
        tensors[key] = torch.tensor(float(args.rank))
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    recipe = {k: v for k, v in vars(args).items() if k not in ("dest", "work", "preview", "preview_only")}
    save_file(tensors, args.dest, metadata={"ss_network_dim": str(args.rank), "ss_network_alpha": str(args.rank),
                                             "edge_recipe": json.dumps(recipe | {"steps": step}, default=str)})
    print(f"wrote {args.dest} ({args.dest.stat().st_size} bytes) after {step} steps, loss {loss:.4f}")


def round_trip(args: argparse.Namespace, bundle) -> None:
    """Four scenes as drawn, in grey, as black edges on white and in the ink, each over its VAE
    encode/decode round trip: what the decoder can draw, and so what a UNet LoRA can learn."""
    encoder = args.encoder or bundle.root / "vae_encoder" / "model.onnx"
    decoder = ort.InferenceSession(str(bundle.components["vae_decoder"].path), providers=["CPUExecutionProvider"])
    drawn = [scenes.scene(s).image for s in range(4)]
    grey = [ImageOps.grayscale(im).convert("RGB") for im in drawn]
    edges = [ImageOps.invert(ImageOps.grayscale(im).filter(ImageFilter.FIND_EDGES).point(lambda v: 255 * (v > 40)))
             .convert("RGB") for im in drawn]
    images = drawn + grey + edges + [scenes.scene(s, ink=args.ink).image for s in range(4)]
    z = encode_images(encoder, images, bundle.vae_scaling_factor) / bundle.vae_scaling_factor
    out = decoder.run(None, {decoder.get_inputs()[0].name: z.astype(np.float32)})[0]
    back = [Image.fromarray(((np.clip(o, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)) for o in out]
    rows = [im for k in range(0, len(images), 4) for im in images[k:k + 4] + back[k:k + 4]]
    scenes.grid(rows, cols=4).save(args.work / "round_trip.png")
    print(f"wrote {args.work / 'round_trip.png'}: each row of scenes over its round trip")


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(EMBEDDED_MODEL)
    unet = unet_from_onnx(bundle)
    print(f"UNet from ONNX: max abs difference from onnxruntime {check_against_onnx(unet, bundle):.2e}")
    shown = [scenes.scene(s) for s in range(args.scenes)]
    targets = [scenes.scene(s, ink=args.ink).image for s in range(args.scenes)]
    encoder = args.encoder or bundle.root / "vae_encoder" / "model.onnx"
    x0 = torch.from_numpy(encode_images(encoder, targets, bundle.vae_scaling_factor))
    context = torch.from_numpy(text_embeddings(bundle, [s.caption for s in shown]))
    empty = torch.from_numpy(text_embeddings(bundle, [""]))
    scenes.grid([s.image for s in shown[:8]] + targets[:8], cols=8).save(args.work / "lora_targets.png")
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2  # scaled_linear, as the bundle's scheduler
    alpha_bar = torch.cumprod(1 - betas, 0)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights="gaussian"))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    unet.train()
    start, step, losses, saved = time.monotonic(), 0, [], time.monotonic()
    gen = torch.Generator().manual_seed(1)
    while time.monotonic() - start < args.minutes * 60:
        idx = torch.randint(0, len(x0), (args.batch,), generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noise = torch.randn(x0[idx].shape, generator=gen)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0[idx] + (1 - ab).sqrt() * noise
        ctx = torch.where(torch.rand(args.batch, 1, 1, generator=gen) < 0.1, empty, context[idx])
        loss = torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=ctx).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step}: loss {np.mean(losses[-50:]):.4f} ({(time.monotonic() - start) / step:.2f} s/step)",
                  flush=True)
        if time.monotonic() - saved > args.save_minutes * 60:
            save(unet, args, step, float(np.mean(losses[-50:])))
            saved = time.monotonic()
    save(unet, args, step, float(np.mean(losses[-50:])))


def preview(args: argparse.Namespace) -> None:
    """Before (no LoRA) over after (the LoRA at 1.0), drawn by edge-imagegen itself."""
    from edge.config import LoraConfig as EdgeLoraConfig
    from edge.jobs import parse_job
    from edge.pipeline import Pipeline
    from edge.providers import RuntimeOptions
    pipe = Pipeline(load_bundle(EMBEDDED_MODEL), RuntimeOptions(threads=args.threads),
                    lora=EdgeLoraConfig(dir=str(args.dest.parent)))
    rows = []
    for suffix in ("", f" <lora:{args.dest.stem}:1>"):
        for i, prompt in enumerate(PREVIEW_PROMPTS):
            job = parse_job({"prompt": prompt + suffix, "seed": 40 + i, "steps": 20})
            pipe.check(job)
            rows.append(pipe.generate(job).images[0].image)
    scenes.grid(rows, cols=len(PREVIEW_PROMPTS)).save(args.preview)
    print(f"wrote {args.preview}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=EMBEDDED_MODEL / "loras" / "blueprint.safetensors")
    parser.add_argument("--ink", default="blue", choices=sorted(scenes.COLOURS), help="the one colour parts get")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--save-minutes", type=float, default=5.0, help="write the LoRA this often while training")
    parser.add_argument("--round-trip", action="store_true", help="only draw the VAE round-trip check")
    parser.add_argument("--encoder", type=Path, help="the knolling-tiny VAE encoder ONNX file")
    parser.add_argument("--work", type=Path, default=Path("/tmp/knolling-lora"))
    parser.add_argument("--preview", type=Path, help="write a before/after grid here")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--scenes", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)  # on a shared CPU more small steps beat fewer big ones
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preview-only", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.round_trip:
        round_trip(args, load_bundle(EMBEDDED_MODEL))
        return
    if not args.preview_only:
        train(args)
    if args.preview:
        preview(args)


if __name__ == "__main__":
    main()
