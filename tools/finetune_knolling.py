"""Fine-tune the shipped ``knolling-tiny`` on the second-edition scenes (dev-time only: torch, diffusers, onnx).

The first edition's training checkpoints are gone; only the ONNX bundle remains, and training afresh
(tools/train_knolling.py ``all``) takes about 2 hours on 2 cores. This reads the bundle's UNet and
text encoder back into diffusers / transformers modules (checked against ONNX Runtime), extends the
tokenizer with the new caption words (tools/scenes.py: filler phrases, more templates) and the text
encoder's token embedding with a row per new token, and trains UNet + text encoder on the new scenes
(randomised layouts, user-style captions) with train_knolling's loop and offset noise. The VAE stays
the shipped one, frozen: the latents come from the shipped ``vae_encoder`` (whose posterior mean is
already the UNet's latent space: train_knolling's export folded the channel mean into it), so the
shipped encoder and decoder stay valid and are copied into the new bundle unchanged.

Stages (``--work`` keeps the tokenizer, the latents cache, the checkpoint finetune.pt and log.csv):

    tokenizer  WORK/tokenizer/: the shipped vocabulary and merges, plus merges for the new words
               (every old token keeps its id, so the shipped embedding rows stay meaningful)
    latents    renders ``--scenes`` training scenes and encodes them with the shipped encoder (ORT)
    train      the fine-tune, resumable (``--resume``), bounded by ``--steps`` and ``--max-minutes``
    export     the EMA weights -> Optimum ONNX export -> bundle (FP32); scheduler, VAE from the shipped one

The shipped second edition (benchmarks/README.md, "knolling-tiny second edition, shipped"), from the
first edition (git worktree add /tmp/first 43e35bf):

    W=/tmp/kft; B=/tmp/first/edge/models/knolling-tiny
    nice -n 5 /work/devvenv/bin/python tools/finetune_knolling.py latents --bundle $B --work $W --scenes 24000
    nice -n 5 /work/devvenv/bin/python tools/finetune_knolling.py train --bundle $B --work $W --scenes 24000 \
        --max-minutes 82 --lr 4e-4 --ema 0.998 --decay-to 0.05 --save-every 250
    nice -n 5 /work/devvenv/bin/python tools/finetune_knolling.py export --bundle $B --work $W --dest /tmp/kt2
    cp -r $B/loras /tmp/kt2/ && edge-imagegen quantize /tmp/kt2     # then copy /tmp/kt2 over edge/models/knolling-tiny
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))
import scenes  # noqa: E402
import train_knolling as tk  # noqa: E402
from make_tiny_bundle import copy_bundle, export_optimum  # noqa: E402
from train_vae_encoder import load_decoder  # noqa: E402

log = logging.getLogger("finetune_knolling")
# Template words with no content: new tokens start at their mean embedding, so that a filler word
# begins as something the model already reads as "changes nothing".
NEUTRAL_WORDS = ("on", "of", "white", "background", "top", "view")
# ONNX op consuming an unnamed initializer -> the torch parameter it is (Optimum names only some).
ANONYMOUS = {"MatMul": "weight", "Mul": "weight", "Add": "bias"}


# --- ONNX -> torch ----------------------------------------------------------------------------
def load_onnx_weights(module: torch.nn.Module, onnx_path: Path) -> None:
    """Copy an Optimum export's initializers into ``module``. Named ones match state-dict keys; the
    unnamed ones (Linear weights as transposed MatMul operands, GroupNorm affine as Mul/Add after
    InstanceNorm) are found from the scope in the name of the node that consumes them."""
    model = onnx.load(str(onnx_path))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    state = module.state_dict()
    found = {name: value for name, value in weights.items() if name in state}
    for node in model.graph.node:
        for name in node.input:
            if name in weights and name not in state and node.op_type in ANONYMOUS:
                key = ".".join(node.name.split("/")[1:-1] + [ANONYMOUS[node.op_type]])
                if key in state:
                    found[key] = weights[name].T if node.op_type == "MatMul" else weights[name]
    missing = sorted(set(state) - set(found))
    if missing:
        raise SystemExit(f"{onnx_path}: no weights found for {len(missing)} parameters, e.g. {missing[:5]}")
    with torch.no_grad():
        for key, value in found.items():
            state[key].copy_(torch.from_numpy(np.array(value)).reshape(state[key].shape))  # a writable copy


def check_against_onnx(module: torch.nn.Module, onnx_path: Path, inputs: dict[str, np.ndarray]) -> float:
    """Max |torch - ORT| on ``inputs`` (fed to the module by keyword, in the ONNX input order)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, inputs)[0]
    with torch.no_grad():
        got = module(*(torch.from_numpy(v) for v in inputs.values()))[0].numpy()
    err = float(np.abs(got - expected).max())
    if err > 1e-3:
        raise SystemExit(f"the torch module differs from {onnx_path} by {err} (weights mismatched)")
    return err


