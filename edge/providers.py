"""ONNX Runtime sessions: which execution providers to use and how to configure them.

``runtime.providers`` is an ordered preference (``xnnpack``, ``dnnl``, ``cpu`` or full ONNX Runtime
names), overridable per component. Providers missing from the installed build are skipped with a
logged reason; the CPU provider always ends the list. The PyPI wheels carry only the CPU provider
(on ARM64 it uses Arm-optimised kernels); XNNPACK and DNNL need ONNX Runtime built from source
(``./build.sh --use_xnnpack`` / ``--use_dnnl --build_wheel``; see the README).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .bundle import VARIANT_FILES
from .config import RuntimeOptions
from .errors import BundleError, ConfigError

log = logging.getLogger(__name__)

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",  # the onnxruntime-openvino wheel (x86-64)
}
CPU = "CPUExecutionProvider"
XNNPACK = "XnnpackExecutionProvider"
# the names are the config's (edge.config.OPT_LEVEL_NAMES), the values onnxruntime's
OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# The CPU provider's native FP16 kernels (MLAS half-precision GEMM and convolution, built where the
# compiler has Arm's FP16 vector arithmetic: the aarch64 wheels) include an NHWC convolution
# (NhwcFusedConv) that only the layout pass of level "all" (NhwcTransformer) puts in; the NCHW FP16
# Conv kernel transposes its input and output on every call. x86-64 builds have no FP16
# convolution: there ONNX Runtime casts FP16 nodes to FP32 around its FP32 kernels.
FP16_NATIVE = platform.machine().lower() in ("aarch64", "arm64")


def optimization_level(options: RuntimeOptions, path: Path) -> str:
    """The graph optimization level for a session of ``path``. ``auto``: "all" for an FP16 variant
    where the build has native FP16 kernels (the NHWC FP16 convolution), else "extended"."""
    if options.graph_optimization != "auto":
        return options.graph_optimization
    return "all" if FP16_NATIVE and path.name == VARIANT_FILES["fp16"] else "extended"


def physical_cores() -> int:
    """Physical cores, not SMT threads: ONNX Runtime's kernels gain nothing from siblings."""
    try:
        cores = set()
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}
            if "core id" in info:
                cores.add((info.get("physical id", "0"), info["core id"]))
        if cores:
            return len(cores)
    except OSError:
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_providers(wanted: tuple[str, ...], available: list[str] | None = None) -> list[str]:
    """Map config names to ONNX Runtime names, keeping only those this build has, in order."""
    available = ort.get_available_providers() if available is None else available
    chosen = []
    for name in wanted:
        full = ALIASES.get(name, name)
        if full in available:
            chosen.append(full)
        else:
            log.warning("execution provider %s is not in this onnxruntime build (it has %s); falling back to the "
                        "next one configured", full, ", ".join(available))
    if CPU not in chosen:
        chosen.append(CPU)  # always the last fallback
    return chosen


def _options_for(provider: str, options: RuntimeOptions, threads: int) -> dict[str, Any]:
    configured = {**options.provider_options.get(provider, {}),
                  **{k: v for alias, full in ALIASES.items() if full == provider
                     for k, v in options.provider_options.get(alias, {}).items()}}
    if provider == XNNPACK:  # XNNPACK runs its own thread pool: give it the cores
        return {"intra_op_num_threads": threads, **configured}
    return configured


def session_options(options: RuntimeOptions, providers: list[str], level: str | None = None) -> ort.SessionOptions:
    """``level``: an :data:`OPT_LEVELS` name (:func:`optimization_level`); None: the configured one,
    ``auto`` read as "extended"."""
    if level is None:
        level = "extended" if options.graph_optimization == "auto" else options.graph_optimization
    if level not in OPT_LEVELS:
        raise ConfigError(f"runtime.graph_optimization: {level!r} is not one of auto, {', '.join(OPT_LEVELS)}")
    so = ort.SessionOptions()
    threads = options.threads or physical_cores()
    if XNNPACK in providers:
        # XNNPACK's docs: ORT's own pool to 1 thread, not spinning, so the two pools don't fight.
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = OPT_LEVELS[level]
    so.enable_cpu_mem_arena = options.memory_arena
    if not options.prepack:
        # Pre-packing copies each weight into a kernel-specific layout in anonymous memory. Without
        # it, external-data weights are used where ONNX Runtime mapped them from the file: clean page
        # cache the kernel can drop and read back under pressure, instead of memory it must swap.
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.log_severity_level = 3  # ORT's warnings about unused initializers are noise to an operator
    return so


def _cache_path(path: Path, options: RuntimeOptions, level: str) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{ort.__version__}|{level}"
    return Path(options.optimized_cache) / f"{path.parent.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"


def _load(source: Path, so: ort.SessionOptions, providers: list[str], options: RuntimeOptions,
          shown_as: Path) -> ort.InferenceSession:
    threads = options.threads or physical_cores()
    try:
        return ort.InferenceSession(str(source), sess_options=so,
                                    providers=[(p, _options_for(p, options, threads)) for p in providers])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise BundleError(f"{shown_as}: ONNX Runtime could not load it: {exc}") from None


def make_session(path: Path, options: RuntimeOptions, component: str | None = None,
                 initializers: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """A session of ``path``; ``initializers`` override the file's (LoRA-fused weights), which ONNX
    Runtime reads from these arrays for the session's life: the session keeps them referenced."""
    providers = resolve_providers(options.component_providers.get(component or "", options.providers))
    level = optimization_level(options, path)
    so = session_options(options, providers, level)
    if initializers:
        if so.graph_optimization_level == OPT_LEVELS["all"]:
            # level "all" re-lays Conv weights out (NCHWc) before overrides apply: they would be lost
            so.graph_optimization_level = OPT_LEVELS["extended"]
        values = [ort.OrtValue.ortvalue_from_numpy(array) for array in initializers.values()]
        for name, value in zip(initializers, values):
            so.add_initializer(name, value)
        session = _load(path, so, providers, options, path)  # the optimized-model cache is the base file's
        session._edge_initializers = (initializers, values)
        return session
    if not options.optimized_cache or providers != [CPU]:  # compiling providers can't save their graphs
        return _load(path, so, providers, options, path)
    cached = _cache_path(path, options, level)
    if cached.is_file():
        fast = session_options(options, providers, level)
        fast.graph_optimization_level = OPT_LEVELS["disabled"]  # already optimized on an earlier start
        try:
            return _load(cached, fast, providers, options, cached)
        except BundleError as exc:  # a cache cut short by a power cut: rebuild it
            log.warning("%s; rebuilding it", exc)
            cached.unlink()
    cached.parent.mkdir(parents=True, exist_ok=True)
    so.optimized_model_filepath = str(cached)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", cached.name + ".data")
    return _load(path, so, providers, options, path)
