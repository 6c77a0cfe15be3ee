"""Train ``knolling-tiny``: a small Stable-Diffusion-architecture model for knolling and exploded views of
product parts on white, at 128x128 (dev-time only: needs torch, diffusers, transformers, optimum-onnx).

Stages, each seeded, resumable (``--resume``), logged to ``WORK/log.csv`` and stdout, and bounded by
``--steps`` and ``--max-minutes`` (a stage stops cleanly at either and saves its checkpoint):

    tokenizer  WORK/tokenizer/: a CLIP BPE vocabulary (vocab.json + merges.txt) learnt from the caption
               words, so that every caption word is one token; loads in edge.tokenizer unchanged
    vae        AutoencoderKL 128x128x3 <-> 4x16x16, trained on 64x64 crops of rendered scenes (the VAE is
               fully convolutional, without attention, so crops teach it the same mapping 4x cheaper)
    latents    renders the training scenes, encodes them with the VAE (posterior means) and stores them
               with their token ids in WORK/latents.npz: the UNet stage never touches pixels
    unet       UNet2DConditionModel + CLIPTextModel, trained jointly on the latents (epsilon prediction,
               the DDPM scaled_linear schedule of the bundle's EulerDiscreteScheduler, min-SNR weights,
               10% empty captions for classifier-free guidance, EMA weights)
    export     the EMA weights through Optimum's ONNX export into the bundle layout (FP32), static shapes
    all        every stage in turn, splitting one --max-minutes budget between vae and unet

OFFSET NOISE. The bundle keeps SD 1.x's scaled_linear schedule, whose last timestep still holds
sqrt(alpha_bar) = 0.068 of the image. On a 16x16 latent the per-channel mean of the starting noise has
std 1/16 = 0.0625, about the size of the leaked image mean (0.068 x 0.6), so a model trained on plain
noise learns to read the parts' colour from the noise mean and, at inference, takes it from the seed
instead of the prompt (blue drawn purple, orange drawn red). ``--offset-noise S`` adds a per-channel
constant of std S to the training noise (Guttenberg 2023), which makes the mean uninformative, so the
colour must come from the text. The shipped model: ``all --max-minutes 100`` with plain noise, then
``unet --resume --offset-noise 0.25 --max-minutes 20`` (see benchmarks/README.md for the effect).
Its second edition (randomised layouts, user-style captions, issue 18) is a fine-tune of those
weights read back from the ONNX bundle: tools/finetune_knolling.py, which reuses ``fit_unet``.

The text encoder is trained jointly with the UNet rather than frozen: with a vocabulary this small
and captions this regular it costs a few percent of a UNet step, and a frozen random encoder would
leave the UNet to untangle arbitrary word embeddings mixed by three random attention layers.

    /work/devenv/bin/python tools/train_knolling.py all --work /tmp/knolling --max-minutes 115
    /work/devenv/bin/python tools/train_knolling.py unet --work /tmp/knolling --resume --offset-noise 0.25 --max-minutes 20
    /work/devenv/bin/python tools/train_knolling.py export --work /tmp/knolling --dest edge/models/knolling-tiny
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))
import scenes  # noqa: E402
from make_tiny_bundle import RESOLUTION, TOKENS, copy_bundle, export_optimum  # noqa: E402
from make_tokenizer_fixtures import BOS, EOS, _write_json, bytes_to_unicode, sd1_configs  # noqa: E402

log = logging.getLogger("train_knolling")

LATENT = RESOLUTION // 8
CROP = 64  # VAE training crop (pixels)
WHITE_LEVEL = 230 / 127.5 - 1  # adherence.NEAR_WHITE in the VAE's [-1, 1] pixel range
# The bundle's scheduler, as make_tiny_bundle's: the UNet learns this forward process.
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
PREVIEW_PROMPTS = ("knolling of 3 red gears", "exploded view of 2 blue batteries", "flat lay of a green chip",
                   "knolling of 4 yellow nuts", "exploded view of a purple spring and 2 orange washers",
                   "parts laid out: 2 teal lenses", "knolling of 6 pink screws", "exploded diagram of 3 blue bearings")


# --- tokenizer --------------------------------------------------------------------------------
def word_symbols(word: str) -> tuple[str, ...]:
    """A word as byte-level BPE symbols before any merge (the last one carries the end-of-word mark)."""
    byte_chars = bytes_to_unicode()
    chars = [byte_chars[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def _merge(seq: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def learn_merges(words: set[str], known: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Byte-level BPE merges, learnt until every word is one symbol (ties: the smaller pair). With
    ``known`` merges, the words are first split as a BPE tokenizer with those merges splits them and
    only the merges to add after them are returned (the known words keep their tokens)."""
    symbols = {}
    for word in sorted(words):
        seq = word_symbols(word)
        for pair in known:  # in rank order, as BPE applies them
            seq = _merge(seq, pair)
        symbols[word] = seq
    merges = []
    while True:
        pairs = Counter(p for seq in symbols.values() for p in zip(seq, seq[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        symbols = {word: _merge(seq, best) for word, seq in symbols.items()}


def write_tokenizer(dest: Path) -> Path:
    """vocab.json (512 byte symbols, the merge results, the two specials) + merges.txt + configs,
    laid out as ``make_tokenizer_fixtures.write_clip_vocab`` lays out CLIP's."""
    from edge.tokenizer import ClipTokenizer
    merges = learn_merges(scenes.caption_words())
    byte_symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [BOS, EOS]:
        vocab.setdefault(symbol, len(vocab))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    for name, data in sd1_configs(vocab, EOS, TOKENS).items():
        _write_json(dest / name, data)
    tokenizer = ClipTokenizer.from_dir(dest)
    split = [w for w in scenes.caption_words() if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"learnt merges leave these caption words in pieces: {split}")
    log.info("tokenizer: %d merges, %d tokens -> %s", len(merges), len(vocab), dest)
    return dest


def load_tokenizer(work: Path):
    from edge.tokenizer import ClipTokenizer
    folder = work / "tokenizer"
    if not (folder / "vocab.json").is_file():
        write_tokenizer(folder)
    return ClipTokenizer.from_dir(folder)


# --- models -----------------------------------------------------------------------------------
def build_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        mid_block_add_attention=False)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.vocab), hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=TOKENS, projection_dim=64,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id))


