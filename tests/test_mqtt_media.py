"""Results where a remote MQTT client can use them: image bytes, request/response, ``get``, history,
a retained state that follows the job. Real Mosquitto, real daemon subprocesses, real pipeline."""

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon_harness import (TIMEOUT_SCALE, Broker, broker, daemons, listeners, needs_mosquitto,  # noqa: F401
                            topic_is, wait_until)
from test_mqtt import MosquittoSub

pytestmark = [needs_mosquitto, pytest.mark.slow]


def payload(m):
    return json.loads(m.payload)


def mosquitto_rr(port, topic, response_topic, message):
    exe = shutil.which("mosquitto_rr")
    if exe is None:
        pytest.skip("mosquitto_rr is not installed (mosquitto-clients)")
    run = subprocess.run([exe, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-e", response_topic,
                          "-m", message, "-W", str(int(60 * TIMEOUT_SCALE))],
                         capture_output=True, text=True, timeout=90 * TIMEOUT_SCALE)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_mosquitto_rr_gets_the_result_and_get_answers_with_the_stored_one(broker, daemons):
    d = daemons("rr", broker).start()
    job = {"id": "rr-1", "prompt": "knolling of two red gears", "steps": 4, "seed": 3}
    # MQTT 5 ResponseTopic + CorrelationData: exactly one message comes back, the result
    result = mosquitto_rr(broker.port, f"{d.prefix}/jobs", "kiosk/rr/reply", json.dumps(job))
    assert result["status"] == "ok" and result["id"] == "rr-1" and result["seeds"] == [3]
    assert Path(result["paths"][0]).is_file()
    # after the fact, request/response on the job's get topic: the stored result
    again = mosquitto_rr(broker.port, f"{d.prefix}/jobs/rr-1/get", "kiosk/rr/get", "")
    assert again["status"] == "ok" and again["paths"] == result["paths"] and again["seeds"] == [3]
    missing = mosquitto_rr(broker.port, f"{d.prefix}/jobs/nope/get", "kiosk/rr/get2", "")
    assert missing["status"] == "error" and missing["field"] == "id" and "no job 'nope'" in missing["error"]


def test_a_subscriber_that_starts_after_the_job_ended_gets_the_stored_result_and_images(broker, daemons, listeners):
    d = daemons("late", broker).start()
    sender = listeners(broker.port, [f"{d.prefix}/jobs/+/result"])
    sender.publish(f"{d.prefix}/jobs", json.dumps({"id": "late-1", "prompt": "a blue battery", "steps": 3}))
    first = payload(sender.wait_for(topic_is(f"{d.prefix}/jobs/late-1/result")))
    late = listeners(broker.port, [f"{d.prefix}/jobs/late-1/#", f"{d.prefix}/history"])
    assert not late.messages  # results and images are not retained: nothing comes by itself
    late.publish(f"{d.prefix}/jobs/late-1/get", b"")
    body = payload(late.wait_for(topic_is(f"{d.prefix}/jobs/late-1/result"), what="the stored result"))
    assert body["status"] == "ok" and body["paths"] == first["paths"] and body["state"] == "done"
    image = late.wait_for(topic_is(f"{d.prefix}/jobs/late-1/image/0"), what="the image again")
    assert image.payload == Path(body["paths"][0]).read_bytes()
    # history over MQTT: the journal's page, newest first
    late.publish(f"{d.prefix}/history/get", json.dumps({"limit": 5}))
    page = payload(late.wait_for(topic_is(f"{d.prefix}/history"), what="the history"))
    assert page["status"] == "ok" and page["next"] is None
    [entry] = page["jobs"]
    assert entry["id"] == "late-1" and entry["prompt"] == "a blue battery" and entry["paths"] == first["paths"]
    late.publish(f"{d.prefix}/history/get", b"[1]")
    bad = payload(late.wait_count(topic_is(f"{d.prefix}/history"), 2, what="the refusal")[1])
    assert bad["status"] == "error" and bad["field"] == "payload"


def test_image_bytes_on_the_image_topics_equal_the_png_on_disk(broker, daemons, listeners):
    d = daemons("img", broker, {"mqtt": {"fleet_group": "lab"}}).start()
    fleet = "edge-imagegen/fleet/lab"
    watch = listeners(broker.port, [f"{d.prefix}/jobs/+/result", f"{d.prefix}/jobs/+/image/+", f"{d.prefix}/image",
                                    f"{fleet}/jobs/+/image/+"])
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "two", "prompt": "a gear", "steps": 3, "count": 2}))
    result = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/two/result")))
    assert [e["topic"] for e in result["images"]] == [f"{d.prefix}/jobs/two/image/0", f"{d.prefix}/jobs/two/image/1"]
    pngs = [Path(p).read_bytes() for p in result["paths"]]
    for k, png in enumerate(pngs):
        message = watch.wait_for(topic_is(f"{d.prefix}/jobs/two/image/{k}"))
        assert message.payload == png and png[:8] == b"\x89PNG\r\n\x1a\n" and not message.retain
        assert message.qos == 1 and result["images"][k]["bytes"] == len(png)
    assert watch.wait_for(topic_is(f"{d.prefix}/image")).payload == pngs[-1]
    # the retained last image, as a dashboard that connects later sees it
    newcomer = listeners(broker.port, [f"{d.prefix}/image"])
    latest = newcomer.wait_for(topic_is(f"{d.prefix}/image"), what="the retained image")
    assert latest.retain and latest.payload == pngs[-1]
    # a fleet job's images also go under the fleet prefix
    watch.publish(f"{fleet}/jobs", json.dumps({"id": "fl", "prompt": "a gear", "steps": 2}))
    fleet_image = watch.wait_for(topic_is(f"{fleet}/jobs/fl/image/0"), what="the fleet copy")
    assert fleet_image.payload == watch.wait_for(topic_is(f"{d.prefix}/jobs/fl/image/0")).payload
    # "return": "base64": the PNG inside the one result message, no image messages of its own
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "b64", "prompt": "a gear", "steps": 2, "return": "base64"}))
    inline = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/b64/result")))
    [entry] = inline["images"]
    assert base64.b64decode(entry["base64"]) == Path(inline["paths"][0]).read_bytes()
    assert not [m for m in watch.messages if m.topic.startswith(f"{d.prefix}/jobs/b64/image")]
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "b65", "prompt": "a gear", "return": "zip"}))
    refused = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/b65/result")))
    assert refused["field"] == "return" and "must be one of paths, base64" in refused["error"]


