"""The daemon's lifecycle against the real pipeline: crashes, stops, systemd's notify protocol, disk."""

import base64
import hashlib
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon_harness import (broker, daemons, images_by_job, listeners, mounted_tmpfs, needs_mosquitto, short_dir,  # noqa: F401
                            topic_is, wait_until)
from edge import disk, inputs
from edge.config import load_config
from edge.errors import OutputError
from edge.jobs import admit, parse_job
from edge.journal import Journal
from edge.notify import Notifier
from edge.output import image_path, save_result
from edge.policy import ContentPolicy
from edge.runner import PipelineRunner
from edge.service import Service

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import scenes  # noqa: E402

# real daemon subprocesses: the whole suite runs them, the fast lane (-m "not slow") does not
pytestmark = pytest.mark.slow


def submit(d, job):
    with d.client() as c:
        reply = c.request({"op": "submit", "job": job})
    assert reply["status"] == "queued", reply
    return reply


def wait_mid_job(d, job_id):
    """Return once ``job_id`` has done some but not all of its steps."""
    with d.client() as c:
        for m in c.request_stream({"op": "watch", "id": job_id}):
            if m.get("event") == "progress" and m["image"] == 1 and 0 < m["step"] < m["steps"]:
                return
    raise AssertionError(f"{job_id} finished before it was seen mid-way")


def wait_all_done(d, ids, timeout=120):
    def done():
        jobs = d.jobs()
        return all(jobs.get(i, {}).get("state") == "done" for i in ids) and jobs
    return wait_until(done, timeout, f"jobs {ids} to be done", interval=0.2)


@needs_mosquitto
def test_kill_9_mid_job_then_restart_every_accepted_job_has_exactly_one_image_set(broker, daemons, listeners):
    d = daemons("k1", broker).start()
    watch = listeners(broker.port, [f"{d.prefix}/jobs/+/result"])
    socket_ids = [f"s{i}" for i in range(3)]
    mqtt_ids = [f"m{i}" for i in range(3)]
    for i, job_id in enumerate(socket_ids):
        submit(d, {"id": job_id, "prompt": "a red gear", "steps": 60, "count": 2, "seed": 10 * i})
    for i, job_id in enumerate(mqtt_ids):  # QoS 1; acknowledged once journaled (or redelivered after the kill)
        watch.publish(f"{d.prefix}/jobs", json.dumps({"id": job_id, "prompt": "a blue nut", "steps": 40,
                                                     "count": 2, "seed": 100 + i}))
    wait_mid_job(d, "s0")
    d.kill()
    assert d.jobs()["s0"]["state"] == "running"  # the crash left it mid-way

    d.start()
    ids = socket_ids + mqtt_ids
    jobs = wait_all_done(d, ids)
    assert jobs["s0"]["attempts"] == 2
    by_job = images_by_job(d.images())
    assert sorted(by_job) == sorted(ids)
    assert {k: len(v) for k, v in by_job.items()} == {k: 2 for k in ids}  # one set each, never two
    assert not list(d.out_dir.glob("*/.*.tmp"))  # no half-written file survives the restart
    # each MQTT job's result (published just after its commit, its images first: wait for those ids)
    results = watch.wait_count(lambda m: m.topic.split("/")[-2] in mqtt_ids, len(mqtt_ids), what="MQTT results")
    assert {json.loads(m.payload)["id"] for m in results} >= set(mqtt_ids)
    assert all(json.loads(m.payload)["status"] == "ok" for m in results)


def test_sigterm_lets_the_running_job_finish_and_speaks_the_notify_protocol(daemons):
    d = daemons("t1").start()
    assert any(n.startswith("STATUS=idle") for n in d.notes)  # sent with READY=1
    submit(d, {"id": "j1", "prompt": "a gear", "steps": 60, "count": 2})
    wait_mid_job(d, "j1")
    d.wait_note(lambda n: n.startswith("STATUS=running job j1"), what="STATUS running")
    assert d.terminate() == 0
    assert "STOPPING=1" in d.notes
    assert d.jobs()["j1"]["state"] == "done"  # finished within daemon.stop_timeout
    assert len(images_by_job(d.images())["j1"]) == 2


def test_sigterm_past_stop_timeout_leaves_the_job_queued_for_the_next_start(daemons):
    d = daemons("t2", config={"daemon": {"stop_timeout": 0.2}}).start()
    submit(d, {"id": "long", "prompt": "a gear", "steps": 150, "count": 8})
    wait_mid_job(d, "long")
    assert d.terminate() == 0
    jobs = d.jobs()
    assert jobs["long"]["state"] == "queued" and jobs["long"]["attempts"] == 1
    assert not d.images()  # cancelled before any image was written
    d.start()
    wait_all_done(d, ["long"], timeout=300)
    assert len(images_by_job(d.images())["long"]) == 8


