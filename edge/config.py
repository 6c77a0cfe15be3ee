"""The YAML config: one file, every key documented in configs/default.yaml.

Each section is a frozen dataclass; :func:`load_config` checks every key against it (unknown
keys, wrong types, values outside the allowed set) and names the key in its error. The
dataclass defaults are the built-in defaults, and configs/default.yaml spells them out
(a test keeps the two equal).
"""

from __future__ import annotations

import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .bundle import COMPONENTS, OPTIONAL_COMPONENTS
from .errors import ConfigError
from .jobs import Defaults, Limits

PRECISIONS = ("auto", "fp32", "fp16", "int8", "int8-lowmem")
LOG_LEVELS = ("debug", "info", "warning", "error")
# onnxruntime's graph optimization levels, and auto (edge.providers.optimization_level)
OPT_LEVEL_NAMES = ("auto", "disabled", "basic", "extended", "all")
VAE_TILING_MODES = ("auto", "on", "off")  # edge.tiling
PREVIEW_MODES = ("auto", "linear")  # edge.preview: auto takes a bundle's tiny decoder, linear never


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are built; the ``runtime`` config section."""

    threads: int = 0  # 0: the number of physical cores
    providers: tuple[str, ...] = ("cpu",)
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # provider -> its options
    component_providers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # e.g. unet -> (xnnpack, cpu)
    graph_optimization: str = "auto"  # extended; all for FP16 variants where FP16 kernels are native
    optimized_cache: str | None = None  # folder for optimized models (faster restarts), None: off
    cfg_batch: bool = True  # run conditional and unconditional UNet passes as one batch of 2
    memory_arena: bool = True
    prepack: bool = True  # False: weights stay in the file's mapped pages, no second packed copy
    vae_tiling: str = "auto"  # auto: the lowmem tier tiles when a whole decode would not fit; on; off
    vae_tile_size: int = 0  # tile side in pixels; 0: the largest that fits the memory budget


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # None: the embedded model
    precision: str = "auto"
    decoder: str | None = None  # a VAE decoder folder (e.g. TAESD) used instead of the bundle's


@dataclass(frozen=True)
class MemoryConfig:
    headroom_mb: int = 256  # kept free for the OS, the front ends and activation spikes


@dataclass(frozen=True)
class LoraConfig:
    dir: str | None = None  # None: the model bundle's loras/ folder
    cache_sessions: int = 2  # most LoRA sets kept loaded; the memory plan budgets fewer where they do not fit


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "outputs"
    sidecar: bool = True
    min_free_mb: int = 200  # serve: a job does not start below this much free space
    max_bytes: int = 0  # serve: prune the oldest images beyond this total; 0: no limit
    max_age_days: float = 0.0  # serve: prune images older than this; 0: keep


@dataclass(frozen=True)
class DaemonConfig:
    """``edge-imagegen serve``: the journal, the worker and the service's lifecycle."""

    device_id: str | None = None  # None: the host name
    state_dir: str | None = None  # None: $STATE_DIRECTORY (systemd), else ~/.local/state/edge-imagegen
    max_queue: int = 100
    stop_timeout: float = 20.0
    max_attempts: int = 3
    stall_timeout: float = 300.0
    keep_days: float = 30.0


@dataclass(frozen=True)
class SocketConfig:
    enabled: bool = True
    path: str | None = None  # None: $RUNTIME_DIRECTORY/edge-imagegen.sock, see edge.paths
    mode: str = "0660"
    allow_uids: tuple[int, ...] = ()  # with allow_groups: who may connect (SO_PEERCRED); both empty: socket.mode decides
    allow_groups: tuple[str, ...] = ()  # group names; a member (primary or supplementary group) may connect


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    ca: str | None = None  # None: the system's CA certificates
    cert: str | None = None
    key: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = True
    host: str = "localhost"
    port: int = 1883
    client_id: str | None = None  # None: edge-imagegen-<device id>
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    keepalive: int = 60
    protocol: str = "mqttv5"
    qos: int = 1
    topic_prefix: str | None = None  # None: edge-imagegen/<device id>
    session_expiry: int = 86400
    fleet_group: str | None = None
    fleet_prefix: str | None = None  # None: edge-imagegen/fleet/<fleet_group>
    progress_interval: float = 0.5
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 60
    publish_images: bool = True  # PNG bytes on <prefix>/jobs/<id>/image/<k> and retained <prefix>/image
    max_image_bytes: int = 1048576  # the broker's message_size_limit; larger images: a note in the result
    homeassistant: bool = False  # Home Assistant MQTT discovery
    discovery_prefix: str = "homeassistant"
    homeassistant_remove: bool = False  # publish empty discovery configs at connect: HA forgets the device
    tcp_nodelay: bool = True  # send small packets (PUBACK, progress) at once; see benchmarks/README.md


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP front end (edge.comms.http): the page, the native, AUTOMATIC1111 and OpenAI APIs."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 7860  # AUTOMATIC1111's
    token_file: str | None = None  # file whose first line is the bearer token; required off loopback
    max_body_bytes: int = 65536
    request_timeout: float = 300.0  # a synchronous call (A1111, OpenAI) waits this long, then 504
    preview_every: int = 1  # steps between previews for a watcher; 0: no previews
    preview: str = "auto"  # auto: a bundle's tiny decoder draws them (a decode each); linear: the cheap map
    examples: tuple[str, ...] = ()  # example prompts on the kiosk start screen
    kiosk_idle_seconds: float = 120.0  # kiosk mode returns to the start screen after this long idle