def test_too_large_images_give_a_note_in_the_result_not_a_lost_result(tmp_path, daemons, listeners):
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed")
    # a broker that takes no packet over 6000 bytes (and says so in its CONNACK): a PNG is ~11 KB
    small = Broker(tmp_path / "small", extra=("max_packet_size 6000",)).start()
    try:
        d = daemons("big", small).start()
        watch = listeners(small.port, [f"{d.prefix}/jobs/+/result", f"{d.prefix}/jobs/+/image/+", f"{d.prefix}/image"])
        watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "huge", "prompt": "a gear", "steps": 2}))
        result = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/huge/result"), what="the result"))
        [note] = result["images"]
        size = Path(result["paths"][0]).stat().st_size
        assert result["status"] == "ok" and note["topic"] is None and note["bytes"] == size > 6000
        assert "over the" in note["note"] and "maximum packet size" in note["note"] and "paths[0]" in note["note"]
        watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "huge64", "prompt": "a gear", "steps": 2,
                                                      "return": "base64"}))
        inline = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/huge64/result"), what="the inline result"))
        assert "base64" not in inline["images"][0] and "note" in inline["images"][0]
        assert not [m for m in watch.messages if "/image" in m.topic]
        assert "disconnected from the broker" not in d.log()  # nothing oversized was ever sent
    finally:
        small.kill()


def test_the_configured_limit_also_holds_and_publish_images_switches_them_off(broker, daemons, listeners):
    d = daemons("lim", broker, {"mqtt": {"max_image_bytes": 4000}}).start()
    watch = listeners(broker.port, [f"{d.prefix}/jobs/+/result", f"{d.prefix}/jobs/+/image/+"])
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "cap", "prompt": "a gear", "steps": 2}))
    [note] = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/cap/result")))["images"]
    assert note["topic"] is None and "4000-byte limit" in note["note"]
    off = daemons("off", broker, {"mqtt": {"publish_images": False}}).start()
    watch2 = listeners(broker.port, [f"{off.prefix}/jobs/+/result", f"{off.prefix}/jobs/+/image/+", f"{off.prefix}/image"])
    watch2.publish(f"{off.prefix}/jobs", json.dumps({"id": "quiet", "prompt": "a gear", "steps": 2}))
    result = payload(watch2.wait_for(topic_is(f"{off.prefix}/jobs/quiet/result")))
    assert result["status"] == "ok" and "images" not in result
    assert [m.topic for m in watch2.messages] == [f"{off.prefix}/jobs/quiet/result"]


def test_retained_state_follows_the_job_start_its_steps_and_its_end(broker, daemons, listeners):
    d = daemons("st", broker, {"mqtt": {"progress_interval": 0.25}}).start()
    watch = listeners(broker.port, [f"{d.prefix}/state", f"{d.prefix}/jobs/+/result", f"{d.prefix}/jobs/+/progress"])
    watch.wait_for(lambda m: m.topic == f"{d.prefix}/state" and payload(m)["state"] == "idle", what="idle at first")
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "walk", "prompt": "a gear", "steps": 120}))
    watch.wait_for(topic_is(f"{d.prefix}/jobs/walk/result"), timeout=120, what="the result")
    states = [(i, payload(m)) for i, m in enumerate(watch.messages) if m.topic == f"{d.prefix}/state"]
    result_at = next(i for i, m in enumerate(watch.messages) if m.topic.endswith("/walk/result"))
    started_at = next(i for i, m in enumerate(watch.messages)
                      if m.topic.endswith("/walk/progress") and payload(m).get("step") == 0)
    running = [s for i, s in states if s["state"] == "running"]
    assert running and all(s["current"]["id"] == "walk" for s in running)
    steps = [s["current"].get("step", 0) for s in running]
    assert steps == sorted(steps) and steps[-1] > 0  # the step moves on, in order
    # throttled like progress (0.25 s), not one message per step
    assert len(running) < 120 / 4
    # never idle while the job runs: every state between its start and its result says running
    # (one published just before the start may still be under way when the start arrives)
    between = [s["state"] for i, s in states if started_at < i < result_at]
    assert between and set(between[1:]) == {"running"}, between

    def idle_with_last_job():
        [(_, body)] = MosquittoSub(broker.port, f"{d.prefix}/state").messages()
        state = json.loads(body)
        return state if state["state"] == "idle" else None

    state = wait_until(idle_with_last_job, 10, "the retained state to say idle", interval=0.2)
    assert state["last_job"]["id"] == "walk" and state["last_job"]["state"] == "done"
    assert state["last_job"]["seconds"] > 0 and state["current"] is None and state["queue"] == 0