def load_text_encoder(bundle: Path):
    from transformers import CLIPTextConfig, CLIPTextModel
    model = CLIPTextModel(CLIPTextConfig.from_json_file(str(bundle / "text_encoder" / "config.json"))).eval()
    load_onnx_weights(model, bundle / "text_encoder" / "model.onnx")
    ids = np.full((1, tk.TOKENS), model.config.eos_token_id, dtype=np.int64)
    ids[0, :6] = [model.config.bos_token_id, 100, 200, 300, 400, 500]
    err = check_against_onnx(model, bundle / "text_encoder" / "model.onnx", {"input_ids": ids})
    log.info("text encoder read back from %s: max |torch - onnx| = %.2e", bundle, err)
    return model


class _UnetCall(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return (self.unet(sample, timestep, encoder_hidden_states=context).sample,)


def load_unet(bundle: Path):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(str(bundle / "unet"))).eval()
    load_onnx_weights(unet, bundle / "unet" / "model.onnx")
    session = ort.InferenceSession(str(bundle / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    kinds = {i.name: i.type for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    inputs = {names[0]: rng.standard_normal((1, 4, tk.LATENT, tk.LATENT)).astype(np.float32),
              names[1]: np.asarray(500, dtype=np.int64 if "int64" in kinds[names[1]] else np.float32),  # rank 0
              names[2]: rng.standard_normal((1, tk.TOKENS, 64)).astype(np.float32)}
    err = check_against_onnx(_UnetCall(unet), bundle / "unet" / "model.onnx", inputs)
    log.info("UNet read back from %s: max |torch - onnx| = %.2e", bundle, err)
    return unet


def grow_embedding(text_encoder, old_vocab: dict[str, int], new_vocab: dict[str, int]) -> None:
    """One more embedding row per new token, each the mean of the neutral words' rows."""
    old_rows = text_encoder.get_input_embeddings().weight.detach().clone()
    text_encoder.resize_token_embeddings(len(new_vocab))
    start = torch.stack([old_rows[old_vocab[w + "</w>"]] for w in NEUTRAL_WORDS]).mean(0)
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[:len(old_rows)] = old_rows
        weight[len(old_rows):] = start
    text_encoder.config.vocab_size = len(new_vocab)


# --- stages -----------------------------------------------------------------------------------
def extend_tokenizer(bundle: Path, dest: Path):
    """The shipped tokenizer plus merges (and tokens, appended) for the caption words it splits."""
    from edge.tokenizer import ClipTokenizer
    source = bundle / "tokenizer"
    vocab = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    known = [tuple(line.split()) for line in (source / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
             if line.strip()]
    added = tk.learn_merges(scenes.caption_words(), known)
    grown = dict(vocab)
    for pair in added:
        grown.setdefault("".join(pair), len(grown))
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest)
    (dest / "vocab.json").write_text(json.dumps(grown, ensure_ascii=False) + "\n", encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in known + added),
                                     encoding="utf-8")
    old, new = ClipTokenizer.from_dir(source), ClipTokenizer.from_dir(dest)
    split = [w for w in scenes.caption_words() if len(new.tokenize(w)) != 1]
    changed = [w for w in vocab if w.endswith("</w>") and old.encode(w[:-4]).ids != new.encode(w[:-4]).ids]
    if split or changed:
        raise SystemExit(f"extended tokenizer: words in pieces {split}, old words re-tokenised {changed[:5]}")
    log.info("tokenizer: %d merges added, %d -> %d tokens -> %s", len(added), len(vocab), len(grown), dest)
    return old, new


def make_latents(args: argparse.Namespace) -> tk.UnetData:
    """The training scenes through the shipped encoder (posterior mean x scaling factor), cached."""
    path = args.work / "latents.npz"
    _, tokenizer = extend_tokenizer(args.bundle, args.work / "tokenizer")
    encoder = args.bundle / "vae_encoder" / "model.onnx"
    scale = json.loads((args.bundle / "vae_decoder" / "config.json").read_text())["scaling_factor"]
    if not (path.is_file() and len(np.load(path)["latents"]) == args.scenes):
        session = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
        t0, latents, ids = time.monotonic(), [], []
        for start in range(0, args.scenes, 256):
            batch = [scenes.scene(s) for s in range(start, min(start + 256, args.scenes))]
            pixels = np.stack([np.asarray(s.image) for s in batch]).transpose(0, 3, 1, 2).astype(np.float32)
            latents.append(session.run(None, {"sample": pixels / 127.5 - 1})[0][:, :4] * scale)
            ids += [tokenizer.encode(s.caption).ids for s in batch]
            print(f"[latents] {start + len(batch)}/{args.scenes} ({time.monotonic() - t0:.0f} s)", flush=True)
        np.savez(path, latents=np.concatenate(latents).astype(np.float16), ids=np.asarray(ids, dtype=np.int32))
    data = np.load(path)
    meta = {"encoder_bytes": encoder.stat().st_size, "vocab": len(tokenizer.vocab)}
    return tk.UnetData(torch.from_numpy(data["latents"].astype(np.float32)),
                       torch.from_numpy(data["ids"].astype(np.int64)),
                       torch.tensor(tokenizer.encode("").ids, dtype=torch.int64), meta)


def load_models(args: argparse.Namespace):
    old, new = extend_tokenizer(args.bundle, args.work / "tokenizer")
    text_encoder = load_text_encoder(args.bundle)
    grow_embedding(text_encoder, old.vocab, new.vocab)
    return load_unet(args.bundle), text_encoder, new


def train(args: argparse.Namespace) -> None:
    data = make_latents(args)
    torch.manual_seed(args.seed)
    unet, text_encoder, _ = load_models(args)
    tk.fit_unet(args, unet.to(args.device), text_encoder.to(args.device), data, args.work / "finetune.pt",
                check=("encoder_bytes", "vocab"))


def export(args: argparse.Namespace) -> None:
    """EMA weights -> diffusers pipeline (VAE: the shipped decoder) -> Optimum ONNX -> bundle, then the
    shipped scheduler config and VAE files over the exported ones (unchanged, bit for bit)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    unet, text_encoder, tokenizer = load_models(args)
    state = torch.load(args.work / "finetune.pt", weights_only=False)
    ema = tk.EMA([unet, text_encoder], 0)
    ema.load_state_dict(state["ema"])
    ema.copy_to([unet, text_encoder])
    vae = tk.build_vae()
    load_decoder(vae, args.bundle / "vae_decoder" / "model.onnx")
    vae.register_to_config(scaling_factor=json.loads((args.bundle / "vae_decoder" / "config.json").read_text())
                           ["scaling_factor"])
    folder = args.work / "tokenizer"
    clip_tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=tk.EOS,
                                   model_max_length=tk.TOKENS)
    for caption in tk.PREVIEW_PROMPTS + ("Knolling of 3 red gears, on a pure white background, high quality.",):
        expected = tokenizer.encode(caption).ids
        got = clip_tokenizer(caption, padding="max_length", max_length=tk.TOKENS, truncation=True).input_ids
        if got != expected:
            raise SystemExit(f"transformers and edge.tokenizer disagree on {caption!r}: {got} vs {expected}")
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer, unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**tk.SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    dest = args.dest
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipeline.save_pretrained(tmp / "pt")
        export_optimum(tmp / "pt", tmp / "onnx")
        copy_bundle(tmp / "onnx", dest)
    for sub in ("scheduler", "vae_decoder", "vae_encoder"):
        shutil.rmtree(dest / sub, ignore_errors=True)
        shutil.copytree(args.bundle / sub, dest / sub, ignore=shutil.ignore_patterns("*.fp16.onnx", "*.int8.onnx"))
    shutil.rmtree(dest / "tokenizer")
    shutil.copytree(folder, dest / "tokenizer")  # the files edge.tokenizer was checked against
    print(f"[export] fine-tune step {state['step']} -> {dest}")
    if args.preview:
        tk.preview(dest, args.preview)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("tokenizer", "latents", "train", "export"))
    parser.add_argument("--bundle", type=Path, required=True, help="the shipped bundle (read only)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--dest", type=Path, help="export: the new bundle folder")
    parser.add_argument("--preview", type=Path, help="export: also a grid of sample outputs (PNG)")
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--decay-to", type=float, help="cosine decay to this share of --lr at --steps")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--uncond-rate", type=float, default=0.1)
    parser.add_argument("--min-snr-gamma", type=float, default=5.0)
    parser.add_argument("--offset-noise", type=float, default=0.25, help="as the shipped model's last stage")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.command == "tokenizer":
        extend_tokenizer(args.bundle, args.work / "tokenizer")
    elif args.command == "latents":
        make_latents(args)
    elif args.command == "train":
        train(args)
    elif args.command == "export":
        if args.dest is None or args.dest.resolve() == args.bundle.resolve():
            parser.error("export needs a --dest other than --bundle (the export reads the shipped VAE from it)")
        export(args)


if __name__ == "__main__":
    main()