def test_a_job_that_kills_the_daemon_every_time_is_failed_not_retried_forever(daemons):
    d = daemons("p1", config={"daemon": {"max_attempts": 2}}).start()
    submit(d, {"id": "poison", "prompt": "a gear", "steps": 150, "count": 8})
    for _ in range(2):
        wait_mid_job(d, "poison")
        d.kill()
        d.start()
    job = wait_until(lambda: d.jobs()["poison"]["state"] == "error" and d.jobs()["poison"], 30, "poison failed")
    assert "interrupted" in job["error"] and "max_attempts" in job["error"]
    with d.client() as c:  # its client gets the reason, and the daemon goes on with other work
        assert c.request({"op": "get", "id": "poison"})["status"] == "error"
        assert c.request({"op": "submit", "job": {"prompt": "a nut", "steps": 2}})["status"] == "queued"


# --- in-process: the worker and the watchdog -------------------------------------------------------------
class NotifyReceiver:
    def __init__(self):
        self.dir = short_dir()
        self.path = str(self.dir / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)

    def drain(self, seconds):
        lines, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                lines += self.sock.recv(4096).decode().splitlines()
            except socket.timeout:
                pass
        return lines

    def close(self):
        self.sock.close()
        os.unlink(self.path)
        self.dir.rmdir()


def make_service(tmp_path, pipeline, notifier=None, runner=None, **overrides):
    config = load_config(None, {"mqtt.enabled": False, "socket.enabled": False, "output.min_free_mb": 0,
                                **overrides})
    journal = Journal(tmp_path / "state" / "jobs.sqlite3", config.daemon.max_queue)
    return Service(config, runner or PipelineRunner(pipeline), journal, tmp_path / "out", notifier)


class HangingRunner(PipelineRunner):
    """The real pipeline behind a call that hangs until released, as a stuck ONNX call would."""

    def __init__(self, pipeline):
        super().__init__(pipeline)
        self.release = threading.Event()

    def generate(self, job, on_step, cancel, finish=None):
        self.release.wait(30)
        return super().generate(job, on_step, cancel, finish)


def test_watchdog_pings_only_while_the_worker_shows_progress(tmp_path, pipeline):
    receiver = NotifyReceiver()
    runner = HangingRunner(pipeline)
    service = make_service(tmp_path, pipeline, Notifier(receiver.path, watchdog_usec=100_000), runner,
                           **{"daemon.stall_timeout": 0.5})
    try:
        service.start()
        assert receiver.drain(0.4).count("WATCHDOG=1") >= 3  # every 50 ms while idle
        assert service.submit_data({"id": "w1", "prompt": "a gear", "steps": 2}, "socket").accepted
        receiver.drain(0.8)  # the stall timeout passes while the worker hangs
        assert "WATCHDOG=1" not in receiver.drain(0.4)  # systemd would now restart the service
        runner.release.set()
        wait_until(lambda: service.journal.get("w1").state == "done", 30, "the job after the hang")
        assert receiver.drain(0.4).count("WATCHDOG=1") >= 3  # progress again: pings again
    finally:
        runner.release.set()
        service.stop(10)
        service.journal.close()
        receiver.close()


def test_replay_after_a_crash_between_writing_and_committing_keeps_one_image_set(tmp_path, pipeline):
    service = make_service(tmp_path, pipeline)
    job = parse_job({"id": "r1", "prompt": "a gear", "steps": 3, "count": 2, "seed": 5})
    service.journal.submit(job, "socket")
    record = service.journal.claim_next()
    service._run(record)
    done = service.journal.get("r1")
    first = {p: os.stat(p).st_mtime_ns for p in done.result["paths"]}
    # a crash after the images were written but before "done" was committed
    db = sqlite3.connect(service.journal.path)
    db.execute("UPDATE jobs SET state = 'running', result = NULL WHERE id = 'r1'")
    db.commit()
    db.close()
    assert service.journal.recover(max_attempts=3) == (["r1"], [])
    service._run(service.journal.claim_next())
    again = service.journal.get("r1")
    assert again.state == "done" and again.attempts == 2
    assert again.result["paths"] == done.result["paths"] and again.result["timings"]["replayed"] is True
    assert {p: os.stat(p).st_mtime_ns for p in again.result["paths"]} == first  # not regenerated
    assert len(list((tmp_path / "out").glob("*/*.png"))) == 2
    service.journal.close()


