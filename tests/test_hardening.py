"""Issue 12: no message, client, disk or second process can silence the daemon.

Real daemons, a real Mosquitto broker, real filesystems (a small tmpfs where mount works).
"""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time

import pytest
import yaml
from daemon_harness import (TIMEOUT_SCALE, broker, daemons, listeners, mounted_tmpfs, needs_mosquitto, response_props,  # noqa: F401
                            topic_is, wait_until)
from edge.comms.mqtt import MqttFrontEnd
from edge.config import load_config
from edge.journal import Journal
from edge.runner import PipelineRunner
from edge.service import Service

pytestmark = pytest.mark.slow


def payload(m):
    return json.loads(m.payload)


# --- 1. every message answered, on both front ends, also after a restart ------------------------------
HOSTILE_MQTT = [  # (payload, the topic the answer comes on: None = <prefix>/errors, field, words)
    (b"[" * 3000, None, "payload", "nested too deeply"),
    (b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}", None, "payload", "4300 digits"),
    (b'{"id": "ovf", "prompt": "a", "guidance": 1' + b"0" * 400 + b"}", "ovf", "guidance", "401 digits"),
    (b'{"id": "sur", "prompt": "a\\ud800 gears"}', "sur", "prompt", "lone surrogate"),
    (b'{"id": "nl\\n", "prompt": "a"}', None, "id", "must be 1 to 64 characters"),
    (b"\xed\xa0\x80", None, "payload", "is not UTF-8"),
]


@needs_mosquitto
def test_hostile_mqtt_messages_are_answered_and_never_redelivered_and_jobs_still_run(broker, daemons, listeners):
    d = daemons("h1", broker).start()
    watch = listeners(broker.port, [f"{d.prefix}/errors", f"{d.prefix}/jobs/+/result"])
    for raw, _, _, _ in HOSTILE_MQTT:
        watch.publish(f"{d.prefix}/jobs", raw)
    without_id = [h for h in HOSTILE_MQTT if h[1] is None]
    errors = watch.wait_count(topic_is(f"{d.prefix}/errors"), len(without_id), what="answers without an id")
    for m, (_, _, field, words) in zip(errors, without_id):
        assert payload(m)["field"] == field and words in payload(m)["error"], payload(m)
    for _, job_id, field, words in (h for h in HOSTILE_MQTT if h[1] is not None):
        body = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/{job_id}/result"), what=job_id))
        assert body["status"] == "error" and body["field"] == field and words in body["error"], body
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "ok1", "prompt": "a gear", "steps": 2}))
    assert payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/ok1/result")))["status"] == "ok"
    answered = len(watch.messages)
    assert d.terminate() == 0
    d.start()  # every hostile message was acknowledged: none comes back with the session
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "ok2", "prompt": "a gear", "steps": 2}))
    assert payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/ok2/result")))["status"] == "ok"
    assert [m.topic for m in watch.messages[answered:]] == [f"{d.prefix}/jobs/ok2/result"]
    assert d.jobs().keys() == {"ok1", "ok2"} and "Traceback" not in d.log()


class CheckBreaks(PipelineRunner):
    """The real pipeline with a model-side check that fails unexpectedly (a bug, not a refusal)."""

    def __init__(self, pipeline):
        super().__init__(pipeline)
        self.calls = 0

    def check(self, job):
        self.calls += 1
        raise RuntimeError("the model check broke")


def front_end(tmp_path, broker, runner, name):
    config = load_config(None, {"mqtt.host": "127.0.0.1", "mqtt.port": broker.port, "mqtt.client_id": "edge-inproc",
                                "mqtt.topic_prefix": "test/inproc", "socket.enabled": False,
                                "output.min_free_mb": 0, "daemon.device_id": "inproc"})
    journal = Journal(tmp_path / name / "jobs.sqlite3")
    service = Service(config, runner, journal, tmp_path / name / "out")
    return service, MqttFrontEnd(config, service)


