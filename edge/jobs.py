"""The one job shape every front end uses, and the one place it is validated.

A job arrives as a JSON object (MQTT, the Unix socket) or as CLI flags; all of
them go through :func:`parse_job` so that limits and error messages are the
same everywhere. Errors name the field and the limit (:class:`ValidationError`).
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

from .errors import EdgeError, ValidationError
from .images import RESIZE_MODES, ImageLimits, check_image

MAX_SEED = 2**53 - 1  # the largest integer every JSON client round-trips exactly
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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
    max_mask_blur: int = 64

    @property
    def max_request_bytes(self) -> int:
        """A whole request: the job plus two images at their limit in base64 (4 characters per 3 bytes)."""
        return self.max_payload_bytes + 2 * (4 * -(-self.max_image_bytes // 3))

    @property
    def images(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_image_pixels)


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
    # Edit jobs (edge.editing): images as base64 PNG/JPEG/WebP, checked at submit by parse_job.
    init_image: str | None = None
    mask: str | None = None  # white = repaint
    strength: float | None = None  # None: 0.75 for img2img, 1 with a mask
    mask_blur: int = 4
    resize_mode: str = "just_resize"
    image_guidance: float | None = None  # InstructPix2Pix models only; None: 1.5
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
    raw = payload.encode() if isinstance(payload, str) else payload
    if b'"init_image"' in raw:  # an edit job: room for its images too
        if len(raw) > limits.max_request_bytes:
            raise ValidationError("payload", f"is {len(raw)} bytes, the limit is {limits.max_request_bytes} "
                                  "(limits.max_payload_bytes plus two images of limits.max_image_bytes in base64)")
    elif len(raw) > limits.max_payload_bytes:
        raise ValidationError("payload", f"is {len(raw)} bytes, the limit is {limits.max_payload_bytes}")
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
        **_edit_fields(data, limits),
    )


def _edit_fields(data: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """init_image, mask, strength, mask_blur, resize_mode, image_guidance; model-specific checks
    (does this model take a mask, an image guidance?) are Pipeline.edit_kind's."""
    fields: dict[str, Any] = {}
    for name in ("init_image", "mask"):
        if data.get(name) is not None:
            fields[name] = check_image(name, data[name], limits.images)
    if data.get("strength") is not None:
        fields["strength"] = _float("strength", data["strength"], 0.0, 1.0)
    if data.get("mask_blur") is not None:
        fields["mask_blur"] = _int("mask_blur", data["mask_blur"], 0, limits.max_mask_blur)
    if data.get("resize_mode") is not None:
        mode = data["resize_mode"]
        if mode not in RESIZE_MODES:
            raise ValidationError("resize_mode", f"{mode!r} is not supported; choose one of {', '.join(RESIZE_MODES)}")
        fields["resize_mode"] = mode
    if data.get("image_guidance") is not None:
        fields["image_guidance"] = _float("image_guidance", data["image_guidance"], limits.min_guidance,
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


def valid_id(value: Any) -> str | None:
    """``value`` if it is a well-formed job id, else None.

    For front ends that must route an error reply before :func:`parse_job` has accepted the job
    (an id that fails this check is never put into a topic name or a file name).
    """
    return value if isinstance(value, str) and _ID_RE.match(value) else None


# --- the durable journal -----------------------------------------------------------------------
# Every accepted job is committed here before any front end acknowledges it, so a job that was
# acknowledged survives a crash or a power cut. SQLite in WAL mode with synchronous=FULL: each
# commit is fsynced, so the last acknowledged job survives power loss too (NORMAL only survives a
# process crash).

ACTIVE = ("queued", "running")
FINISHED = ("done", "error", "cancelled", "rejected")
STATES = ACTIVE + FINISHED


class BusyError(EdgeError):
    """The queue is full; the job was not accepted (the client may try again later)."""


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

    @property
    def finished_state(self) -> bool:
        return self.state in FINISHED

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "job": self.job.to_dict(), "source": self.source,
                "submitted": self.submitted, "started": self.started, "finished": self.finished,
                "attempts": self.attempts, "result": self.result, "error": self.error}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    dedup_key TEXT,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    job TEXT NOT NULL,
    source TEXT NOT NULL,
    reply TEXT NOT NULL,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    run_at TEXT,
    result TEXT,
    error TEXT,
    delivered INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_dedup ON jobs (dedup_key) WHERE dedup_key IS NOT NULL;
