"""The HTTP front end's costs, measured side by side in one run on a real daemon.

1. request -> job start when idle: POST /api/jobs against the socket's submit (the journal's
   ``started`` time minus the client's send time; one clock, one machine);
2. what an AUTOMATIC1111 txt2img call adds over the same job on the socket (submit + watch to
   the result there; the A1111 call also base64-encodes the PNGs into its answer);
3. the preview's cost per step (edge.preview, latents -> PNG) at the embedded model's latent size
   (4x16x16) and at SD-1.5's (4x64x64), against the embedded model's step time;
4. the RSS the HTTP front end adds: the daemon with http.enabled true against false, idle after
   one job.

    .venv/bin/python benchmarks/bench_http.py --runs 15
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks_common import machine
from edge.bundle import load_bundle
from edge.client import SocketClient
from edge.errors import EdgeError
from edge.preview import load_preview

JOB = {"prompt": "a red gear and a blue nut", "steps": 8, "seed": 42}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, folder: Path, http: bool):
        self.port = free_port()
        self.sock = folder / "s.sock"
        config = {"daemon": {"state_dir": str(folder / "state")}, "socket": {"path": str(self.sock)},
                  "mqtt": {"enabled": False}, "http": {"enabled": http, "port": self.port},
                  "output": {"min_free_mb": 0, "sidecar": False}, "log_level": "warning"}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--config", str(folder / "config.yaml")],
                                     cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with SocketClient(self.sock, timeout=60) as c:
                    if c.request({"op": "status"})["status"] == "ok":
                        break
            except (OSError, EdgeError):  # not listening yet
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, "the daemon did not start"
            time.sleep(0.1)

    def http(self, method: str, path: str, body: dict | None = None) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=json.dumps(body) if body else None)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def socket_job(self, job: dict) -> dict:
        with SocketClient(self.sock, timeout=120) as c:
            return list(c.submit_and_watch(job))[-1]

    def started(self, job_id: str) -> float:
        with SocketClient(self.sock, timeout=30) as c:
            while True:
                record = c.request({"op": "get", "id": job_id})["job"]
                if record["state"] == "done":
                    return record["started"]
                time.sleep(0.02)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def start_latency(d: Daemon, runs: int) -> tuple[list[float], list[float]]:
    via_http, via_socket = [], []
    for i in range(runs):
        t0 = time.time()
        job_id = d.http("POST", "/api/jobs", {**JOB, "steps": 1, "id": f"lh{i}"})["id"]
        via_http.append(d.started(job_id) - t0)
        t0 = time.time()
        with SocketClient(d.sock, timeout=30) as c:
            job_id = c.request({"op": "submit", "job": {**JOB, "steps": 1, "id": f"ls{i}"}})["id"]
        via_socket.append(d.started(job_id) - t0)
    return via_http, via_socket


def a1111_overhead(d: Daemon, runs: int) -> dict[str, list[float]]:
    """Wall time per call, and that minus the job's own span in the journal (submitted -> finished)."""
    out: dict[str, list[float]] = {"a1111": [], "socket": [], "a1111 front end": [], "socket front end": []}
    body = {"prompt": JOB["prompt"], "steps": JOB["steps"], "seed": JOB["seed"], "width": 128, "height": 128,
            "sampler_name": "Euler", "cfg_scale": 7.5, "batch_size": 1, "n_iter": 1}

    def span(job_id: str) -> float:
        record = d.http("GET", f"/api/jobs/{job_id}")["job"]
        return record["finished"] - record["submitted"]

    for _ in range(runs):
        t0 = time.perf_counter()
        answer = d.http("POST", "/sdapi/v1/txt2img", body)
        wall = time.perf_counter() - t0
        assert len(answer["images"]) == 1
        out["a1111"].append(wall)
        out["a1111 front end"].append(wall - span(json.loads(answer["info"])["job_id"]))
        t0 = time.perf_counter()
        result = d.socket_job({**JOB, "scheduler": "euler", "guidance": 7.5})
        wall = time.perf_counter() - t0
        assert result["status"] == "ok"
        out["socket"].append(wall)
        out["socket front end"].append(wall - span(result["id"]))
    return out


def preview_cost(runs: int) -> dict[str, float]:
    preview = load_preview(load_bundle().components["vae_decoder"].folder, 4)
    rng = np.random.default_rng(0)
    out = {}
    for side in (16, 64):
        latents = rng.standard_normal((1, 4, side, side)).astype(np.float32)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            preview.png(latents)
            times.append(time.perf_counter() - t0)
        out[f"{side}x{side}"] = statistics.median(times)
    return out


def step_time(d: Daemon) -> float:
    result = d.http("POST", "/sdapi/v1/txt2img", {"prompt": JOB["prompt"], "steps": 40, "width": 128, "height": 128})
    info = json.loads(result["info"])
    record = d.http("GET", f"/api/jobs/{info['job_id']}")
    return record["job"]["result"]["timings"]["step_mean"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rss: dict[bool, list[float]] = {True: [], False: []}
        for rep in range(3):
            for http in (False, True):
                (folder / f"r{rep}{http}").mkdir()
                d = Daemon(folder / f"r{rep}{http}", http)
                d.socket_job(JOB)
                time.sleep(0.5)
                rss[http].append(d.rss_mb())
                d.stop()
        (folder / "main").mkdir()
        d = Daemon(folder / "main", http=True)
        try:
            d.socket_job(JOB)  # warm
            via_http, via_socket = start_latency(d, args.runs)
            calls = a1111_overhead(d, args.runs)
            step = step_time(d)
        finally:
            d.stop()
    med = statistics.median
    print(f"request -> job start, idle (median of {args.runs}): HTTP POST /api/jobs {med(via_http) * 1000:.1f} ms, "
          f"socket submit {med(via_socket) * 1000:.1f} ms")
    a1111, sock = med(calls["a1111"]), med(calls["socket"])
    fa, fs = med(calls["a1111 front end"]), med(calls["socket front end"])
    print(f"{JOB['steps']}-step job, request -> result (median of {args.runs}, alternating): A1111 txt2img "
          f"{a1111 * 1000:.1f} ms, socket submit+watch {sock * 1000:.1f} ms ({a1111 / sock:.3f}x); outside the "
          f"job's own journal span: A1111 {fa * 1000:.1f} ms, socket {fs * 1000:.1f} ms, so A1111 adds "
          f"{(fa - fs) * 1000:.1f} ms")
    cost = preview_cost(200)
    print(f"embedded model step (mean of 40, fp32): {step * 1000:.2f} ms")
    for size, seconds in cost.items():
        print(f"preview latents {size} -> PNG (median of 200): {seconds * 1000:.3f} ms "
              f"= {seconds / step * 100:.1f}% of the embedded model's step")
    print(f"daemon RSS idle after one job (median of 3): http off {med(rss[False]):.1f} MB, "
          f"on {med(rss[True]):.1f} MB; the HTTP front end adds {med(rss[True]) - med(rss[False]):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