@needs_mosquitto
def test_an_unexpected_failure_is_answered_on_errors_acknowledged_and_logged_once(tmp_path, broker, listeners,
                                                                                   pipeline, caplog):
    watch = listeners(broker.port, ["test/inproc/errors", "test/inproc/status"])
    runner = CheckBreaks(pipeline)
    for run in range(2):  # the second run resumes the session: the message must not come back
        n = len(watch.messages)
        service, fe = front_end(tmp_path, broker, runner, f"run{run}")
        fe.start()
        try:
            watch.wait_for(lambda m: m.topic == "test/inproc/status" and m.payload == b"online" and
                           watch.messages.index(m) >= n, what="the front end online")
            if run == 0:
                watch.publish("test/inproc/jobs", json.dumps({"prompt": "a gear"}))
                body = payload(watch.wait_for(topic_is("test/inproc/errors"), what="the internal error"))
                assert body["status"] == "error" and body["error"] == "internal error: RuntimeError: the model check broke"
            else:
                time.sleep(2 * TIMEOUT_SCALE)  # a redelivery would come at once
        finally:
            fe.stop_accepting()
            fe.close()
            service.journal.close()
    assert runner.calls == 1
    assert sum("failed; answered on test/inproc/errors" in r.getMessage() for r in caplog.records) == 1


# --- 2 (issue) and 3: ResponseTopic checked before anything is stored ----------------------------------
@needs_mosquitto
def test_a_wildcard_response_topic_is_refused_before_anything_is_stored(broker, daemons, listeners):
    d = daemons("rt", broker).start()
    watch = listeners(broker.port, [f"{d.prefix}/errors", f"{d.prefix}/jobs/+/result"])
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "w1", "prompt": "a gear", "steps": 2}),
                  properties=response_props("replies/#"))
    body = payload(watch.wait_for(topic_is(f"{d.prefix}/errors"), what="the refusal"))
    assert body["field"] == "ResponseTopic" and "wildcard" in body["error"]
    assert "w1" not in d.jobs()
    assert d.terminate() == 0
    d.start()  # nothing undelivered with a bad topic to trip over at the next connect
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "w2", "prompt": "a gear", "steps": 2}))
    assert payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/w2/result")))["status"] == "ok"
    assert "Traceback" not in d.log()


# --- 7. replies go to the ResponseTopic of the request that asked --------------------------------------
@needs_mosquitto
def test_a_resubmitted_id_is_answered_on_the_new_senders_response_topic(broker, daemons, listeners):
    d = daemons("re", broker).start()
    watch = listeners(broker.port, ["kiosk/+/reply"])
    job = json.dumps({"id": "same", "prompt": "a gear", "steps": 2})
    watch.publish(f"{d.prefix}/jobs", job, properties=response_props("kiosk/1/reply", b"one"))
    first = watch.wait_for(lambda m: m.topic == "kiosk/1/reply" and payload(m)["status"] == "ok", what="result 1")
    watch.publish(f"{d.prefix}/jobs", job, properties=response_props("kiosk/2/reply", b"two"))
    second = watch.wait_for(topic_is("kiosk/2/reply"), what="the answer to the second sender")
    assert payload(second)["status"] == "ok" and payload(second)["paths"] == payload(first)["paths"]
    assert second.properties.CorrelationData == b"two"
    time.sleep(0.5)
    assert sum(m.topic == "kiosk/1/reply" for m in watch.messages) == 1  # its one message, the result: nothing more


# --- 4. the journal's disk full: busy, unacknowledged, taken by itself once there is room ---------------
@pytest.fixture
def small_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "state-disk", "4m") as mountpoint:
        yield mountpoint