def build_unet():
    """16x16 (32 ch) -> 8x8 (64 ch, cross-attention) -> 4x4 (96 ch, cross-attention) and back.

    Cross-attention at 8x8 and below only: at 16x16 it costs 60% more time per step for a model
    whose parts span at least one 8x8 cell; the 30 MB budget (FP32 + FP16 + INT8) caps the size.
    """
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32)


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- training plumbing ------------------------------------------------------------------------
@dataclass
class Budget:
    steps: int
    deadline: float  # time.monotonic() value; inf: none
    start_step: int = 0
    start: float = 0.0

    @classmethod
    def of(cls, steps: int, minutes: float | None, start_step: int = 0) -> "Budget":
        now = time.monotonic()
        return cls(steps, now + minutes * 60 if minutes else math.inf, start_step, now)

    def done(self, step: int) -> bool:
        return step >= self.steps or time.monotonic() >= self.deadline

    def progress(self, step: int) -> float:
        """0 -> 1 over this run: by steps or by the clock, whichever ends it first."""
        by_steps = (step - self.start_step) / max(1, self.steps - self.start_step)
        by_clock = (time.monotonic() - self.start) / (self.deadline - self.start)
        return min(1.0, max(by_steps, by_clock))


class Log:
    """Appends one CSV row per logged step to WORK/log.csv and echoes it."""

    def __init__(self, work: Path, stage: str):
        self.path, self.stage = work / "log.csv", stage
        self.t0 = time.monotonic()

    def write(self, step: int, loss: float, seconds_per_step: float, **extra: float) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["stage", "step", "loss", "seconds_per_step", "elapsed", "extra"])
            writer.writerow([self.stage, step, f"{loss:.5f}", f"{seconds_per_step:.3f}",
                             f"{time.monotonic() - self.t0:.0f}", json.dumps(extra)])
        more = " ".join(f"{k} {v:.4g}" for k, v in extra.items())
        print(f"[{self.stage}] step {step} loss {loss:.4f} {seconds_per_step:.3f} s/it {more}", flush=True)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a checkpoint is whole or absent, even if the run is killed mid-save


