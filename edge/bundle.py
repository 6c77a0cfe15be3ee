"""A model bundle on disk: the diffusers / Optimum ONNX export layout.

    model_index.json
    scheduler/scheduler_config.json
    tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
    text_encoder/model.onnx   (+ config.json)
    unet/model.onnx           (+ config.json; external weights in model.onnx_data or weights.pb)
    vae_decoder/model.onnx    (+ config.json: scaling_factor, block_out_channels)
    vae_encoder/model.onnx    optional: only image-to-image, inpainting and instruction editing use it

Precision variants sit next to the FP32 file as ``model.fp16.onnx`` and ``model.int8.onnx``.
Only file presence and JSON are checked here; tensor names, dtypes and shapes are read from the
ONNX Runtime sessions by the pipeline, because exporters disagree on them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

log = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
OPTIONAL_COMPONENTS = ("vae_encoder",)
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
EXPORT_COMMAND = "optimum-cli export onnx --task text-to-image --model MODEL_ID DEST"
EMBEDDED_MODEL = Path(__file__).parent / "models" / "knolling-tiny"


def read_json(path: Path, expected: str, required: bool = True) -> dict[str, Any]:
    """Read a JSON object, or raise BundleError naming the file and what it should hold."""
    if not path.is_file():
        if required:
            raise BundleError(f"{path}: missing; expected {expected}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); expected {expected}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: holds a JSON {type(data).__name__}; expected {expected}")
    return data


@dataclass(frozen=True)
class Component:
    name: str
    folder: Path
    config: dict[str, Any]
    variants: dict[str, Path]  # precision -> ONNX file, only those present

    @property
    def path(self) -> Path:
        return self.variants["fp32"]


@dataclass(frozen=True)
class Bundle:
    root: Path
    name: str
    scheduler_config: dict[str, Any]
    tokenizer_dir: Path
    components: dict[str, Component] = field(default_factory=dict)

    @property
    def vae_encoder(self) -> Component | None:
        return self.components.get("vae_encoder")

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.components["vae_decoder"].config.get("scaling_factor", 0.18215))

    @property
    def vae_shift_factor(self) -> float:
        return float(self.components["vae_decoder"].config.get("shift_factor") or 0.0)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE blocks - 1), 8 for every SD model."""
        blocks = self.components["vae_decoder"].config.get("block_out_channels", [0] * 4)
        return 2 ** (len(blocks) - 1)

    @property
    def native_size(self) -> int | None:
        """The training resolution in pixels, from the UNet's sample_size, if recorded."""
        size = self.components["unet"].config.get("sample_size")
        return size * self.vae_scale if isinstance(size, int) else None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.root),
            "scheduler": self.scheduler_config.get("_class_name"),
            "components": {
                name: {precision: path.stat().st_size for precision, path in comp.variants.items()}
                for name, comp in self.components.items()
            },
        }


def _component(root: Path, name: str) -> Component:
    folder = root / name
    variants = {p: folder / f for p, f in VARIANT_FILES.items() if (folder / f).is_file()}
    if "fp32" not in variants:
        raise BundleError(f"{folder / 'model.onnx'}: missing; expected the {name} ONNX model "
                          f"(export with `{EXPORT_COMMAND}`)")
    config = read_json(folder / "config.json", f"the {name} config as a JSON object", required=False)
    return Component(name, folder, config, variants)


def load_bundle(path: Path | str | None = None) -> Bundle:
    """Check a bundle folder and read its small JSON files. ``None`` means the embedded model."""
    root = Path(path) if path is not None else EMBEDDED_MODEL
    if not root.is_dir():
        raise BundleError(f"{root}: not a folder; expected a model bundle (model_index.json, unet/, ...)")
    index = read_json(root / "model_index.json", "the pipeline index written by diffusers or Optimum")
    scheduler = read_json(root / "scheduler" / "scheduler_config.json",
                          "a diffusers scheduler config with _class_name")
    tokenizer_dir = root / "tokenizer"
    for name, what in (("vocab.json", "the CLIP BPE vocabulary"), ("merges.txt", "the CLIP BPE merges")):
        if not (tokenizer_dir / name).is_file():
            raise BundleError(f"{tokenizer_dir / name}: missing; expected {what}")
    components = {name: _component(root, name) for name in COMPONENTS}
    components.update({name: _component(root, name) for name in OPTIONAL_COMPONENTS if (root / name).is_dir()})
    log.debug("bundle %s: %s", root, index.get("_class_name"))
    return Bundle(root=root, name=root.name, scheduler_config=scheduler, tokenizer_dir=tokenizer_dir,
                  components=components)
