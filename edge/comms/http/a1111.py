"""AUTOMATIC1111's ``/sdapi/v1`` shapes mapped onto the one job shape, and its answers built back.

This is the one place where the strict job shape is mapped rather than mirrored: A1111 clients
send dozens of fields by habit (``enable_hr``, ``styles``, ``restore_faces``, ...), and refusing
them would lock those clients out. Fields with a meaning here are renamed (``cfg_scale`` ->
``guidance``, ``sampler_name`` -> ``scheduler``, ``batch_size * n_iter`` -> ``count``); the rest are
ignored with a logged note. Values are passed on unchanged, so :func:`edge.jobs.parse_job` still
checks every one of them; its errors are renamed back to the field the client sent.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ...errors import ValidationError
from ...jobs import JobRecord

log = logging.getLogger(__name__)

# A1111 sampler names (and the scheduler names edge-imagegen uses, which some clients send) -> ours
SAMPLERS: dict[str, str] = {"Euler": "euler", "Euler a": "euler_a", "DDIM": "ddim", "LCM": "lcm",
                            "DPM++ 2M": "dpmpp_2m", "DPM++ 2M Karras": "dpmpp_2m_karras"}
RENAMED = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "cfg_scale": "guidance",
           "seed": "seed", "width": "width", "height": "height"}
COUNTED = ("batch_size", "n_iter")
# img2img: init_images (a list of one), mask, and these; resize_mode by A1111's numbers
EDIT_RENAMED = {"mask": "mask", "denoising_strength": "strength", "mask_blur": "mask_blur",
                "image_cfg_scale": "image_guidance"}
RESIZE_MODES = {0: "just_resize", 1: "crop_and_resize", 2: "resize_and_fill"}
BACK = ({ours: theirs for theirs, ours in (RENAMED | EDIT_RENAMED).items()}
        | {"scheduler": "sampler_name", "count": "batch_size", "init_image": "init_images"})
# A1111's newer "scheduler" field (the noise schedule); only Karras changes anything here
SCHEDULE_FIELD = "scheduler"


def to_job(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The job fields for a txt2img request, and the names of the fields that were ignored."""
    job: dict[str, Any] = {ours: data[theirs] for theirs, ours in RENAMED.items() if data.get(theirs) is not None}
    if job.get("negative_prompt") == "":
        del job["negative_prompt"]  # A1111 clients send "" for "none given": the configured default applies
    batch, n_iter = data.get("batch_size", 1), data.get("n_iter", 1)
    whole = [isinstance(v, int) and not isinstance(v, bool) for v in (batch, n_iter)]
    job["count"] = batch * n_iter if all(whole) else (n_iter if whole[0] else batch)  # parse_job refuses it
    sampler = data.get("sampler_name") or data.get("sampler_index")
    if sampler is not None:
        name = SAMPLERS.get(sampler, sampler) if isinstance(sampler, str) else sampler
        if name == "dpmpp_2m" and str(data.get(SCHEDULE_FIELD, "")).lower() == "karras":
            name = "dpmpp_2m_karras"
        job["scheduler"] = name
    used = set(RENAMED) | set(COUNTED) | {"sampler_name", "sampler_index", SCHEDULE_FIELD}
    ignored = sorted(k for k in data if k not in used)
    return job, ignored


def to_edit_job(data: dict[str, Any], instruct: bool) -> tuple[dict[str, Any], list[str]]:
    """The job fields for an img2img request (image to image, inpainting), and the ignored fields.

    A1111 clients send ``image_cfg_scale`` (and ``denoising_strength``) whatever the model: they
    are passed on for an InstructPix2Pix model (``instruct``) and ignored with the rest otherwise.
    """
    job, ignored = to_job(data)
    images = data.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise ValidationError("init_images", "must be a list of one base64 image (edge-imagegen edits one at a time)")
    if data.get("inpainting_mask_invert"):
        raise ValidationError("inpainting_mask_invert", "is not supported: send the mask inverted (white = repaint)")
    job["init_image"] = images[0]
    unused = ("denoising_strength",) if instruct else ("image_cfg_scale",)
    job.update({ours: data[theirs] for theirs, ours in EDIT_RENAMED.items()
                if data.get(theirs) is not None and theirs not in unused})
    if data.get("resize_mode") is not None:
        mode = data["resize_mode"]
        job["resize_mode"] = RESIZE_MODES.get(mode, mode) if isinstance(mode, int) else mode  # parse_job checks
    used = {"init_images", "inpainting_mask_invert", "resize_mode", *EDIT_RENAMED} - set(unused)
    return job, [k for k in ignored if k not in used]


