"""The HTTP front end against a real daemon on a free loopback port, driven by independent clients:
webuiapi (AUTOMATIC1111's API), openai (OpenAI's), and the standard library's http.client."""

import base64
import io
import json
import signal
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
import webuiapi
import yaml
from openai import OpenAI
from PIL import Image

from daemon_harness import Daemon, TIMEOUT_SCALE, daemons, images_by_job, wait_until  # noqa: F401
from edge.output import parse_parameters
from http_client import Http, png

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT = 3.0  # seconds: short, so that the 504 and slow-client tests are quick
LONG = {"prompt": "a long job", "steps": 150, "count": 8}  # ~25 s on the embedded model


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("http"), "h1",
               config={"http": {"request_timeout": REQUEST_TIMEOUT * TIMEOUT_SCALE, "max_body_bytes": 32768},
                       "policy": {"blocked_words": ["forbidden"]}})
    d.start()
    yield d
    d.cleanup()


@pytest.fixture
def api(daemon):
    client = Http(daemon.url)
    yield client
    for entry in client.get("/api/jobs?limit=50")[1]["jobs"]:  # leave no job running for the next test
        if entry["state"] in ("queued", "running"):
            client.request("DELETE", f"/api/jobs/{entry['id']}")
    wait_until(lambda: client.get("/api/status")[1]["state"] == "idle", 30, "the worker to be idle")


def seed_of(image: Image.Image) -> int:
    return int(parse_parameters(image.info["parameters"])["Seed"])


def assert_healthy(api):
    """The daemon is up and its queue still runs jobs."""
    status, body, _ = api.post("/api/jobs", {"prompt": "still working", "steps": 2})
    assert status == 202, body
    assert api.wait_state(body["id"], ("done",))["status"] == "ok"


# --- the compatible APIs, by their own client libraries ---------------------------------------------------
def test_a1111_txt2img_by_webuiapi_gives_pngs_whose_parameters_hold_the_seeds(daemon, api):
    client = webuiapi.WebUIApi(host="127.0.0.1", port=daemon.http_port)
    result = client.txt2img(prompt="a red gear", negative_prompt="blur", seed=4242, steps=6, cfg_scale=6.5,
                            width=128, height=128, batch_size=2, sampler_name="Euler")
    assert len(result.images) == 2
    assert [seed_of(im) for im in result.images] == [4242, 4243]
    assert all(im.size == (128, 128) and im.format == "PNG" for im in result.images)
    params = parse_parameters(result.images[0].info["parameters"])
    assert params["prompt"] == "a red gear" and params["negative_prompt"] == "blur"
    assert params["Sampler"] == "Euler" and params["CFG scale"] == "6.5" and params["Steps"] == "6"
    assert result.info["all_seeds"] == [4242, 4243] and result.info["seed"] == 4242
    assert len(result.info["infotexts"]) == 2 and "Seed: 4243" in result.info["infotexts"][1]
    assert result.parameters["prompt"] == "a red gear"  # A1111 echoes the request
    job_id = result.info["job_id"]
    entry = api.get(f"/api/jobs/{job_id}")[1]
    assert entry["job"]["source"] == "http" and entry["job"]["job"]["guidance"] == 6.5
    assert client.util_get_current_model() == "knolling-tiny"
    assert "Euler a" in client.util_get_sampler_names()
    assert client.util_get_model_names() == ["knolling-tiny"]
    noted = [line for line in daemon.log().splitlines() if "ignored fields edge-imagegen has no use for" in line]
    assert noted and "enable_hr" in noted[-1] and "restore_faces" in noted[-1]  # noted, not refused


