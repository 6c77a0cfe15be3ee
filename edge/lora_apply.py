"""LoRA at run time: fused weights handed to ONNX Runtime as initializer overrides, sessions cached.

For a job's LoRA set, each changed layer's weight becomes W' = W + sum(strength * (alpha/rank) *
up @ down), computed from the FP32 file's W and given to a new session of the component through
``SessionOptions.add_initializer``: the model files are never rewritten. FP16 variants get W' cast;
INT8 variants get W' re-quantized the way ``edge-imagegen quantize`` made them (symmetric int8,
per channel for static QDQ, one scale per tensor for dynamic MatMulInteger), with new scales (and, for
a static layer's int32 bias, its scale = input scale x weight scale, the bias re-quantized to match).

Sessions of recent LoRA sets stay cached, as many as the memory plan budgets (``Plan.lora``: at most
``lora.cache_sessions``, fewer where the budget beyond the tier holds fewer; a plan not chosen from a
budget keeps ``lora.cache_sessions``). With no room for a cached set, a LoRA job builds its sessions
and releases them after the job; the int8-lowmem tier builds its sessions per use anyway. Before
building, the oldest sets are evicted so that the new one keeps the count, and the live budget must
hold the new set (else the job fails with the figures). No LoRA, or every strength 0, runs the base
sessions themselves.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bundle import Bundle
from .config import LoraConfig
from .errors import BundleError, MemoryBudgetError, ValidationError
from .job_loras import LoraRef
from .lora import LORA_COMPONENTS, LoraFile, LoraLayer, match_layers
from .lora_graph import WeightRef, weight_map
from .memory import MB, load_manifest, lora_set_bytes, read_budget, trim_heap

if TYPE_CHECKING:
    from .pipeline import OnnxModel, Pipeline

log = logging.getLogger(__name__)

INT8_MAX = 127  # onnxruntime.quantization's symmetric int8 range is [-127, 127]
NUMPY = {1: np.float32, 10: np.float16}


class LoraLibrary:
    """The ``.safetensors`` files of one folder, by name (the file name without its suffix).

    A file is read when first used and read again when it changes on disk, so a LoRA can be
    swapped by replacing its file while the daemon runs.
    """

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self._files: dict[str, tuple[tuple[int, int], LoraFile]] = {}

    @classmethod
    def configured(cls, config: LoraConfig, bundle: Bundle) -> LoraLibrary:
        """``lora.dir``, or the bundle's own ``loras/`` folder when it is not set."""
        return cls(Path(config.dir).expanduser() if config.dir else bundle.root / "loras")

    def names(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.safetensors") if p.is_file())

    def get(self, name: str) -> LoraFile:
        path = self.folder / f"{name}.safetensors" if self.folder is not None else None
        if path is None or not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise ValidationError("loras", f"{name}: no such LoRA in {self.folder} (found: {known})")
        stat = path.stat()
        version = (stat.st_size, stat.st_mtime_ns)
        cached = self._files.get(name)
        if cached is None or cached[0] != version:
            try:
                cached = (version, LoraFile(path, name))
            except BundleError as exc:
                raise ValidationError("loras", f"{name}: {exc}") from None
            self._files[name] = cached
        return cached[1]


@dataclass(frozen=True)
class Target:
    layer: LoraLayer
    base: WeightRef  # the FP32 file's weight (the values W' is computed from)
    variant: WeightRef  # the weight in the file the session loads


def _quantize(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per channel along ``axis`` (None: one for the tensor)."""
    if axis is None:
        scale = np.asarray(np.abs(values).max() / INT8_MAX, np.float32)
    else:
        other = tuple(i for i in range(values.ndim) if i != axis)
        scale = (np.abs(values).max(axis=other) / INT8_MAX).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    shape = [1] * values.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(values / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def fused_initializers(component_path: Path, fp32_path: Path, targets: list[tuple[Target, float]]) -> dict[str, np.ndarray]:
    """The overridden initializers of the file at ``component_path`` for these layers and strengths."""
    base_graph, _ = weight_map(fp32_path)
    graph, _ = weight_map(component_path)
    fused: dict[str, tuple[WeightRef, np.ndarray]] = {}
    for target, strength in targets:
        ref = target.variant
        if ref.name not in fused:
            fused[ref.name] = (ref, base_graph.array(target.base.name).astype(np.float32))
        fused[ref.name][1][...] += strength * target.layer.delta(target.base, "")
    out: dict[str, np.ndarray] = {}
    for name, (ref, values) in fused.items():
        if values.shape != ref.shape:  # the variant's exporter laid the weight out the other way round
            values = values.T
        if not ref.quantized:
            out[name] = np.ascontiguousarray(values.astype(NUMPY.get(ref.data_type, np.float32)))
            continue
        old_scale = graph.array(ref.scale)
        q, scale = _quantize(values, ref.axis if old_scale.ndim else None)
        out[name], out[ref.scale] = q, scale.reshape(old_scale.shape)
        if ref.bias is not None:  # int32 bias: its scale must stay input scale x weight scale
            bias = graph.array(ref.bias.name).astype(np.float64) * graph.array(ref.bias.scale)
            bias_scale = (graph.array(ref.bias.input_scale) * scale).astype(np.float32)
            out[ref.bias.name] = np.round(bias / bias_scale).astype(np.int32)
            out[ref.bias.scale] = bias_scale
    return out


class LoraRuntime:
    """The LoRA side of one :class:`~edge.pipeline.Pipeline`: checks at submit, sessions per LoRA set."""

    def __init__(self, pipeline: Pipeline, library: LoraLibrary, cache_sessions: int = 2):
        self.pipeline, self.library = pipeline, library
        plan = pipeline.plan
        self.cache_sets = plan.lora.sets if plan.lora is not None else cache_sessions
        self._targets: dict[tuple[str, str, str], list[Target]] = {}  # (lora sha, component) -> targets
        self._sessions: OrderedDict[tuple, dict[str, Any]] = OrderedDict()  # LoRA set -> component -> session
        self._uncached = False  # the active set's sessions are not in the cache: release them after the job
        self.switch_seconds: dict[str, float] = {}  # what the last activation cost, per component

    def _component_files(self, component: str) -> tuple[Path, Path]:
        comp = self.pipeline.bundle.components[component]
        return comp.variants[self.pipeline.plan.precisions[component]], comp.variants["fp32"]

    def targets(self, lora: LoraFile, component: str) -> list[Target]:
        path, fp32 = self._component_files(component)
        key = (lora.sha256, component, str(path))
        if key not in self._targets:
            unet_config = self.pipeline.bundle.components["unet"].config
            base = match_layers(lora, component, weight_map(fp32)[1], unet_config)
            variant = dict(match_layers(lora, component, weight_map(path)[1], unet_config)) if path != fp32 \
                else dict(base)
            self._targets[key] = [Target(layer, ref, variant[layer]) for layer, ref in base]
        return self._targets[key]

    def check(self, loras: tuple[LoraRef, ...]) -> None:
        """Everything that can fail about a job's LoRAs, before it is accepted (ValidationError)."""
        for ref in loras:
            lora = self.library.get(ref.name)
            if not any(lora.layers.values()):
                raise ValidationError("loras", f"{ref.name}: none of the keys of {lora.path} is a LoRA layer of a "
                                      f"UNet or text encoder this runtime reads (keys: {lora.example_keys()})")
            for component in LORA_COMPONENTS:
                self.targets(lora, component)

    def _active(self, loras: tuple[LoraRef, ...], component: str) -> list[tuple[Target, float]]:
        return [(t, ref.strength) for ref in loras if ref.strength != 0
                for t in self.targets(self.library.get(ref.name), component)]

    def activate(self, loras: tuple[LoraRef, ...]) -> None:
        """Point the text encoder and UNet at sessions with these LoRAs fused (none: the base ones)."""
        t0 = time.perf_counter()
        active = {c: a for c in LORA_COMPONENTS if (a := self._active(loras, c))}
        key = tuple((self.library.get(r.name).sha256, r.strength) for r in loras if r.strength)
        if self.pipeline.plan.lowmem:  # sessions are built per use: hand over the initializers
            for component in LORA_COMPONENTS:
                self._model(component).override(self._fused(component, active[component])
                                                if component in active else None)
        else:
            self.release()
            sessions = self._cached(key) if active else {}
            if sessions is None:
                for component in LORA_COMPONENTS:  # an evicted active set must not outlive the new set's build
                    self._model(component).use(None)
                sessions = self._build(key, active)
            for component in LORA_COMPONENTS:
                self._model(component).use(sessions.get(component))
        self.switch_seconds = {c: time.perf_counter() - t0 if c in active else 0.0 for c in LORA_COMPONENTS}
        log.debug("LoRA set %s active in %.3f s", key, time.perf_counter() - t0)

    def release(self) -> None:
        """After a job: the sessions of a set the cache has no room for go, the base ones come back."""
        if self._uncached:
            for component in LORA_COMPONENTS:
                self._model(component).use(None)
            self._uncached = False
            trim_heap()

    def drop_cache(self) -> None:
        """Free every cached set's sessions (those of the active set stay until it changes)."""
        if self._sessions:
            self._sessions.clear()
            trim_heap()

    def _model(self, component: str) -> OnnxModel:
        return getattr(self.pipeline, component)

    def _fused(self, component: str, active: list[tuple[Target, float]]) -> dict[str, np.ndarray]:
        return fused_initializers(*self._component_files(component), active)

    def _cached(self, key: tuple) -> dict[str, Any] | None:
        if key in self._sessions:
            self._sessions.move_to_end(key)
        return self._sessions.get(key)

    def _build(self, key: tuple, active: dict[str, list[tuple[Target, float]]]) -> dict[str, Any]:
        """New sessions for a set: the oldest cached sets evicted first so that the cache keeps its count."""
        evicted = False
        while self._sessions and len(self._sessions) >= max(1, self.cache_sets):
            self._sessions.popitem(last=False)
            evicted = True
        if evicted:
            trim_heap()  # what the evicted sessions held goes back to the kernel before the budget is read
        bundle = self.pipeline.bundle
        need = lora_set_bytes(bundle, load_manifest(bundle), self.pipeline.plan.precisions, tuple(active))
        if self.pipeline.headroom is not None:
            self._room_for(need)
        sessions = {c: self._model(c).new_session(self._fused(c, a)) for c, a in active.items()}
        if self.cache_sets:
            self._sessions[key] = sessions
        else:
            self._uncached = True
        return sessions

    def _room_for(self, need: int) -> None:
        """The live budget must hold the new set; cached sets are freed for it before giving up."""
        headroom = self.pipeline.headroom or 0
        if read_budget(headroom).bytes < need:
            self.drop_cache()
        budget = read_budget(headroom)
        if budget.bytes < need:
            raise MemoryBudgetError(f"not enough free memory for the sessions of this LoRA set: they need "
                                    f"{need // MB} MB beyond the headroom; budget {budget.describe()}")

    def hashes(self, loras: tuple[LoraRef, ...]) -> dict[str, str]:
        return {r.name: self.library.get(r.name).sha256 for r in loras}


def describe_loras(library: LoraLibrary, bundle: Bundle) -> dict[str, Any]:
    """For ``doctor``: each LoRA found, its hash and which components of the bundle it fits (or why not)."""
    out: dict[str, Any] = {}
    unet_config = bundle.components["unet"].config
    for name in library.names():
        try:
            lora = library.get(name)
            fits = {c: f"{len(match_layers(lora, c, weight_map(bundle.components[c].path)[1], unet_config))} layers"
                    for c in LORA_COMPONENTS if lora.layers[c]}
            out[name] = {"sha256": lora.sha256, "fits": fits or f"no layer of a UNet or text encoder "
                                                              f"(keys: {lora.example_keys()})"}
        except ValidationError as exc:
            out[name] = {"error": exc.reason}
    return out
