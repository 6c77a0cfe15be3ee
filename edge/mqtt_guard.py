"""What keeps the MQTT front end answering: callbacks that never raise into paho's network thread,
reply topics checked before use, paho's network thread watched (for :mod:`edge.supervise`), and
result deliveries recorded by their PUBACK.

A result counts as delivered once the broker acknowledged it (``on_publish`` with its packet id),
not by polling ``MQTTMessageInfo.is_published()``, which raises for a message published while the
broker was away (paho sends it after the reconnect, but its ``rc`` keeps saying "not connected").
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from typing import Any, Callable, TypeVar

import paho.mqtt.client as mqtt

from .fields import unencodable

log = logging.getLogger(__name__)

MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name

F = TypeVar("F", bound=Callable[..., Any])


def total(callback: F) -> F:
    """A paho callback that never raises into paho's network thread: a bug is logged, not fatal."""
    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except Exception:
            log.exception("MQTT callback %s failed", getattr(callback, "__name__", callback))
            return None
    return wrapper  # type: ignore[return-value]


def topic_problem(topic: Any) -> str | None:
    """Why ``topic`` cannot be published to (a client's ResponseTopic), or None when it can."""
    if not isinstance(topic, str) or not topic:
        return "must be a non-empty topic name"
    if any(c in topic for c in "+#"):
        return f"{topic[:64]!r} has a wildcard (+ or #); replies need a topic name"
    if "\x00" in topic or unencodable(topic) is not None:
        return "is not valid UTF-8 text without NUL characters"
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        return f"is {len(topic.encode())} bytes, MQTT's limit is {MAX_TOPIC_BYTES}"
    return None


def watch_network(client: mqtt.Client, closing: threading.Event) -> None:
    """Return once ``closing`` is set; raise if paho's network thread (``loop_start``) died meanwhile."""
    while not closing.wait(0.5):
        if getattr(client, "_thread", None) is None:  # paho clears it when its thread ends
            raise RuntimeError("paho's MQTT network thread stopped")


def restart_network(client: mqtt.Client) -> None:
    """A new network thread for ``client``; a thread that died mid-packet leaves paho's read state
    half-filled, so the connection starts afresh."""
    try:
        client.reconnect()
    except OSError as exc:
        log.warning("reconnect to the broker failed (%s); the network thread retries with back-off", exc)
    client.loop_start()


class Deliveries:
    """Result publishes awaiting their PUBACK, and the job ids to mark delivered in the journal.

    ``on_publish`` runs on paho's network thread while paho holds its own locks, so our lock is
    only ever taken briefly and nothing of paho's is called under it (no lock-order deadlock).
    The journal is written by :meth:`record`, from the housekeeping thread, never paho's.
    """

    def __init__(self, mark_delivered: Callable[[str], None]):
        self._mark = mark_delivered
        self._lock = threading.Lock()
        self._pending: dict[int, str] = {}  # packet id -> job id
        self._acked: list[str] = []

    def expect(self, info: mqtt.MQTTMessageInfo, job_id: str) -> None:
        with self._lock:
            self._pending[info.mid] = job_id
        if _published(info):  # the PUBACK came before the line above
            self.on_publish(None, None, info.mid, None, None)

    def on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            job_id = self._pending.pop(mid, None)
            if job_id is not None:
                self._acked.append(job_id)

    def wait(self, deadline: float) -> None:
        """Until every expected PUBACK came or ``deadline`` (monotonic) passed."""
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.05)

    def record(self) -> None:
        """Mark the acknowledged results delivered; what the journal cannot take now waits for the next call."""
        with self._lock:
            acked, self._acked = self._acked, []
        for i, job_id in enumerate(acked):
            try:
                self._mark(job_id)
            except sqlite3.Error as exc:
                log.warning("cannot record the delivery of job %s yet: %s", job_id, exc)
                with self._lock:
                    self._acked[:0] = acked[i:]
                return


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # not sent yet (no connection): its PUBACK comes after the reconnect
        return False
