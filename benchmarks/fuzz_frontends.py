"""The long fuzz run: ``--payloads`` generated payloads to each front end of a real daemon.

Payloads are drawn from a seeded generator (reproducible with ``--seed``): random bytes, JSON
nested thousands deep, integers of thousands of digits, lone surrogates, invalid UTF-8, NUL, and
valid jobs with fields swapped for hostile values. Socket: one request line each on one connection,
read back one reply each (a missing reply or a dropped connection is "unanswered"). MQTT: each
published with its own ResponseTopic and CorrelationData, so every answer is matched to its request.
A crash is the daemon exiting, a traceback in its log, or a supervised thread dying. At the end a
valid job must still run on each front end.

    python benchmarks/fuzz_frontends.py --payloads 10000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


from benchmarks_common import machine  # noqa: E402
from daemon_harness import Broker, Daemon, Listener, response_props, wait_until  # noqa: E402

HOSTILE_VALUES = ["null", "true", "-1", "0", "1e400", "-1e400", "NaN", "Infinity", "1" + "0" * 400, "9" * 5000,
                  '""', '"   "', '"\\ud800"', '"a\\udfff b"', '"\\u0000"', '"x\\n"', '"../../etc/passwd"',
                  '"' + "x" * 2000 + '"', "[]", "{}", "[" * 2000 + "]" * 2000, '{"a": ' * 500 + "1" + "}" * 500,
                  "0.5", "2.5", "150", "151", "8", "9", "-10", "11", '"euler"', '"lcm"', '"pndm"', "4.0",
                  '"a gear"', '"ok-id"', '"a/#"', '"+"']
FIELDS = ["prompt", "negative_prompt", "steps", "guidance", "seed", "count", "width", "height", "scheduler",
          "priority", "id", "stpes", "op", "job", "\\ud800", ""]


def payload(rng: random.Random, i: int) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:
        n = rng.choice([10, 999, 1000, 3000, 20000])
        return (rng.choice("[{") * n).encode()
    if kind == 2:
        return ("".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 40)))
                .encode("utf-8", "surrogatepass"))
    if kind == 3:  # a valid job, truncated somewhere
        text = json.dumps({"id": f"t{i}", "prompt": "a gear", "steps": 1})
        return text[: rng.randrange(len(text))].encode()
    # a job with 1 to 3 fields replaced by hostile values (steps 1: valid ones run quickly)
    fields = {"id": f'"j{i}"', "prompt": '"a gear"', "steps": "1"}
    for _ in range(rng.randrange(1, 4)):
        fields[rng.choice(FIELDS)] = rng.choice(HOSTILE_VALUES)
    return ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()


def fuzz_socket(d: Daemon, payloads: list[bytes]) -> int:
    unanswered = 0
    c = d.client(timeout=30)
    for raw in payloads:
        line = raw.replace(b"\n", b" ")
        if line[:1] == b"{" and len(line) % 2:  # half of the objects as the submitted job, half as the request
            line = b'{"op": "submit", "job": ' + line + b"}"
        try:
            reply = c.request(line + b"\n")
            if reply.get("status") not in ("queued", "running", "ok", "error"):
                unanswered += 1
        except (OSError, ValueError):
            unanswered += 1
            c.close()
            c = d.client(timeout=30)
    c.close()
    return unanswered


def fuzz_mqtt(d: Daemon, broker: Broker, payloads: list[bytes]) -> int:
    listener = Listener(broker.port, ["fuzz/reply/#"], client_id="fuzz-listener")
    try:
        for i, raw in enumerate(payloads):
            info = listener.client.publish(f"{d.prefix}/jobs", raw, qos=1,
                                           properties=response_props(f"fuzz/reply/{i % 100}", i.to_bytes(4, "big")))
            if i % 200 == 199:
                info.wait_for_publish(30)  # keep the broker's queue for the daemon bounded
        sent = set(range(len(payloads)))

        def answered() -> set[int]:
            with listener.cond:
                return {int.from_bytes(m.properties.CorrelationData, "big") for m in listener.messages}

        try:
            wait_until(lambda: answered() >= sent, 300, "every MQTT payload answered", interval=0.5)
        except AssertionError:
            pass
        return len(sent - answered())
    finally:
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rng = random.Random(args.seed)
    payloads = [payload(rng, i) for i in range(args.payloads)]
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    broker = Broker(folder / "broker", persistence=False).start()
    d = Daemon(folder, "fuzz", broker, {"log_level": "info", "daemon": {"max_queue": 100}}).start()
    try:
        t0 = time.monotonic()
        socket_unanswered = fuzz_socket(d, payloads)
        t1 = time.monotonic()
        mqtt_unanswered = fuzz_mqtt(d, broker, payloads)
        t2 = time.monotonic()
        with d.client(timeout=600) as c:
            socket_ok = list(c.submit_and_watch({"prompt": "a gear", "steps": 2, "priority": 10}))[-1]["status"] == "ok"
        listener = Listener(broker.port, [f"{d.prefix}/jobs/fuzz-last/result"], client_id="fuzz-last")
        listener.publish(f"{d.prefix}/jobs", json.dumps({"id": "fuzz-last", "prompt": "a gear", "steps": 2,
                                                         "priority": 10}))
        mqtt_ok = json.loads(listener.wait_for(lambda m: True, timeout=600).payload)["status"] == "ok"
        listener.close()
        log = d.log()
        crashes = (0 if d.alive() else 1) + log.count("Traceback") + log.count(" died")
        print(f"seed {args.seed}: {args.payloads} payloads per front end")
        print(f"socket: {socket_unanswered} unanswered in {t1 - t0:.0f} s; valid job after: {socket_ok}")
        print(f"mqtt:   {mqtt_unanswered} unanswered in {t2 - t1:.0f} s; valid job after: {mqtt_ok}")
        print(f"crashes (daemon exited, tracebacks, dead threads): {crashes}")
    finally:
        d.terminate(120)
        d.cleanup()
        broker.kill()
    sys.exit(0 if not (socket_unanswered or mqtt_unanswered or crashes) and socket_ok and mqtt_ok else 1)


if __name__ == "__main__":
    main()
