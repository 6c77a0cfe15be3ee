"""The Unix socket front end and its client, against the real pipeline on the embedded model."""

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from daemon_harness import MODEL_REFUSALS, Daemon, daemons, images_by_job, short_dir, wait_until  # noqa: F401 (fixture)
from edge.config import load_config
from edge.runner import PipelineRunner
from edge.service import Service
from edge.errors import EdgeError
from edge.jobs import Job, admit
from edge.journal import Journal
from edge.client import SocketClient
from edge.comms.unix_socket import SocketServer


class Served:
    """A Service and its SocketServer in this process (the worker starts when asked)."""

    def __init__(self, tmp_path, pipeline, **overrides):
        self.sock_dir = short_dir()
        self.path = self.sock_dir / "s.sock"
        config = load_config(None, {"socket.path": str(self.path), "daemon.state_dir": str(tmp_path / "state"),
                                    "mqtt.enabled": False, "output.min_free_mb": 0, **overrides})
        self.journal = Journal(tmp_path / "state" / "jobs.sqlite3", config.daemon.max_queue)
        self.service = Service(config, PipelineRunner(pipeline), self.journal, tmp_path / "state" / "outputs")
        self.server = SocketServer(config)
        self.server.attach(self.service)
        self.server.start()
        self.worker_started = False

    def start_worker(self):
        self.service.start()
        self.worker_started = True

    def client(self):
        return SocketClient(self.path, timeout=60)

    def close(self):
        self.server.stop_accepting()
        self.service.stop(10)
        self.server.close()
        self.journal.close()
        self.sock_dir.rmdir() if self.sock_dir.exists() and not any(self.sock_dir.iterdir()) else None


@pytest.fixture
def served(tmp_path, pipeline):
    made = []

    def make(start=True, **overrides):
        s = Served(tmp_path, pipeline, **overrides)
        if start:
            s.start_worker()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_submit_watch_get_status(served):
    s = served()
    with s.client() as c:
        messages = list(c.submit_and_watch({"id": "sock-1", "prompt": "knolling of a red gear", "steps": 4,
                                            "seed": 7, "count": 2}))
        assert messages[0]["status"] == "queued" and messages[0]["id"] == "sock-1" and messages[0]["seed"] == 7
        progress = [m for m in messages if m.get("event") == "progress"]
        assert [(m["image"], m["step"]) for m in progress] == [(i, k) for i in (1, 2) for k in (1, 2, 3, 4)]
        result = messages[-1]
        assert result["event"] == "result" and result["status"] == "ok" and result["seeds"] == [7, 8]
        for path in result["paths"]:
            assert Image.open(path).size == (128, 128)
            assert "_sock-1_" in Path(path).name
        assert c._reader.readline() == b""  # the watch ended the connection
    with s.client() as c:
        got = c.request({"op": "get", "id": "sock-1"})
        assert got["status"] == "ok" and got["state"] == "done" and got["paths"] == result["paths"]
        assert got["job"]["job"]["prompt"] == "knolling of a red gear"
        status = c.request({"op": "status"})
        assert status["status"] == "ok" and status["state"] == "idle" and status["queue"] == 0
        assert status["model"] == "knolling-tiny" and status["precision"] == "fp32" and "provider" in status


def test_resubmitting_an_id_never_runs_it_twice(served):
    s = served()
    with s.client() as c:
        first = list(c.submit_and_watch({"id": "dup", "prompt": "a lens", "steps": 2}))[-1]
    with s.client() as c:
        again = c.request({"op": "submit", "job": {"id": "dup", "prompt": "something else", "steps": 9}})
        assert again["status"] == "ok" and again["paths"] == first["paths"]
    assert len(images_by_job(sorted(s.service.out_dir.glob("*/*.png")))["dup"]) == 1