def rng_state(rng: np.random.Generator) -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng(rng: np.random.Generator, state: dict) -> None:
    """Resuming then continues exactly as an uninterrupted run would (checked bit for bit on CPU)."""
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EMA:
    """Exponential moving average of weights: what export writes (smoother than the raw weights)."""

    def __init__(self, models: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in models for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm up: early weights are noise
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    def state_dict(self) -> list[torch.Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: list[torch.Tensor]) -> None:
        for s, v in zip(self.shadow, shadow):
            s.copy_(v)

    @torch.no_grad()
    def copy_to(self, models: list[torch.nn.Module]) -> None:
        for p, s in zip((p for m in models for p in m.parameters()), self.shadow):
            p.copy_(s)


def render_images(seeds: range) -> np.ndarray:
    return np.stack([np.asarray(scenes.scene(s).image) for s in seeds])


def to_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], as the SD VAE expects."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


# --- stage: VAE -------------------------------------------------------------------------------
def vae_images(work: Path, n: int) -> np.ndarray:
    path = work / "vae_images.npz"
    if path.is_file():
        images = np.load(path)["images"]
        if len(images) >= n:
            return images[:n]
    t0 = time.monotonic()
    images = render_images(range(n))
    np.savez_compressed(path, images=images)  # mostly white: compresses about 20x
    log.info("rendered %d VAE training scenes in %.0f s -> %s", n, time.monotonic() - t0, path)
    return images


def train_vae(args: argparse.Namespace) -> None:
    work, device = args.work, args.device
    ckpt_path = work / "vae.pt"
    images = vae_images(work, args.vae_scenes)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vae = build_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    step = 0
    if args.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        restore_rng(rng, state["rng"])
        step = state["step"]
        log.info("resumed the VAE at step %d", step)
    log.info("VAE: %.2fM parameters (decoder %.2fM)", parameters(vae) / 1e6, parameters(vae.decoder) / 1e6)
    budget = Budget.of(args.steps, args.max_minutes)
    logger = Log(work, "vae")
    vae.train()

    def save() -> None:
        save_checkpoint(ckpt_path, {"vae": vae.state_dict(), "opt": opt.state_dict(), "rng": rng_state(rng),
                                    "step": step, "config": dict(vae.config)})

    t_last, last_step, losses = time.monotonic(), step, []
    while not budget.done(step):
        idx = rng.integers(0, len(images), args.batch)
        y, x = rng.integers(0, RESOLUTION - CROP + 1, 2)
        batch = to_tensor(images[idx, y:y + CROP, x:x + CROP], device)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # Parts cover a few percent of a scene: weight their pixels up, or colour fidelity (what the
        # adherence check reads) comes last. Normalised so the loss scale does not depend on content.
        weight = 1 + args.part_weight * (batch.amin(dim=1, keepdim=True) < WHITE_LEVEL).float()
        err = recon - batch
        rec = ((err.abs() + err ** 2) * weight).mean() / weight.mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(rec.item())
        if step % args.log_every == 0 or budget.done(step):
            now = time.monotonic()
            logger.write(step, float(np.mean(losses)), (now - t_last) / (step - last_step), kl=kl.item())
            t_last, last_step, losses = now, step, []
        if step % args.save_every == 0:
            save()
    save()
    print(f"[vae] stopped at step {step}; checkpoint {ckpt_path}")
    check_reconstructions(vae.eval(), work, device)


