"""The YAML config: one file, every key documented in configs/default.yaml.

Each section is a frozen dataclass; :func:`load_config` checks every key against it (unknown
keys, wrong types, values outside the allowed set) and names the key in its error. The
dataclass defaults are the built-in defaults, and configs/default.yaml spells them out
(a test keeps the two equal).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .bundle import COMPONENTS
from .errors import ConfigError
from .jobs import Defaults, Limits
from .providers import OPT_LEVELS, RuntimeOptions

PRECISIONS = ("auto", "fp32", "fp16", "int8", "int8-lowmem")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # None: the embedded model
    precision: str = "auto"


@dataclass(frozen=True)
class MemoryConfig:
    headroom_mb: int = 256  # kept free for the OS, the front ends and activation spikes


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "outputs"
    sidecar: bool = True


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    defaults: Defaults = field(default_factory=Defaults)
    limits: Limits = field(default_factory=Limits)
    output: OutputConfig = field(default_factory=OutputConfig)
    log_level: str = "info"


# Keys whose value must be one of a fixed set; checked after types.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.precision": PRECISIONS,
    "runtime.graph_optimization": tuple(OPT_LEVELS),
    "log_level": LOG_LEVELS,
}
NON_NEGATIVE = ("runtime.threads", "memory.headroom_mb")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists to tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of "
                          f"{', '.join(_type_name(o) for o in options)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_convert(f"{key}", k, key_type): _convert(f"{key}.{k}", v, value_type) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {type(value).__name__} {value!r}")
        item_type = typing.get_args(tp)[0]
        return tuple(_convert(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key}: must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    where = prefix or "the config file"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{key}: unknown key; known keys here: "
                              f"{', '.join(sorted(known))}")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(key, value, hints[name])
        if key in CHOICES and values[name] not in CHOICES[key]:
            raise ConfigError(f"{key}: {values[name]!r} is not allowed; choose one of {', '.join(CHOICES[key])}")
        if key in NON_NEGATIVE and values[name] < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {values[name]}")
    return cls(**values)


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or the built-in defaults) and apply dotted-key overrides from the CLI."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.rpartition(".")
        target = data
        for part in filter(None, section.split(".")):
            target = target.setdefault(part, {}) if isinstance(target, dict) else target
        target[key] = value
    try:
        config = _build(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    for component in config.runtime.component_providers:
        if component not in COMPONENTS:
            raise ConfigError(f"runtime.component_providers.{component}: unknown component; choose one of "
                              f"{', '.join(COMPONENTS)}")
    if config.limits.min_guidance > config.limits.max_guidance:
        raise ConfigError("limits.min_guidance: must not exceed limits.max_guidance")
    return config