def test_a1111_img2img_by_webuiapi_inpaints_and_keeps_the_rest(daemon, api):
    from PIL import ImageDraw, ImageFilter
    client = webuiapi.WebUIApi(host="127.0.0.1", port=daemon.http_port)
    source = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(source).ellipse((20, 20, 60, 60), fill=(220, 30, 30))
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((70, 70, 110, 110), fill=255)
    result = client.img2img(images=[source], mask_image=mask, prompt="a yellow nut", seed=7, steps=8,
                            denoising_strength=1.0, mask_blur=2, width=128, height=128)  # and image_cfg_scale, ...
    (out,) = result.images
    params = parse_parameters(out.info["parameters"])
    assert params["Denoising strength"] == "1" and params["Mask blur"] == "2" and seed_of(out) == 7
    outside = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * (3 * 2 + 2) + 1))) == 0
    assert np.array_equal(np.asarray(out.convert("RGB"))[outside], np.asarray(source)[outside])
    assert result.parameters["init_images"] is None  # not echoed back
    entry = api.get(f"/api/jobs/{result.info['job_id']}")[1]
    assert entry["job"]["job"]["init_image"].startswith("sha256:")  # the journal holds a reference


def test_a1111_progress_shows_the_step_and_a_preview_and_interrupt_answers_with_what_is_drawn(daemon, api):
    """As AUTOMATIC1111: /sdapi/v1/interrupt ends the running txt2img at its next step, and the waiting
    call answers 200 with the image drawn so far (its denoised estimate), not an error."""
    client = webuiapi.WebUIApi(host="127.0.0.1", port=daemon.http_port)
    answer = {}
    waiting = threading.Thread(target=lambda: answer.update(result=client.txt2img(
        prompt="knolling of 3 red gears", seed=7, steps=150, batch_size=8, width=128, height=128)))
    waiting.start()
    progress = wait_until(lambda: (p := client.get_progress())["state"]["sampling_step"] > 2 and p, 30,
                          "a step in /sdapi/v1/progress")
    assert progress["state"]["sampling_steps"] == 150 and 0 < progress["progress"] < 1
    assert progress["eta_relative"] > 0
    preview = png(base64.b64decode(progress["current_image"]))
    assert preview.size == (16, 16)  # one pixel per latent: 128 / 8
    assert api.get("/sdapi/v1/progress?skip_current_image=true")[1]["current_image"] is None
    assert client.interrupt() == {}
    waiting.join(60)
    result = answer["result"]
    assert len(result.images) == 1 and seed_of(result.images[0]) == 7  # the first image, the other 7 not made
    drawn = np.asarray(result.images[0].convert("L"))
    assert (drawn > 240).mean() > 0.5 and (drawn < 200).any()  # a picture on white, not noise
    job = api.get(f"/api/jobs/{result.info['job_id']}")[1]
    assert job["state"] == "done" and job["seeds"] == [7] and len(job["paths"]) == 1
    assert any(w.startswith("interrupted: image 1 of 8 ends at step") for w in job["warnings"]), job["warnings"]
    history = api.get("/api/jobs?limit=5")[1]["jobs"]
    assert next(e for e in history if e["id"] == job["id"])["seeds"] == [7]  # the history shows what was made
    assert client.interrupt() == {}  # nothing running: nothing to do
    assert_healthy(api)


def test_openai_images_by_the_openai_client_b64_json_and_url(daemon, api):
    client = OpenAI(base_url=f"{daemon.url}/v1", api_key="not-needed-on-loopback", max_retries=0)
    result = client.images.generate(model="any", prompt="a blue nut", n=2, size="128x128",
                                    response_format="b64_json")
    images = [png(base64.b64decode(item.b64_json)) for item in result.data]
    assert len(images) == 2 and images[0].size == (128, 128)
    seeds = [seed_of(im) for im in images]
    assert seeds[1] == seeds[0] + 1
    newest = api.get("/api/jobs?limit=1")[1]["jobs"][0]
    assert newest["seeds"] == seeds and newest["prompt"] == "a blue nut"
    result = client.images.generate(prompt="a green bolt", size="128x128", response_format="url")
    with urllib.request.urlopen(result.data[0].url, timeout=30) as resp:
        image = png(resp.read())
    assert api.get("/api/jobs?limit=1")[1]["jobs"][0]["seeds"] == [seed_of(image)]