@torch.no_grad()
def check_reconstructions(vae, work: Path, device: str, n: int = 48) -> None:
    """Run the adherence analyzer on VAE reconstructions of unseen scenes: the UNet can do no
    better than what the decoder can draw. Writes originals over reconstructions to vae_recon.png."""
    import adherence
    from PIL import Image
    truth = [scenes.scene(seed) for seed in range(2_000_000, 2_000_000 + n)]
    pixels = to_tensor(np.stack([np.asarray(s.image) for s in truth]), device)
    recon = ((vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1) + 1) * 127.5).round()
    images = [Image.fromarray(a) for a in recon.permute(0, 2, 3, 1).byte().cpu().numpy()]
    found = [adherence.analyze(im) for im in images]
    count = np.mean([len(f.parts) == len(s.parts) for f, s in zip(found, truth)])
    colour = np.mean([f.dominant_colour == s.groups[0].colour  # one colour: unambiguous
                      for f, s in zip(found, truth) if len(s.groups) == 1])
    background = np.mean([f.background_share for f in found])
    scenes.grid([s.image for s in truth[:8]] + images[:8], cols=8).save(work / "vae_recon.png")
    print(f"[vae] reconstructions of {n} unseen scenes: part count exact {100 * count:.0f}%, dominant colour "
          f"(one-colour scenes) {100 * colour:.0f}%, background near-white {100 * background:.1f}% "
          f"-> {work / 'vae_recon.png'}")


def load_vae(work: Path, device: str):
    state = torch.load(work / "vae.pt", weights_only=False)
    vae = build_vae().to(device)
    vae.load_state_dict(state["vae"])
    return vae.eval(), state["step"]


# --- stage: latents ---------------------------------------------------------------------------
@torch.no_grad()
def make_latents(args: argparse.Namespace) -> Path:
    """Encode the training scenes once; record the latent mean and scale the UNet should see."""
    work, device = args.work, args.device
    path = work / "latents.npz"
    vae, vae_step = load_vae(work, device)
    tokenizer = load_tokenizer(work)
    if path.is_file():
        cached = np.load(path)
        if int(cached["vae_step"]) == vae_step and len(cached["latents"]) == args.scenes:
            log.info("latents up to date (%s)", path)
            return path
    t0 = time.monotonic()
    means, ids, captions = [], [], []
    chunk = 256
    for start in range(0, args.scenes, chunk):
        batch = [scenes.scene(s) for s in range(start, min(start + chunk, args.scenes))]
        pixels = to_tensor(np.stack([np.asarray(s.image) for s in batch]), device)
        means.append(vae.encode(pixels).latent_dist.mean.cpu().numpy())
        ids += [tokenizer.encode(s.caption).ids for s in batch]
        captions += [s.caption for s in batch]
        print(f"[latents] {start + len(batch)}/{args.scenes} ({time.monotonic() - t0:.0f} s)", flush=True)
    latents = np.concatenate(means)
    channel_mean = latents.mean(axis=(0, 2, 3))
    scaling_factor = 1.0 / float((latents - channel_mean[None, :, None, None]).std())
    np.savez(path, latents=latents.astype(np.float16), ids=np.asarray(ids, dtype=np.int32),
             captions=np.asarray(captions), channel_mean=channel_mean, scaling_factor=scaling_factor,
             vae_step=vae_step, empty_ids=np.asarray(tokenizer.encode("").ids, dtype=np.int32))
    log.info("encoded %d scenes in %.0f s: channel mean %s, scaling factor %.4f -> %s", len(latents),
             time.monotonic() - t0, np.round(channel_mean, 3), scaling_factor, path)
    return path


