"""The AUTOMATIC1111 and OpenAI field mappings and the http config's checks (no server needed)."""

import json

import pytest

from edge.comms.http import a1111, openai_images
from edge.config import load_config
from edge.errors import ConfigError, ValidationError
from edge.jobs import parse_job


def test_a1111_fields_map_onto_the_job_and_habitual_extras_are_ignored():
    job, ignored = a1111.to_job({"prompt": "a gear", "negative_prompt": "", "steps": 12, "cfg_scale": 5,
                                 "seed": 9, "width": 128, "height": 128, "batch_size": 2, "n_iter": 3,
                                 "sampler_name": "DPM++ 2M", "scheduler": "Karras", "enable_hr": False,
                                 "styles": [], "restore_faces": False})
    assert job == {"prompt": "a gear", "steps": 12, "guidance": 5, "seed": 9, "width": 128, "height": 128,
                   "count": 6, "scheduler": "dpmpp_2m_karras"}
    assert ignored == ["enable_hr", "restore_faces", "styles"]
    assert parse_job(job).count == 6  # the one validator takes it as it is


def test_a1111_errors_name_the_field_the_client_sent():
    job, _ = a1111.to_job({"prompt": "a gear", "cfg_scale": "high"})
    with pytest.raises(ValidationError) as exc:
        parse_job(job)
    body = a1111.rename_error({"status": "error", "error": str(exc.value), "field": exc.value.field})
    assert body["field"] == "cfg_scale" and body["error"].startswith("cfg_scale (guidance): must be a number")
    job, _ = a1111.to_job({"prompt": "a gear", "batch_size": "two"})
    with pytest.raises(ValidationError, match="count: must be an integer"):
        parse_job(job)


def test_a1111_info_is_a_json_string_with_the_seeds_and_infotexts():
    from edge.jobs import Job, JobRecord
    record = JobRecord("j1", Job(prompt="a gear", seed=5, count=2, steps=4), "done", 1, "http", {}, 0.0, 0.0, 1.0,
                       1, None, {"paths": []}, None, False)
    texts = ["a gear\nSteps: 4, Sampler: Euler, CFG scale: 7.5, Seed: 5, Size: 128x128, Model: m",
             "a gear\nSteps: 4, Sampler: Euler, CFG scale: 7.5, Seed: 6, Size: 128x128, Model: m"]
    body = a1111.txt2img_body({"prompt": "a gear"}, record, ["b64", "b64"], texts, "m")
    info = json.loads(body["info"])
    assert info["all_seeds"] == [5, 6] and info["infotexts"] == texts
    assert (info["width"], info["height"], info["sampler_name"]) == (128, 128, "Euler")
    assert a1111.progress_body({"image": 2, "count": 2, "step": 5, "steps": 10}, 0, None, 10.0, 13.0)["progress"] == 0.75


def test_openai_size_n_and_format():
    assert openai_images.to_job({"prompt": "a nut", "n": 2, "size": "128x128", "model": "dall-e-3"}) == (
        {"prompt": "a nut", "count": 2, "width": 128, "height": 128}, "b64_json")
    for data, field in (({"prompt": "a", "size": "128"}, "size"), ({"prompt": "a", "response_format": "jpg"},
                        "response_format"), ({"prompt": "a", "seed": 1}, "seed")):
        with pytest.raises(ValidationError) as exc:
            openai_images.to_job(data)
        assert exc.value.field == field
    assert openai_images.error("count: must be between 1 and 8, got 99", "count")["error"]["param"] == "n"


def test_http_binds_off_loopback_only_with_a_token_file():
    for host in ("0.0.0.0", "192.168.1.20", "kiosk.local", "::"):
        with pytest.raises(ConfigError, match=r"http.token_file: required when http.host"):
            load_config(overrides={"http.host": host})
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert load_config(overrides={"http.host": host}).http.host == host
    assert load_config(overrides={"http.host": "0.0.0.0", "http.token_file": "/run/credentials/token"})
    assert load_config(overrides={"http.host": "0.0.0.0", "http.enabled": False})  # not listening: no token needed
    with pytest.raises(ConfigError, match="http.port: must be at most 65535"):
        load_config(overrides={"http.port": 70000})


def test_a1111_img2img_maps_images_strength_mask_and_resize_mode():
    request = {"prompt": "a gear", "init_images": ["aW1n"], "mask": "bWFzaw==", "denoising_strength": 0.4,
               "mask_blur": 6, "resize_mode": 1, "image_cfg_scale": 1.5, "inpainting_fill": 1,
               "inpainting_mask_invert": 0}
    job, ignored = a1111.to_edit_job(request, instruct=False)
    assert job == {"prompt": "a gear", "count": 1, "init_image": "aW1n", "mask": "bWFzaw==", "strength": 0.4,
                   "mask_blur": 6, "resize_mode": "crop_and_resize"}
    assert ignored == ["image_cfg_scale", "inpainting_fill"]  # sent by habit to every model: not refused
    job, ignored = a1111.to_edit_job({**request, "mask": None}, instruct=True)
    assert job["image_guidance"] == 1.5 and "strength" not in job and "denoising_strength" in ignored
    for bad, field in (({"init_images": []}, "init_images"),
                       ({"inpainting_mask_invert": 1}, "inpainting_mask_invert")):
        with pytest.raises(ValidationError) as exc:
            a1111.to_edit_job({**request, **bad}, instruct=False)
        assert exc.value.field == field
    body = a1111.rename_error({"status": "error", "error": "strength: must be between 0 and 1, got 2",
                               "field": "strength"})
    assert body["field"] == "denoising_strength" and body["error"].startswith("denoising_strength (strength)")
