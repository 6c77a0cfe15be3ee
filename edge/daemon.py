"""``edge-imagegen serve``: the model loaded once, a durable queue, one worker, the front ends.

How a job flows:

1. A front end (:mod:`edge.mqtt`, :mod:`edge.socket_api`) hands the raw request to
   :meth:`Service.submit_payload`. It is decoded and validated by :func:`edge.jobs.parse_job` (the
   one validator), given an id and a seed, checked against the content policy, and committed to
   the :class:`~edge.jobs.Journal`. Only then does the front end acknowledge it.
2. One worker thread claims jobs in priority then arrival order and runs them on the resident
   pipeline; the front ends keep answering meanwhile (ONNX Runtime releases the GIL).
3. Images are written under names fixed by the job (id, seed and the time of its *first* start,
   stored in the journal), so a replay after a crash overwrites the same files instead of adding
   a second set, and a replay that finds the whole set already on disk just records it.
4. Every change is an event (:class:`JobEvent`) the front ends turn into progress and result
   messages.

Lifecycle (systemd ``Type=notify``): READY=1 once the model is loaded, STATUS= lines, WATCHDOG=1
while the worker's heartbeat is fresh, STOPPING=1 on SIGTERM; then the front ends stop accepting,
the running job gets ``daemon.stop_timeout`` seconds to finish or is cancelled and left queued,
and MQTT disconnects cleanly after publishing ``offline``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from . import __version__, disk
from .config import Config
from .errors import CancelledError, EdgeError, ValidationError
from .jobs import BusyError, Job, JobRecord, Journal, decode_payload, parse_job, resolve_seed, valid_id
from .notify import Notifier
from .output import image_path, save_result
from .policy import ContentPolicy

if TYPE_CHECKING:
    from .pipeline import Pipeline, Result, Step

log = logging.getLogger(__name__)

IDLE_POLL = 5.0  # seconds an idle worker sleeps between heartbeats (a submit wakes it at once)
POLICY_ERROR = "rejected: policy"


# --- what the worker runs -----------------------------------------------------------------------
class Runner(Protocol):
    """The model side of the service. :class:`PipelineRunner` in production; tests may stand in."""

    model: str
    precision: str
    provider: str
    known_schedulers: tuple[str, ...] | None

    def check(self, job: Job) -> None: ...  # raise ValidationError for what only the model knows

    def generate(self, job: Job, on_step: Callable[[Step], None], cancel: threading.Event) -> Result: ...


class PipelineRunner:
    """The resident :class:`~edge.pipeline.Pipeline`: loaded once, used for every job."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.model = pipeline.bundle.name
        self.precision = pipeline.precision
        self.provider = pipeline.provider
        self.known_schedulers = pipeline.scheduler_names()

    def check(self, job: Job) -> None:
        self.pipeline.resolve_size(job)  # a fixed-size export refuses other sizes at submit time

    def generate(self, job: Job, on_step: Callable[[Step], None], cancel: threading.Event) -> Result:
        return self.pipeline.generate(job, on_step=on_step, cancel=cancel)


# --- what the front ends see --------------------------------------------------------------------
@dataclass(frozen=True)
class JobEvent:
    kind: str  # "queued" | "started" | "progress" | "finished"
    record: JobRecord
    step: Step | None = None


@dataclass(frozen=True)
class Answer:
    """The reply to one submission. ``accepted``: the job is in the journal (new or a duplicate)."""

    body: dict[str, Any]
    record: JobRecord | None = None
    created: bool = False
    accepted: bool = False
    stopping: bool = False  # refused because the daemon is shutting down: do not acknowledge

    @property
    def job_id(self) -> str | None:
        return self.body.get("id")


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


