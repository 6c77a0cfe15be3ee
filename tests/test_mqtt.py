"""The MQTT front end against a real Mosquitto broker and a real daemon subprocess (real pipeline)."""

import json
import shutil
import subprocess

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon_harness import (MODEL_REFUSALS, TIMEOUT_SCALE, broker, daemons, images_by_job, listeners,  # noqa: F401
                            needs_mosquitto, topic_is, wait_until)

# real daemons and a broker: the whole suite runs them, the fast lane (-m "not slow") does not
pytestmark = [needs_mosquitto, pytest.mark.slow]


def payload(m):
    return json.loads(m.payload)


class MosquittoSub:
    """``mosquitto_sub`` as an independent client: started, then waited on until its SUBACK."""

    def __init__(self, port, topic, count=1):
        exe = shutil.which("mosquitto_sub")
        if exe is None:
            pytest.skip("mosquitto_sub is not installed (mosquitto-clients)")
        # stdbuf: mosquitto_sub's stdout is block-buffered on a pipe, which would hold back the SUBACK line
        line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        self.proc = subprocess.Popen([*line_buffered, exe, "-p", str(port), "-h", "127.0.0.1", "-q", "1", "-t", topic, "-d",
                                      "-F", "MSG %t %p", "-C", str(count), "-W", str(int(60 * TIMEOUT_SCALE))],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:  # -d prints the SUBACK: from then on nothing is missed
            if "SUBACK" in line:
                break
        else:
            raise AssertionError("mosquitto_sub exited before subscribing")

    def messages(self, timeout=60):
        out, _ = self.proc.communicate(timeout=timeout * TIMEOUT_SCALE)
        assert self.proc.returncode == 0, out
        return [line[4:].split(" ", 1) for line in out.splitlines() if line.startswith("MSG ")]


def mosquitto_pub(port, topic, message, *extra):
    exe = shutil.which("mosquitto_pub")
    if exe is None:
        pytest.skip("mosquitto_pub is not installed (mosquitto-clients)")
    subprocess.run([exe, "-p", str(port), "-h", "127.0.0.1", "-q", "1", "-t", topic, "-m", message, *extra],
                   check=True, timeout=30)


def test_mosquitto_clients_submit_and_get_the_result_and_png(broker, daemons):
    d = daemons("pi1", broker).start()
    sub = MosquittoSub(broker.port, f"{d.prefix}/jobs/mq-1/result")
    mosquitto_pub(broker.port, f"{d.prefix}/jobs",
                  json.dumps({"id": "mq-1", "prompt": "knolling of two red gears", "steps": 5, "seed": 11}))
    [(topic, body)] = sub.messages()
    result = json.loads(body)
    assert result["status"] == "ok" and result["id"] == "mq-1" and result["seeds"] == [11]
    assert set(result["timings"]) >= {"wait", "generate", "save", "total"}
    assert result["model"] == "knolling-tiny" and result["precision"] == "fp32"
    png = d.out_dir / result["paths"][0]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the retained availability and state, as a newcomer sees them
    status = MosquittoSub(broker.port, f"{d.prefix}/status")
    assert status.messages() == [[f"{d.prefix}/status", "online"]]

    def retained_state():  # coalesced: it may trail the result message by one publish interval
        [(_, body)] = MosquittoSub(broker.port, f"{d.prefix}/state").messages()
        state = json.loads(body)
        return state if state["state"] == "idle" else None

    state = wait_until(retained_state, 10, "the retained state to say idle", interval=0.2)
    assert state["queue"] == 0 and state["current"] is None
    assert {"model", "precision", "provider", "device"} <= set(state)


def test_progress_is_reported_and_response_topic_gets_correlation_data(broker, daemons, listeners):
    d = daemons("pi1", broker, {"mqtt": {"progress_interval": 0.0}}).start()
    watch = listeners(broker.port, [f"{d.prefix}/jobs/+/progress", f"{d.prefix}/jobs/+/result", "kiosk/7/reply"])
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "kiosk/7/reply"
    props.CorrelationData = b"\x00req-42\xff"
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "rt-1", "prompt": "a lens", "steps": 3}), properties=props)
    watch.wait_for(topic_is(f"{d.prefix}/jobs/rt-1/result"))
    # one message on the response topic, the result (what request/response clients wait for)
    replies = watch.wait_count(topic_is("kiosk/7/reply"), 1, what="the result")
    assert [payload(m)["status"] for m in replies] == ["ok"]
    assert all(m.properties.CorrelationData == b"\x00req-42\xff" for m in replies)
    steps = [payload(m) for m in watch.messages if m.topic == f"{d.prefix}/jobs/rt-1/progress"]
    assert steps[0]["state"] == "queued" and steps[1]["step"] == 0
    assert [s["step"] for s in steps[2:]] == [1, 2, 3] and steps[-1]["steps"] == 3