# --- edit jobs: their input images are as durable as the job ------------------------------------------
def _scene_png(seed=4):
    buf = io.BytesIO()
    scenes.render((scenes.Group("red", "gear", 3),), "knolling", seed=seed).image.save(buf, format="PNG")
    return buf.getvalue()


def test_kill_9_before_an_accepted_img2img_job_ran_then_restart_runs_it_with_its_input(daemons, pipeline):
    png = _scene_png()
    edit = {"id": "edit", "prompt": "knolling of 3 blue gears", "steps": 10, "seed": 9, "strength": 0.6,
            "init_image": base64.b64encode(png).decode()}
    d = daemons("e1").start()
    submit(d, {"id": "blocker", "prompt": "a red gear", "steps": 150, "count": 8})
    submit(d, edit)  # acknowledged: its input is on disk and the journal names it
    wait_mid_job(d, "blocker")
    d.kill()
    digest = hashlib.sha256(png).hexdigest()
    stored = d.state_dir / "inputs" / digest
    assert stored.read_bytes() == png
    db = sqlite3.connect(f"file:{d.state_dir / 'jobs.sqlite3'}?mode=ro", uri=True)
    (journaled,) = db.execute("SELECT job FROM jobs WHERE id = 'edit'").fetchone()
    db.close()
    assert json.loads(journaled)["init_image"] == f"sha256:{digest}"  # a reference, not the bytes
    assert d.jobs()["edit"]["state"] == "queued"  # accepted, never started

    d.start()
    wait_all_done(d, ["blocker", "edit"], timeout=600)
    by_job = images_by_job(d.images())
    assert len(by_job["edit"]) == 1 and len(by_job["blocker"]) == 8  # exactly one image set each
    # It ran with its input: the image is the one this img2img job gives in-process.
    expected = np.asarray(pipeline.generate(admit(parse_job(edit))).images[0].image).astype(float)
    got = np.asarray(Image.open(by_job["edit"][0])).astype(float)
    assert 10 * np.log10(255.0**2 / max(np.mean((got - expected) ** 2), 1e-12)) >= 40
    sidecar = json.loads(by_job["edit"][0].with_suffix(".json").read_text())
    assert sidecar["request"]["init_image"] == f"sha256:{digest}"


def test_input_images_are_stored_before_the_commit_and_pruned_with_their_job(tmp_path, pipeline, monkeypatch):
    service = make_service(tmp_path, pipeline)
    png = _scene_png(5)
    answer = service.submit_data({"id": "i1", "prompt": "a gear", "steps": 2, "strength": 0.5,
                                  "init_image": base64.b64encode(png).decode()}, "socket")
    assert answer.accepted
    (ref,) = inputs.references(service.journal.get("i1").job)
    assert service.inputs.get(ref) == png
    service._run(service.journal.claim_next())
    assert service.journal.get("i1").state == "done"
    service._maintain()  # the job is still journaled: its input stays
    assert service.inputs.get(ref) == png
    monkeypatch.setattr(inputs, "GRACE_SECONDS", 0.0)
    db = sqlite3.connect(service.journal.path)
    db.execute("UPDATE jobs SET finished = 0 WHERE id = 'i1'")  # finished long ago
    db.commit()
    db.close()
    service._last_journal_prune = 0.0
    service._maintain()  # the journal forgets the job, and its input image goes with it
    assert service.journal.get("i1") is None and not list(service.inputs.root.iterdir())
    service.journal.close()