# --- the native API -------------------------------------------------------------------------------------------
def test_sse_events_arrive_in_order_with_previews_then_the_result(api):
    status, first, _ = api.post("/api/jobs", {"prompt": "ahead", "steps": 30})
    status, body, _ = api.post("/api/jobs", {"id": "sse-1", "prompt": "a brass gear", "steps": 8, "seed": 7})
    assert status == 202 and body["position"] in (0, 1)  # 0 once "ahead" is running
    events = list(api.events("sse-1"))
    names = [name for name, _ in events]
    assert names[0] == "queued" and events[0][1]["position"] >= 0
    start = names.index("started")
    assert set(names[:start]) == {"queued"}
    steps = [body["step"] for name, body in events if name == "progress"]
    assert steps == list(range(1, 9)) and names[start + 1:-1] == ["progress"] * 8  # every step, in order
    previews = [body["preview"] for name, body in events if name == "progress"]
    assert all(p.startswith("data:image/png;base64,") for p in previews)  # http.preview_every: 1
    png(base64.b64decode(previews[-1].split(",", 1)[1]))
    name, result = events[-1]
    assert name == "result" and result["status"] == "ok" and result["seeds"] == [7]
    status, data, headers = api.get(result["images"][0])
    assert status == 200 and headers["Content-Type"] == "image/png" and seed_of(png(data)) == 7
    status, data, _ = api.get(result["images"][0] + "?download=1")
    assert status == 200
    # a stream opened after the end gets the result at once
    assert [n for n, _ in api.events("sse-1")] == ["result"]


def test_duplicate_id_returns_that_job_and_history_pages_newest_first(api):
    ids = [f"hist-{i}" for i in range(3)]
    for job_id in ids:
        assert api.post("/api/jobs", {"id": job_id, "prompt": "a nut", "steps": 2})[0] == 202
    status, again, _ = api.post("/api/jobs", {"id": ids[0], "prompt": "something else"})
    assert status == 200 and again["id"] == ids[0]
    api.wait_state(ids[-1], ("done",))
    page = api.get("/api/jobs?limit=2")[1]
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2] and page["next"] == ids[1]
    rest = api.get(f"/api/jobs?limit=2&before={page['next']}")[1]
    assert rest["jobs"][0]["id"] == ids[0] and rest["jobs"][0]["images"][0].startswith("/images/")
    assert api.get("/api/status")[1]["model"] == "knolling-tiny"
    assert api.get("/healthz")[1] == {"status": "ok"}


def test_cancel_queued_running_finished_and_unknown(api):
    running = api.post("/api/jobs", {"id": "c-run", **LONG})[1]
    queued = api.post("/api/jobs", {"id": "c-queued", "prompt": "never runs"})[1]
    assert queued["position"] in (0, 1)
    status, body, _ = api.request("DELETE", "/api/jobs/c-queued")
    assert status == 200 and body["cancelled"] is True
    api.wait_state("c-run", ("running",))
    status, body, _ = api.request("DELETE", "/api/jobs/c-run")
    assert status == 200 and body["cancelling"] is True
    assert api.wait_state(running["id"], ("cancelled",))["state"] == "cancelled"
    status, body, _ = api.request("DELETE", "/api/jobs/c-queued")
    assert status == 409 and body["field"] == "id" and "already cancelled" in body["error"]
    status, body, _ = api.request("DELETE", "/api/jobs/nope")
    assert status == 404 and body["field"] == "id"
    assert api.get("/api/jobs/nope")[0] == 404


def test_a_synchronous_call_past_request_timeout_answers_504_and_the_job_goes_on(api):
    t0 = time.monotonic()
    status, body, _ = api.post("/sdapi/v1/txt2img", {"prompt": "slow", "steps": 150, "batch_size": 8,
                                                      "width": 128, "height": 128})
    assert status == 504 and body["field"] == "request_timeout" and "http.request_timeout" in body["error"]
    assert time.monotonic() - t0 >= REQUEST_TIMEOUT
    state = api.get(f"/api/jobs/{body['id']}")[1]
    assert state["job"]["state"] == "running"  # it goes on, and the history has it
    assert body["id"] in [j["id"] for j in api.get("/api/jobs?limit=5")[1]["jobs"]]


