"""The one job shape every front end uses, its events, and the wire bodies that describe them.

A job arrives as a JSON object (MQTT, the Unix socket) or as CLI flags; all of them go through
:func:`parse_job` so that limits and error messages are the same everywhere. Errors name the field
and the limit (:class:`ValidationError`). What only the model knows (its fixed size, the chosen
scheduler's step limits) is checked next, by the runner, still before the job is accepted.

Every reply a front end sends is built here (:func:`error_body`, :func:`state_body`,
:func:`result_body` and :meth:`JobEvent.body`), so a job reads the same on every transport.
This module imports nothing heavier than the standard library: thin clients use it.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import ValidationError
from .fields import float_field, int_field, shown, text_field
from .job_loras import LoraRef, parse_loras

RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")  # AUTOMATIC1111's, edge.images does them
MAX_SEED = 2**53 - 1  # the largest integer every JSON client round-trips exactly
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # used with fullmatch: no trailing newline slips by


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may ask for; set in the ``limits`` config section."""

    max_payload_bytes: int = 16384  # the job JSON without its images
    max_image_bytes: int = 4 * 1024 * 1024  # each of init_image and mask, decoded from base64
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int = 1000
    max_steps: int = 150
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_count: int = 8
    max_side: int = 2048
    min_priority: int = -10
    max_priority: int = 10
    max_loras: int = 4
    min_lora_strength: float = 0.0
    max_lora_strength: float = 1.5
    max_mask_blur: int = 64

    @property
    def max_request_bytes(self) -> int:
        """A whole request: the job plus two images at their limit in base64 (4 characters per 3 bytes)."""
        return self.max_payload_bytes + 2 * (4 * -(-self.max_image_bytes // 3))


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
    """One validated request. ``seed == -1`` and ``id is None`` are replaced by :func:`admit`."""

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
    # Edit jobs (edge.editing): images as base64 PNG/JPEG/WebP, checked at submit by parse_job.
    init_image: str | None = None
    mask: str | None = None  # white = repaint
    strength: float | None = None  # None: 0.75 for img2img, 1 with a mask
    mask_blur: int = 4
    resize_mode: str = "just_resize"
    image_guidance: float | None = None  # InstructPix2Pix models only; None: 1.5
    return_: str = "paths"  # "return" on the wire (a Python keyword): paths, or base64 images inline (MQTT)
    loras: tuple[LoraRef, ...] = ()

    def __post_init__(self) -> None:  # a journaled job comes back with its LoRAs as JSON objects
        object.__setattr__(self, "loras", tuple(LoraRef(**r) if isinstance(r, dict) else r for r in self.loras))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["return"] = data.pop("return_")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """The inverse of :meth:`to_dict` (a journal written before ``return`` existed lacks it)."""
        data = dict(data)
        if "return" in data:
            data["return_"] = data.pop("return")
        return cls(**data)


JOB_FIELDS = tuple("return" if f.name == "return_" else f.name for f in fields(Job))
RETURN_MODES = ("paths", "base64")


@dataclass(frozen=True)
class Step:
    """Progress of a job, passed to the ``on_step`` callback after every denoising step."""

    image: int  # 0-based index within the job
    count: int
    step: int  # 1-based
    steps: int  # steps that run (fewer than the job's with img2img strength < 1)
    seconds: float  # duration of this step
    # the scheduler's denoised estimate at this step (the predicted final latents; a numpy array,
    # shared, not copied): previews are made from it by whoever watches, and only then (edge.preview)
    latents: Any = field(default=None, repr=False, compare=False)


# --- validation ----------------------------------------------------------------------------------
def _side(name: str, value: Any, limits: Limits) -> int | None:
    if value is None:
        return None
    return int_field(name, value, 8, limits.max_side)


def decode_payload(payload: bytes | str, limits: Limits) -> dict[str, Any]:
    """Turn raw bytes from a front end into a JSON object, or raise ValidationError."""
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    if b'"init_image' in raw:  # an edit job (init_image, A1111's init_images): room for its images too
        if len(raw) > limits.max_request_bytes:
            raise ValidationError("payload", f"is {len(raw)} bytes, the limit is {limits.max_request_bytes} "
                                  "(limits.max_payload_bytes plus two images of limits.max_image_bytes in base64)")
    elif len(raw) > limits.max_payload_bytes:
        raise ValidationError("payload", f"is {len(raw)} bytes, the limit is {limits.max_payload_bytes}")
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        data = json.loads(text)
    except UnicodeError as exc:  # invalid UTF-8 bytes, or a str with lone surrogates
        raise ValidationError("payload", f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValidationError("payload", f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ValidationError("payload", "is nested too deeply to decode") from None
    except ValueError:  # an integer of more digits than Python converts
        raise ValidationError("payload", f"holds an integer of more than {sys.get_int_max_str_digits()} digits; "
                                         f"no field takes one") from None
    if not isinstance(data, dict):
        raise ValidationError("payload", f"must be a JSON object, got {type(data).__name__}")
    return data


def parse_job(data: dict[str, Any], limits: Limits = Limits(), defaults: Defaults = Defaults()) -> Job:
    """Validate a job given as a dict (already-decoded JSON or CLI flags).

    Unknown fields are rejected so that a typo ("step" for "steps") is not silently ignored.
    """
    unknown = sorted(set(data) - set(JOB_FIELDS))
    if unknown:
        raise ValidationError(unknown[0][:64], f"is not a job field; known fields: {', '.join(JOB_FIELDS)}")
    if "prompt" not in data:
        raise ValidationError("prompt", "is required")

    def get(name: str, default: Any) -> Any:
        value = data.get(name)
        return default if value is None else value

    job_id = data.get("id")
    if job_id is not None and valid_id(job_id) is None:
        raise ValidationError("id", "must be 1 to 64 characters of letters, digits, '_', '.' or '-'")
    scheduler = get("scheduler", defaults.scheduler)
    prompt, loras = parse_loras(text_field("prompt", data["prompt"], limits.max_prompt_chars, required=True),
                                data.get("loras"), limits.max_loras)
    returns = get("return", "paths")
    if returns not in RETURN_MODES:
        raise ValidationError("return", f"must be one of {', '.join(RETURN_MODES)}, got {shown(returns)}")
    return Job(
        id=job_id,
        prompt=prompt,
        negative_prompt=text_field("negative_prompt", get("negative_prompt", defaults.negative_prompt),
                              limits.max_prompt_chars, required=False),
        steps=int_field("steps", get("steps", defaults.steps), 1, limits.max_steps),
        guidance=float_field("guidance", get("guidance", defaults.guidance), limits.min_guidance, limits.max_guidance),
        seed=int_field("seed", get("seed", -1), -1, MAX_SEED),
        count=int_field("count", get("count", defaults.count), 1, limits.max_count),
        width=_side("width", get("width", defaults.width), limits),
        height=_side("height", get("height", defaults.height), limits),
        scheduler=None if scheduler is None else text_field("scheduler", scheduler, 64, required=True),
        priority=int_field("priority", get("priority", 0), limits.min_priority, limits.max_priority),
        loras=tuple(LoraRef(name, float_field(f"loras.{name}.strength", strength, limits.min_lora_strength,
                                         limits.max_lora_strength)) for name, strength in loras),
        return_=returns,
        **_edit_fields(data, limits),
    )




def new_id() -> str:
    return uuid.uuid4().hex[:12]


def _edit_fields(data: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """init_image, mask, strength, mask_blur, resize_mode, image_guidance; model-specific checks
    (does this model take a mask, an image guidance?) are Pipeline.edit_kind's."""
    fields: dict[str, Any] = {}
    for name in ("init_image", "mask"):
        if data.get(name) is not None:
            from .images import ImageLimits, check_image  # Pillow: only for jobs that carry images
            fields[name] = check_image(name, data[name], ImageLimits(limits.max_image_bytes, limits.max_image_pixels))
    if data.get("strength") is not None:
        fields["strength"] = float_field("strength", data["strength"], 0.0, 1.0)
    if data.get("mask_blur") is not None:
        fields["mask_blur"] = int_field("mask_blur", data["mask_blur"], 0, limits.max_mask_blur)
    if data.get("resize_mode") is not None:
        mode = data["resize_mode"]
        if mode not in RESIZE_MODES:
            raise ValidationError("resize_mode", f"{mode!r} is not supported; choose one of {', '.join(RESIZE_MODES)}")
        fields["resize_mode"] = mode
    if data.get("image_guidance") is not None:
        fields["image_guidance"] = float_field("image_guidance", data["image_guidance"], limits.min_guidance,
                                          limits.max_guidance)
    for name in ("mask", "strength"):
        if name in fields and "init_image" not in fields:
            raise ValidationError(name, "needs init_image (the image to edit)")
    return fields


def resolve_seed(job: Job) -> Job:
    """Replace seed -1 with a fresh random seed so the seed used can always be reported."""
    if job.seed != -1:
        return job
    return replace(job, seed=secrets.randbelow(2**32))


def admit(job: Job) -> Job:
    """Fix what must not change between a job's acceptance and a replay: its id and its seed."""
    return resolve_seed(job if job.id is not None else replace(job, id=new_id()))


def valid_id(value: Any) -> str | None:
    """``value`` if it is a well-formed job id, else None.

    For front ends that must route an error reply before :func:`parse_job` has accepted the job
    (an id that fails this check is never put into a topic name or a file name).
    """
    return value if isinstance(value, str) and ID_PATTERN.fullmatch(value) else None


# --- a job as it stands -------------------------------------------------------------------------
ACTIVE = ("queued", "running")
FINISHED = ("done", "error", "cancelled", "rejected")
STATES = ACTIVE + FINISHED


@dataclass(frozen=True)
class JobRecord:
    """A job as the journal holds it: the request, where it stands and what came of it."""

    id: str
    job: Job
    state: str
    seq: int  # arrival order
    source: str  # "mqtt", "socket", ...
    reply: dict[str, Any]  # where the front end should send the result (e.g. an MQTT ResponseTopic)
    submitted: float  # Unix time
    started: float | None
    finished: float | None
    attempts: int  # times a worker started it (more than 1: interrupted by a crash or a stop)
    run_at: str | None  # UTC time fixed at the first start; names the output files (idempotent replays)
    result: dict[str, Any] | None
    error: str | None
    delivered: bool  # the front end confirmed the result reached its client or broker
    peer: dict[str, int] | None = None  # the socket client's {"uid", "gid", "pid"} (SO_PEERCRED)

    @property
    def finished_state(self) -> bool:
        return self.state in FINISHED

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "job": self.job.to_dict(), "source": self.source,
                "submitted": self.submitted, "started": self.started, "finished": self.finished,
                "attempts": self.attempts, "result": self.result, "error": self.error, "peer": self.peer}


# --- wire bodies ----------------------------------------------------------------------------------
def error_body(message: str, job_id: str | None = None, field: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"status": "error", "id": job_id, "error": message}
    if field is not None:
        body["field"] = field
    body.update(extra)
    return body


def result_body(record: JobRecord) -> dict[str, Any]:
    """The result message of a finished job: ``{"status": "ok"|"error", "id", "state", ...}``."""
    if record.state == "done":
        return {"status": "ok", "id": record.id, "state": "done", **(record.result or {})}
    body = error_body(record.error or record.state, record.id, state=record.state)
    if record.state == "rejected":
        body["field"] = "prompt"
    elif record.result and record.result.get("field"):
        body["field"] = record.result["field"]
    return body


def state_body(record: JobRecord, position: int | None = None) -> dict[str, Any]:
    """Where an unfinished job stands: ``{"status": "queued"|"running", ...}``; finished: its result."""
    if record.finished_state:
        return result_body(record)
    body = {"status": record.state, "id": record.id, "state": record.state, "seed": record.job.seed}
    if position is not None:
        body["position"] = position
    return body


def progress_body(record: JobRecord, step: Step) -> dict[str, Any]:
    return {"id": record.id, "state": "running", "image": step.image + 1, "count": step.count,
            "step": step.step, "steps": step.steps, "seconds": round(step.seconds, 4)}


def history_entry(record: JobRecord) -> dict[str, Any]:
    """One job in a history listing: what was asked, where it stands, what came of it."""
    result = record.result or {}
    asked = [record.job.seed + k for k in range(record.job.count)]
    return {"id": record.id, "state": record.state, "prompt": record.job.prompt, "job": record.job.to_dict(),
            "source": record.source, "seeds": result.get("seeds", asked),  # an interrupted job made fewer
            "paths": result.get("paths", []), "submitted": record.submitted, "started": record.started,
            "finished": record.finished, "error": record.error}


def cancel_body(record: JobRecord, cancelled: bool) -> dict[str, Any]:
    """The answer to a cancel request, the same on every front end.

    ``status`` says whether the request did what it asked: ``ok`` for a job cancelled now (queued)
    or at its next step (running), ``error`` for a job that had already finished.
    """
    if cancelled or record.state == "running":
        body = {"status": "ok", "id": record.id, "state": record.state, "cancelled": record.state == "cancelled"}
        if record.state == "running":
            body["cancelling"] = True
        return body
    return error_body(f"id: job {record.id} is already {record.state}; nothing to cancel", record.id, "id",
                      state=record.state)


@dataclass(frozen=True)
class JobEvent:
    """A change of a job, published by the service to every front end."""

    kind: str  # "queued" | "started" | "progress" | "finished"
    record: JobRecord
    step: Step | None = None
    position: int | None = None  # queued: jobs ahead of this one

    @property
    def name(self) -> str:
        """The event's name on the wire: queued, started, progress or result."""
        return "result" if self.kind == "finished" else self.kind

    def body(self) -> dict[str, Any]:
        record = self.record
        if self.kind == "queued":
            return state_body(record, self.position)
        if self.kind == "started":
            return {"id": record.id, "state": "running", "image": 1, "count": record.job.count, "step": 0,
                    "steps": record.job.steps}
        if self.kind == "progress" and self.step is not None:
            return progress_body(record, self.step)
        return result_body(record)
