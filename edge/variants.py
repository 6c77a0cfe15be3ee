"""``variants.json``: what each component variant of a bundle costs and how faithful it is.

Written by ``edge-imagegen quantize`` (how each variant was made, or why it was rejected) and by
``edge-imagegen profile`` on the device itself (:mod:`edge.profile`: file bytes, peak RSS, load time,
per-call latency, fidelity). :mod:`edge.memory` reads the peak RSS figures to choose a precision tier.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from .output import atomic_write

log = logging.getLogger(__name__)


def manifest_path(root: Path) -> Path:
    return Path(root) / "variants.json"


def read_manifest(root: Path) -> dict[str, Any]:
    """The bundle's variants.json, or {} when it has none (footprints are then estimated)."""
    path = manifest_path(root)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        log.warning("%s: not valid JSON (%s); footprints will be estimated", path, exc)
        return {}


def update_manifest(root: Path, change: Callable[[dict], None]) -> dict:
    """Read variants.json (or start one), apply ``change`` to it, write it back atomically."""
    path = manifest_path(root)
    manifest: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    manifest["version"] = 1
    change(manifest)
    atomic_write(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest
