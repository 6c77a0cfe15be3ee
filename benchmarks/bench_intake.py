"""Intake throughput of a real daemon: jobs accepted per second over MQTT and over the socket.

Each run starts a fresh daemon (its own state folder) on a real Mosquitto broker and floods it:
MQTT: ``--jobs`` QoS 1 messages from one client, as fast as paho sends them, timed until every job
is in the journal; socket: ``--clients`` connections submitting ``--jobs`` jobs in all, timed until
the last reply. Every job is 1 step, so the worker runs them meanwhile (intake "while the worker
runs"). ``--python`` names other interpreters with other installations of edge-imagegen (e.g. the
code before group commit); the runs of all of them are interleaved and the medians reported.

    python benchmarks/bench_intake.py --runs 5 --python /tmp/venv-old/bin/python --python .venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from benchmarks_common import machine  # noqa: E402
from daemon_harness import Broker, Daemon, wait_until  # noqa: E402


def journaled(d: Daemon) -> int:
    db = sqlite3.connect(f"file:{d.state_dir / 'jobs.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM jobs").fetchone()[0]
    finally:
        db.close()


def mqtt_rate(d: Daemon, broker: Broker, n: int, tag: str) -> float:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{tag}")
    client.max_inflight_messages_set(0)  # unlimited: the daemon, not this client, sets the pace
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    payloads = [json.dumps({"id": f"{tag}-m{i}", "prompt": "a gear", "steps": 1}) for i in range(n)]
    t0 = time.perf_counter()
    infos = [client.publish(f"{d.prefix}/jobs", p, qos=1) for p in payloads]
    wait_until(lambda: journaled(d) >= n, 600, f"{n} MQTT jobs in the journal", interval=0.01)
    elapsed = time.perf_counter() - t0
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    return n / elapsed


def socket_rate(d: Daemon, n: int, clients: int, tag: str) -> float:
    per = n // clients
    errors: list[str] = []

    def submit(k: int) -> None:
        with d.client() as c:
            for i in range(per):
                reply = c.request({"op": "submit", "job": {"id": f"{tag}-s{k}-{i}", "prompt": "a gear", "steps": 1}})
                if reply["status"] != "queued" and reply["status"] != "ok":
                    errors.append(reply.get("error", str(reply)))

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"socket submissions refused: {errors[:3]}")
    return per * clients / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", help="interpreter of an installation to measure (repeatable)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    pythons = args.python or [sys.executable]
    print(f"machine: {machine()}")
    folder = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    broker = Broker(folder / "broker", persistence=False).start()
    rates: dict[str, dict[str, list[float]]] = {p: {"mqtt": [], "socket": []} for p in pythons}
    try:
        for run in range(args.runs):
            for k, python in enumerate(pythons):
                tag = f"r{run}p{k}"
                d = Daemon(folder, tag, broker, {"daemon": {"max_queue": 10 * args.jobs}, "log_level": "info"},
                           python=python).start()
                try:
                    rates[python]["mqtt"].append(mqtt_rate(d, broker, args.jobs, tag))
                    rates[python]["socket"].append(socket_rate(d, args.jobs, args.clients, tag))
                finally:
                    d.terminate(120)
                    d.cleanup()
                print(f"run {run} {python}: mqtt {rates[python]['mqtt'][-1]:.0f} jobs/s, "
                      f"socket {rates[python]['socket'][-1]:.0f} jobs/s", flush=True)
    finally:
        broker.kill()
    print(f"\n{args.jobs} jobs per front end and run, {args.clients} socket clients, {args.runs} interleaved runs")
    print("| installation | MQTT jobs/s (median) | socket jobs/s (median) |\n| --- | --- | --- |")
    for python in pythons:
        print(f"| {python} | {statistics.median(rates[python]['mqtt']):.0f} | "
              f"{statistics.median(rates[python]['socket']):.0f} |")


if __name__ == "__main__":
    main()
