"""Threads that must not die: a front end's thread that raises is logged and restarted with back-off.

While a thread is down (between its death and its restart) it is listed in :attr:`Supervisor.degraded`,
which the service's ``status`` (the retained MQTT state, the socket's ``status``) shows. A thread
that dies ``max_restarts`` times without running ``stable_after`` seconds in between is given up:
:meth:`Supervisor.healthy` turns False and the service stops feeding the systemd watchdog, so that
systemd restarts the whole daemon.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, min_delay: float = 1.0, max_delay: float = 30.0, max_restarts: int = 5,
                 stable_after: float = 60.0):
        self.min_delay, self.max_delay = min_delay, max_delay
        self.max_restarts, self.stable_after = max_restarts, stable_after
        self._lock = threading.Lock()
        self._down: dict[str, bool] = {}  # name -> given up
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (no arguments) whenever a thread goes down or comes back."""
        self._listeners.append(listener)

    @property
    def degraded(self) -> list[str]:
        """Names of the supervised threads that are down now (restarting or given up)."""
        with self._lock:
            return sorted(self._down)

    def healthy(self) -> bool:
        """False once a thread was given up: the daemon cannot repair itself."""
        with self._lock:
            return not any(self._down.values())

    def spawn(self, name: str, target: Callable[[], None], stop: threading.Event,
              restart: Callable[[], None] | None = None) -> threading.Thread:
        """Run ``target`` on a thread called ``name`` until it returns or ``stop`` is set.

        ``target`` returning is a normal end; raising is a death. ``restart`` runs before each
        restart (e.g. to open a new listening socket); if it raises, that counts as a death too.
        """
        thread = threading.Thread(target=self._run, args=(name, target, stop, restart), name=name, daemon=True)
        thread.start()
        return thread

    def _run(self, name: str, target: Callable[[], None], stop: threading.Event,
             restart: Callable[[], None] | None) -> None:
        delay, deaths, first = self.min_delay, 0, True
        while not stop.is_set():
            started = time.monotonic()
            try:
                if not first and restart is not None:
                    restart()
                if not first:
                    log.warning("thread %s restarted", name)
                    self._set(name, None)
                first = False
                target()
                return
            except Exception:
                if stop.is_set():
                    return
                if time.monotonic() - started >= self.stable_after:
                    delay, deaths = self.min_delay, 0
                deaths += 1
                if deaths > self.max_restarts:
                    log.exception("thread %s died %d times in a row; giving up (no more watchdog pings)",
                                  name, deaths)
                    self._set(name, True)
                    return
                log.exception("thread %s died; restarting it in %g s", name, delay)
                self._set(name, False)
            if stop.wait(delay):
                return
            delay = min(delay * 2, self.max_delay)

    def _set(self, name: str, given_up: bool | None) -> None:
        with self._lock:
            if given_up is None:
                changed = self._down.pop(name, None) is not None
            else:
                changed = self._down.get(name) != given_up
                self._down[name] = given_up
        if changed:
            for listener in list(self._listeners):
                listener()