def rename_error(body: dict[str, Any]) -> dict[str, Any]:
    """An error body from the service, with the field named as the A1111 client sent it."""
    field = body.get("field")
    if field in BACK and BACK[field] != field:
        body = {**body, "field": BACK[field], "error": f"{BACK[field]} ({field}){body['error'][len(field):]}"
                if body.get("error", "").startswith(field) else body["error"]}
    return body


def txt2img_body(request: dict[str, Any], record: JobRecord, images: list[str], infotexts: list[str],
                 model: str) -> dict[str, Any]:
    """``{"images": [base64 PNG], "parameters": the request, "info": a JSON string}`` as A1111 answers."""
    job = record.job
    seeds = [job.seed + k for k in range(job.count)]
    info = {"prompt": job.prompt, "all_prompts": [job.prompt] * job.count, "negative_prompt": job.negative_prompt,
            "all_negative_prompts": [job.negative_prompt] * job.count, "seed": job.seed, "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * job.count, "subseed_strength": 0, "width": None, "height": None,
            "sampler_name": None, "cfg_scale": job.guidance, "steps": job.steps, "batch_size": job.count,
            "sd_model_name": model, "job_id": record.id, "infotexts": infotexts}
    if infotexts:  # the settings line of the first image: sampler and size as they were used
        settings = dict(item.split(": ", 1) for item in infotexts[0].split("\n")[-1].split(", ") if ": " in item)
        width, _, height = settings.get("Size", "").partition("x")
        info.update(sampler_name=settings.get("Sampler"), width=int(width) if width.isdigit() else None,
                    height=int(height) if height.isdigit() else None)
    return {"images": images, "parameters": request, "info": json.dumps(info)}


def progress_body(step: dict[str, Any] | None, queue: int, preview: str | None, started: float | None,
                  now: float) -> dict[str, Any]:
    """``GET /sdapi/v1/progress``: the running job's share done, the ETA, its step and a preview."""
    if step is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": _state(0, 0, 0, 0, queue), "current_image": None,
                "textinfo": None}
    total = step["count"] * step["steps"]
    done = (step["image"] - 1) * step["steps"] + step["step"]
    progress = done / total if total else 0.0
    elapsed = now - started if started else 0.0
    eta = elapsed / progress - elapsed if progress > 0 else 0.0
    return {"progress": round(progress, 4), "eta_relative": round(max(eta, 0.0), 3),
            "state": _state(step["step"], step["steps"], step["image"] - 1, step["count"], queue),
            "current_image": preview, "textinfo": None}


def _state(step: int, steps: int, image: int, count: int, queue: int) -> dict[str, Any]:
    return {"skipped": False, "interrupted": False, "job": "", "job_count": queue, "job_timestamp": "",
            "job_no": image, "sampling_step": step, "sampling_steps": steps, "image_no": image, "image_count": count}


def samplers(names: tuple[str, ...]) -> list[dict[str, Any]]:
    labels = {ours: theirs for theirs, ours in SAMPLERS.items()}
    return [{"name": labels.get(n, n), "aliases": [n], "options": {}} for n in names]


def sd_models(model: str, precision: str) -> list[dict[str, Any]]:
    return [{"title": model, "model_name": model, "hash": None, "sha256": None, "filename": model,
             "config": None, "precision": precision}]


def options(model: str) -> dict[str, Any]:
    return {"sd_model_checkpoint": model, "samples_format": "png", "samples_save": True}


def note_ignored(ignored: list[str], where: str) -> None:
    if ignored:
        log.info("%s: ignored fields edge-imagegen has no use for: %s", where, ", ".join(ignored))
