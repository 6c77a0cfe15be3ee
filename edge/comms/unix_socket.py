"""The local Unix socket front end: one JSON object per line each way (the client is :mod:`edge.client`).

Requests (``op`` picks the operation; every reply has ``status``: ``ok``, ``queued``,
``running`` or ``error``, and errors name the ``field``)::

    {"op": "submit", "job": {"prompt": "...", ...}, "watch": true}   -> the job's state; with watch,
                                                                        then its events (see watch)
    {"op": "get", "id": "..."}       -> the job's state, request and result
    {"op": "cancel", "id": "..."}    -> cancels a queued job now, a running one at its next step
    {"op": "status"}                 -> queue depth, current job, model, precision, provider
    {"op": "watch", "id": "..."}     -> {"event": "started"|"progress", ...} lines, then one
                                        {"event": "result", "status": "ok"|"error", ...} line, and
                                        the server closes the connection (the end of the stream)
    {"op": "list", "limit": 20, "before": "..."}
                                     -> {"status": "ok", "jobs": [...], "next": id|null}: the journal,
                                        newest first (prompt, state, seeds, paths, times); ``next``
                                        is the ``before`` of the next page

The request line is the payload that ``limits.max_request_bytes`` bounds (the job, plus its images). Every line is answered,
whatever it holds (a request that fails unexpectedly gets ``internal error``, and the connection
stays open). Each connection's peer uid/gid (SO_PEERCRED, :mod:`edge.peer`) is kept with the
jobs it submits and checked against ``socket.allow_uids`` / ``socket.allow_groups``. The accept
thread is supervised: if the listening socket breaks, it is bound again. The socket is
``socket.path`` (default ``$RUNTIME_DIRECTORY/edge-imagegen.sock``) created with ``socket.mode``
(0660: the service's user and group), or the one systemd passes on fd 3 (socket activation,
``LISTEN_FDS``/``LISTEN_PID``); an activated socket belongs to systemd and is never unlinked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import select
import socket
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import EdgeError, ValidationError
from ..jobs import JobEvent, decode_payload, error_body
from ..paths import server_socket_path
from ..peer import AllowList, peer_credentials

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # systemd passes activated sockets from fd 3 on
MAX_CONNECTIONS = 32  # one thread each; a kiosk has a handful of clients
HARD_LINE_CAP = 1 << 20  # bytes read of one request line at most; the rest is dropped with the connection
# accept() errors that pass (a client gave up, a resource ran short for a moment); any other means the
# listening socket itself is broken: the accept thread dies and its supervisor binds a new one
TRANSIENT_ACCEPT = {errno.ECONNABORTED, errno.EINTR, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                    errno.EPERM, errno.EPROTO, errno.EAGAIN}
OPS = ("submit", "get", "cancel", "status", "watch", "list")


# --- systemd's socket ---------------------------------------------------------------------------
def activated_socket(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed (fd 3), or None when not socket-activated."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS", "").isdigit():
        return None
    count = int(env["LISTEN_FDS"])
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # not for our children
        env.pop(name, None)
    if count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; using the first (fd 3)", count)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise EdgeError("the socket systemd passed is not a Unix stream socket; check ListenStream= in "
                        "edge-imagegen.socket")
    os.set_inheritable(sock.fileno(), False)
    return sock


def activated_socket_present(environ: dict[str, str] | None = None) -> bool:
    """Whether systemd passed a socket (without taking it, as :func:`activated_socket` does)."""
    env = os.environ if environ is None else environ
    fds = env.get("LISTEN_FDS", "")
    return env.get("LISTEN_PID") == str(os.getpid()) and fds.isdigit() and int(fds) > 0


def _bind(path: Path, mode: int) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise EdgeError(f"{path}: exists and is not a socket; set socket.path to another place")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a daemon that died: nobody listens any more
        else:
            raise EdgeError(f"{path}: another daemon is listening there; stop it or set socket.path")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind creates the file with the umask's mode; narrow it for the bind itself so that the
    # socket is never reachable by more users than socket.mode allows, even for an instant
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(64)
    return sock


# --- the server -------------------------------------------------------------------------------------
class SocketServer:
    """Accepts connections on one thread, serves each on its own."""

    def __init__(self, config: Config):
        self.config = config
        self.service: Service | None = None  # attached once the model is loaded
        self.allow = AllowList(config.socket)
        self.sock = activated_socket()
        self.activated = self.sock is not None
        if self.sock is None:
            self.path: Path | None = server_socket_path(config)
            self.sock = _bind(self.path, int(config.socket.mode, 8))
            log.info("listening on %s (mode %s)", self.path, config.socket.mode)
        else:
            name = self.sock.getsockname()
            self.path = Path(name) if isinstance(name, str) and name else None
            log.info("listening on the socket systemd passed (%s)", self.path or "unnamed")
        self.accepting = True
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._watchers: dict[str, list[queue.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def attach(self, service: Service) -> None:
        self.service = service
        service.events.subscribe(self._on_event)

    def start(self) -> None:
        if self.service is None:
            raise RuntimeError("attach a service first")
        self._thread = self.service.supervisor.spawn("socket-accept", self._accept_loop, self._stopped, self._rebind)

    def _rebind(self) -> None:
        """Before a restart of the accept thread: a new listening socket in place of the broken one
        (systemd's socket is its to repair: a restart of the unit gets a new one)."""
        if self.activated or self.path is None:
            return
        self.sock.close()
        self.sock = _bind(self.path, int(self.config.socket.mode, 8))
        log.info("listening on %s again", self.path)

    def reconfigured(self) -> None:
        """Nothing derived from the limits is kept: each request reads the service's."""

    def stop_accepting(self) -> None:
        """No new connections; open ones get "stopping" for submissions (the service refuses them)."""
        self.accepting = False
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._stopped.set()
            self._thread.join(5)

    def close(self) -> None:
        self.stop_accepting()
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        # the listening socket: ours is closed and unlinked; systemd's stays open in systemd and
        # must keep its file, or the next activation would find nothing to connect to
        self.sock.close()
        if not self.activated and self.path is not None:
            self.path.unlink(missing_ok=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _accept_loop(self) -> None:
        # select() with a wake-up pipe rather than closing or shutting down the listening socket:
        # shutdown() would also break systemd's copy of an activated socket
        while self.accepting:
            readable, _, _ = select.select([self.sock, self._wake_r], [], [])
            if self._wake_r in readable or not self.accepting:
                break
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if exc.errno not in TRANSIENT_ACCEPT:
                    raise
                log.warning("accept failed: %s", exc)
                time.sleep(0.05)  # EMFILE stays until a connection closes: do not spin
                continue
            with self._lock:
                if len(self._connections) >= MAX_CONNECTIONS:
                    _send(conn, error_body(f"busy: {MAX_CONNECTIONS} clients are connected; try again later"))
                    conn.close()
                    continue
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="socket-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
            refusal = self.allow.refusal(peer)
            if refusal is not None:
                log.warning("socket connection refused: %s", refusal)
                _send(conn, error_body(refusal, None, "uid"))
                return
            peer = {"uid": peer["uid"], "gid": peer["gid"]}  # the pid is gone by the time anyone reads the journal
            reader = conn.makefile("rb")
            while True:
                line, overflow = _read_line(reader, self.service.config.limits.max_request_bytes)
                if line is None:
                    break
                if not self._answer(conn, line, peer) or overflow:
                    break  # the rest of an overlong line cannot be told from the next request
        except OSError:
            pass  # the client went away
        except Exception:
            log.exception("socket client handler failed")
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _answer(self, conn: socket.socket, line: bytes, peer: dict[str, int]) -> bool:
        """:meth:`_handle`, total: an unexpected failure is logged and answered, and the connection stays."""
        try:
            return self._handle(conn, line, peer)
        except Exception as exc:
            log.exception("socket request failed")
            return _send(conn, error_body(f"internal error: {type(exc).__name__}: {str(exc)[:200]}"))

    def _handle(self, conn: socket.socket, line: bytes, peer: dict[str, int]) -> bool:
        """Answer one request line; False ends the connection."""
        assert self.service is not None
        try:
            request = decode_payload(line, self.service.config.limits)
        except ValidationError as exc:
            return _send(conn, error_body(str(exc), None, exc.field))
        op = request.get("op")
        if op not in OPS:
            return _send(conn, error_body(f"op: must be one of {', '.join(OPS)}, got {op!r}", None, "op"))
        if op == "status":
            return _send(conn, {"status": "ok", **self.service.status()})
        if op == "get":
            return _send(conn, self.service.get(request.get("id")))
        if op == "cancel":
            return _send(conn, self.service.cancel(request.get("id")))
        if op == "watch":
            return self._watch(conn, request.get("id"))
        if op == "list":
            return _send(conn, self.service.history(request.get("limit", 20), request.get("before")))
        job = request.get("job")
        if not isinstance(job, dict):
            return _send(conn, error_body(f"job: must be a JSON object with the job's fields, got "
                                          f"{type(job).__name__}", None, "job"))
        answer = self.service.submit_data(job, "socket", peer=peer)
        if not _send(conn, answer.body):
            return False
        if request.get("watch") and answer.accepted and answer.record is not None:
            return self._watch(conn, answer.record.id)
        return True

    def _watch(self, conn: socket.socket, job_id: Any) -> bool:
        """Stream the job's events up to its result, then end the connection (False); an id that is no
        job is answered with the error like any bad request, and the connection stays (True)."""
        assert self.service is not None
        events: queue.Queue = queue.Queue()
        key = str(job_id)
        with self._lock:  # register before looking, so that no event falls between the two
            self._watchers.setdefault(key, []).append(events)
        try:
            state = self.service.get(job_id)
            if "state" not in state:  # no such job: nothing was watched
                return _send(conn, {"event": "result", **state})
            if state["status"] in ("ok", "error"):  # finished: nothing to wait for
                _send(conn, {"event": "result", **state})
                return False
            while True:
                message = events.get()
                if not _send(conn, message) or message["event"] == "result":
                    return False
        finally:
            with self._lock:
                self._watchers[key].remove(events)
                if not self._watchers[key]:
                    del self._watchers[key]

    def _on_event(self, event: JobEvent) -> None:
        with self._lock:
            watchers = list(self._watchers.get(event.record.id, ()))
        if not watchers or event.kind == "queued":
            return
        message = {"event": event.name, **event.body()}
        for events in watchers:
            events.put(message)


def _read_line(reader: Any, limit: int) -> tuple[bytes | None, bool]:
    """One line (without the newline); (None, False) at end of stream.

    A line longer than ``limit`` is read on up to HARD_LINE_CAP (or twice the limit) so that decode_payload can name
    its size; past that the connection is dropped (overflow True).
    """
    line = reader.readline(limit + 2)
    if not line:
        return None, False
    if line.endswith(b"\n") or len(line) < limit + 2:
        return line.rstrip(b"\r\n"), False
    rest = reader.readline(max(HARD_LINE_CAP, 2 * limit) - len(line))
    line += rest
    overflow = not line.endswith(b"\n")
    return line.rstrip(b"\r\n"), overflow


def _send(conn: socket.socket, message: dict[str, Any]) -> bool:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
        return True
    except OSError:
        return False
