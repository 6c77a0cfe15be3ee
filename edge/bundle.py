"""A model bundle on disk: the diffusers / Optimum ONNX export layout.

    model_index.json
    scheduler/scheduler_config.json
    tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
    text_encoder/model.onnx   (+ config.json)
    unet/model.onnx           (+ config.json; external weights in model.onnx_data or weights.pb)
    vae_decoder/model.onnx    (+ config.json: scaling_factor, block_out_channels; or an AutoencoderTiny)
    vae_encoder/model.onnx    optional: only image-to-image, inpainting and instruction editing use it
    edge.json                 optional: {"steps": 1, "guidance": 0.0, "scheduler": "euler"}, the
                              model's recommended job defaults

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
from .onnx_files import model_bytes

log = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
OPTIONAL_COMPONENTS = ("vae_encoder",)
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
EXPORT_COMMAND = "optimum-cli export onnx --task text-to-image --model MODEL_ID DEST"
EMBEDDED_MODEL = Path(__file__).parent / "models" / "knolling-tiny"
TINY_DECODER = "AutoencoderTiny"


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
    recommended: dict[str, Any] = field(default_factory=dict)  # from edge.json: steps, guidance, scheduler

    @property
    def tiny_decoder(self) -> bool:
        """A diffusers AutoencoderTiny (TAESD): it decodes the UNet's latents as they are."""
        return self.components["vae_decoder"].config.get("_class_name") == TINY_DECODER

    @property
    def vae_encoder(self) -> Component | None:
        return self.components.get("vae_encoder")

    @property
    def encoder_scaling_factor(self) -> float:
        """What encoded latents are multiplied by: the encoder's own config (a bundle may pair it with
        a tiny decoder, whose factor is 1), else the decoder's."""
        config = self.vae_encoder.config if self.vae_encoder else {}
        return float(config.get("scaling_factor") or self.vae_scaling_factor)

    @property
    def vae_scaling_factor(self) -> float:
        # AutoencoderTiny's scaling_factor is 1.0: diffusers divides by it, so TAESD gets the UNet's latents
        default = 1.0 if self.tiny_decoder else 0.18215
        return float(self.components["vae_decoder"].config.get("scaling_factor", default))

    @property
    def vae_shift_factor(self) -> float:
        return float(self.components["vae_decoder"].config.get("shift_factor") or 0.0)

    def _decoder_blocks(self) -> list[int]:
        config = self.components["vae_decoder"].config
        return config.get("decoder_block_out_channels" if self.tiny_decoder else "block_out_channels") or [128] * 4

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE blocks - 1), 8 for every SD model and TAESD."""
        factor = self.components["vae_decoder"].config.get("upsampling_scaling_factor", 2) if self.tiny_decoder else 2
        return factor ** (len(self._decoder_blocks()) - 1)

    @property
    def vae_channels(self) -> int:
        """Channels of the decoder's full-resolution block, what its activations scale with."""
        blocks = self._decoder_blocks()
        return int(blocks[-1] if self.tiny_decoder else blocks[0])  # TAESD lists them from the latent side

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
            "recommended": self.recommended,
            "decoder": {"path": str(self.components["vae_decoder"].folder),
                        "class": self.components["vae_decoder"].config.get("_class_name"),
                        "scaling_factor": self.vae_scaling_factor},
            "components": {
                name: {precision: model_bytes(path) for precision, path in comp.variants.items()}
                for name, comp in self.components.items()
            },
        }


def _component(root: Path, name: str, folder: Path | None = None) -> Component:
    """``root / name``, or ``folder`` in its place (``model.decoder``)."""
    folder = folder or root / name
    variants = {p: folder / f for p, f in VARIANT_FILES.items() if (folder / f).is_file()}
    if "fp32" not in variants:
        raise BundleError(f"{folder / 'model.onnx'}: missing; expected the {name} ONNX model "
                          f"(export with `{EXPORT_COMMAND}`)")
    config = read_json(folder / "config.json", f"the {name} config as a JSON object", required=False)
    return Component(name, folder, config, variants)


RECOMMENDED = {"steps": int, "guidance": (int, float), "scheduler": str}


def _recommended(path: Path) -> dict[str, Any]:
    """A bundle's edge.json: the steps, guidance and scheduler its model is meant to run with."""
    from .schedulers import NAMES
    data = read_json(path, 'a JSON object like {"steps": 1, "guidance": 0.0, "scheduler": "euler"}', required=False)
    for key, value in data.items():
        kind = RECOMMENDED.get(key)
        if kind is None:
            raise BundleError(f"{path}: {key}: unknown key; known keys: {', '.join(RECOMMENDED)}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError(f"{path}: {key}: must be a {'number' if key == 'guidance' else kind.__name__}, "
                              f"got {value!r}")
    if data.get("steps", 1) < 1:
        raise BundleError(f"{path}: steps: must be 1 or more, got {data['steps']}")
    if data.get("guidance", 0) < 0:
        raise BundleError(f"{path}: guidance: must be 0 or more, got {data['guidance']}")
    if data.get("scheduler", NAMES[0]) not in NAMES:
        raise BundleError(f"{path}: scheduler: {data['scheduler']!r} is not one of {', '.join(NAMES)}")
    return {k: float(v) if k == "guidance" else v for k, v in data.items()}


def load_bundle(path: Path | str | None = None, decoder: Path | str | None = None) -> Bundle:
    """Check a bundle folder and read its small JSON files. ``None`` means the embedded model.

    ``decoder``: a VAE decoder folder (``model.onnx`` + ``config.json``, e.g. a TAESD
    AutoencoderTiny) used instead of the bundle's own ``vae_decoder/``.
    """
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
    if decoder is not None and not Path(decoder).is_dir():
        raise BundleError(f"model.decoder: {decoder}: not a folder; expected a VAE decoder folder "
                          f"(model.onnx, config.json)")
    replaced = {"vae_decoder": Path(decoder)} if decoder is not None else {}
    components = {name: _component(root, name, replaced.get(name)) for name in COMPONENTS}
    unet_out = components["unet"].config.get("out_channels")
    latent = components["vae_decoder"].config.get("latent_channels")
    if decoder is not None and None not in (unet_out, latent) and unet_out != latent:
        raise BundleError(f"model.decoder: {decoder} decodes {latent}-channel latents; the UNet of {root} "
                          f"makes {unet_out}-channel ones (an SD 1.x/2.x decoder takes 4)")
    components.update({name: _component(root, name) for name in OPTIONAL_COMPONENTS if (root / name).is_dir()})
    log.debug("bundle %s: %s", root, index.get("_class_name"))
    return Bundle(root=root, name=root.name, scheduler_config=scheduler, tokenizer_dir=tokenizer_dir,
                  components=components, recommended=_recommended(root / "edge.json"))