# --- disk ------------------------------------------------------------------------------------------------
def test_free_space_floor_fails_the_job_with_a_clear_error_and_the_daemon_stays_up(daemons):
    d = daemons("f1", config={"output": {"min_free_mb": 10**9}}).start()  # a petabyte: never free
    with d.client() as c:
        messages = list(c.submit_and_watch({"id": "big", "prompt": "a gear", "steps": 2}))
    result = messages[-1]
    assert result["status"] == "error" and result["error"].startswith("disk:")
    assert "output.min_free_mb" in result["error"]
    with d.client() as c:
        assert c.request({"op": "status"})["status"] == "ok"
    assert d.alive() and not d.images()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs: a real filesystem that fills up."""
    with mounted_tmpfs(tmp_path / "disk", "1m") as mountpoint:
        yield mountpoint


def test_a_full_disk_fails_the_job_and_the_next_one_succeeds_once_there_is_room(daemons, tiny_disk):
    out = tiny_disk / "outputs"
    d = daemons("full", config={"output": {"min_free_mb": 0, "dir": str(out)}}).start()
    d.out_dir = out
    filler = tiny_disk / "filler"
    with open(filler, "wb") as f:  # leave about 8 KB: too little for one 128x128 PNG and its sidecar
        f.write(b"\0" * (disk.free_bytes(tiny_disk) - 8192))
    with d.client() as c:
        result = list(c.submit_and_watch({"id": "nospace", "prompt": "a gear", "steps": 2, "count": 2}))[-1]
    assert result["status"] == "error" and "no space left" in result["error"], result
    assert not d.images()  # nothing half-written is left to pass for output
    assert not list(out.glob("*/.*.tmp"))
    filler.unlink()
    with d.client() as c:
        result = list(c.submit_and_watch({"id": "fits", "prompt": "a gear", "steps": 2}))[-1]
    assert result["status"] == "ok" and d.alive()
    assert d.jobs()["nospace"]["state"] == "error" and d.jobs()["fits"]["state"] == "done"


def write_set(out_dir, job_id, size, mtime):
    png = image_path(out_dir, job_id, 1, datetime.fromtimestamp(mtime, timezone.utc))
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(b"p" * size)
    png.with_suffix(".json").write_bytes(b"{}")
    os.utime(png, (mtime, mtime))
    return png


def test_prune_by_age_then_by_size_oldest_first_keeping_the_new_job(tmp_path):
    now = time.time()
    old = write_set(tmp_path, "old", 1000, now - 10 * 86400)
    a = write_set(tmp_path, "a", 1000, now - 300)
    b = write_set(tmp_path, "b", 1000, now - 200)
    c = write_set(tmp_path, "c", 5000, now - 100)
    report = disk.prune(tmp_path, max_bytes=4000, max_age_days=7, keep={c}, now=now)
    assert report.files == 3  # old by age; a and b by size, oldest first; c kept although alone too big
    assert [p.exists() for p in (old, a, b, c)] == [False, False, False, True]
    assert not old.with_suffix(".json").exists() and c.with_suffix(".json").exists()
    assert not old.parent.exists()  # its empty date folder went too
    assert disk.prune(tmp_path) == disk.PruneReport()  # both limits 0: keep everything


def test_the_daemon_prunes_its_outputs_after_each_job(tmp_path, pipeline):
    service = make_service(tmp_path, pipeline, **{"output.max_bytes": 1})
    for i in range(3):
        service.journal.submit(parse_job({"id": f"p{i}", "prompt": "a gear", "steps": 2, "seed": i}), "socket")
        service._run(service.journal.claim_next())
    pngs = list((tmp_path / "out").glob("*/*.png"))
    assert [p.name.split("_")[1] for p in pngs] == ["p2"]  # only the newest job's image is left
    service.journal.close()


def test_save_result_removes_a_partial_image_set(tmp_path, pipeline):
    result = pipeline.generate(parse_job({"prompt": "a gear", "steps": 2, "count": 2, "seed": 1}))
    when = datetime(2026, 1, 2, tzinfo=timezone.utc)
    blocker = image_path(tmp_path, "x", 2, when)  # the second image's name is taken by a folder
    blocker.mkdir(parents=True)
    with pytest.raises(OutputError, match="^disk: could not write"):
        save_result(result, tmp_path, "x", model="m", provider="p", precision="fp32", when=when)
    assert not image_path(tmp_path, "x", 1, when).exists()
    assert not image_path(tmp_path, "x", 1, when).with_suffix(".json").exists()


# --- the content policy ----------------------------------------------------------------------------------
def test_policy_matches_whole_words_case_and_lookalikes_and_patterns():
    policy = ContentPolicy(("gun", "c++", "hand grenade"), (r"weap[o0]n",))
    assert not policy.check("a GUN on a table").allowed
    assert policy.check("it has begun").allowed  # whole words only
    assert not policy.check("learn c++ today").allowed
    assert not policy.check("a hand   grenade").allowed
    assert not policy.check("a ｇｕｎ").allowed  # full-width letters fold to "gun"
    assert not policy.check("a WEAP0N").allowed
    verdict = policy.check("a weapon")
    assert verdict.rule == "pattern 'weap[o0]n'"
    assert not ContentPolicy() and ContentPolicy().check("anything").allowed


# --- the notify protocol ---------------------------------------------------------------------------------
def test_notifier_from_env_honours_watchdog_pid_and_abstract_sockets():
    assert Notifier.from_env({}).enabled is False
    assert Notifier.from_env({"WATCHDOG_USEC": "4000000"}).watchdog_interval == 2.0
    assert Notifier.from_env({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    name = f"edge-test-{os.getpid()}-{threading.get_ident()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("idle, 0 queued")
        assert sock.recv(4096).decode().splitlines() == ["READY=1", "STATUS=idle, 0 queued"]
        notifier.close()
    finally:
        sock.close()