# --- stage: UNet + text encoder ---------------------------------------------------------------
@dataclass
class UnetData:
    """What the UNet trains on: scaled latents, token ids, the empty caption's ids, and the identity of
    the latent space (a checkpoint trained in another one cannot be resumed)."""

    x0: torch.Tensor
    ids: torch.Tensor
    empty: torch.Tensor
    meta: dict


def train_unet(args: argparse.Namespace) -> None:
    data = np.load(make_latents(args))
    x0_all = torch.from_numpy((data["latents"].astype(np.float32) - data["channel_mean"][None, :, None, None])
                              * float(data["scaling_factor"]))
    tokenizer = load_tokenizer(args.work)
    torch.manual_seed(args.seed)
    unet, text_encoder = build_unet().to(args.device), build_text_encoder(tokenizer).to(args.device)
    fit_unet(args, unet, text_encoder, UnetData(
        x0_all, torch.from_numpy(data["ids"].astype(np.int64)), torch.from_numpy(data["empty_ids"].astype(np.int64)),
        {"vae_step": int(data["vae_step"]), "channel_mean": data["channel_mean"],
         "scaling_factor": float(data["scaling_factor"])}), args.work / "unet.pt", check=("vae_step",))


def learning_rate(args: argparse.Namespace, step: int, budget: Budget) -> float:
    """Linear warm-up, then constant (the EMA does the annealing) or, with ``--decay-to``, a cosine
    down to that share of ``--lr`` at the end of this run's budget (steps or minutes): a fine-tune's
    last steps at a low rate sharpen what the EMA of a constant rate leaves blurred."""
    rate = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.decay_to is None:
        return rate
    return rate * (args.decay_to + (1 - args.decay_to) * 0.5 * (1 + math.cos(math.pi * budget.progress(step))))


def fit_unet(args: argparse.Namespace, unet: torch.nn.Module, text_encoder: torch.nn.Module, data: UnetData,
             ckpt_path: Path, check: tuple[str, ...]) -> None:
    """Train UNet + text encoder jointly (epsilon prediction, min-SNR weights, CFG dropout, EMA) from
    the weights they have, or from ``ckpt_path`` with ``--resume`` (its ``check`` meta must match)."""
    from diffusers import DDPMScheduler
    device = args.device
    rng = np.random.default_rng(args.seed)
    models = [unet, text_encoder]
    ema = EMA(models, args.ema)
    opt = torch.optim.AdamW([p for m in models for p in m.parameters()], lr=args.lr, weight_decay=1e-2)
    step = 0
    if args.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        for key in check:
            if state[key] != data.meta[key]:
                raise SystemExit(f"{ckpt_path} was trained with {key} {state[key]}, but the latents now have "
                                 f"{data.meta[key]}: train afresh (no --resume)")
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        restore_rng(rng, state["rng"])
        step = state["step"]
        log.info("resumed the UNet at step %d", step)
    log.info("UNet %.2fM, text encoder %.2fM parameters; %d training scenes", parameters(unet) / 1e6,
             parameters(text_encoder) / 1e6, len(data.x0))
    alphas_cumprod = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "timestep_spacing"}
                                   ).alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight_of_t = torch.clamp(snr, max=args.min_snr_gamma) / snr  # min-SNR weighting (Hang et al. 2023)
    budget = Budget.of(args.steps, args.max_minutes, step)
    logger = Log(args.work, ckpt_path.stem)
    for m in models:
        m.train()

    def save() -> None:
        save_checkpoint(ckpt_path, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                                    "ema": ema.state_dict(), "opt": opt.state_dict(), "rng": rng_state(rng),
                                    "step": step, **data.meta})

    t_last, last_step, losses = time.monotonic(), step, []
    empty = data.empty.to(device)
    while not budget.done(step):
        idx = torch.from_numpy(rng.integers(0, len(data.x0), args.batch))
        x0, ids = data.x0[idx].to(device), data.ids[idx].to(device)
        drop = torch.from_numpy(rng.random(args.batch) < args.uncond_rate).to(device)
        ids = torch.where(drop[:, None], empty[None, :], ids)
        t = torch.randint(0, len(alphas_cumprod), (args.batch,), device=device)
        noise = torch.randn_like(x0)
        if args.offset_noise:
            noise = noise + args.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=device)
        ab = alphas_cumprod[t][:, None, None, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, step, budget)
        context = text_encoder(ids)[0]
        eps = unet(xt, t, encoder_hidden_states=context).sample
        loss = (weight_of_t[t] * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in models for p in m.parameters()], 1.0)
        opt.step()
        ema.update(step)
        step += 1
        losses.append(loss.item())
        if step % args.log_every == 0 or budget.done(step):
            now = time.monotonic()
            logger.write(step, float(np.mean(losses)), (now - t_last) / (step - last_step),
                         lr=opt.param_groups[0]["lr"])
            t_last, last_step, losses = now, step, []
        if step % args.save_every == 0:
            save()
    save()
    print(f"[{ckpt_path.stem}] stopped at step {step}; checkpoint {ckpt_path}")


