"""The service: intake, the journal, one worker, and the events every front end subscribes to.

How a job flows:

1. A front end (one module per transport in :mod:`edge.comms`) hands the raw request to
   :meth:`Service.submit_payload` (or ``submit_payload_later``, a future; :mod:`edge.intake`). It is
   decoded and validated by :func:`edge.jobs.parse_job` (the one validator), checked by the runner
   for what only the model knows (:meth:`Runner.check`), given an id and a seed, checked against the
   content policy, and group-committed to the :class:`~edge.journal.Journal`. Only then does the
   front end acknowledge it.
2. One worker thread claims jobs in priority then arrival order and runs them on the resident
   pipeline; the front ends keep answering meanwhile (ONNX Runtime releases the GIL).
3. Images are written under names fixed by the job (id, seed and the time of its *first* start,
   stored in the journal), so a replay after a crash overwrites the same files instead of adding
   a second set, and a replay that finds the whole set already on disk just records it.
4. Every change is a :class:`~edge.jobs.JobEvent` on the service's :class:`EventBus`; each front
   end turns it into its own messages with the bodies :mod:`edge.jobs` builds.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from . import __version__, disk
from .config import Config
from .errors import CancelledError, EdgeError, ValidationError
from .intake import Answer, Intake  # noqa: F401 (Answer: front ends type against edge.service.Answer)
from .jobs import JobEvent, JobRecord, Step, cancel_body, error_body, history_entry, progress_body, state_body, valid_id
from .inputs import references
from .journal import Journal
from .notify import Notifier
from .output import image_path, save_result, set_files
from .runner import Runner
from .supervise import Supervisor

log = logging.getLogger(__name__)

IDLE_POLL = 5.0  # seconds an idle worker sleeps between heartbeats (a submit wakes it at once)
MAX_HISTORY_PAGE = 500


# --- what the front ends see --------------------------------------------------------------------
class EventBus:
    """Job events to every subscriber, in order, on the thread that publishes them."""

    def __init__(self) -> None:
        self._subscribers: list[Callable[[JobEvent], None]] = []

    def subscribe(self, subscriber: Callable[[JobEvent], None]) -> None:
        self._subscribers.append(subscriber)

    def publish(self, event: JobEvent) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:  # a front end's bug must not stop the worker
                log.exception("job event subscriber %r failed on %s", subscriber, event.kind)


class Service(Intake):
    """Intake (:class:`edge.intake.Intake`), journal, worker and events; front ends and the systemd
    glue sit around it. ``supervisor`` runs the front ends' threads."""

    def __init__(self, config: Config, runner: Runner, journal: Journal, out_dir: Path,
                 notifier: Notifier | None = None, device_id: str | None = None):
        super().__init__(config, runner, journal)
        self.out_dir = Path(out_dir)
        self.notifier = notifier or Notifier()
        self.device_id = device_id or default_device_id(config)
        self.supervisor = Supervisor()
        self.events = EventBus()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancel = threading.Event()
        self._finish = threading.Event()  # interrupt(): end the running job early, keeping its images
        self._current: JobRecord | None = None
        self._current_step: Step | None = None
        self._last_job: dict[str, Any] | None = None  # the last job that ended since the start: id, state, seconds
        self._heartbeat = time.monotonic()
        self._worker: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._last_journal_prune = 0.0

    def _queued(self, record: JobRecord, position: int | None) -> None:
        self._wake.set()
        self._emit("queued", record, position=position)

    def _emit(self, kind: str, record: JobRecord, step: Step | None = None, position: int | None = None) -> None:
        self.events.publish(JobEvent(kind, record, step, position))

    def record(self, job_id: Any) -> JobRecord | None:
        """The journal's record of a job, for a front end that builds its own result message."""
        return self.journal.get(job_id) if valid_id(job_id) else None

    def get(self, job_id: Any) -> dict[str, Any]:
        record = self.record(job_id)
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
            return cancel_body(current, cancelled=False)
        record, cancelled = self.journal.cancel(job_id) if valid_id(job_id) else (None, False)
        if record is None:
            return error_body(f"id: no job {job_id!r} in the journal", valid_id(job_id), "id")
        if cancelled:
            log.info("job %s cancelled while queued", record.id)
            self._emit("finished", record)
        return cancel_body(record, cancelled)

    def interrupt(self, job_id: str) -> bool:
        """End the running job ``job_id`` at its next step with the images drawn so far (AUTOMATIC1111's
        interrupt); False when it is not the one running."""
        current = self._current
        if current is None or current.id != job_id:
            return False
        self._finish.set()
        return True

    def history(self, limit: Any = 20, before: Any = None) -> dict[str, Any]:
        """A page of past and current jobs, newest first; ``next`` is the ``before`` of the next page."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_HISTORY_PAGE:
            return error_body(f"limit: must be an integer between 1 and {MAX_HISTORY_PAGE}, got {limit!r}", None, "limit")
        if before is not None and valid_id(before) is None:
            return error_body("before: must be a job id (the last id of the previous page)", None, "before")
        page = self.journal.history(limit, before)
        return {"status": "ok", "jobs": [history_entry(r) for r in page],
                "next": page[-1].id if len(page) == limit else None}

    # --- results a front end has to deliver ----------------------------------------------------
    def undelivered(self, source: str) -> list[JobRecord]:
        """Finished jobs from ``source`` whose result was not confirmed delivered (a stop came between)."""
        return self.journal.undelivered(source)

    def mark_delivered(self, job_id: str) -> None:
        self.journal.mark_delivered(job_id)

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
            "last_job": self._last_job,
            "degraded": self.supervisor.degraded,  # front-end threads that died and are not back yet
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
        self._finish.clear()
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
            self._last_job = {"id": final.id, "state": final.state,
                              "seconds": round((final.finished or 0.0) - (final.started or 0.0), 3)}
            self._emit("finished", final)
        self._update_status()

    def _execute(self, record: JobRecord) -> dict[str, Any]:
        job = record.job
        when = datetime.fromisoformat(record.run_at or "")
        expected = [image_path(self.out_dir, record.id, job.seed + k, when) for k in range(job.count)]
        if record.attempts > 1 and all(p.is_file() for p in set_files(expected, self.config.output.sidecar)):
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

        result = self.runner.generate(self.inputs.resolve(job), on_step, self._cancel, self._finish)
        t0 = time.perf_counter()
        paths = save_result(result, self.out_dir, record.id, model=self.runner.model, provider=self.runner.provider,
                            precision=self.runner.precision, sidecar=output.sidecar, when=when,
                            extra={"submitted_by": record.peer} if record.peer else None)
        steps = result.timings.get("steps") or []
        timings = {"generate": round(float(result.timings.get("total", 0.0)), 4),
                   "step_mean": round(sum(steps) / len(steps), 4) if steps else None,
                   "save": round(time.perf_counter() - t0, 4)}
        disk.prune(self.out_dir, output.max_bytes, output.max_age_days, keep=set(paths))
        for warning in result.warnings:
            log.warning("job %s: %s", record.id, warning)
        return self._result(record, paths, timings, result.warnings)

    def _result(self, record: JobRecord, paths: list[Path], timings: dict[str, Any],
                warnings: list[str] | None = None) -> dict[str, Any]:
        now = time.time()
        timings = {"wait": round((record.started or now) - record.submitted, 4), **timings,
                   "total": round(now - record.submitted, 4)}
        body = {"paths": [str(p) for p in paths], "seeds": [record.job.seed + k for k in range(len(paths))],
                "timings": timings, "model": self.runner.model, "precision": self.runner.precision,
                "provider": self.runner.provider}
        if warnings:
            body["warnings"] = warnings
        return body

    def _maintain(self) -> None:
        """Idle-time housekeeping: forget old finished jobs (once an hour)."""
        now = time.time()
        if now - self._last_journal_prune > 3600:
            self._last_journal_prune = now
            removed = self.journal.prune(now - self.config.daemon.keep_days * 86400)
            if removed:
                log.info("forgot %d finished jobs older than %g days", removed, self.config.daemon.keep_days)
            named = set().union(*(references(job) for job in self.journal.all_jobs()))
            if gone := self.inputs.prune(named):
                log.info("removed %d input image(s) of forgotten jobs", gone)

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
        """WATCHDOG=1 every WATCHDOG_USEC/2, but only while the worker's heartbeat is fresh and no
        front-end thread was given up by the supervisor.

        The pings come from their own thread (a single long ONNX call must not starve them), but
        are driven by the worker: a worker stuck for ``daemon.stall_timeout`` stops them, and
        systemd kills and restarts the service (the job is requeued by the journal's recovery).
        """
        interval = self.notifier.watchdog_interval or 1.0
        stall = self.config.daemon.stall_timeout
        warned = False
        while not self._stopping.wait(interval):
            age = time.monotonic() - self._heartbeat
            if age < stall and self.supervisor.healthy():
                self.notifier.watchdog()
                warned = False
            elif not warned:
                if age >= stall:
                    log.error("the worker has shown no progress for %.0f s (daemon.stall_timeout %g s); "
                              "no more watchdog pings", age, stall)
                else:
                    log.error("front-end thread(s) %s cannot come back; no more watchdog pings",
                              ", ".join(self.supervisor.degraded))
                warned = True




def default_device_id(config: Config) -> str:
    """``daemon.device_id`` or the host name, reduced to what a topic and a client id allow."""
    if config.daemon.device_id:
        return config.daemon.device_id
    name = socket.gethostname().split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:64] or "device"