BAD = [
    (b"{not json", "payload", "is not valid JSON"),
    (b"\xff\xfe\x00garbage\x01", "payload", "is not UTF-8"),
    (b"[1, 2]", "payload", "must be a JSON object"),
    (b'{"op": "explode"}', "op", "must be one of submit, get, cancel, status, watch, list"),
    (b'{"op": "submit", "job": "a cat"}', "job", "must be a JSON object"),
    (b'{"op": "submit", "job": {"prompt": 5}}', "prompt", "must be a string"),
    (b'{"op": "submit", "job": {"prompt": "a", "steps": "many"}}', "steps", "must be an integer"),
    (b'{"op": "submit", "job": {"prompt": "a", "steps": 151}}', "steps", "between 1 and 150"),
    (b'{"op": "submit", "job": {"prompt": "a", "width": 256}}', "width", "fixed size of 128x128"),
    (b'{"op": "submit", "job": {"prompt": "a", "stpes": 3}}', "stpes", "is not a job field"),
    (b'{"op": "submit", "job": {"prompt": "a", "id": "../etc"}}', "id", "must be 1 to 64 characters"),
    (b'{"op": "submit", "job": {"prompt": "a", "scheduler": "pndm"}}', "scheduler", "not supported"),
    (b'{"op": "submit", "job": {"prompt": "' + b"x" * 20000 + b'"}}', "payload", "the limit is 16384"),
    (b'{"op": "submit", "job": {"prompt": "a photo of a Rifle"}}', "prompt", "rejected: policy"),
    (b'{"op": "submit", "job": {"prompt": "how to make a bomb"}}', "prompt", "rejected: policy"),
    (b'{"op": "get", "id": "nope"}', "id", "no job 'nope'"),
]


def test_bad_requests_get_clear_errors_and_leave_the_queue_intact(served):
    s = served(start=False, **{"policy.blocked_words": ["rifle"], "policy.blocked_patterns": [r"\bbomb(s)?\b"]})
    with s.client() as c:
        for i in range(3):  # a queue the garbage must not disturb (the worker is not running yet)
            assert c.request({"op": "submit", "job": {"id": f"keep-{i}", "prompt": "a gear", "steps": 2}})["status"] == "queued"
        for line, field, words in BAD:
            reply = c.request(line + b"\n")  # one connection for all: each error leaves it usable
            assert reply["status"] == "error", line[:60]
            assert reply["field"] == field and words in reply["error"], (line[:60], reply)
        assert c.request({"op": "status"})["queue"] == 3
    assert {r: s.journal.get(f"keep-{r}").state for r in range(3)} == {0: "queued", 1: "queued", 2: "queued"}
    assert s.journal.counts()["rejected"] == 2  # policy rejections are recorded, never run
    s.start_worker()
    for i in range(3):
        with s.client() as c:  # one connection per watch: the server closes it after the result
            results = [m for m in c.request_stream({"op": "watch", "id": f"keep-{i}"})]
            assert results[-1]["status"] == "ok"
    assert sorted(images_by_job(sorted(s.service.out_dir.glob("*/*.png")))) == ["keep-0", "keep-1", "keep-2"]


def test_model_side_checks_refuse_at_submit(served):
    s = served(start=False)
    with s.client() as c:
        for job, field, words in MODEL_REFUSALS:
            reply = c.request({"op": "submit", "job": job})
            assert reply["status"] == "error" and reply["id"] == job["id"], reply
            assert reply["field"] == field and words in reply["error"], reply
    assert all(s.journal.get(job["id"]) is None for job, _, _ in MODEL_REFUSALS)
    assert sum(s.journal.counts().values()) == 0


def test_busy_when_the_queue_is_full(served):
    s = served(start=False, **{"daemon.max_queue": 2})
    with s.client() as c:
        for i in range(2):
            c.request({"op": "submit", "job": {"prompt": "a", "steps": 1}})
        reply = c.request({"op": "submit", "job": {"prompt": "a", "steps": 1}})
        assert reply["status"] == "error" and reply["error"].startswith("busy: the queue is full (2 jobs, the limit is 2)")


def test_cancel_a_queued_job(served):
    s = served(start=False)
    with s.client() as c:
        c.request({"op": "submit", "job": {"id": "c1", "prompt": "a", "steps": 2}})
        reply = c.request({"op": "cancel", "id": "c1"})
        assert reply == {"status": "ok", "id": "c1", "state": "cancelled", "cancelled": True}
        again = c.request({"op": "cancel", "id": "c1"})  # nothing left to cancel: an error, naming the id
        assert again["status"] == "error" and again["field"] == "id" and "already cancelled" in again["error"]
        assert c.request({"op": "get", "id": "c1"})["state"] == "cancelled"
    s.start_worker()
    with s.client() as c:
        assert list(c.request_stream({"op": "watch", "id": "c1"}))[-1]["state"] == "cancelled"
    assert not list(s.service.out_dir.glob("*/*.png"))


