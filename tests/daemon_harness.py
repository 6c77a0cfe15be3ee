"""Test helpers: a real Mosquitto broker, a daemon subprocess, an MQTT test client.

Everything waits on events (a port that accepts, READY=1 on a notify socket, a message that
arrived) with a deadline instead of sleeping; every process is killed in a finalizer.
"""

from __future__ import annotations

import getpass
from contextlib import contextmanager
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.client import SocketClient

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (./test.sh installs it)")


# Deadlines are for a hung test, not a slow machine: under qemu emulation (tests/arm64/run.sh) a
# denoising step takes a couple of hundred times longer, so that runner scales every deadline.
TIMEOUT_SCALE = float(os.environ.get("EDGE_TEST_TIMEOUT_SCALE", "1"))

# What only the model or its scheduler knows, refused at submit: nothing of these reaches the journal.
MODEL_REFUSALS = [
    ({"id": "m1", "prompt": "a gear", "scheduler": "lcm", "steps": 60}, "steps", "between 1 and 50"),
    ({"id": "m2", "prompt": "a gear", "width": 256, "height": 256}, "width", "fixed size of 128x128"),
    ({"id": "m3", "prompt": "a gear", "scheduler": "pndm"}, "scheduler", "'pndm' is not supported"),
    ({"id": "m4", "prompt": "a gear", "image_guidance": 1.5}, "image_guidance", "this model does not take it"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll a cheap predicate (a port, a file) until it holds; for things that have no event to wait on."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def short_dir() -> Path:
    """A short temp folder: Unix socket paths are limited to 107 bytes, pytest's tmp_path can be longer."""
    return Path(tempfile.mkdtemp(prefix="eg-"))


# --- the broker -------------------------------------------------------------------------------------
class Broker:
    """``mosquitto -c <conf>`` on a free loopback port, persistence on (autosave on every change)."""

    def __init__(self, folder: Path, persistence: bool = True, extra: tuple[str, ...] = ()):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 f"log_dest file {folder / 'mosquitto.log'}", "log_type error", "log_type warning",
                 "log_type notice", "log_type information", "max_queued_messages 100000",
                 f"user {getpass.getuser()}"]  # when run as root, do not drop to user mosquitto
        lines += list(extra)  # more mosquitto.conf lines (benchmarks: set_tcp_nodelay)
        if persistence:
            lines += ["persistence true", f"persistence_location {folder}/", "autosave_interval 1",
                      "autosave_on_changes true"]
        lines += extra  # e.g. "max_packet_size 6000"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> Broker:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

        def accepting() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.proc.stderr.read().decode()} {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_until(accepting, timeout, f"mosquitto to accept on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file and exits
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


# --- an MQTT test client ------------------------------------------------------------------------------
class Listener:
    """A paho client that records every message it receives and lets a test wait for one."""

    def __init__(self, port: int, topics: list[str], client_id: str | None = None, persistent: bool = False):
        self.messages: list[mqtt.MQTTMessage] = []
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{os.getpid()}-{id(self)}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(1, 1)
        self.topics = topics

        def on_connect(client, userdata, flags, rc, props):
            client.subscribe([(t, 1) for t in topics])

        def on_subscribe(client, userdata, mid, rcs, props):
            self.connected.set()

        def on_message(client, userdata, msg):
            with self.cond:
                self.messages.append(msg)
                self.cond.notify_all()

        self.client.on_connect, self.client.on_subscribe, self.client.on_message = on_connect, on_subscribe, on_message
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
        self.client.connect("127.0.0.1", port, 30, clean_start=not persistent, properties=props)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise AssertionError(f"test client could not subscribe to {topics}")

    def wait_for(self, predicate: Callable[[mqtt.MQTTMessage], bool], timeout: float = 30.0,
                 what: str = "a message") -> mqtt.MQTTMessage:
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for msg in self.messages:
                    if predicate(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    topics = [m.topic for m in self.messages][-20:]
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last topics: {topics}")
                self.cond.wait(remaining)

    def wait_count(self, predicate: Callable[[mqtt.MQTTMessage], bool], n: int, timeout: float = 60.0,
                   what: str = "messages") -> list[mqtt.MQTTMessage]:
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if len(found) >= n:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout} s: {len(found)} of {n} {what}")
                self.cond.wait(remaining)

    def results(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        with self.cond:
            for m in self.messages:
                if m.topic.endswith("/result"):
                    out.setdefault(m.topic.split("/")[-2], []).append(json.loads(m.payload))
        return out

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, properties: Properties | None = None) -> None:
        self.client.publish(topic, payload, qos=qos, properties=properties).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def topic_is(topic: str) -> Callable[[mqtt.MQTTMessage], bool]:
    return lambda m: m.topic == topic


def response_props(topic: str, correlation: bytes = b"c") -> Properties:
    """MQTT 5 PUBLISH properties asking for the answers on ``topic`` with ``correlation``."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    props.CorrelationData = correlation
    return props


# --- the daemon ---------------------------------------------------------------------------------------
class Daemon:
    """``python -m edge.cli serve`` in a subprocess, with NOTIFY_SOCKET pointing at the test."""

    def __init__(self, folder: Path, name: str = "d1", broker: Broker | None = None,
                 config: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 python: str = sys.executable):
        self.folder = folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.broker = broker
        self.short = short_dir()
        self.socket_path = self.short / "s.sock"
        self.state_dir = self.folder / "state"
        self.out_dir = self.state_dir / "outputs"
        self.prefix = f"test/{name}"
        self.http_port = free_port()
        base: dict[str, Any] = {
            "runtime": {"threads": 1},
            "daemon": {"state_dir": str(self.state_dir), "device_id": name, "stop_timeout": 10.0 * TIMEOUT_SCALE},
            "socket": {"path": str(self.socket_path)},
            "mqtt": {"enabled": broker is not None, "host": "127.0.0.1", "port": broker.port if broker else 1883,
                     "client_id": f"edge-test-{name}", "topic_prefix": self.prefix, "session_expiry": 300,
                     "reconnect_min_delay": 1, "reconnect_max_delay": 2, "progress_interval": 0.0},
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "output": {"min_free_mb": 0},
            "log_level": "debug",
        }
        for section, values in (config or {}).items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section].update(values)
            else:
                base[section] = values
        self.url = f"http://{base['http']['host']}:{base['http']['port']}"  # the HTTP front end
        self.config_path = self.folder / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(base))
        self.extra_env = env or {}
        self.python = python  # another interpreter runs another installation (benchmarks: before/after)
        self.proc: subprocess.Popen | None = None
        self.notes: list[str] = []
        self.notes_cond = threading.Condition()
        self._notify_sock: socket.socket | None = None
        self.log_path = self.folder / "daemon.log"

    # --- notify protocol ----------------------------------------------------------------------------
    def _open_notify(self) -> str:
        path = self.short / f"notify-{len(list(self.short.glob('notify-*')))}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        self._notify_sock = sock

        def read() -> None:
            while True:
                try:
                    data = sock.recv(4096)
                except OSError:
                    return
                with self.notes_cond:
                    self.notes.extend(data.decode().splitlines())
                    self.notes_cond.notify_all()

        threading.Thread(target=read, daemon=True).start()
        return str(path)

    def wait_note(self, predicate: Callable[[str], bool], timeout: float = 60.0, what: str = "a notification",
                  start: int = 0) -> str:
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        with self.notes_cond:
            while True:
                for note in self.notes[start:]:
                    if predicate(note):
                        return note
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited ({self.proc.returncode}) before {what}:\n{self.log()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {what}; notes {self.notes}\n{self.log()}")
                self.notes_cond.wait(min(remaining, 0.5))

    # --- process ------------------------------------------------------------------------------------
    def start(self, wait: bool = True, pass_fds: tuple[int, ...] = (), argv_prefix: list[str] | None = None) -> Daemon:
        if self._notify_sock is not None:
            self._notify_sock.close()
        with self.notes_cond:
            self.notes = []
        env = {**os.environ, "NOTIFY_SOCKET": self._open_notify(), **self.extra_env}
        argv = [self.python, "-m", "edge.cli", "serve", "--config", str(self.config_path)]
        subscribed = self.log().count("subscribed to the job topics")
        log = open(self.log_path, "ab")
        # cwd "/": `-m edge.cli` imports the installed package (./test.sh), not the source tree
        self.proc = subprocess.Popen((argv_prefix or []) + argv, cwd="/", env=env, stdout=log, stderr=log,
                                     pass_fds=pass_fds)
        log.close()
        if wait:
            self.wait_note(lambda n: n == "READY=1", what="READY=1")
            if self.broker is not None and self.broker.proc is not None:
                # READY=1 means the model is loaded; a job published before the daemon's first
                # SUBSCRIBE reached the broker would have no session to wait in
                wait_until(lambda: self.log().count("subscribed to the job topics") > subscribed, 30,
                           f"{self.name} to subscribe")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout * TIMEOUT_SCALE)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self) -> None:
        self.kill()
        if self._notify_sock is not None:
            self._notify_sock.close()
        shutil.rmtree(self.short, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- looking inside -------------------------------------------------------------------------------
    def client(self, timeout: float = 60.0) -> SocketClient:
        return SocketClient(self.socket_path, timeout=timeout * TIMEOUT_SCALE)

    def jobs(self) -> dict[str, dict[str, Any]]:
        """The journal's rows (read-only; WAL lets us read while the daemon writes)."""
        db = sqlite3.connect(f"file:{self.state_dir / 'jobs.sqlite3'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT id, state, attempts, result, error FROM jobs").fetchall()
        finally:
            db.close()
        return {r[0]: {"state": r[1], "attempts": r[2], "result": json.loads(r[3]) if r[3] else None,
                       "error": r[4]} for r in rows}

    def images(self) -> list[Path]:
        return sorted(self.out_dir.glob("*/*.png"))


def images_by_job(paths: list[Path]) -> dict[str, list[Path]]:
    """Image files grouped by job id (names: <time>_<job id>_<seed>.png)."""
    out: dict[str, list[Path]] = {}
    for p in paths:
        job_id = p.stem.split("_", 1)[1].rsplit("_", 1)[0]
        out.setdefault(job_id, []).append(p)
    return out


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture
def broker(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (./test.sh installs it)")
    b = Broker(tmp_path / "broker").start()
    yield b
    b.kill()


@pytest.fixture
def daemons(tmp_path):
    """A factory of daemon subprocesses, all killed at the end of the test."""
    made: list[Daemon] = []

    def make(name: str = "d1", broker: Broker | None = None, config: dict | None = None, **kw: Any) -> Daemon:
        d = Daemon(tmp_path, name, broker, config, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def listeners():
    made: list[Listener] = []

    def make(port: int, topics: list[str], **kw: Any) -> Listener:
        listener = Listener(port, topics, **kw)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()


@contextmanager
def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` that fills up (needs mount rights, e.g. root in a container)."""
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