def test_bad_messages_are_answered_and_the_daemon_stays_up(broker, daemons, listeners):
    d = daemons("pi1", broker, {"policy": {"blocked_words": ["knife"], "blocked_patterns": ["weap[o0]n"]}}).start()
    watch = listeners(broker.port, [f"{d.prefix}/errors", f"{d.prefix}/jobs/+/result", "bad/reply"])
    jobs = f"{d.prefix}/jobs"
    # a long job running and one queued behind it: the garbage must not disturb them
    watch.publish(jobs, json.dumps({"id": "long", "prompt": "a gear", "steps": 150}))
    watch.publish(jobs, json.dumps({"id": "next", "prompt": "a gear", "steps": 2}))
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "bad/reply"
    props.CorrelationData = b"c1"
    bad = [
        (b"{not json", "payload", "is not valid JSON", None),
        (b"\x00\xff\xfe\x80 binary garbage \xc3\x28", "payload", "is not UTF-8", None),
        (b"", "payload", "is not valid JSON", None),
        (b"[]", "payload", "must be a JSON object", None),
        (json.dumps({"prompt": "x" * 17000}).encode(), "payload", "the limit is 16384", None),
        (json.dumps({"id": "t1", "prompt": "a", "steps": "20"}).encode(), "steps", "must be an integer", "t1"),
        (json.dumps({"id": "t2", "prompt": "a", "guidance": 99}).encode(), "guidance", "between 0 and 30", "t2"),
        (json.dumps({"id": "t3", "prompt": None}).encode(), "prompt", "must be a string", "t3"),
        (json.dumps({"id": "t4", "prompt": "a", "count": 9}).encode(), "count", "between 1 and 8", "t4"),
        (json.dumps({"id": "t5", "prompt": "a sharp KNIFE on a table"}).encode(), "prompt", "rejected: policy", "t5"),
        (json.dumps({"id": "t6", "prompt": "a weap0n"}).encode(), "prompt", "rejected: policy", "t6"),
        (json.dumps({"id": "bad id!", "prompt": "a"}).encode(), "id", "must be 1 to 64 characters", None),
    ]
    for raw, _, _, _ in bad:
        watch.publish(jobs, raw)
    watch.publish(jobs, b"{broken", properties=props)
    errors = watch.wait_count(topic_is(f"{d.prefix}/errors"), 7, what="errors without an id")
    bodies = [payload(m) for m in errors]
    expected_errors = [(f, w) for _, f, w, job_id in bad if job_id is None] + [("payload", "is not valid JSON")]
    assert [(b["field"], w in b["error"]) for b, (_, w) in zip(bodies, expected_errors)] == \
        [(f, True) for f, _ in expected_errors]
    for _, field, words, job_id in bad:
        if job_id:
            body = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/{job_id}/result")))
            assert body["status"] == "error" and body["id"] == job_id
            assert body["field"] == field and words in body["error"], body
    reply = payload(watch.wait_for(topic_is("bad/reply")))
    assert reply["field"] == "payload" and reply["status"] == "error"
    # the daemon is alive, the two real jobs finish, the rejected ones never ran
    for job_id in ("long", "next"):
        assert payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/{job_id}/result")))["status"] == "ok"
    assert d.alive()
    jobs_in_journal = d.jobs()
    assert jobs_in_journal["t5"]["state"] == jobs_in_journal["t6"]["state"] == "rejected"
    assert sorted(images_by_job(d.images())) == ["long", "next"]


def test_broker_restart_mid_run_loses_nothing(broker, daemons, listeners):
    d = daemons("pi1", broker).start()
    # the test's own client keeps a persistent session too, so that results published while it was
    # cut off are delivered when it reconnects
    watch = listeners(broker.port, [f"{d.prefix}/jobs/+/result", f"{d.prefix}/jobs/+/progress"],
                      client_id="restart-watcher", persistent=True)
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "before", "prompt": "a gear", "steps": 150}))
    watch.wait_for(lambda m: m.topic.endswith("/before/progress") and payload(m).get("step", 0) >= 5,
                   what="the first job under way")
    broker.stop()
    broker.start()
    # published with QoS 1 while the daemon is still waiting for its reconnect back-off
    publisher = listeners(broker.port, ["unused/topic"])
    ids = [f"during-{i}" for i in range(5)]
    for job_id in ids:
        publisher.publish(f"{d.prefix}/jobs", json.dumps({"id": job_id, "prompt": "a gear", "steps": 2}))
    for job_id in ["before"] + ids:
        body = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/{job_id}/result"), timeout=60,
                                      what=f"the result of {job_id}"))
        assert body["status"] == "ok"
    assert "disconnected from the broker" in d.log() and d.log().count("connected to the broker") >= 2
    by_job = images_by_job(d.images())
    assert sorted(by_job) == sorted(["before"] + ids) and all(len(v) == 1 for v in by_job.values())


