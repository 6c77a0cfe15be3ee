"""ONNX Runtime sessions: which execution providers to use and how to configure them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from .errors import BundleError, ConfigError

log = logging.getLogger(__name__)

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
}
OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are built; the ``runtime`` config section."""

    threads: int = 0  # 0: the number of physical cores
    providers: tuple[str, ...] = ("cpu",)
    graph_optimization: str = "extended"
    cfg_batch: bool = True  # run conditional and unconditional UNet passes as one batch of 2
    memory_arena: bool = True


def physical_cores() -> int:
    """Physical cores, not SMT threads: ONNX Runtime's kernels gain nothing from siblings."""
    try:
        cores = set()
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            info = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
            info = {k.strip(): v.strip() for k, v in info.items()}
            if "core id" in info:
                cores.add((info.get("physical id", "0"), info["core id"]))
        if cores:
            return len(cores)
    except OSError:
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_providers(wanted: tuple[str, ...]) -> list[str]:
    """Map config names to ONNX Runtime names, keeping only those this build has, in order."""
    available = ort.get_available_providers()
    chosen = []
    for name in wanted:
        full = ALIASES.get(name, name)
        if full in available:
            chosen.append(full)
        else:
            log.warning("execution provider %s is not in this onnxruntime build (has: %s); skipping it",
                        full, ", ".join(available))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # always the last fallback
    return chosen


def make_session(path: Path, options: RuntimeOptions) -> ort.InferenceSession:
    if options.graph_optimization not in OPT_LEVELS:
        raise ConfigError(f"runtime.graph_optimization: {options.graph_optimization!r} is not one of "
                          f"{', '.join(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads or physical_cores()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = OPT_LEVELS[options.graph_optimization]
    so.enable_cpu_mem_arena = options.memory_arena
    so.log_severity_level = 3  # ORT's warnings about unused initializers are noise to an operator
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=resolve_providers(options.providers))
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise BundleError(f"{path}: ONNX Runtime could not load it: {exc}") from None