# --- the service --------------------------------------------------------------------------------
class Service:
    """Intake, journal, worker and events; front ends and the systemd glue sit around it."""

    def __init__(self, config: Config, runner: Runner, journal: Journal, out_dir: Path,
                 notifier: Notifier | None = None, device_id: str | None = None):
        self.config = config
        self.runner = runner
        self.journal = journal
        self.out_dir = Path(out_dir)
        self.notifier = notifier or Notifier()
        self.device_id = device_id or default_device_id(config)
        self.policy = ContentPolicy(config.policy.blocked_words, config.policy.blocked_patterns)
        self.accepting = True
        self._listeners: list[Callable[[JobEvent], None]] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancel = threading.Event()
        self._current: JobRecord | None = None
        self._current_step: Step | None = None
        self._heartbeat = time.monotonic()
        self._worker: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._last_journal_prune = 0.0

    # --- events -------------------------------------------------------------------------------
    def add_listener(self, listener: Callable[[JobEvent], None]) -> None:
        self._listeners.append(listener)

    def _emit(self, kind: str, record: JobRecord, step: Step | None = None) -> None:
        event = JobEvent(kind, record, step)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a front end's bug must not stop the worker
                log.exception("job event listener %r failed on %s", listener, kind)

    # --- intake (called from front-end threads) -----------------------------------------------
    def submit_payload(self, payload: bytes | str, source: str, reply: dict[str, Any] | None = None,
                       dedup_key: str | None = None, redelivery: bool = False) -> Answer:
        """Decode, validate, police and journal one raw request. Never raises for bad input."""
        try:
            data = decode_payload(payload, self.config.limits)
        except ValidationError as exc:
            return Answer(error_body(str(exc), None, exc.field))
        return self.submit_data(data, source, reply, dedup_key, redelivery)

    def submit_data(self, data: dict[str, Any], source: str, reply: dict[str, Any] | None = None,
                    dedup_key: str | None = None, redelivery: bool = False) -> Answer:
        job_id = valid_id(data.get("id"))  # only to address the reply; parse_job decides
        if not self.accepting:
            return Answer(error_body("stopping: the daemon is shutting down; try again later", job_id),
                          stopping=True)
        try:
            job = parse_job(data, self.config.limits, self.config.defaults, self.runner.known_schedulers)
            self.runner.check(job)
        except ValidationError as exc:
            return Answer(error_body(str(exc), job_id, exc.field))
        # the seed is fixed before the commit so that a replay draws the very same image
        job = resolve_seed(replace(job, id=job.id or uuid.uuid4().hex[:12]))
        verdict = self.policy.check(job.prompt)
        try:
            if not verdict.allowed:
                record, created = self.journal.submit(job, source, reply, dedup_key, redelivery,
                                                      state="rejected", error=POLICY_ERROR)
                if created:
                    log.warning("job %s from %s rejected by the content policy (%s)", job.id, source, verdict.rule)
                return Answer(state_body(record), record, created, accepted=True)
            record, created = self.journal.submit(job, source, reply, dedup_key, redelivery)
        except BusyError as exc:
            return Answer(error_body(str(exc), job.id))
        if created:
            log.info("job %s queued from %s (priority %d)", record.id, source, job.priority)
            self._wake.set()
            self._emit("queued", record)
        return Answer(state_body(record, self.journal.position(record.id)), record, created, accepted=True)

    def get(self, job_id: Any) -> dict[str, Any]:
        record = self.journal.get(job_id) if valid_id(job_id) else None
        if record is None:
            return error_body(f"id: no job {job_id!r} in the journal", valid_id(job_id), "id")
        body = state_body(record, self.journal.position(record.id))
        body["job"] = record.to_dict()
        current = self._current
        if current is not None and current.id == record.id and self._current_step is not None:
            body["progress"] = progress_body(current, self._current_step)
        return body

    def cancel(self, job_id: Any) -> dict[str, Any]:
        """Cancel a queued job now, a running one at its next step."""
        current = self._current
        if current is not None and current.id == job_id:
            self._cancel.set()
            return {"status": "running", "id": job_id, "state": "running", "cancelling": True}
        record, cancelled = self.journal.cancel(job_id) if valid_id(job_id) else (None, False)
        if record is None:
            return error_body(f"id: no job {job_id!r} in the journal", valid_id(job_id), "id")
        if cancelled:
            log.info("job %s cancelled while queued", record.id)
            self._emit("finished", record)
        return state_body(record)

    def status(self) -> dict[str, Any]:
        """The service's state, as published on MQTT (retained) and answered on the socket."""
        current, step = self._current, self._current_step
        return {
            "state": "stopping" if self._stopping.is_set() else ("running" if current else "idle"),
            "queue": self.journal.depth(),
            "current": (progress_body(current, step) if step else {"id": current.id}) if current else None,
            "model": self.runner.model,
            "precision": self.runner.precision,
            "provider": self.runner.provider,
            "device": self.device_id,
            "version": __version__,
        }

    # --- the worker ---------------------------------------------------------------------------
    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="worker", daemon=True)
        self._worker.start()
        if self.notifier.watchdog_interval:
            self._watchdog = threading.Thread(target=self._watchdog_loop, name="watchdog", daemon=True)
            self._watchdog.start()
        self._update_status()

    def stop(self, timeout: float) -> None:
        """Stop taking jobs; let the running one finish within ``timeout`` s, else cancel and requeue it."""
        self.accepting = False
        self._stopping.set()
        self._wake.set()
        worker = self._worker
        if worker is None:
            return
        worker.join(timeout)
        if worker.is_alive():
            current = self._current
            log.warning("job %s did not finish within daemon.stop_timeout (%g s); cancelling it, it stays queued",
                        current.id if current else "?", timeout)
            self._cancel.set()
            worker.join(10)  # cancellation takes effect between steps
            if worker.is_alive():  # stuck in one long ONNX call: the journal still says running,
                log.error("the worker did not stop; its job is requeued at the next start")  # recover() requeues it

    def _work(self) -> None:
        while not self._stopping.is_set():
            self._heartbeat = time.monotonic()
            try:
                self._wake.clear()
                record = self.journal.claim_next()
                if record is None:
                    self._maintain()
                    self._wake.wait(min(IDLE_POLL, self.notifier.watchdog_interval or IDLE_POLL))
                    continue
                self._run(record)
            except Exception:  # e.g. the journal's disk is full: keep the service up, retry later
                log.exception("worker error; retrying in 5 s")
                self._stopping.wait(5)

    def _run(self, record: JobRecord) -> None:
        self._cancel.clear()
        self._current, self._current_step = record, None
        log.info("job %s started (attempt %d): %d image(s), %d steps", record.id, record.attempts,
                 record.job.count, record.job.steps)
        self._update_status()
        self._emit("started", record)
        final: JobRecord | None
        try:
            result = self._execute(record)
            final = self.journal.finish(record.id, "done", result=result)
            log.info("job %s done in %.2f s", record.id, result["timings"].get("total", 0.0))
        except CancelledError:
            if self._stopping.is_set():  # a stop, not the client: run it after the restart
                self.journal.requeue(record.id)
                log.info("job %s interrupted by the stop; left queued", record.id)
                final = None
            else:
                final = self.journal.finish(record.id, "cancelled", error="cancelled")
                log.info("job %s cancelled", record.id)
        except ValidationError as exc:
            final = self.journal.finish(record.id, "error", result={"field": exc.field}, error=str(exc))
        except EdgeError as exc:  # disk full, below the floor, memory budget, ...
            log.error("job %s failed: %s", record.id, exc)
            final = self.journal.finish(record.id, "error", error=str(exc))
        except Exception as exc:
            log.exception("job %s failed", record.id)
            final = self.journal.finish(record.id, "error", error=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._current, self._current_step = None, None
            self._heartbeat = time.monotonic()
        if final is not None:
            self._emit("finished", final)
        self._update_status()

    def _execute(self, record: JobRecord) -> dict[str, Any]:
        job = record.job
        when = datetime.fromisoformat(record.run_at or "")
        expected = [image_path(self.out_dir, record.id, job.seed + k, when) for k in range(job.count)]
        if record.attempts > 1 and all(p.is_file() for p in expected):
            # the images were written before a crash, the commit was not: record them, do not redo
            log.info("job %s: its %d image(s) are already on disk; not generating them again", record.id, job.count)
            return self._result(record, expected, {"replayed": True})
        output = self.config.output
        disk.prune(self.out_dir, output.max_bytes, output.max_age_days)
        disk.check_floor(self.out_dir, output.min_free_mb)

        def on_step(step: Step) -> None:
            self._heartbeat = time.monotonic()
            self._current_step = step
            self._emit("progress", record, step)

        result = self.runner.generate(job, on_step, self._cancel)
        t0 = time.perf_counter()
        paths = save_result(result, self.out_dir, record.id, model=self.runner.model, provider=self.runner.provider,
                            precision=self.runner.precision, sidecar=output.sidecar, when=when)
        steps = result.timings.get("steps") or []
        timings = {"generate": round(float(result.timings.get("total", 0.0)), 4),
                   "step_mean": round(sum(steps) / len(steps), 4) if steps else None,
                   "save": round(time.perf_counter() - t0, 4)}
        disk.prune(self.out_dir, output.max_bytes, output.max_age_days, keep=set(paths))
        return self._result(record, paths, timings)

    def _result(self, record: JobRecord, paths: list[Path], timings: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        timings = {"wait": round((record.started or now) - record.submitted, 4), **timings,
                   "total": round(now - record.submitted, 4)}
        return {"paths": [str(p) for p in paths], "seeds": [record.job.seed + k for k in range(record.job.count)],
                "timings": timings, "model": self.runner.model, "precision": self.runner.precision,
                "provider": self.runner.provider}

    def _maintain(self) -> None:
        """Idle-time housekeeping: forget old finished jobs (once an hour)."""
        now = time.time()
        if now - self._last_journal_prune > 3600:
            self._last_journal_prune = now
            removed = self.journal.prune(now - self.config.daemon.keep_days * 86400)
            if removed:
                log.info("forgot %d finished jobs older than %g days", removed, self.config.daemon.keep_days)

    # --- systemd --------------------------------------------------------------------------------
    def _update_status(self) -> None:
        current, depth = self._current, self.journal.depth()
        if self._stopping.is_set():
            text = f"stopping, {depth} queued"
        elif current is not None:
            text = f"running job {current.id}, {depth - 1} more queued"
        else:
            text = f"idle, {depth} queued"
        self.notifier.status(text)

    def _watchdog_loop(self) -> None:
        """WATCHDOG=1 every WATCHDOG_USEC/2, but only while the worker's heartbeat is fresh.

        The pings come from their own thread (a single long ONNX call must not starve them), but
        are driven by the worker: a worker stuck for ``daemon.stall_timeout`` stops them, and
        systemd kills and restarts the service (the job is requeued by the journal's recovery).
        """
        interval = self.notifier.watchdog_interval or 1.0
        stall = self.config.daemon.stall_timeout
        warned = False
        while not self._stopping.wait(interval):
            age = time.monotonic() - self._heartbeat
            if age < stall:
                self.notifier.watchdog()
                warned = False
            elif not warned:
                log.error("the worker has shown no progress for %.0f s (daemon.stall_timeout %g s); "
                          "no more watchdog pings", age, stall)
                warned = True


def progress_body(record: JobRecord, step: Step) -> dict[str, Any]:
    return {"id": record.id, "state": "running", "image": step.image + 1, "count": step.count,
            "step": step.step, "steps": step.steps, "seconds": round(step.seconds, 4)}


# --- the process --------------------------------------------------------------------------------
def default_device_id(config: Config) -> str:
    """``daemon.device_id`` or the host name, reduced to what a topic and a client id allow."""
    if config.daemon.device_id:
        return config.daemon.device_id
    name = socket.gethostname().split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:64] or "device"


def state_dir(config: Config) -> Path:
    if config.daemon.state_dir:
        return Path(config.daemon.state_dir).expanduser()
    if os.environ.get("STATE_DIRECTORY"):  # systemd StateDirectory=; may list several, the first is ours
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "edge-imagegen"


def output_dir(config: Config, state: Path) -> Path:
    out = Path(config.output.dir).expanduser()
    return out if out.is_absolute() else state / out


@contextmanager
def extending_start_timeout(notifier: Notifier, seconds: float = 30.0) -> Iterator[None]:
    """Keep asking systemd for more start-up time while a (possibly slow) model loads."""
    done = threading.Event()

    def extend() -> None:
        notifier.extend_timeout(seconds)
        while not done.wait(seconds / 3):
            notifier.extend_timeout(seconds)

    thread = None
    if notifier.enabled:
        thread = threading.Thread(target=extend, name="extend-timeout", daemon=True)
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread is not None:
            thread.join()


class FrontEnd(Protocol):
    def start(self) -> None: ...

    def stop_accepting(self) -> None: ...

    def close(self) -> None: ...


def serve(config: Config, load_runner: Callable[[Config], Runner] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit status."""
    from .mqtt import MqttFrontEnd
    from .socket_api import SocketServer

    notifier = Notifier.from_env()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())

    state = state_dir(config)
    state.mkdir(parents=True, exist_ok=True)
    out_dir = output_dir(config, state)
    journal = Journal(state / "jobs.sqlite3", config.daemon.max_queue)
    requeued, failed = journal.recover(config.daemon.max_attempts)
    if requeued:
        log.info("requeued %d job(s) interrupted by the last stop or crash: %s", len(requeued), ", ".join(requeued))
    for job_id in failed:
        log.error("job %s was interrupted %d times; failed instead of retried", job_id, config.daemon.max_attempts)
    disk.remove_temp_files(out_dir)

    # Listening before the model loads: systemd's socket (if any) is taken over at once, and our
    # own socket exists early for clients; nothing is read from it before the model is ready.
    socket_server = SocketServer(config, None) if config.socket.enabled else None

    notifier.status("loading the model")
    with extending_start_timeout(notifier):
        if load_runner is None:
            from .cli import load_pipeline
            runner: Runner = PipelineRunner(load_pipeline(config))
        else:
            runner = load_runner(config)

    service = Service(config, runner, journal, out_dir, notifier)
    front_ends: list[FrontEnd] = []
    if socket_server is not None:
        socket_server.attach(service)
        front_ends.append(socket_server)
    if config.mqtt.enabled:
        front_ends.append(MqttFrontEnd(config, service))
    service.start()
    for front_end in front_ends:
        front_end.start()
    notifier.ready(f"idle, {journal.depth()} queued")
    log.info("ready: model %s, precision %s, provider %s, state in %s, images in %s", runner.model,
             runner.precision, runner.provider, state, out_dir)

    while not stop.wait(1.0):
        pass

    log.info("stopping")
    notifier.stopping()
    for front_end in front_ends:
        front_end.stop_accepting()
    service.stop(config.daemon.stop_timeout)
    for front_end in front_ends:
        front_end.close()
    journal.close()
    notifier.close()
    log.info("stopped")
    return 0