def test_socket_mode_and_stale_socket(tmp_path, pipeline, served):
    s = served(start=False)
    assert stat.S_IMODE(os.stat(s.path).st_mode) == 0o660
    # a second daemon on a live socket refuses to start
    with pytest.raises(EdgeError, match="another daemon is listening"):
        Served(tmp_path / "b", pipeline, **{"socket.path": str(s.path)})
    # a socket file left by a dead daemon is replaced
    stale_dir = short_dir()
    stale = stale_dir / "s.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()
    t = Served(tmp_path / "c", pipeline, **{"socket.path": str(stale)})
    with SocketClient(stale, timeout=10) as c:
        assert c.request({"op": "status"})["status"] == "ok"
    t.close()
    assert not stale.exists()  # our own socket is removed at exit


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def test_submit_command_prints_paths_and_errors(served):
    s = served()
    proc = cli("submit", "exploded view of a blue battery", "--steps", "3", "--seed", "5", "--id", "cli-1",
               "--socket", str(s.path))
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    assert len(paths) == 1 and Path(paths[0]).is_file() and "_cli-1_5.png" in paths[0]
    assert "job cli-1 queued" in proc.stderr and "step 3/3" in proc.stderr  # plain lines: not a TTY
    proc = cli("submit", "x", "--steps", "0", "--socket", str(s.path))
    assert proc.returncode == 2 and "error: steps: must be between 1 and 150, got 0" in proc.stderr
    proc = cli("submit", "x", "--socket", str(s.sock_dir / "nothing.sock"))
    assert proc.returncode == 2 and "is `edge-imagegen serve` running?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a subprocess or seconds of waiting: the whole suite, not the fast lane
def test_socket_activation_uses_fd_3_and_never_unlinks(tmp_path, daemons):
    folder = short_dir()
    path = folder / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    fd = listener.fileno()
    d = daemons("act", config={"socket": {"path": str(folder / "unused.sock")}})
    # as systemd does: the socket on fd 3, LISTEN_PID = the daemon's own pid (the wrapper execs it)
    wrapper = [sys.executable, "-c", "import os, sys; os.dup2(int(sys.argv[1]), 3); "
               "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); os.execv(sys.argv[2], sys.argv[2:])",
               str(fd)]
    d.start(pass_fds=(fd,), argv_prefix=wrapper)
    assert not (folder / "unused.sock").exists()
    with SocketClient(path, timeout=60) as c:
        result = list(c.submit_and_watch({"prompt": "a gear", "steps": 2}))[-1]
        assert result["status"] == "ok" and Path(result["paths"][0]).is_file()
    assert d.terminate() == 0
    assert path.exists() and stat.S_ISSOCK(path.lstat().st_mode)  # systemd's socket is left alone
    with SocketClient(path, timeout=5):  # and still listening (our copy of the fd keeps it)
        pass
    listener.close()


def test_watch_ends_with_the_result_and_the_connection_closes(served):
    s = served()
    with s.client() as c:
        c.send({"op": "submit", "job": {"id": "w1", "prompt": "a gear", "steps": 3}, "watch": True})
        lines = []
        while (line := c._reader.readline()):  # read to the end of the stream: the server must close it
            lines.append(json.loads(line))
    assert lines[0]["status"] == "queued" and lines[-1]["event"] == "result" and lines[-1]["status"] == "ok"
    assert [m["event"] for m in lines[1:]] == ["started", "progress", "progress", "progress", "result"]
    with s.client() as c:  # a watch of a finished job: the result at once, then the end
        c.send({"op": "watch", "id": "w1"})
        assert json.loads(c._reader.readline())["paths"] == lines[-1]["paths"]
        assert c._reader.readline() == b""