# --- export -----------------------------------------------------------------------------------
def export(args: argparse.Namespace) -> None:
    """EMA weights -> diffusers folder -> Optimum ONNX export -> bundle with static shapes (FP32)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    work, dest = args.work, args.dest
    tokenizer = load_tokenizer(work)
    vae, vae_step = load_vae(work, "cpu")
    state = torch.load(work / "unet.pt", weights_only=False)
    if state["vae_step"] != vae_step:
        raise SystemExit(f"the UNet was trained on latents of VAE step {state['vae_step']}, "
                         f"but vae.pt is at step {vae_step}: rerun the unet stage")
    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    ema = EMA([unet, text_encoder], 0)
    ema.load_state_dict(state["ema"])
    ema.copy_to([unet, text_encoder])
    with torch.no_grad():
        # The UNet saw (z - mean) * scaling_factor. Fold the mean into the VAE so that the runtime's
        # plain `latents / scaling_factor` (SD 1.x, no shift) decodes right: the encoder's posterior
        # mean gives z - mean, and the decoder's first 1x1 conv adds W @ mean back.
        mean = torch.as_tensor(state["channel_mean"], dtype=torch.float32)
        vae.quant_conv.bias[:4] -= mean
        vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mean
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    clip_tokenizer = CLIPTokenizer(str(work / "tokenizer" / "vocab.json"), str(work / "tokenizer" / "merges.txt"),
                                   pad_token=EOS, model_max_length=TOKENS)
    for caption in PREVIEW_PROMPTS:  # transformers must read the vocabulary as edge.tokenizer does
        expected = tokenizer.encode(caption).ids
        got = clip_tokenizer(caption, padding="max_length", max_length=TOKENS, truncation=True).input_ids
        if got != expected:
            raise SystemExit(f"transformers and edge.tokenizer disagree on {caption!r}: {got} vs {expected}")
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer, unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipeline.save_pretrained(tmp / "pt")
        export_optimum(tmp / "pt", tmp / "onnx")
        copy_bundle(tmp / "onnx", dest)
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"[export] UNet step {state['step']}, VAE step {vae_step} -> {dest} ({total / 1e6:.1f} MB)")
    if args.preview:
        preview(dest, args.preview)


def preview(bundle_dir: Path, out: Path) -> None:
    """A grid of PREVIEW_PROMPTS generated by the runtime itself (edge.pipeline), one seed each."""
    from edge.bundle import load_bundle
    from edge.jobs import parse_job
    from edge.pipeline import Pipeline
    from edge.providers import RuntimeOptions
    pipe = Pipeline(load_bundle(bundle_dir), RuntimeOptions(threads=2))
    t0 = time.monotonic()
    images = [pipe.generate(parse_job({"prompt": p, "seed": i})).images[0].image
              for i, p in enumerate(PREVIEW_PROMPTS)]
    scenes.grid(images, cols=4).save(out)
    print(f"[preview] {len(images)} images in {time.monotonic() - t0:.1f} s -> {out}")


# --- all --------------------------------------------------------------------------------------
def run_all(args: argparse.Namespace) -> None:
    """The whole recipe under one budget: the VAE gets ``--vae-share`` of it, the UNet the rest less
    what encoding the latents and exporting take."""
    t0 = time.monotonic()
    total = args.max_minutes or math.inf
    stage_args = argparse.Namespace(**vars(args))
    stage_args.steps, stage_args.lr, stage_args.batch = args.vae_steps, args.vae_lr, args.batch // 2
    stage_args.max_minutes = total * args.vae_share if args.max_minutes else None
    train_vae(stage_args)
    make_latents(args)
    spent = (time.monotonic() - t0) / 60
    stage_args.steps, stage_args.lr, stage_args.batch = args.unet_steps, args.unet_lr, args.batch
    stage_args.max_minutes = total - spent - args.export_minutes if args.max_minutes else None
    train_unet(stage_args)
    export(args)
    print(f"[all] {(time.monotonic() - t0) / 60:.1f} minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work", type=Path, required=True, help="checkpoints, caches and log.csv")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    common.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint")
    common.add_argument("--max-minutes", type=float, help="wall-clock budget; the stage saves and stops")
    common.add_argument("--log-every", type=int, default=50)
    common.add_argument("--save-every", type=int, default=500)
    common.add_argument("--scenes", type=int, default=20000, help="training scenes for the UNet (seeds 0..n-1)")
    vae_opts = argparse.ArgumentParser(add_help=False)
    vae_opts.add_argument("--vae-scenes", type=int, default=4000)
    vae_opts.add_argument("--kl-weight", type=float, default=1e-5)
    vae_opts.add_argument("--part-weight", type=float, default=4.0, help="extra loss weight of non-white pixels")
    unet_opts = argparse.ArgumentParser(add_help=False)
    unet_opts.add_argument("--ema", type=float, default=0.999)
    unet_opts.add_argument("--uncond-rate", type=float, default=0.1, help="share of empty captions (for CFG)")
    unet_opts.add_argument("--min-snr-gamma", type=float, default=5.0)
    unet_opts.add_argument("--warmup", type=int, default=200)
    unet_opts.add_argument("--decay-to", type=float, help="cosine decay to this share of the rate at --steps")
    unet_opts.add_argument("--offset-noise", type=float, default=0.0,
                           help="std of a per-channel constant added to the noise (see OFFSET NOISE above)")
    export_opts = argparse.ArgumentParser(add_help=False)
    export_opts.add_argument("--dest", type=Path, required=True)
    export_opts.add_argument("--preview", type=Path, help="also write a grid of sample outputs (PNG)")

    sub.add_parser("tokenizer", parents=[common])
    p = sub.add_parser("vae", parents=[common, vae_opts])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    sub.add_parser("latents", parents=[common])
    p = sub.add_parser("unet", parents=[common, unet_opts])
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    sub.add_parser("export", parents=[common, export_opts])
    p = sub.add_parser("all", parents=[common, vae_opts, unet_opts, export_opts])
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--unet-steps", type=int, default=100000, help="usually the time budget stops it first")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=32, help="UNet batch; the VAE uses half")
    p.add_argument("--vae-share", type=float, default=0.2, help="share of --max-minutes for the VAE")
    p.add_argument("--export-minutes", type=float, default=3.0, help="kept back for export")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.command == "tokenizer":
        write_tokenizer(args.work / "tokenizer")
    load_tokenizer(args.work)
    if args.command == "vae":
        train_vae(args)
    elif args.command == "latents":
        make_latents(args)
    elif args.command == "unet":
        train_unet(args)
    elif args.command == "export":
        export(args)
    elif args.command == "all":
        run_all(args)


if __name__ == "__main__":
    main()
