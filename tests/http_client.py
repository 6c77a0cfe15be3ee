"""A plain HTTP test client (the standard library's, independent of the server's aiohttp)."""

from __future__ import annotations

import http.client
import io
import json
import time
from typing import Any, Iterator
from urllib.parse import urlsplit

from PIL import Image

from daemon_harness import TIMEOUT_SCALE


class Http:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.token = token
        self.timeout = timeout * TIMEOUT_SCALE

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
        """(status, decoded JSON or bytes, headers)."""
        headers = dict(headers or {})
        if self.token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn = self._conn()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            kind = resp.getheader("Content-Type", "")
            decoded = json.loads(payload) if kind.startswith("application/json") else payload
            return resp.status, decoded, dict(resp.getheaders())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        return self.request("POST", path, body, **kw)

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's Server-Sent Events as (name, body) until the stream ends."""
        conn = self._conn()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        conn.request("GET", f"/api/jobs/{job_id}/events", headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200, (resp.status, resp.read())
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        name = None
        try:
            while True:
                line = resp.readline()
                if not line:
                    return
                text = line.decode().rstrip("\r\n")
                if text.startswith("event: "):
                    name = text[len("event: "):]
                elif text.startswith("data: "):
                    yield name, json.loads(text[len("data: "):])
        finally:
            conn.close()

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout * TIMEOUT_SCALE
        while True:
            status, body, _ = self.get(f"/api/jobs/{job_id}")
            if status == 200 and body["job"]["state"] in states:
                return body
            assert time.monotonic() < deadline, f"{job_id} not {states}: {body}"
            time.sleep(0.05)


def png(data: bytes) -> Image.Image:
    """Decode a PNG fully (load() checks every chunk and the pixel data)."""
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image
