"""LoRA files: their key styles, and matching their layers onto an exported model.

Two key styles are read, for the UNet and the text encoder, linear and conv (LoCon) layers:

- kohya / AUTOMATIC1111: ``lora_unet_<module path, '.' as '_'>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``, ``lora_te_`` (or ``lora_te1_``) for the text encoder, with the UNet named either the
  diffusers way (``down_blocks_1_attentions_0_...``) or after the original SD checkpoint's blocks
  (``input_blocks_4_1_...``, ``middle_block_1_...``, ``output_blocks_3_1_...``; mapped as diffusers'
  ``_maybe_map_sgm_blocks_to_diffusers`` does, from the UNet's config.json);
- diffusers / PEFT: ``unet.<path>.lora_A.weight`` / ``lora_B``, ``text_encoder.<path>...``, optionally
  behind ``base_model.model.``, rank and alpha from the ``lora_adapter_metadata`` header entry
  diffusers writes (without it, alpha = rank as diffusers assumes).

A layer's update is ``(alpha / rank) * up @ down``; kohya's '_' for '.' is undone by matching against
the module paths the graph has (:mod:`edge.lora_graph`), not by guessing where the dots were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ValidationError
from .lora_graph import WeightRef
from .safetensors_file import SafetensorsFile

log = logging.getLogger(__name__)

LORA_COMPONENTS = ("text_encoder", "unet")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
         (".lora.down.weight", ".lora.up.weight"))
UNSUPPORTED = ("hada_", "lokr_", "dora_scale", "lora_mid")  # LoHa, LoKr, DoRA, Tucker (and ".diff": full diffs)
SGM = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)|(middle_block)_(\d+)_(.+)")
SGM_FIXED = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
             "time_embed_2": "time_embedding_linear_2"}
SGM_RESNET = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
              ("skip_connection", "conv_shortcut"))


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: it holds arrays
class LoraLayer:
    component: str
    key: str  # the file's name for the layer, for messages
    flat: str  # the target module path with '.' as '_' (kohya's spelling)
    down: np.ndarray  # [rank, in] or [rank, in, kh, kw]
    up: np.ndarray  # [out, rank] or [out, rank, 1, 1]
    scale: float  # alpha / rank

    def delta(self, ref: WeightRef, lora_name: str) -> np.ndarray:
        """The update in the layout of ``ref``'s initializer; ValidationError when the shapes differ."""
        rank = self.down.shape[0]
        if self.up.shape[1] != rank:
            raise ValidationError("loras", f"{lora_name}: layer {self.key} has lora_down rank {rank} but lora_up "
                                  f"{list(self.up.shape)}")
        product = self.scale * (self.up.reshape(self.up.shape[0], rank) @ self.down.reshape(rank, -1))
        want = ref.shape if ref.layout != "in_out" else ref.shape[::-1]
        full = (self.up.shape[0], *self.down.shape[1:])
        if ref.layout == "conv" and product.size == int(np.prod(want)) and full[:2] == tuple(want[:2]):
            product = product.reshape(want)  # a linear LoRA on a 1x1 conv (proj_in across SD versions)
        elif full != tuple(want):
            raise ValidationError("loras", f"{lora_name}: layer {ref.module} is {list(want)} in this model but the "
                                  f"LoRA's update for it is {list(full)}: the LoRA is for another architecture")
        else:
            product = product.reshape(want)
        return product.T if ref.layout == "in_out" else product


def _sgm_to_diffusers(flat: str, unet_config: dict[str, Any]) -> str:
    """``input_blocks_4_1_transformer_blocks_0_attn1_to_q`` -> ``down_blocks_1_attentions_0_...``."""
    for old, new in SGM_FIXED.items():
        if flat.startswith(old + "_") or flat == old:
            return new + flat[len(old):]
    match = SGM.fullmatch(flat)
    if match is None:
        return flat
    if match.group(5):
        kind, index, inner, rest = "middle_block", int(match.group(6)), 0, match.group(7)
    else:
        kind, index, inner, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    per_block = unet_config.get("layers_per_block", 2)
    per_block = per_block[0] if isinstance(per_block, list) else per_block
    if kind == "middle_block":
        head = {0: "mid_block_resnets_0", 1: "mid_block_attentions_0", 2: "mid_block_resnets_1"}.get(index, flat)
    elif kind == "input_blocks":
        block, layer = (index - 1) // (per_block + 1), (index - 1) % (per_block + 1)
        if layer == per_block:  # the block's downsampler
            head, rest = f"down_blocks_{block}_downsamplers_0", rest.replace("op", "conv", 1)
        else:
            head = f"down_blocks_{block}_{'resnets' if inner == 0 else 'attentions'}_{layer}"
    else:
        block, layer = index // (per_block + 1), index % (per_block + 1)
        up_types = unet_config.get("up_block_types") or ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
        has_attention = block < len(up_types) and "CrossAttn" in up_types[block]
        if inner == 0:
            head = f"up_blocks_{block}_resnets_{layer}"
        elif inner == 1 and has_attention:
            head = f"up_blocks_{block}_attentions_{layer}"
        else:
            head = f"up_blocks_{block}_upsamplers_0"
    if "_resnets_" in head:
        for old, new in SGM_RESNET:
            rest = rest.replace(old, new)
    return f"{head}_{rest}"