def test_list_pages_across_250_jobs_newest_first(served, tmp_path):
    s = served(start=False, **{"daemon.max_queue": 300})
    ids = [f"h{i:03d}" for i in range(250)]
    for i, job_id in enumerate(ids):  # journal-level insertion (quick), read back through the socket op
        s.journal.submit(admit(Job(prompt=f"gear {i}", id=job_id, seed=i)), "socket")
    s.journal.finish("h010", "done", result={"paths": ["/x/h010.png"]})
    pages, before = [], None
    with s.client() as c:
        while True:
            page = c.request({"op": "list", "limit": 100, **({"before": before} if before else {})})
            assert page["status"] == "ok"
            pages.append(page["jobs"])
            before = page["next"]
            if before is None:
                break
        assert [len(p) for p in pages] == [100, 100, 50]
        listed = [j["id"] for p in pages for j in p]
        assert listed == ids[::-1]  # newest first, each once, none missing
        h010 = next(j for p in pages for j in p if j["id"] == "h010")
        assert (h010["state"], h010["prompt"], h010["seeds"], h010["paths"]) == ("done", "gear 10", [10], ["/x/h010.png"])
        assert {"submitted", "started", "finished", "job", "source", "error"} <= set(h010)
        assert c.request({"op": "list"})["jobs"][0]["id"] == "h249" and len(c.request({"op": "list"})["jobs"]) == 20
        assert c.request({"op": "list", "limit": 5, "before": "h000"}) == {"status": "ok", "jobs": [], "next": None}
        for bad, field in (({"limit": 0}, "limit"), ({"limit": "9"}, "limit"), ({"limit": 501}, "limit"),
                           ({"before": "../x"}, "before")):
            reply = c.request({"op": "list", **bad})
            assert reply["status"] == "error" and reply["field"] == field, reply
    # the CLI over the same socket: a page as text, every page as JSON
    proc = cli("history", "--limit", "3", "--socket", str(s.path))
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["h249", "h248", "h247"]
    assert '"gear 249"' in proc.stdout and "queued" in proc.stdout
    proc = cli("history", "--all", "--json", "--limit", "100", "--before", "h100", "--socket", str(s.path))
    assert proc.returncode == 0, proc.stderr
    assert [j["id"] for line in proc.stdout.splitlines() for j in json.loads(line)["jobs"]] == ids[:100][::-1]
    proc = cli("history", "--limit", "0", "--socket", str(s.path))
    assert proc.returncode == 2 and "error: limit: must be an integer between 1 and 500" in proc.stderr


def test_an_off_domain_prompt_warns_in_the_result(served):
    s = served()
    with s.client() as c:  # one connection per watch: the server closes it after the result
        result = list(c.submit_and_watch({"id": "cat", "prompt": "a cat on a sofa", "steps": 2}))[-1]
    with s.client() as c:
        known = list(c.submit_and_watch({"id": "gear", "prompt": "knolling of 3 red gears", "steps": 2}))[-1]
    assert result["status"] == "ok" and "unknown: cat, sofa" in result["warnings"][0]
    assert "warnings" not in known


# --- hardening (issue 12) -------------------------------------------------------------------------------
HOSTILE_LINES = [  # each once closed the connection without a reply, or was accepted and failed later
    (b"[" * 3000, "payload", "nested too deeply"),
    (b'{"op": "submit", "job": {"prompt": "a", "seed": 1' + b"0" * 5000 + b"}}", "payload", "4300 digits"),
    (b'{"op": "submit", "job": {"prompt": "a", "guidance": 1' + b"0" * 400 + b"}}", "guidance", "401 digits"),
    (b'{"op": "submit", "job": {"prompt": "a\\ud800 gears"}}', "prompt", "lone surrogate"),
    (b'{"op": "submit", "job": {"prompt": "a", "id": "x\\n"}}', "id", "must be 1 to 64 characters"),
    (b'{"op": "watch", "id": {"a": [' + b"[" * 500 + b"]" * 500 + b"]}}", "id", "no job"),
    (b'{"op": "get", "id": [1, 2]}', "id", "no job"),
    (b"\xed\xa0\x80", "payload", "is not UTF-8"),  # a surrogate encoded as UTF-8 bytes
]


