"""What every benchmark prints first: the machine it ran on."""

import platform
from pathlib import Path

import onnxruntime as ort

from edge.providers import physical_cores


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model}, {physical_cores()} physical cores, {platform.machine()}, onnxruntime {ort.__version__}"