def _peft_scales(metadata: dict[str, str]) -> dict[str, tuple[float, int | None, bool]]:
    """(lora_alpha, r, use_rslora) per component from diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out = {}
    for comp in LORA_COMPONENTS:
        if f"{comp}.lora_alpha" in data:
            out[comp] = (float(data[f"{comp}.lora_alpha"]), data.get(f"{comp}.r"), bool(data.get(f"{comp}.use_rslora")))
    return out


class LoraFile:
    """One LoRA file's layers, per component, with the file's name and hash."""

    def __init__(self, path: Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        tensors = SafetensorsFile(self.path)
        self.keys = sorted(tensors.tensors)
        self.layers: dict[str, list[LoraLayer]] = {c: [] for c in LORA_COMPONENTS}
        self.unmatched: list[str] = []  # keys of no known style
        bad = next((k for k in self.keys if any(u in k for u in UNSUPPORTED) or k.endswith((".diff", ".diff_b"))),
                   None)
        if bad is not None:
            raise ValidationError("loras", f"{self.name}: {self.path} holds {bad!r}: LoHa, LoKr, DoRA and "
                                  f"full-difference layers are not supported, only LoRA (down/up) and LoCon")
        peft = _peft_scales(tensors.metadata)
        seen = set()
        for key in self.keys:
            pair = next(((d, u) for d, u in PAIRS if key.endswith(d)), None)
            if pair is None:
                continue
            stem = key[: -len(pair[0])]
            up_key = stem + pair[1]
            if up_key not in tensors.tensors:
                raise ValidationError("loras", f"{self.name}: {key} has no {up_key}")
            seen.update((key, up_key, stem + ".alpha"))
            component, flat = self._target(stem)
            if component is None:
                self.unmatched.append(key)
                continue
            down, up = tensors.array(key), tensors.array(up_key)
            rank = down.shape[0]
            if stem + ".alpha" in tensors.tensors:
                scale = float(tensors.array(stem + ".alpha").reshape(-1)[0]) / rank
            elif component in peft:
                alpha, _, rslora = peft[component]
                scale = alpha / (rank ** 0.5 if rslora else rank)
            else:
                scale = 1.0
            self.layers[component].append(LoraLayer(component, stem, flat, down, up, scale))
        self.unmatched += [k for k in self.keys if k not in seen]

    @staticmethod
    def _target(stem: str) -> tuple[str | None, str]:
        for prefix, component in KOHYA_PREFIXES.items():
            if stem.startswith(prefix):
                return component, stem[len(prefix):]
        stem = stem.removeprefix("base_model.model.")
        for component in LORA_COMPONENTS:
            if stem.startswith(component + "."):
                return component, stem[len(component) + 1:].replace(".processor", "").replace(".", "_")
        return None, stem

    def example_keys(self, n: int = 3) -> str:
        return ", ".join(self.keys[:n]) + (", ..." if len(self.keys) > n else "")


def match_layers(lora: LoraFile, component: str, weights: dict[str, WeightRef],
                 unet_config: dict[str, Any]) -> list[tuple[LoraLayer, WeightRef]]:
    """Each of the LoRA's layers for ``component`` with the weight it changes, shapes checked.

    Raises ValidationError for a layer this model lacks or whose shape differs (another architecture).
    """
    by_flat = {ref.flat: ref for ref in weights.values()}
    pairs = []
    for layer in lora.layers[component]:
        flat = _sgm_to_diffusers(layer.flat, unet_config) if component == "unet" else layer.flat
        ref = by_flat.get(flat)
        if ref is None:
            raise ValidationError("loras", f"{lora.name}: layer {layer.key} has no counterpart in this model's "
                                  f"{component}: the LoRA is for another architecture")
        layer.delta(ref, lora.name)  # shape check now, at submit, rather than at the job's start
        pairs.append((layer, ref))
    return pairs