def test_hostile_lines_are_each_answered_and_the_connection_keeps_taking_jobs(served):
    s = served()
    with s.client() as c:
        for line, field, words in HOSTILE_LINES:
            reply = c.request(line + b"\n")
            assert reply["status"] == "error" and reply["field"] == field and words in reply["error"], (line[:50], reply)
        result = list(c.submit_and_watch({"id": "after", "prompt": "a gear", "steps": 2}))[-1]
    assert result["status"] == "ok" and all(Path(p).is_file() for p in result["paths"])
    assert [r.id for r in s.journal.history()] == ["after"]  # none of the hostile ones was stored


@pytest.mark.slow  # a subprocess or seconds of waiting: the whole suite, not the fast lane
def test_a_broken_listening_socket_is_bound_again_and_shown_degraded_meanwhile(served):
    s = served(start=False)
    s.service.supervisor.min_delay = 0.5
    s.server.sock.shutdown(socket.SHUT_RDWR)  # accept() now fails with EINVAL: the socket itself is broken
    wait_until(lambda: s.service.status()["degraded"] == ["socket-accept"], 10, "the accept thread to be down")
    wait_until(lambda: s.service.status()["degraded"] == [], 10, "the accept thread to be back")
    with s.client() as c:
        assert c.request({"op": "status"})["degraded"] == []
        assert c.request({"op": "submit", "job": {"prompt": "a gear", "steps": 1}})["status"] == "queued"
    assert s.service.supervisor.healthy()


@pytest.mark.slow  # a subprocess or seconds of waiting: the whole suite, not the fast lane
def test_a_socket_that_cannot_come_back_stops_the_watchdog(tmp_path, pipeline):
    from test_daemon import NotifyReceiver  # noqa: PLC0415 (a helper of that module)
    from edge.notify import Notifier
    receiver = NotifyReceiver()
    s = Served(tmp_path, pipeline)
    s.service.notifier = Notifier(receiver.path, watchdog_usec=100_000)
    s.service.supervisor.min_delay, s.service.supervisor.max_restarts = 0.05, 2
    s.start_worker()
    try:
        assert receiver.drain(0.5).count("WATCHDOG=1") >= 2
        s.server.sock.shutdown(socket.SHUT_RDWR)
        s.path.unlink()
        s.path.write_text("not a socket")  # every rebind fails: the thread cannot come back
        wait_until(lambda: not s.service.supervisor.healthy(), 10, "the supervisor to give up")
        receiver.drain(0.3)
        assert "WATCHDOG=1" not in receiver.drain(0.5)  # systemd restarts the daemon
        assert s.service.status()["degraded"] == ["socket-accept"]
    finally:
        s.path.unlink(missing_ok=True)
        s.close()
        receiver.close()


def test_the_peer_uid_and_gid_are_kept_in_the_journal_and_the_sidecar(served):
    s = served()
    with s.client() as c:
        result = list(c.submit_and_watch({"id": "who", "prompt": "a gear", "steps": 2}))[-1]
    me = {"uid": os.getuid(), "gid": os.getgid()}
    assert s.journal.get("who").peer == me
    sidecar = json.loads(Path(result["paths"][0]).with_suffix(".json").read_text())
    assert sidecar["submitted_by"] == me


def test_the_allow_list_refuses_other_uids_and_admits_listed_ones_and_groups(served):
    import grp
    s = served(start=False, **{"socket.allow_uids": [os.getuid() + 4242]})
    with s.client() as c:
        reply = c.receive()  # refused at connect, before any request
    assert reply["status"] == "error" and reply["error"].startswith(f"permission: uid {os.getuid()} ")
    my_group = grp.getgrgid(os.getgid()).gr_name
    for allowed in ({"socket.allow_uids": [os.getuid()]}, {"socket.allow_groups": [my_group]}):
        t = served(start=False, **allowed)
        with t.client() as c:
            assert c.request({"op": "status"})["status"] == "ok"
    with pytest.raises(EdgeError, match="socket.allow_groups: there is no group 'no-such-group-x'"):
        served(start=False, **{"socket.allow_groups": ["no-such-group-x"]})