# --- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, raw, status, field, words", [
    ("/api/jobs", b'{"prompt": "a gear", ', 400, "payload", "not valid JSON"),
    ("/api/jobs", b'["a gear"]', 400, "payload", "must be a JSON object"),
    ("/api/jobs", b'{"prompt": "a gear", "steps": "ten"}', 400, "steps", "must be an integer"),
    ("/api/jobs", b'{"prompt": "a gear", "steps": 151}', 400, "steps", "between 1 and 150"),
    ("/api/jobs", b'{"prompt": "a gear", "step": 10}', 400, "step", "is not a job field"),
    ("/api/jobs", b'{"prompt": "a gear", "width": 256, "height": 256}', 400, "width", "fixed size of 128x128"),
    ("/api/jobs", b'{"prompt": "' + b"x" * 20000 + b'"}', 413, "payload", "the limit is 16384"),
    ("/api/jobs", b'{"prompt": "' + b"x" * 40000 + b'"}', 413, "payload", "the limit is 32768"),
    ("/sdapi/v1/txt2img", b'{"prompt": "a gear", "cfg_scale": "high"}', 400, "cfg_scale", "must be a number"),
    ("/sdapi/v1/txt2img", b'{"prompt": "a gear", "sampler_name": "PLMS"}', 400, "sampler_name", "'PLMS'"),
    ("/sdapi/v1/txt2img", b"{", 400, "payload", "not valid JSON"),
    ("/api/jobs", b'{"prompt": "a forbidden gear"}', 400, "prompt", "rejected: policy"),
    ("/sdapi/v1/txt2img", b'{"prompt": "a forbidden gear"}', 400, "prompt", "rejected: policy"),
    ("/v1/images/generations", b'{"prompt": "a forbidden gear"}', 400, "prompt", "rejected: policy"),
    ("/v1/images/generations", b'{"prompt": "a gear", "size": "big"}', 400, "size", "WIDTHxHEIGHT"),
    ("/v1/images/generations", b'{"prompt": "a gear", "n": 99}', 400, "n", "between 1 and 8"),
])
def test_bad_requests_get_the_status_and_an_error_naming_the_field(api, path, raw, status, field, words):
    got, body, _ = api.post(path, raw=raw, headers={"Content-Type": "application/json"})
    assert got == status, body
    message = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert body["field"] == field and words in message, body
    assert_healthy(api)


@pytest.mark.parametrize("path", ["/images/../jobs.sqlite3", "/images/%2e%2e/jobs.sqlite3",
                                  "/images/%2e%2e%2f%2e%2e%2fconfig.yaml", "/images//etc/passwd",
                                  "/images/2026-01-01/none.png", "/images/..%2f..%2fdaemon.log"])
def test_images_outside_the_output_folder_are_404(api, path):
    status, body, _ = api.get(path)
    assert status == 404 and body["status"] == "error", (path, body)


def test_a_slow_client_gets_408_or_is_dropped_and_others_are_served(daemon, api):
    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=30) as slow, \
            socket.create_connection(("127.0.0.1", daemon.http_port), timeout=30) as stuck:
        slow.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        stuck.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        assert_healthy(api)  # meanwhile everyone else is served
        t0 = time.monotonic()
        reply = slow.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408"), reply
        assert '"field": "payload"' in reply and "http.request_timeout" in reply
        assert time.monotonic() - t0 < REQUEST_TIMEOUT * TIMEOUT_SCALE + 5
        assert stuck.recv(4096) == b""  # headers never finished: dropped after http.request_timeout
        assert time.monotonic() - t0 < REQUEST_TIMEOUT * TIMEOUT_SCALE + 5
    assert daemon.alive()
    assert_healthy(api)


