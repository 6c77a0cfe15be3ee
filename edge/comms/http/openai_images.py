"""OpenAI's ``POST /v1/images/generations`` mapped onto the one job shape, and its answer built back.

Requests: ``prompt``, ``n`` (-> ``count``), ``size`` ``"WxH"`` (-> ``width``, ``height``),
``response_format`` ``b64_json`` (default) or ``url``. ``model``, ``quality``, ``style`` and ``user``
are accepted and ignored (the device has one model). Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``, ``param`` naming the field.
"""

from __future__ import annotations

import re
from typing import Any

from ...errors import ValidationError

FORMATS = ("b64_json", "url")
IGNORED = ("model", "quality", "style", "user", "background", "moderation", "output_format")
KNOWN = ("prompt", "n", "size", "response_format") + IGNORED
BACK = {"count": "n", "width": "size", "height": "size"}  # job fields as this API names them
SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def to_job(data: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The job fields and the response format; ValidationError for what only this API defines."""
    unknown = sorted(set(data) - set(KNOWN))
    if unknown:
        raise ValidationError(unknown[0], f"is not a field of this API; known fields: {', '.join(KNOWN)}")
    job: dict[str, Any] = {"prompt": data.get("prompt")} if "prompt" in data else {}
    if data.get("n") is not None:
        job["count"] = data["n"]
    size = data.get("size")
    if size is not None and size != "auto":
        match = SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise ValidationError("size", f"must be \"WIDTHxHEIGHT\" like \"512x512\", got {size!r}")
        job["width"], job["height"] = int(match[1]), int(match[2])
    fmt = data.get("response_format") or "b64_json"
    if fmt not in FORMATS:
        raise ValidationError("response_format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return job, fmt


def error(message: str, field: str | None, kind: str = "invalid_request_error") -> dict[str, Any]:
    if field in BACK:
        message, field = f"{BACK[field]}: {message}", BACK[field]  # "n: count: must be between 1 and 8"
    return {"error": {"message": message, "type": kind, "param": field, "code": None}, "field": field}


def images_body(created: int, prompt: str, items: list[str], fmt: str) -> dict[str, Any]:
    """``items``: base64 PNGs (b64_json) or absolute URLs (url)."""
    return {"created": created, "data": [{fmt: item, "revised_prompt": prompt} for item in items]}