def fill(folder):
    """Write a file until the filesystem is full; returns it (delete it to make room)."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@needs_mosquitto
def test_a_full_journal_disk_answers_busy_keeps_the_message_and_takes_it_once_there_is_room(
        tmp_path, small_tmpfs, broker, daemons, listeners):
    out = tmp_path / "outputs"
    d = daemons("disk", broker, {"daemon": {"state_dir": str(small_tmpfs / "state")},
                                 "output": {"dir": str(out)}}).start()
    d.state_dir, d.out_dir = small_tmpfs / "state", out
    watch = listeners(broker.port, [f"{d.prefix}/jobs/+/result", f"{d.prefix}/jobs/+/progress"])
    filler = fill(small_tmpfs)
    with d.client() as c:
        reply = c.request({"op": "submit", "job": {"id": "sock-full", "prompt": "a gear", "steps": 2}})
    assert reply["status"] == "error" and reply["error"].startswith("busy: the journal cannot be written ("), reply
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "mq-full", "prompt": "a gear", "steps": 2}))
    busy = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/mq-full/result"), what="the busy answer"))
    assert busy["error"].startswith("busy: the journal cannot be written")
    assert "mq-full" not in d.jobs()
    filler.unlink()  # room again: no restart, the held message is offered again and taken
    done = watch.wait_for(lambda m: m.topic == f"{d.prefix}/jobs/mq-full/result" and payload(m)["status"] == "ok",
                          what="the held job's result")
    assert payload(done)["id"] == "mq-full"
    with d.client() as c:
        result = list(c.submit_and_watch({"id": "sock-after", "prompt": "a gear", "steps": 2}))[-1]
    assert result["status"] == "ok"
    assert {k: v["state"] for k, v in d.jobs().items()} == {"mq-full": "done", "sock-after": "done"}
    assert d.alive() and d.log().count("cannot be written") == 1  # logged once, not per message


# --- 5. one daemon per state folder; unusable folders named -------------------------------------------
def test_a_second_daemon_on_the_same_state_folder_exits_at_once_naming_the_folder_and_the_holder(daemons):
    first = daemons("one").start()
    with first.client() as c:
        c.request({"op": "submit", "job": {"id": "long", "prompt": "a gear", "steps": 150, "count": 4}})
    wait_until(lambda: first.jobs()["long"]["state"] == "running", 30, "the job to start")
    second = daemons("two", config={"daemon": {"state_dir": str(first.state_dir)}})
    second.start(wait=False)
    assert second.proc.wait(30 * TIMEOUT_SCALE) == 2
    lines = [line for line in second.log().splitlines() if line.startswith("error:")]
    assert lines == [f"error: daemon.state_dir: {first.state_dir} is in use by another edge-imagegen daemon "
                     f"(PID {first.proc.pid}); stop it, or give this one another daemon.state_dir"]
    assert first.jobs()["long"] == {**first.jobs()["long"], "state": "running", "attempts": 1}  # not requeued
    assert "loading the model" not in second.log() and "requeued" not in second.log()
    assert first.alive()


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"root, and cannot mount a read-only tmpfs: {proc.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("section, key, where", [
    ("daemon", "state_dir", lambda ro: ro),
    ("output", "dir", lambda ro: ro / "images"),
    ("socket", "path", lambda ro: ro / "s.sock"),
])
def test_an_unusable_folder_stops_start_up_with_one_line_naming_it(daemons, read_only_dir, section, key, where):
    path = where(read_only_dir)
    d = daemons(f"ro-{section}", config={section: {key: str(path)}})
    d.start(wait=False)
    assert d.proc.wait(60 * TIMEOUT_SCALE) == 2
    lines = [line for line in d.log().splitlines() if line.strip()]
    folder = path if section == "daemon" else path.parent if section == "socket" else path
    assert lines[-1].startswith(f"error: {section}.{key}: cannot ") and str(folder) in lines[-1], lines
    assert "Traceback" not in d.log()


# --- 6. SIGHUP reloads what can change without the model ----------------------------------------------
def test_sighup_reloads_policy_limits_and_defaults_and_keeps_the_running_job(daemons):
    d = daemons("hup").start()
    with d.client() as c:
        assert c.request({"op": "submit", "job": {"id": "k1", "prompt": "a knife", "steps": 2}})["status"] == "queued"
        c.request({"op": "submit", "job": {"id": "long", "prompt": "a gear", "steps": 150, "count": 2}})
    wait_until(lambda: d.jobs()["long"]["state"] == "running", 60, "the long job to start")
    config = yaml.safe_load(d.config_path.read_text())
    config["policy"] = {"blocked_words": ["knife"]}
    config["limits"] = {"max_steps": 10}
    config["mqtt"]["port"] = 1  # needs a restart: logged, not applied
    d.config_path.write_text(yaml.safe_dump(config))
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload: applied policy, limits" in d.log(), 30, "the reload")
    assert "reload: mqtt changed; that takes effect only after a restart" in d.log()
    with d.client() as c:
        assert c.request({"op": "submit", "job": {"id": "k2", "prompt": "a knife", "steps": 2}})["error"] == "rejected: policy"
        steps = c.request({"op": "submit", "job": {"id": "s2", "prompt": "a gear", "steps": 20}})
        assert steps["field"] == "steps" and "between 1 and 10" in steps["error"]
    d.config_path.write_text("limits: {max_stepz: 3}\n")  # a typo: invalid, nothing changes
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload: nothing reloaded, the config is not valid" in d.log(), 30, "the refused reload")
    with d.client() as c:
        assert c.request({"op": "submit", "job": {"prompt": "a gear", "steps": 11}})["field"] == "steps"
    assert "RELOADING=1" in d.notes and d.alive()
    jobs = d.jobs()
    assert jobs["long"]["state"] == "running" and jobs["long"]["attempts"] == 1  # the reload did not touch it
    assert d.terminate() == 0 and jobs["k1"]["state"] == "done"


# --- issue 5: results published while the broker is down --------------------------------------------
@needs_mosquitto
def test_results_published_while_the_broker_is_down_are_delivered_and_the_state_keeps_up(broker, daemons,
                                                                                          listeners):
    d = daemons("down", broker).start()
    watch = listeners(broker.port, [f"{d.prefix}/jobs/+/result"], client_id="down-watcher", persistent=True)
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "during", "prompt": "a gear", "steps": 40}))
    wait_until(lambda: d.jobs().get("during", {}).get("state") == "running", 30, "the job to start")
    broker.kill()
    wait_until(lambda: d.jobs()["during"]["state"] == "done", 120, "the job to finish with the broker down")
    time.sleep(1.0)  # the housekeeping thread runs its rounds while the result is unsendable
    broker.start()
    assert payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/during/result"), timeout=60))["status"] == "ok"
    state = listeners(broker.port, [f"{d.prefix}/state"])

    def idle():
        states = [payload(m) for m in state.messages]
        return states and states[-1]["state"] == "idle" and states[-1]["queue"] == 0

    wait_until(idle, 30, "the retained state to say idle")

    def delivered():
        db = sqlite3.connect(f"file:{d.state_dir / 'jobs.sqlite3'}?mode=ro", uri=True)
        try:
            return db.execute("SELECT delivered FROM jobs WHERE id = 'during'").fetchone()[0] == 1
        finally:
            db.close()

    wait_until(delivered, 30, "the delivery to be recorded")
    assert d.terminate() == 0 and "Traceback" not in d.log()


# --- 8. TCP_NODELAY on the broker connection ----------------------------------------------------------
@needs_mosquitto
def test_the_broker_connection_has_tcp_nodelay(tmp_path, broker, listeners, pipeline):
    watch = listeners(broker.port, ["test/inproc/status"])
    service, fe = front_end(tmp_path, broker, PipelineRunner(pipeline), "nodelay")
    fe.start()
    try:
        watch.wait_for(lambda m: m.payload == b"online", what="the front end online")
        sock = fe.client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        fe.close()
        service.journal.close()