# --- durability and the token ---------------------------------------------------------------------------------
def test_a_job_submitted_over_http_survives_kill_9(daemons):
    d = daemons("k-http").start()
    api = Http(d.url)
    assert api.post("/api/jobs", {"id": "h-kill", "prompt": "a red gear", "steps": 60, "count": 2, "seed": 5})[0] == 202
    for name, body in api.events("h-kill"):
        if name == "progress" and 0 < body["step"] < body["steps"]:
            break
    d.kill()
    assert d.jobs()["h-kill"]["state"] == "running"
    d.start()
    done = Http(d.url).wait_state("h-kill", ("done",))
    assert done["job"]["attempts"] == 2 and done["seeds"] == [5, 6]
    assert len(images_by_job(d.images())["h-kill"]) == 2


def test_a_non_loopback_style_bind_needs_the_token(daemons, tmp_path):
    token = "s3cret-token-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    d = daemons("tok", config={"http": {"host": "127.0.0.2", "token_file": str(token_file)}}).start()
    anonymous, wrong, right = Http(d.url), Http(d.url, token="wrong-token-0123456789"), Http(d.url, token=token)
    for client in (anonymous, wrong):
        for method, path in (("GET", "/api/status"), ("POST", "/api/jobs"), ("GET", "/sdapi/v1/progress"),
                             ("GET", "/api/jobs/x/events"), ("POST", "/v1/images/generations")):
            status, body, headers = client.request(method, path, body={"prompt": "a gear"})
            assert status == 401 and body["field"] == "token", (method, path, body)
            assert headers["WWW-Authenticate"].startswith("Bearer")
    assert anonymous.get("/healthz")[0] == 200 and anonymous.get("/")[0] == 200  # the page asks for the token
    status, body, _ = right.post("/api/jobs", {"prompt": "a gear", "steps": 2})
    assert status == 202
    result = right.wait_state(body["id"], ("done",))
    assert anonymous.get(result["images"][0] + f"?token={token}")[0] == 200
    assert anonymous.get(result["images"][0])[0] == 401
    a1111 = webuiapi.WebUIApi(host="127.0.0.2", port=d.http_port)
    a1111.set_auth("anyone", token)  # A1111 clients send HTTP basic auth: the token is the password
    assert a1111.txt2img(prompt="a gear", steps=2, width=128, height=128).images
    openai = OpenAI(base_url=f"{d.url}/v1", api_key=token, max_retries=0)
    assert openai.images.generate(prompt="a nut", size="128x128").data[0].b64_json


def test_a_chunked_body_over_the_limit_gets_413_without_being_read_whole(daemon, api):
    limits = api.get("/api/config")[1]["limits"]
    limit = 32768 + 2 * 4 * -(-limits["max_image_bytes"] // 3)  # http.max_body_bytes + two images in base64
    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=30) as conn:
        conn.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b'{"prompt": "' + b"x" * limit
        conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))  # no length up front; past the limit it stops
        reply = conn.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"field": "payload"' in reply and "over the limit" in reply
    assert_healthy(api)


def test_sighup_limits_and_defaults_reach_the_page_and_the_compatible_apis(daemons):
    d = daemons("http-hup").start()
    api = Http(d.url)
    assert api.get("/api/config")[1]["limits"]["max_steps"] == 150
    config = yaml.safe_load(d.config_path.read_text())
    config["limits"], config["defaults"] = {"max_steps": 10}, {"steps": 6}
    d.config_path.write_text(yaml.safe_dump(config))
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload: applied" in d.log(), 30, "the reload")
    page = api.get("/api/config")[1]
    assert page["limits"]["max_steps"] == 10 and page["defaults"]["steps"] == 6  # what the page's form draws
    status, body, _ = api.post("/sdapi/v1/txt2img", {"prompt": "a gear", "steps": 20})
    assert status == 400 and body["field"] == "steps" and "between 1 and 10" in body["error"], body
    status, body, _ = api.post("/api/jobs", {"prompt": "a gear"})
    assert status == 202 and api.wait_state(body["id"], ("done",))["job"]["job"]["steps"] == 6
    assert d.alive() and "degraded" in api.get("/api/status")[1] and api.get("/api/status")[1]["degraded"] == []
