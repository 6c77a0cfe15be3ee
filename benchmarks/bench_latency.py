"""Publish -> job start latency of an idle daemon, with and without TCP_NODELAY on its broker connection.

One job at a time (1 step): the time from the test client's publish (MQTT) or request (socket) to
its ``started`` message (the progress message with ``step`` 0, or the socket's ``started`` event).
Each run starts one daemon with ``mqtt.tcp_nodelay: false`` and one with ``true``, interleaved, on
the same broker; ``--python`` another installation to include (its own default for the option).

    python benchmarks/bench_latency.py --runs 5 --jobs 30
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchmarks_common import machine  # noqa: E402
from daemon_harness import Broker, Daemon, Listener  # noqa: E402


def mqtt_latencies(d: Daemon, broker: Broker, n: int, tag: str) -> list[float]:
    started: dict[str, float] = {}
    done = threading.Condition()
    listener = Listener(broker.port, [f"{d.prefix}/jobs/+/progress", f"{d.prefix}/jobs/+/result"], client_id=f"lat-{tag}")

    def on_message(client, userdata, msg):
        body = json.loads(msg.payload)
        if msg.topic.endswith("/progress") and body.get("state") == "running" and body.get("step") == 0:
            started.setdefault(body["id"], time.perf_counter())
        elif msg.topic.endswith("/result"):
            with done:
                done.notify_all()

    listener.client.on_message = on_message
    # the measuring client's own writes must not wait for Nagle either (its PUBACKs precede each publish)
    listener.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    try:
        for i in range(n + 1):  # the first job warms the daemon up and is not counted
            job_id = f"{tag}-{i}"
            with done:
                t0 = time.perf_counter()
                listener.client.publish(f"{d.prefix}/jobs", json.dumps({"id": job_id, "prompt": "a gear", "steps": 1}),
                                        qos=1)
                done.wait_for(lambda: job_id in started, 30)
                done.wait(0.5)  # the result: the daemon is idle again before the next publish
            if i and job_id in started:
                out.append(started[job_id] - t0)
    finally:
        listener.close()
    return out


def socket_latencies(d: Daemon, n: int) -> list[float]:
    out = []
    with d.client() as c:
        for i in range(n + 1):
            t0 = time.perf_counter()
            for m in c.submit_and_watch({"prompt": "a gear", "steps": 1}):
                if m.get("event") == "started" and i:
                    out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--python", help="also this installation (before TCP_NODELAY existed)")
    parser.add_argument("--broker-nodelay", action="store_true", help="mosquitto's set_tcp_nodelay true as well")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    folder = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    broker = Broker(folder / "broker", persistence=False,
                    extra=("set_tcp_nodelay true",) if args.broker_nodelay else ()).start()
    print(f"broker: mosquitto, set_tcp_nodelay {'true' if args.broker_nodelay else 'false (its default)'}")
    variants = {"tcp_nodelay false": ({"mqtt": {"tcp_nodelay": False}}, sys.executable),
                "tcp_nodelay true": ({"mqtt": {"tcp_nodelay": True}}, sys.executable)}
    if args.python:
        variants[args.python] = ({}, args.python)
    results: dict[str, dict[str, list[float]]] = {v: {"mqtt": [], "socket": []} for v in variants}
    try:
        for run in range(args.runs):
            for k, (name, (config, python)) in enumerate(variants.items()):
                tag = f"r{run}v{k}"
                d = Daemon(folder, tag, broker, {**config, "log_level": "info"}, python=python).start()
                try:
                    results[name]["mqtt"] += mqtt_latencies(d, broker, args.jobs, tag)
                    results[name]["socket"] += socket_latencies(d, args.jobs)
                finally:
                    d.terminate(60)
                    d.cleanup()
                print(f"run {run} {name}: mqtt median {statistics.median(results[name]['mqtt']) * 1e3:.1f} ms", flush=True)
    finally:
        broker.kill()
    print(f"\n{args.jobs} jobs per variant and run, {args.runs} interleaved runs, idle daemon")
    print("| variant | MQTT publish -> start, median | p90 | socket request -> start, median |\n| --- | --- | --- | --- |")
    for name, r in results.items():
        mq = sorted(r["mqtt"])
        print(f"| {name} | {statistics.median(mq) * 1e3:.1f} ms | {mq[int(len(mq) * 0.9)] * 1e3:.1f} ms | "
              f"{statistics.median(r['socket']) * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
