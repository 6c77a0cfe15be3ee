"""The AUTOMATIC1111 (``/sdapi/v1``) and OpenAI (``/v1/images/generations``) endpoints.

Both are synchronous: the request waits for its job (which goes through the service like any
other: the job shape, the content policy, the limits, the journal) and answers with the images
as base64 PNGs (or URLs). A job that outlives ``http.request_timeout`` is answered 504 with its id;
it goes on and stays in the history (``GET /api/jobs/{id}``).
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from PIL import Image

from ...errors import ValidationError
from ...jobs import JobRecord, decode_payload, error_body, new_id, result_body
from . import a1111, openai_images
from .replies import HttpError, answer_status

if TYPE_CHECKING:
    from .server import HttpFrontEnd


def add_routes(app: web.Application, front: HttpFrontEnd) -> None:
    compat = Compat(front)
    r = app.router
    r.add_post("/sdapi/v1/txt2img", compat.txt2img)
    r.add_post("/sdapi/v1/img2img", compat.img2img)
    r.add_get("/sdapi/v1/progress", compat.progress)
    r.add_post("/sdapi/v1/interrupt", compat.interrupt)
    r.add_get("/sdapi/v1/samplers", compat.samplers)
    r.add_get("/sdapi/v1/sd-models", compat.sd_models)
    r.add_get("/sdapi/v1/options", compat.options)
    r.add_post("/sdapi/v1/options", compat.set_options)
    r.add_post("/v1/images/generations", compat.generations)


def _failed_status(record: JobRecord) -> int:
    if record.state == "cancelled":
        return 409
    if record.state == "rejected" or (record.result or {}).get("field"):
        return 400
    return 500


def _read_images(paths: list[str]) -> tuple[list[str], list[str]]:
    """Base64 PNGs and their ``parameters`` texts (read back from the files, as A1111 reports them)."""
    images, texts = [], []
    for path in paths:
        data = Path(path).read_bytes()
        images.append(base64.b64encode(data).decode())
        with Image.open(path) as image:
            texts.append(image.text.get("parameters", ""))
    return images, texts


class Compat:
    def __init__(self, front: HttpFrontEnd):
        self.front = front
        self.service = front.service
    async def _object(self, request: web.Request) -> dict[str, Any]:
        raw = await self.front.body(request)
        # the mapped job is small whatever the client sent by habit: bound the request by the body limit
        limits = replace(self.front.config.limits, max_payload_bytes=self.front.body_limit)
        try:
            return decode_payload(raw, limits)
        except ValidationError as exc:
            raise self._error(400, str(exc), exc.field, request) from None

    def _error(self, status: int, message: str, field: str | None, request: web.Request,
               job_id: str | None = None) -> Exception:
        if request.path.startswith("/v1/"):
            return HttpError(status, openai_images.error(message, field))
        return HttpError(status, a1111.rename_error(error_body(message, job_id, field)))

    async def _run(self, job: dict[str, Any], request: web.Request) -> JobRecord:
        """Submit and wait for the job's end; the finished record, or an HttpError to answer."""
        job_id = job["id"] = new_id()
        future = self.front.watchers.final(job_id)  # before the submission: its end cannot be missed
        timeout = self.front.http.request_timeout
        try:
            answer = await self.front.call(self.service.submit_data, job, "http")
            if not answer.accepted or answer.record is None:
                raise self._error(answer_status(answer), answer.body["error"], answer.body.get("field"), request)
            record = answer.record
            if not record.finished_state:
                record = await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise self._error(504, f"request_timeout: job {job_id} is not finished after {timeout:g} s "
                                   f"(http.request_timeout); it goes on: GET /api/jobs/{job_id}",
                              "request_timeout", request, job_id) from None
        finally:
            self.front.watchers.drop_final(job_id, future)
        if record.state != "done":
            body = result_body(record)
            raise self._error(_failed_status(record), body["error"], body.get("field"), request, job_id)
        return record

    # --- AUTOMATIC1111 ---------------------------------------------------------------------------
    async def txt2img(self, request: web.Request) -> web.Response:
        data = await self._object(request)
        job, ignored = a1111.to_job(data)
        a1111.note_ignored(ignored, "/sdapi/v1/txt2img")
        record = await self._run(job, request)
        images, texts = await self.front.call(_read_images, record.result["paths"])
        return web.json_response(a1111.txt2img_body(data, record, images, texts, self.service.runner.model))

    async def img2img(self, request: web.Request) -> web.Response:
        data = await self._object(request)
        try:
            job, ignored = a1111.to_edit_job(data, self.service.runner.model_kind == "instruct")
        except ValidationError as exc:
            raise self._error(400, str(exc), exc.field, request) from None
        a1111.note_ignored(ignored, "/sdapi/v1/img2img")
        record = await self._run(job, request)
        images, texts = await self.front.call(_read_images, record.result["paths"])
        echo = {**data, "init_images": None, "mask": None}  # as A1111 answers: not the inputs again
        return web.json_response(a1111.txt2img_body(echo, record, images, texts, self.service.runner.model))

    async def progress(self, request: web.Request) -> web.Response:
        status = await self.front.call(self.service.status)
        current = self.front.watchers.current()
        if current is None:
            return web.json_response(a1111.progress_body(None, status["queue"], None, None, 0.0))
        record, step, latents = current
        preview = None
        if request.query.get("skip_current_image", "false").lower() != "true":
            url = await self.front.call(self.front.watchers.preview_url, latents)  # a decoder's: seconds
            preview = url.split(",", 1)[1] if url else None  # A1111 sends bare base64
        started = self.front.watchers.started.get(record.id)
        return web.json_response(a1111.progress_body(step, status["queue"], preview, started,
                                                     self.front.loop.time()))

    async def interrupt(self, request: web.Request) -> web.Response:
        """As A1111: the running job ends at its next step and answers with what it has drawn."""
        current = (await self.front.call(self.service.status))["current"]
        if current is not None:
            await self.front.call(self.service.interrupt, current["id"])
        return web.json_response({})

    async def samplers(self, request: web.Request) -> web.Response:
        from ...schedulers import NAMES
        return web.json_response(a1111.samplers(NAMES))

    async def sd_models(self, request: web.Request) -> web.Response:
        runner = self.service.runner
        return web.json_response(a1111.sd_models(runner.model, runner.precision))

    async def options(self, request: web.Request) -> web.Response:
        return web.json_response(a1111.options(self.service.runner.model))

    async def set_options(self, request: web.Request) -> web.Response:
        a1111.note_ignored(sorted(await self._object(request)), "/sdapi/v1/options (one model, no settings)")
        return web.json_response(None)

    # --- OpenAI ------------------------------------------------------------------------------------
    async def generations(self, request: web.Request) -> web.Response:
        data = await self._object(request)
        try:
            job, fmt = openai_images.to_job(data)
        except ValidationError as exc:
            raise self._error(400, str(exc), exc.field, request) from None
        record = await self._run(job, request)
        paths = record.result["paths"]
        if fmt == "b64_json":
            items = (await self.front.call(_read_images, paths))[0]
        else:
            token = f"?token={self.front.token}" if self.front.token else ""
            items = [f"{request.scheme}://{request.host}{self.front.image_url(p)}{token}" for p in paths]
        return web.json_response(openai_images.images_body(int(time.time()), record.job.prompt, items, fmt))
