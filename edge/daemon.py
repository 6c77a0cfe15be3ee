"""``edge-imagegen serve``: the process around the service, and its systemd lifecycle.

:func:`serve` opens the journal and requeues what a crash interrupted, listens on the socket early
(before the model loads), loads the model, starts the :class:`~edge.service.Service` and the
front ends in :mod:`edge.comms`, and waits for a signal.

Lifecycle (systemd ``Type=notify``): the state folder's lock first (:mod:`edge.lock`: one daemon
per folder), READY=1 once the model is loaded, STATUS= lines, WATCHDOG=1 while the worker's
heartbeat is fresh, RELOADING=1 on SIGHUP (:mod:`edge.reload`), STOPPING=1 on SIGTERM or SIGINT;
then the front ends stop accepting, the running job gets ``daemon.stop_timeout`` seconds to finish
or is cancelled and left queued, MQTT disconnects cleanly after publishing ``offline``, and the
exit status is 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from . import disk
from .comms import FrontEnd
from .config import Config
from .journal import Journal
from .lock import StateLock, writable_dir
from .notify import Notifier
from .paths import output_dir, server_socket_path, state_dir
from .reload import reload
from .runner import PipelineRunner, Runner
from .service import Service

log = logging.getLogger(__name__)


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


def load_runner(config: Config) -> Runner:
    from .loader import load_pipeline
    return PipelineRunner(load_pipeline(config), config.http.preview)


def serve(config: Config, make_runner: Callable[[Config], Runner] = load_runner,
          load_config: Callable[[], Config] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit status. ``load_config`` re-reads
    the config on SIGHUP (None: SIGHUP only logs that there is nothing to reload from)."""
    stop, hangup = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    signal.signal(signal.SIGHUP, lambda signum, frame: hangup.set())  # its default would kill the daemon

    state = writable_dir(state_dir(config), "daemon.state_dir")
    with StateLock(state):  # before recovery touches the journal or the temp files
        return _serve(config, state, make_runner, load_config, stop, hangup)


def _serve(config: Config, state: Path, make_runner: Callable[[Config], Runner],
           load_config: Callable[[], Config] | None, stop: threading.Event, hangup: threading.Event) -> int:
    from .comms.mqtt import MqttFrontEnd
    from .comms.unix_socket import SocketServer, activated_socket_present

    out_dir = writable_dir(output_dir(config, state), "output.dir")
    if config.socket.enabled and not activated_socket_present():
        writable_dir(server_socket_path(config).parent, "socket.path")
    notifier = Notifier.from_env()
    journal = Journal(state / "jobs.sqlite3", config.daemon.max_queue)
    requeued, failed = journal.recover(config.daemon.max_attempts)
    if requeued:
        log.info("requeued %d job(s) interrupted by the last stop or crash: %s", len(requeued), ", ".join(requeued))
    for job_id in failed:
        log.error("job %s was interrupted %d times; failed instead of retried", job_id, config.daemon.max_attempts)
    disk.remove_temp_files(out_dir)

    # Listening before the model loads: systemd's socket (if any) is taken over at once, and our
    # own socket exists early for clients; nothing is read from it before the model is ready.
    socket_server = SocketServer(config) if config.socket.enabled else None

    notifier.status("loading the model")
    with extending_start_timeout(notifier):
        runner = make_runner(config)

    service = Service(config, runner, journal, out_dir, notifier)
    front_ends: list[FrontEnd] = []
    if socket_server is not None:
        socket_server.attach(service)
        front_ends.append(socket_server)
    if config.mqtt.enabled:
        front_ends.append(MqttFrontEnd(config, service))
    if config.http.enabled:
        from .comms.http.server import HttpFrontEnd  # aiohttp: only for a daemon that serves HTTP
        front_ends.append(HttpFrontEnd(config, service))
    service.start()
    for front_end in front_ends:
        front_end.start()
    notifier.ready(f"idle, {journal.depth()} queued")
    log.info("ready: model %s, precision %s, provider %s, state in %s, images in %s", runner.model,
             runner.precision, runner.provider, state, out_dir)

    while not stop.wait(0.2):
        if hangup.is_set():
            hangup.clear()
            notifier.notify("RELOADING=1")
            if load_config is None:
                log.warning("SIGHUP: no config file to reload from")
            elif reload(service, load_config):
                for front_end in front_ends:
                    front_end.reconfigured()
            notifier.notify("READY=1")

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
