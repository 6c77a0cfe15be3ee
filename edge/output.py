"""Images on disk: atomic PNG writes with their parameters embedded, plus a JSON sidecar.

Layout: ``<out>/<YYYY-MM-DD>/<YYYYmmddTHHMMSSZ>_<job id>_<seed>.png`` (UTC). The ``parameters``
text chunk follows the AUTOMATIC1111 convention, so existing tools (A1111's "PNG Info", ComfyUI,
exiftool) read the prompt, seed and settings back.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from . import __version__
from .errors import OutputError
from .images import b64decode, sha256
from .jobs import Job

if TYPE_CHECKING:
    from .pipeline import Result

DPI = 300


@dataclass(frozen=True)
class ImageMeta:
    """What goes into the PNG and its sidecar besides the pixels."""

    job: Job
    seed: int
    width: int
    height: int
    sampler: str
    model: str
    extra: dict[str, Any]  # timings, precision, provider, tokens dropped: sidecar only
    settings: dict[str, str] = field(default_factory=dict)  # edit jobs: "Denoising strength", "Mask blur", ...
    lora_hashes: dict[str, str] = field(default_factory=dict)  # LoRA name -> sha256 of its file


# AUTOMATIC1111's own pattern for the settings line: values may be quoted and hold ", "
SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parameters_text(meta: ImageMeta) -> str:
    """The AUTOMATIC1111 ``parameters`` string: prompt, optional negative prompt, settings.

    LoRAs are written the way A1111 writes them: ``<lora:name:strength>`` in the prompt line and
    ``Lora hashes: "name: <first 12 hex digits of the file's sha256>"`` among the settings.
    """
    job = meta.job
    lines = [" ".join([job.prompt, *(f"<lora:{r.name}:{r.strength:g}>" for r in job.loras)])]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    settings = (f"Steps: {job.steps}, Sampler: {meta.sampler}, CFG scale: {job.guidance:g}, "
                f"Seed: {meta.seed}, Size: {meta.width}x{meta.height}, Model: {meta.model}"
                + "".join(f", {key}: {value}" for key, value in meta.settings.items()))
    if job.loras:
        hashes = ", ".join(f"{r.name}: {meta.lora_hashes.get(r.name, '')[:12]}" for r in job.loras)
        settings += f', Lora hashes: "{hashes}"'
    lines.append(settings)
    return "\n".join(lines)


def request_record(job: Job) -> dict[str, Any]:
    """The job for the sidecar: input images by their sha256, not their bytes."""
    record = job.to_dict()
    for name in ("init_image", "mask"):
        if record.get(name) is not None:
            record[name] = "sha256:" + sha256(b64decode(name, record[name]))
    return record


def parse_parameters(text: str) -> dict[str, str]:
    """Read a ``parameters`` string back (prompt, negative prompt and the settings line)."""
    lines = text.split("\n")
    settings = {k: v[1:-1] if v.startswith('"') else v for k, v in SETTING.findall(lines[-1])}
    negative = [l[len("Negative prompt: "):] for l in lines[1:-1] if l.startswith("Negative prompt: ")]
    return {"prompt": lines[0], "negative_prompt": negative[0] if negative else "", **settings}


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either nothing or all of it, even after power loss.

    Temp file in the same folder (rename is only atomic within a filesystem), fsync the file,
    rename over the target, then fsync the folder so the rename itself is durable.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: a viewer running as another user could not read it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only set, and that races threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _write_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"disk: no space left on the device for {path.parent}; free some space or lower "
                           f"output.max_bytes")
    return OutputError(f"disk: could not write {path} ({exc.strerror})")


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", parameters)  # iTXt: UTF-8, so non-ASCII prompts survive
    info.add(b"sRGB", b"\x00")  # rendering intent: perceptual
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, dpi=(DPI, DPI))
    return buf.getvalue()


def image_path(out_dir: Path, job_id: str, seed: int, when: datetime) -> Path:
    return out_dir / when.strftime("%Y-%m-%d") / f"{when.strftime('%Y%m%dT%H%M%SZ')}_{job_id}_{seed}.png"


def sidecar_bytes(meta: ImageMeta, path: Path, job_id: str, when: datetime) -> bytes:
    loras = [{"name": r.name, "strength": r.strength, "sha256": meta.lora_hashes.get(r.name)} for r in meta.job.loras]
    record = {"image": path.name, "job_id": job_id, "request": request_record(meta.job), "seed": meta.seed,
              "loras": loras, "width": meta.width, "height": meta.height, "sampler": meta.sampler, "model": meta.model,
              "parameters": parameters_text(meta), "created": when.isoformat(), **meta.extra}
    return (json.dumps(record, indent=2) + "\n").encode()


def save_image(image: Image.Image, meta: ImageMeta, out_dir: Path, job_id: str,
               when: datetime | None = None, sidecar: bool = True) -> Path:
    """Write one PNG (then its sidecar ``.json``) atomically; returns the PNG's path."""
    when = when or datetime.now(timezone.utc)
    path = image_path(out_dir, job_id, meta.seed, when)
    _write_set([(path, png_bytes(image, parameters_text(meta)), sidecar_bytes(meta, path, job_id, when) if sidecar
                 else None)])
    return path


def set_files(paths: list[Path], sidecar: bool) -> list[Path]:
    """Every file of an image set: the PNGs, then their sidecars (the order they are written in)."""
    return paths + ([p.with_suffix(".json") for p in paths] if sidecar else [])


def _write_set(items: list[tuple[Path, bytes, bytes | None]]) -> None:
    """PNGs first, sidecars last, so a complete set of sidecars means every PNG is there; on any
    failure nothing of the set is left (a partial set would pass for a finished job's output, and a
    sidecar without its PNG for a lost image)."""
    written: list[Path] = []
    try:
        for path, png, _ in items:
            written.append(path)
            atomic_write(path, png)
        for path, _, sidecar in items:
            if sidecar is not None:
                written.append(path.with_suffix(".json"))
                atomic_write(path.with_suffix(".json"), sidecar)
    except BaseException:
        for f in written:
            with contextlib.suppress(OSError):
                f.unlink(missing_ok=True)
        raise


def save_result(result: Result, out_dir: Path, job_id: str, *, model: str, provider: str, precision: str,
                sidecar: bool = True, when: datetime | None = None,
                extra: dict[str, Any] | None = None) -> list[Path]:
    """Write every image of a pipeline result; returns their paths in image order.

    ``extra``: more sidecar fields (the daemon's ``submitted_by``)."""
    when = when or datetime.now(timezone.utc)
    extra = {"scheduler": result.scheduler, "timings": result.timings, "tokens_dropped": result.tokens_dropped,
             "precision": precision, "provider": provider, "version": __version__, **(extra or {})}
    if result.warnings:
        extra["warnings"] = result.warnings
    items = []
    for img in result.images:
        meta = ImageMeta(job=result.job, seed=img.seed, width=result.width, height=result.height,
                         sampler=result.sampler, model=model, extra=extra, settings=result.parameters,
                         lora_hashes=result.lora_hashes)
        path = image_path(out_dir, job_id, img.seed, when)
        # encoded up front: a prompt PNG or JSON cannot hold fails here, before any file is written
        items.append((path, png_bytes(img.image, parameters_text(meta)),
                      sidecar_bytes(meta, path, job_id, when) if sidecar else None))
    _write_set(items)
    return [path for path, _, _ in items]