@dataclass(frozen=True)
class PolicyConfig:
    blocked_words: tuple[str, ...] = ()
    blocked_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    defaults: Defaults = field(default_factory=Defaults)
    limits: Limits = field(default_factory=Limits)
    output: OutputConfig = field(default_factory=OutputConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    socket: SocketConfig = field(default_factory=SocketConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log_level: str = "info"
    # Not a YAML key: the dotted keys the file or the command line set to a value (not null), so that
    # a bundle's edge.json can fill in only the defaults the user left to the built-ins.
    given: frozenset[str] = field(default=frozenset(), compare=False, metadata={"internal": True})


# Keys whose value must be one of a fixed set; checked after types.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.precision": PRECISIONS,
    "runtime.graph_optimization": OPT_LEVEL_NAMES,
    "runtime.vae_tiling": VAE_TILING_MODES,
    "http.preview": PREVIEW_MODES,
    "log_level": LOG_LEVELS,
    "mqtt.protocol": ("mqttv5", "mqttv311"),
}
NON_NEGATIVE = ("runtime.threads", "runtime.vae_tile_size", "memory.headroom_mb", "lora.cache_sessions",
                "limits.max_loras",
                "output.min_free_mb", "output.max_bytes", "output.max_age_days",
                "daemon.max_queue", "daemon.stop_timeout", "daemon.max_attempts", "daemon.stall_timeout",
                "daemon.keep_days", "mqtt.port", "mqtt.keepalive", "mqtt.session_expiry",
                "mqtt.progress_interval", "mqtt.reconnect_min_delay", "mqtt.reconnect_max_delay",
                "mqtt.max_image_bytes",
                "http.port", "http.max_body_bytes", "http.request_timeout", "http.preview_every",
                "http.kiosk_idle_seconds")


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
    known = {f.name for f in fields(cls) if not f.metadata.get("internal")}
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
    config = replace(config, given=_given(data))
    for component in config.runtime.component_providers:
        if component not in COMPONENTS + OPTIONAL_COMPONENTS:
            raise ConfigError(f"runtime.component_providers.{component}: unknown component; choose one of "
                              f"{', '.join(COMPONENTS + OPTIONAL_COMPONENTS)}")
    if config.limits.min_guidance > config.limits.max_guidance:
        raise ConfigError("limits.min_guidance: must not exceed limits.max_guidance")
    if config.limits.min_lora_strength > config.limits.max_lora_strength:
        raise ConfigError("limits.min_lora_strength: must not exceed limits.max_lora_strength")
    _check_daemon_sections(config)
    return config


def _given(data: dict[str, Any]) -> frozenset[str]:
    """The dotted ``section.key`` names set to a value; null means "the built-in / the bundle's"."""
    names = set()
    for section, values in data.items():
        if isinstance(values, dict):
            names.update(f"{section}.{key}" for key, value in values.items() if value is not None)
        elif values is not None:
            names.add(section)
    return frozenset(names)


def _check_daemon_sections(config: Config) -> None:
    """Checks of the serve sections that the generic type and choice checks cannot express."""
    if config.mqtt.qos not in (1, 2):  # QoS 0 could lose an accepted job
        raise ConfigError(f"mqtt.qos: {config.mqtt.qos} is not allowed; choose one of 1, 2")
    if config.daemon.max_queue < 1:
        raise ConfigError("daemon.max_queue: must be 1 or more")
    if config.daemon.max_attempts < 1:
        raise ConfigError("daemon.max_attempts: must be 1 or more")
    try:
        mode = int(config.socket.mode, 8)
    except ValueError:
        raise ConfigError(f"socket.mode: {config.socket.mode!r} is not an octal file mode like \"0660\"") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"socket.mode: {config.socket.mode!r} is not a file mode (0000 to 0777)")
    _check_http(config)
    for i, pattern in enumerate(config.policy.blocked_patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"policy.blocked_patterns[{i}]: {pattern!r} is not a valid regular expression "
                              f"({exc})") from None
    for name in ("device_id",):
        value = getattr(config.daemon, name)
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ConfigError(f"daemon.{name}: {value!r} must be 1 to 64 letters, digits, '_', '.' or '-' "
                              f"(it is part of MQTT topics)")
    if config.mqtt.homeassistant and config.mqtt.homeassistant_remove:
        raise ConfigError("mqtt.homeassistant_remove: cannot be true while mqtt.homeassistant is true "
                          "(one announces the device, the other removes it)")
    for name in ("topic_prefix", "fleet_prefix", "fleet_group", "discovery_prefix"):
        value = getattr(config.mqtt, name)
        if value is not None and (not value or any(c in value for c in "+#\x00") or value.endswith("/")
                                  or (name == "fleet_group" and "/" in value)):
            raise ConfigError(f"mqtt.{name}: {value!r} must be a non-empty topic without wildcards "
                              f"(+, #) or a trailing '/'" + (" and without '/'" if name == "fleet_group" else ""))


def _check_http(config: Config) -> None:
    """Anything but loopback is reachable by others: it needs a token."""
    http = config.http
    if not http.enabled:
        return
    if http.port > 65535:
        raise ConfigError(f"http.port: must be at most 65535, got {http.port}")
    if http.token_file is None and not is_loopback(http.host):
        raise ConfigError(f"http.token_file: required when http.host ({http.host!r}) is not a loopback "
                          f"address; set a token file or bind 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