def test_will_says_offline_on_a_crash_and_a_clean_stop_says_it_too(broker, daemons, listeners):
    d = daemons("pi1", broker).start()
    watch = listeners(broker.port, [f"{d.prefix}/status", f"{d.prefix}/state"])
    watch.wait_for(lambda m: m.topic == f"{d.prefix}/status" and m.payload == b"online")
    d.kill()  # no DISCONNECT: the broker publishes the will
    watch.wait_for(lambda m: m.topic == f"{d.prefix}/status" and m.payload == b"offline", what="the will")
    n = len(watch.messages)
    d.start()
    watch.wait_for(lambda m: m.topic == f"{d.prefix}/status" and m.payload == b"online" and
                   watch.messages.index(m) >= n, what="online again")
    assert d.terminate() == 0
    last = {m.topic: m.payload for m in watch.messages}
    assert last[f"{d.prefix}/status"] == b"offline" and json.loads(last[f"{d.prefix}/state"])["state"] == "offline"


def test_model_side_checks_refuse_at_submit(broker, daemons, listeners):
    """LCM's step limit, a fixed-size export and an unknown scheduler are refused before the
    message is acknowledged: answered with the field, never journaled, never run."""
    d = daemons("pi1", broker).start()
    watch = listeners(broker.port, [f"{d.prefix}/jobs/+/result"])
    for job, _, _ in MODEL_REFUSALS:
        watch.publish(f"{d.prefix}/jobs", json.dumps(job))
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "fine", "prompt": "a gear", "steps": 2}))
    for job, field, words in MODEL_REFUSALS:
        body = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/{job['id']}/result"), what=job["id"]))
        assert body["status"] == "error" and body["field"] == field and words in body["error"], body
    assert payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/fine/result")))["status"] == "ok"
    assert set(d.jobs()) == {"fine"}
    assert sorted(images_by_job(d.images())) == ["fine"]


def test_mqtt_311_and_duplicate_ids(broker, daemons, listeners):
    d = daemons("pi1", broker, {"mqtt": {"protocol": "mqttv311"}}).start()
    watch = listeners(broker.port, [f"{d.prefix}/jobs/+/result"])
    job = json.dumps({"id": "same", "prompt": "a gear", "steps": 2})
    for _ in range(2):  # the same id twice while it is queued: one job, one result on its topic
        watch.publish(f"{d.prefix}/jobs", job)
    watch.wait_for(topic_is(f"{d.prefix}/jobs/same/result"), what="the result")
    watch.publish(f"{d.prefix}/jobs", job)  # again once finished: answered with the same result
    results = watch.wait_count(topic_is(f"{d.prefix}/jobs/same/result"), 2, what="two answers")
    assert [payload(m)["status"] for m in results] == ["ok", "ok"]
    assert payload(results[0])["paths"] == payload(results[1])["paths"]
    assert len(images_by_job(d.images())["same"]) == 1


def test_fleet_group_shares_jobs_each_runs_once(broker, daemons, listeners):
    fleet = {"mqtt": {"fleet_group": "lab"}}
    a = daemons("pa", broker, fleet).start()
    b = daemons("pb", broker, fleet).start()
    watch = listeners(broker.port, ["edge-imagegen/fleet/lab/jobs/+/result", "test/+/state"])
    for d in (a, b):  # both subscribed (start() waits for that), connected and idle before the jobs go out
        state = payload(watch.wait_for(topic_is(f"{d.prefix}/state"), what=f"{d.name} connected"))
        assert (state["state"], state["queue"], state["device"]) == ("idle", 0, d.name)
    ids = [f"f{i:02d}" for i in range(16)]
    for job_id in ids:
        watch.publish("edge-imagegen/fleet/lab/jobs", json.dumps({"id": job_id, "prompt": "a gear", "steps": 10}))
    results = watch.wait_count(lambda m: m.topic.endswith("/result"), len(ids), what="fleet results")
    assert sorted(payload(m)["id"] for m in results) == ids  # each once, none lost
    done_a, done_b = images_by_job(a.images()), images_by_job(b.images())
    assert not set(done_a) & set(done_b)  # no job ran on both
    assert sorted(set(done_a) | set(done_b)) == ids
    assert done_a and done_b  # the work was shared
    assert all(len(v) == 1 for v in {**done_a, **done_b}.values())
