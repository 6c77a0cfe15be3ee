"""The one job shape every front end uses, and the one place it is validated.

A job arrives as a JSON object (MQTT, the Unix socket) or as CLI flags; all of
them go through :func:`parse_job` so that limits and error messages are the
same everywhere. Errors name the field and the limit (:class:`ValidationError`).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import ValidationError

MAX_SEED = 2**53 - 1  # the largest integer every JSON client round-trips exactly
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may ask for; set in the ``limits`` config section."""

    max_payload_bytes: int = 16384
    max_prompt_chars: int = 1000
    max_steps: int = 150
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_count: int = 8
    max_side: int = 2048
    min_priority: int = -10
    max_priority: int = 10


@dataclass(frozen=True)
class Defaults:
    """Values used for fields a job leaves out; the ``defaults`` config section."""

    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    count: int = 1
    scheduler: str | None = None  # None: the bundle's scheduler_config.json
    width: int | None = None  # None: the model's native size
    height: int | None = None


@dataclass(frozen=True)
class Job:
    """One validated request. ``seed == -1`` has been replaced by :func:`resolve_seed`."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = -1
    count: int = 1
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    priority: int = 0
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        return data


JOB_FIELDS = tuple(f.name for f in fields(Job) if f.name != "extra")


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValidationError(name, f"must be an integer, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise ValidationError(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(name, f"must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not lo <= value <= hi:  # also rejects NaN
        raise ValidationError(name, f"must be between {lo:g} and {hi:g}, got {value:g}")
    return value


def _text(name: str, value: Any, max_chars: int, required: bool) -> str:
    if not isinstance(value, str):
        raise ValidationError(name, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValidationError(name, "must not be empty")
    if len(value) > max_chars:
        raise ValidationError(name, f"is {len(value)} characters, the limit is {max_chars}")
    if "\x00" in value:
        raise ValidationError(name, "must not contain NUL characters")
    return value


def _side(name: str, value: Any, limits: Limits) -> int | None:
    if value is None:
        return None
    return _int(name, value, 8, limits.max_side)


def decode_payload(payload: bytes | str, limits: Limits) -> dict[str, Any]:
    """Turn raw bytes from a front end into a JSON object, or raise ValidationError."""
    size = len(payload.encode() if isinstance(payload, str) else payload)
    if size > limits.max_payload_bytes:
        raise ValidationError("payload", f"is {size} bytes, the limit is {limits.max_payload_bytes}")
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise ValidationError("payload", f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValidationError("payload", f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ValidationError("payload", f"must be a JSON object, got {type(data).__name__}")
    return data


def parse_job(data: dict[str, Any], limits: Limits = Limits(), defaults: Defaults = Defaults(),
              known_schedulers: tuple[str, ...] | None = None) -> Job:
    """Validate a job given as a dict (already-decoded JSON or CLI flags).

    Unknown fields are rejected so that a typo ("step" for "steps") is not silently ignored.
    """
    unknown = sorted(set(data) - set(JOB_FIELDS))
    if unknown:
        raise ValidationError(unknown[0], f"is not a job field; known fields: {', '.join(JOB_FIELDS)}")
    if "prompt" not in data:
        raise ValidationError("prompt", "is required")

    def get(name: str, default: Any) -> Any:
        value = data.get(name)
        return default if value is None else value

    job_id = data.get("id")
    if job_id is not None and (not isinstance(job_id, str) or not _ID_RE.match(job_id)):
        raise ValidationError("id", "must be 1 to 64 characters of letters, digits, '_', '.' or '-'")
    scheduler = get("scheduler", defaults.scheduler)
    if scheduler is not None:
        scheduler = _text("scheduler", scheduler, 64, required=True)
        if known_schedulers is not None and scheduler not in known_schedulers:
            raise ValidationError("scheduler", f"{scheduler!r} is not supported; choose one of {', '.join(known_schedulers)}")
    return Job(
        id=job_id,
        prompt=_text("prompt", data["prompt"], limits.max_prompt_chars, required=True),
        negative_prompt=_text("negative_prompt", get("negative_prompt", defaults.negative_prompt),
                              limits.max_prompt_chars, required=False),
        steps=_int("steps", get("steps", defaults.steps), 1, limits.max_steps),
        guidance=_float("guidance", get("guidance", defaults.guidance), limits.min_guidance, limits.max_guidance),
        seed=_int("seed", get("seed", -1), -1, MAX_SEED),
        count=_int("count", get("count", defaults.count), 1, limits.max_count),
        width=_side("width", get("width", defaults.width), limits),
        height=_side("height", get("height", defaults.height), limits),
        scheduler=scheduler,
        priority=_int("priority", get("priority", 0), limits.min_priority, limits.max_priority),
    )


def resolve_seed(job: Job) -> Job:
    """Replace seed -1 with a fresh random seed so the seed used can always be reported."""
    if job.seed != -1:
        return job
    return replace(job, seed=secrets.randbelow(2**32))
