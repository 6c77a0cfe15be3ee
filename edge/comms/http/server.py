"""The HTTP front end: the page, the native API, and the AUTOMATIC1111 and OpenAI APIs (compat.py).

aiohttp serves on its own event loop in one thread. Service calls that touch the journal run in
the loop's thread pool, so a commit's fsync never holds up another request; the service's events
come in through :class:`~edge.comms.http.watch.Watchers`.

Native API (every body is the one :mod:`edge.jobs` builds for every transport, plus ``images``:
the URLs of the result's files)::

    POST   /api/jobs              the job JSON -> 202 {"status": "queued", "id", "position", ...};
                                  a duplicate id -> 200 with that job's state
    GET    /api/jobs/{id}         its state, request and result
    GET    /api/jobs/{id}/events  Server-Sent Events: queued (position), started, progress (with a
                                  "preview" data URL every http.preview_every steps), result
    DELETE /api/jobs/{id}         cancel (a queued job now, a running one at its next step)
    GET    /api/jobs?limit=&before=   history from the journal, newest first
    GET    /api/status, /api/config, /healthz, /images/{path} (only files under the output folder)

Errors are JSON ``{"status": "error", "error": "<field>: <what, with the limit>", "field"}`` with
400 (bad input), 401 (token), 404, 408 (body not sent within http.request_timeout), 409 (cancel of
a finished job), 413 (body too large), 429 (queue full), 503 (shutting down), 504 (compat.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import threading
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from ...config import Config
from ...errors import ConfigError, EdgeError
from ...jobs import error_body
from ...service import MAX_HISTORY_PAGE
from . import compat
from .replies import HttpError, answer_status
from .watch import Watchers

if TYPE_CHECKING:
    from ...service import Service

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
STATIC = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
PUBLIC = set(STATIC) | {"/healthz"}
KEEPALIVE = 15.0  # seconds between SSE comments, so that a dead client is noticed


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"http.token_file: cannot read {path} ({exc.strerror})") from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ConfigError(f"http.token_file: {path} must start with a token of 16 characters or more")
    return token


async def read_at_most(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it passes ``limit`` bytes (a chunked body has no length to check first)."""
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class HttpFrontEnd:
    """Binds at construction (a taken port fails the start), serves after :meth:`start`."""

    def __init__(self, config: Config, service: Service):
        self.service = service
        self.http = config.http  # needs a restart to change, unlike the limits and defaults (self.config)
        self.token = read_token(self.http.token_file)
        self.out_dir = service.out_dir.resolve()
        self.loop = asyncio.new_event_loop()
        self.watchers = Watchers(self.loop, service, service.runner.preview, self.http.preview_every)
        # body() bounds every body by the live limits itself (they change on SIGHUP)
        self.app = web.Application(middlewares=[self._guard])
        self._routes()
        compat.add_routes(self.app, self)
        # keepalive_timeout also runs from the connection's start: a client that never finishes its
        # request headers is dropped after it (one whose body stalls gets 408, see body())
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                     keepalive_timeout=self.http.request_timeout)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.http.host, self.http.port, shutdown_timeout=2.0)
        try:
            self.loop.run_until_complete(site.start())
        except OSError as exc:
            self.loop.run_until_complete(self._runner.cleanup())
            self.loop.close()
            raise EdgeError(f"http.port: cannot listen on {self.http.host}:{self.http.port} ({exc.strerror}); "
                            f"set http.port or http.enabled: false") from None
        service.events.subscribe(self.watchers.on_event)
        log.info("HTTP on http://%s:%d/ (%s)", self.http.host, self.http.port,
                 "bearer token required" if self.token else "no token")
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def config(self) -> Config:
        """The service's config: a SIGHUP's limits and defaults show here at once."""
        return self.service.config

    @property
    def body_limit(self) -> int:
        """Edit jobs carry their images: room for two at limits.max_image_bytes beyond http.max_body_bytes."""
        limits = self.config.limits
        return self.http.max_body_bytes + limits.max_request_bytes - limits.max_payload_bytes

    # --- FrontEnd ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = self.service.supervisor.spawn("http", self.loop.run_forever, self._closing)

    def reconfigured(self) -> None:
        """Nothing to republish: every request reads the live :attr:`config`."""

    def stop_accepting(self) -> None:
        """Nothing to close yet: the service answers submissions "stopping" (503), reads go on."""

    def close(self) -> None:
        if self._thread is None:
            return
        self._closing.set()
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        except Exception:
            log.exception("HTTP shutdown")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    # --- helpers for the handlers -----------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A service call that may wait for the journal, off the loop."""
        return await self.loop.run_in_executor(None, fn, *args)

    async def body(self, request: web.Request) -> bytes:
        limit = self.body_limit
        if request.content_length is not None and request.content_length > limit:
            raise HttpError(413, error_body(f"payload: is {request.content_length} bytes, the limit is {limit} "
                                            f"(http.max_body_bytes, plus two images of limits.max_image_bytes)",
                                            None, "payload"))
        try:
            raw = await asyncio.wait_for(read_at_most(request, limit), self.http.request_timeout)
        except asyncio.TimeoutError:
            raise HttpError(408, error_body(f"payload: not received within {self.http.request_timeout:g} s "
                                            f"(http.request_timeout)", None, "payload")) from None
        if raw is None:
            raise HttpError(413, error_body(f"payload: is over the limit of {limit} bytes (http.max_body_bytes, "
                                            f"plus two images)", None, "payload"))
        if len(raw) > self.http.max_body_bytes and b'"init_image' not in raw:  # the room is for images only
            raise HttpError(413, error_body(f"payload: is {len(raw)} bytes, the limit is {self.http.max_body_bytes} "
                                            f"(http.max_body_bytes)", None, "payload"))
        return raw

    def image_url(self, path: str) -> str | None:
        try:
            return "/images/" + Path(path).resolve().relative_to(self.out_dir).as_posix()
        except ValueError:
            return None

    def with_images(self, body: dict[str, Any]) -> dict[str, Any]:
        paths = body.get("paths") or []
        if paths:
            body = {**body, "images": [u for u in map(self.image_url, paths) if u]}
        return body

    def authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        given = request.query.get("token", "")
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":  # A1111 clients (webuiapi's set_auth): any user, the token as password
            try:
                given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                given = ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path not in PUBLIC and not self.authorized(request):
            return web.json_response(error_body("token: missing or wrong; send Authorization: Bearer <the token "
                                                "in http.token_file>", None, "token"), status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="edge-imagegen"'})
        try:
            return await handler(request)
        except HttpError as exc:
            return web.json_response(exc.body, status=exc.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            what = {404: "path: no such resource", 405: f"method: {request.method} is not allowed here"}
            return web.json_response(error_body(what.get(exc.status, exc.reason), None,
                                                "path" if exc.status == 404 else "method"), status=exc.status)

    # --- the native API ---------------------------------------------------------------------------
    def _routes(self) -> None:
        r = self.app.router
        for path, name in STATIC.items():
            r.add_get(path, self._static(name))
        r.add_get("/healthz", self.healthz)
        r.add_get("/api/status", self.status)
        r.add_get("/api/config", self.page_config)
        r.add_post("/api/jobs", self.submit)
        r.add_get("/api/jobs", self.history)
        r.add_get("/api/jobs/{id}", self.get)
        r.add_delete("/api/jobs/{id}", self.cancel)
        r.add_get("/api/jobs/{id}/events", self.events)
        r.add_get("/images/{path:.+}", self.image)
        r.add_get("/api/images.zip", self.zip_images)

    def _static(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(WEB_DIR / name, headers={"Cache-Control": "no-cache"})
        return handler

    async def healthz(self, request: web.Request) -> web.Response:
        ok = self.service.accepting
        return web.json_response({"status": "ok" if ok else "stopping"}, status=200 if ok else 503)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **await self.call(self.service.status)})

    async def page_config(self, request: web.Request) -> web.Response:
        """What the page needs to draw its form: the defaults, the limits, the model's sizes."""
        from ...schedulers import NAMES
        config, runner = self.config, self.service.runner
        return web.json_response({
            "status": "ok", "defaults": asdict(config.defaults), "limits": asdict(config.limits),
            "schedulers": list(NAMES), "model": runner.model, "size": list(runner.size),
            "fixed_size": runner.fixed_size, "examples": list(self.http.examples),
            "kiosk_idle_seconds": self.http.kiosk_idle_seconds, "previews": self.watchers.preview is not None})

    async def submit(self, request: web.Request) -> web.Response:
        raw = await self.body(request)
        answer = await self.call(self.service.submit_payload, raw, "http")
        status = answer_status(answer)
        if status == 400 and len(raw) > self.config.limits.max_payload_bytes:
            status = 413
        return web.json_response(self.with_images(answer.body), status=status)

    async def get(self, request: web.Request) -> web.Response:
        body = await self.call(self.service.get, request.match_info["id"])
        return web.json_response(self.with_images(body), status=200 if "job" in body else 404)  # failed jobs: 200

    async def cancel(self, request: web.Request) -> web.Response:
        body = await self.call(self.service.cancel, request.match_info["id"])
        status = 200 if body["status"] == "ok" else (409 if "state" in body else 404)
        return web.json_response(body, status=status)

    async def history(self, request: web.Request) -> web.Response:
        limit: Any = request.query.get("limit", "20")
        limit = int(limit) if limit.isdigit() else limit  # the service names anything else
        body = await self.call(self.service.history, limit, request.query.get("before"))
        if body["status"] == "ok":
            body["jobs"] = [self.with_images(entry) for entry in body["jobs"]]
        return web.json_response(body, status=200 if body["status"] == "ok" else 400)

    async def image(self, request: web.Request) -> web.StreamResponse:
        relative = request.match_info["path"]
        path = (self.out_dir / relative).resolve()
        if not path.is_relative_to(self.out_dir) or not path.is_file() or path.suffix not in (".png", ".json"):
            raise HttpError(404, error_body(f"path: no image {relative!r} in the output folder", None, "path"))
        headers = {"Cache-Control": "private, max-age=86400"}
        if "download" in request.query:
            headers["Content-Disposition"] = f'attachment; filename="{path.name}"'
        return web.FileResponse(path, headers=headers)

    async def zip_images(self, request: web.Request) -> web.Response:
        """The images of the jobs named by ``id`` (repeated): the page's "download all"."""
        ids = request.query.getall("id", [])
        if not 1 <= len(ids) <= MAX_HISTORY_PAGE:
            raise HttpError(400, error_body(f"id: name 1 to {MAX_HISTORY_PAGE} jobs, got {len(ids)}", None, "id"))
        paths: list[Path] = []
        for job_id in ids:
            body = await self.call(self.service.get, job_id)
            paths += [Path(p) for p in body.get("paths", []) if self.image_url(p)]
        data = await self.call(_zip, paths)
        return web.Response(body=data, content_type="application/zip",
                            headers={"Content-Disposition": 'attachment; filename="edge-imagegen.zip"'})

    async def events(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["id"]
        queue = self.watchers.open_stream(job_id)  # before looking, so that no event falls between
        try:
            state = await self.call(self.service.get, job_id)
            if state["status"] == "error" and "job" not in state:
                raise HttpError(404, state)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                   "X-Accel-Buffering": "no"})
            await response.prepare(request)
            state.pop("job", None)
            if state["status"] in ("ok", "error"):  # finished already
                await _send(response, "result", self.with_images(state))
                return response
            if state["status"] == "queued":
                await _send(response, "queued", state)
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except asyncio.TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                name = message.pop("event")
                await _send(response, name, self.with_images(message) if name == "result" else message)
                if name == "result":
                    return response
        finally:
            self.watchers.close_stream(job_id, queue)


def _zip(paths: list[Path]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
        for path in paths:
            if path.is_file():
                archive.write(path, path.name)
    return buf.getvalue()


async def _send(response: web.StreamResponse, event: str, body: dict[str, Any]) -> None:
    await response.write(f"event: {event}\ndata: {json.dumps(body)}\n\n".encode())
