"""Writing small .safetensors files for the tests (the runtime only reads them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.bundle import EMBEDDED_MODEL
from edge.lora_graph import weight_map

CODES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": CODES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
    return path


def random_kohya_lora(path: Path, modules: dict[str, tuple[str, str]], seed: int, size: float = 1.0,
                      rank: int = 4, alpha: float = 4.0) -> Path:
    """A kohya-style LoRA for ``modules`` (module path -> (component, model file)) whose update is
    about ``size`` times each weight, from the shapes the model's own files have."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (component, file) in modules.items():
        graph, weights = weight_map(file)
        ref = weights[module]
        w = graph.array(ref.name)
        shape = ref.shape[::-1] if ref.layout == "in_out" else ref.shape
        out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
        down = (rng.standard_normal((rank, inp, *kernel)) / np.sqrt(inp * max(1, np.prod(kernel)))).astype(np.float32)
        up = (rng.standard_normal((out, rank, *(1,) * len(kernel))) * size * w.std() * rank / alpha).astype(np.float32)
        stem = ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
        tensors[f"{stem}.alpha"] = np.asarray(alpha, np.float32)
    return write_safetensors(path, tensors)


KNOLLING_UNET = EMBEDDED_MODEL / "unet" / "model.onnx"
KNOLLING_TE = EMBEDDED_MODEL / "text_encoder" / "model.onnx"
# linear (MatMul), 1x1 and 3x3 conv with a bias (static INT8 re-quantizes the bias), Gemm, text encoder
KNOLLING_MODULES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": ("unet", KNOLLING_UNET),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": ("unet", KNOLLING_UNET),
    "mid_block.attentions.0.proj_in": ("unet", KNOLLING_UNET),
    "up_blocks.1.resnets.0.conv1": ("unet", KNOLLING_UNET),
    "down_blocks.1.resnets.0.time_emb_proj": ("unet", KNOLLING_UNET),
    "text_model.encoder.layers.0.self_attn.q_proj": ("text_encoder", KNOLLING_TE),
    "text_model.encoder.layers.1.mlp.fc1": ("text_encoder", KNOLLING_TE),
}
