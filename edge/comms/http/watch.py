"""The service's job events, fanned out to the HTTP front end's waiting requests on its event loop.

The service publishes on its worker thread; :meth:`Watchers.on_event` only hands each event to
the loop (``call_soon_threadsafe``) and remembers the latest progress, so the worker never waits
for an HTTP client. On the loop, event streams (SSE) get their job's events, synchronous calls
(A1111, OpenAI) get their job's final record, and streams of queued jobs get their new position.

Previews are made only for a job someone streams, every ``preview_every`` steps (and at the last
step), on the worker thread as the step is published: in order with the job's events and never
holding up the loop, even when a tiny decoder makes them. An A1111 progress poller gets one on
demand (off the loop, see compat.py).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import TYPE_CHECKING, Any

from ...jobs import JobEvent, JobRecord

if TYPE_CHECKING:
    from ...preview import Preview
    from ...service import Service

log = logging.getLogger(__name__)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


class Watchers:
    def __init__(self, loop: asyncio.AbstractEventLoop, service: Service, preview: Preview | None,
                 every: int):
        self.loop, self.service = loop, service
        self.preview = preview if every > 0 else None
        self.every = every
        self.streams: dict[str, set[asyncio.Queue]] = {}  # job id -> its event streams' queues
        self.finals: dict[str, list[asyncio.Future]] = {}  # job id -> synchronous calls waiting
        self.last_progress: JobEvent | None = None  # written by the worker thread, read by pollers
        self.started: dict[str, float] = {}  # job id -> monotonic start, for A1111's ETA

    # --- the worker thread ----------------------------------------------------------------------
    def on_event(self, event: JobEvent) -> None:
        preview = None
        if event.kind == "progress":
            self.last_progress = event
            if event.record.id not in self.streams:  # nobody streams it: nothing to do on the loop
                return
            preview = self._step_preview(event)
        elif event.kind == "finished":
            last = self.last_progress
            if last is not None and last.record.id == event.record.id:
                self.last_progress = None
        try:
            self.loop.call_soon_threadsafe(self._dispatch, event, preview)
        except RuntimeError:  # the loop is closed: the front end is gone
            pass

    def _step_preview(self, event: JobEvent) -> str | None:
        step = event.step
        if self.preview is None or step is None or step.latents is None:
            return None
        return self.preview_url(step.latents) if step.step % self.every == 0 or step.step == step.steps else None

    # --- the loop -------------------------------------------------------------------------------
    def open_stream(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.streams.setdefault(job_id, set()).add(queue)
        return queue

    def close_stream(self, job_id: str, queue: asyncio.Queue) -> None:
        queues = self.streams.get(job_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self.streams[job_id]

    def final(self, job_id: str) -> asyncio.Future:
        """A future for the job's finished record (register before submitting, so none is missed)."""
        future = self.loop.create_future()
        self.finals.setdefault(job_id, []).append(future)
        return future

    def drop_final(self, job_id: str, future: asyncio.Future) -> None:
        futures = self.finals.get(job_id, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            self.finals.pop(job_id, None)

    def _dispatch(self, event: JobEvent, preview: str | None = None) -> None:
        job_id = event.record.id
        if event.kind == "started":
            self.started[job_id] = self.loop.time()
        if event.kind == "finished":
            self.started.pop(job_id, None)
            for future in self.finals.pop(job_id, []):
                if not future.done():
                    future.set_result(event.record)
        if event.kind != "queued":
            message = {"event": event.name, **event.body()}
            if preview is not None:
                message["preview"] = preview
            for queue in self.streams.get(job_id, ()):
                queue.put_nowait(message)
        if event.kind in ("started", "finished"):
            self._positions(exclude=job_id)

    def _positions(self, exclude: str) -> None:
        """Streams of jobs still queued hear where they stand now."""
        for job_id, queues in list(self.streams.items()):
            if job_id == exclude:
                continue
            state = self.service.get(job_id)
            if state.get("status") == "queued":
                message = {"event": "queued", **{k: v for k, v in state.items() if k != "job"}}
                for queue in queues:
                    queue.put_nowait(message)

    def preview_url(self, latents: Any) -> str | None:
        if self.preview is None:
            return None
        try:
            return data_url(self.preview.png(latents))
        except Exception:  # a preview must never cost a job its events
            log.exception("preview failed")
            return None

    def current(self) -> tuple[JobRecord, dict[str, Any], Any] | None:
        """The running job's record, its progress body and its latents, for a progress poller."""
        event = self.last_progress
        if event is None or event.step is None:
            return None
        return event.record, event.body(), event.step.latents

