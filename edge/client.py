"""The client of ``serve``'s Unix socket: ``edge-imagegen submit``, ``history`` and the tests use it.

Thin on purpose: it imports neither onnxruntime nor numpy, so a submit costs milliseconds.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Iterator

from .errors import EdgeError


class SocketClient:
    """Talks to ``serve`` over its socket (used by ``edge-imagegen submit`` and the tests)."""

    def __init__(self, path: Path | str, timeout: float | None = None):
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError as exc:
            self.sock.close()
            raise EdgeError(f"cannot connect to {self.path} ({exc.strerror or exc}); is `edge-imagegen serve` "
                            f"running? (--socket or socket.path picks another socket)") from None
        self._reader = self.sock.makefile("rb")

    def __enter__(self) -> SocketClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()
        self.sock.close()

    def send(self, request: dict[str, Any] | bytes) -> None:
        data = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        self.sock.sendall(data)

    def receive(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise EdgeError("the daemon closed the connection")
        return json.loads(line)

    def request(self, request: dict[str, Any] | bytes) -> dict[str, Any]:
        self.send(request)
        return self.receive()

    def request_stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """A ``watch`` request's messages, up to and including the result."""
        self.send(request)
        while True:
            message = self.receive()
            yield message
            if message.get("event") in (None, "result"):
                return

    def history(self, limit: int = 20, before: str | None = None) -> dict[str, Any]:
        """One page of the journal, newest first: ``{"status", "jobs", "next"}`` (``next``: the next ``before``)."""
        request: dict[str, Any] = {"op": "list", "limit": limit}
        if before is not None:
            request["before"] = before
        return self.request(request)

    def submit_and_watch(self, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The submit reply, then the job's events up to and including its result."""
        first = self.request({"op": "submit", "job": job, "watch": True})
        yield first
        if first["status"] in ("queued", "running"):
            while True:
                message = self.receive()
                yield message
                if message.get("event") == "result":
                    return