"""
_COLUMNS = ("id", "job", "state", "seq", "source", "reply", "submitted", "started", "finished", "attempts",
            "run_at", "result", "error", "delivered")


def _record(row: tuple) -> JobRecord:
    values = dict(zip(_COLUMNS, row))
    values["job"] = Job(**json.loads(values["job"]))
    values["reply"] = json.loads(values["reply"])
    values["result"] = json.loads(values["result"]) if values["result"] else None
    values["delivered"] = bool(values["delivered"])
    return JobRecord(**values)


class Journal:
    """Jobs in SQLite: submit, claim the next one, finish; requeue interrupted ones at start-up.

    Thread-safe: the front ends (MQTT network thread, socket connections) and the worker share
    one connection behind a lock, each operation being one short IMMEDIATE transaction.
    """

    def __init__(self, path: Path | str, max_queue: int = 100):
        self.path = Path(path)
        self.max_queue = max_queue
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE takes the write lock up front,
        # so a check-then-insert such as the queue bound cannot race)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise EdgeError(f"{self.path}: SQLite refused WAL mode (got {mode}); put the state "
                            f"directory on a local filesystem")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _get(self, db: sqlite3.Connection, where: str, *args: Any) -> JobRecord | None:
        row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE {where}", args).fetchone()
        return _record(row) if row else None

    # --- front ends ---------------------------------------------------------------------------
    def submit(self, job: Job, source: str = "", reply: dict[str, Any] | None = None,
               dedup_key: str | None = None, redelivery: bool = False, state: str = "queued",
               error: str | None = None) -> tuple[JobRecord, bool]:
        """Commit a job; returns (record, created).

        A job whose id is already in the journal is not added again: the existing record is
        returned with created False. ``dedup_key`` identifies a message without an id (e.g. an MQTT
        packet id and payload); it is stored, and looked up only when ``redelivery`` says the
        transport is delivering the message again (packet ids are reused later on). A new
        queued job beyond ``max_queue`` active jobs raises :class:`BusyError`. ``state="rejected"``
        records a job refused by the content policy (it never runs and takes no queue room).
        """
        if job.id is None:
            raise ValueError("the journal needs jobs with an id")
        assert state in ("queued", "rejected")
        with self._tx() as db:
            existing = self._get(db, "id = ?", job.id)
            if existing is None and dedup_key is not None and redelivery:
                existing = self._get(db, "seq = (SELECT max(seq) FROM jobs WHERE dedup_key = ?)", dedup_key)
            if existing is not None:
                return existing, False
            if state == "queued":
                active = self._active(db)
                if active >= self.max_queue:
                    raise BusyError(f"busy: the queue is full ({active} jobs, the limit is {self.max_queue}); "
                                    f"try again later")
            now = time.time()
            db.execute("INSERT INTO jobs (id, dedup_key, priority, state, job, source, reply, submitted, finished, "
                       "error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job.id, dedup_key, job.priority, state, json.dumps(job.to_dict()), source,
                        json.dumps(reply or {}), now, now if state != "queued" else None, error))
            return self._get(db, "id = ?", job.id), True

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._get(self._db, "id = ?", job_id)

    def cancel(self, job_id: str) -> tuple[JobRecord | None, bool]:
        """Cancel a queued job; a running one is the worker's to stop.

        Returns (the record after, whether this call cancelled it).
        """
        with self._tx() as db:
            changed = db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, error = 'cancelled' "
                                 "WHERE id = ? AND state = 'queued'", (time.time(), job_id)).rowcount
            return self._get(db, "id = ?", job_id), bool(changed)

    def depth(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._active(self._db)

    @staticmethod
    def _active(db: sqlite3.Connection) -> int:
        return db.execute("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]

    def position(self, job_id: str) -> int | None:
        """How many queued jobs run before this one (0: next), or None when it is not queued."""
        with self._lock:
            row = self._db.execute("SELECT priority, seq FROM jobs WHERE id = ? AND state = 'queued'",
                                   (job_id,)).fetchone()
            if row is None:
                return None
            return self._db.execute("SELECT count(*) FROM jobs WHERE state = 'queued' AND "
                                    "(priority > ? OR (priority = ? AND seq < ?))", (row[0], row[0], row[1])).fetchone()[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        return {state: dict(rows).get(state, 0) for state in STATES}

    # --- the worker ---------------------------------------------------------------------------
    def claim_next(self) -> JobRecord | None:
        """Mark the next job (highest priority, then earliest) running and return it."""
        with self._tx() as db:
            row = db.execute("SELECT seq FROM jobs WHERE state = 'queued' ORDER BY priority DESC, seq LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            # run_at is fixed once: a replay after a crash writes the very same file names
            run_at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now))
            db.execute("UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1, "
                       "run_at = COALESCE(run_at, ?) WHERE seq = ?", (now, run_at, row[0]))
            return self._get(db, "seq = ?", row[0])

    def finish(self, job_id: str, state: str, result: dict[str, Any] | None = None,
               error: str | None = None) -> JobRecord:
        assert state in FINISHED
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, finished = ?, result = ?, error = ? WHERE id = ?",
                       (state, time.time(), json.dumps(result) if result is not None else None, error, job_id))
            return self._get(db, "id = ?", job_id)

    def requeue(self, job_id: str) -> JobRecord:
        """Put a running job back in the queue (a stop that could not wait for it)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'queued' WHERE id = ? AND state = 'running'", (job_id,))
            return self._get(db, "id = ?", job_id)

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """At start-up: requeue jobs a crash left running; fail those interrupted ``max_attempts`` times.

        Returns (requeued ids, failed ids).
        """
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running' ORDER BY seq").fetchall()
            requeued, failed = [], []
            for job_id, attempts in rows:
                if attempts >= max_attempts:
                    db.execute("UPDATE jobs SET state = 'error', finished = ?, error = ? WHERE id = ?",
                               (time.time(), f"interrupted: the daemon stopped during this job {attempts} times "
                                f"(daemon.max_attempts); not retried", job_id))
                    failed.append(job_id)
                else:
                    db.execute("UPDATE jobs SET state = 'queued' WHERE id = ?", (job_id,))
                    requeued.append(job_id)
        return requeued, failed

    # --- results ------------------------------------------------------------------------------
    def mark_delivered(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET delivered = 1 WHERE id = ?", (job_id,))

    def undelivered(self, source: str, limit: int = 1000) -> list[JobRecord]:
        """Finished jobs from ``source`` whose result was not confirmed delivered, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE source = ? AND delivered = 0 AND "
                f"state IN ('done', 'error', 'cancelled', 'rejected') ORDER BY seq LIMIT ?", (source, limit)).fetchall()
        return [_record(r) for r in rows]

    def prune(self, older_than: float) -> int:
        """Forget finished jobs that finished before ``older_than`` (Unix time); returns how many."""
        with self._tx() as db:
            return db.execute("DELETE FROM jobs WHERE state IN ('done', 'error', 'cancelled', 'rejected') "
                              "AND finished < ?", (older_than,)).rowcount
