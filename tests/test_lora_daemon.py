"""LoRA jobs through a real daemon: alternating LoRAs and strengths, and a kill -9 mid-job."""

import numpy as np
import pytest
from PIL import Image

from daemon_harness import daemons, images_by_job  # noqa: F401
from edge.bundle import load_bundle
from edge.config import LoraConfig
from edge.jobs import parse_job
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions
from lora_files import KNOLLING_MODULES, random_kohya_lora
from test_daemon import submit, wait_all_done, wait_mid_job

pytestmark = pytest.mark.slow

JOBS = {
    "a1": {"loras": [{"name": "parts", "strength": 0.5}]},
    "b1": {"loras": [{"name": "lines", "strength": 1.0}]},
    "a2": {"loras": [{"name": "parts", "strength": 1.2}]},
    "n1": {},
    "ab": {"prompt": "knolling of 2 blue nuts <lora:lines:0.4>", "loras": [{"name": "parts", "strength": 0.7}]},
    "b2": {"loras": [{"name": "lines", "strength": 0.0}]},
}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    random_kohya_lora(folder / "parts.safetensors", KNOLLING_MODULES, seed=21, size=4.0)
    random_kohya_lora(folder / "lines.safetensors", KNOLLING_MODULES, seed=22, size=4.0)
    return folder


def direct(lora_dir, jobs):
    """The same jobs run straight through a pipeline of the same model, tier and threads."""
    pipe = Pipeline(load_bundle(), RuntimeOptions(threads=1), lora=LoraConfig(dir=str(lora_dir)))
    out = {}
    for job_id, data in jobs.items():
        job = parse_job({"id": job_id, **data})
        pipe.check(job)
        out[job_id] = np.asarray(pipe.generate(job).images[0].image)
    return out


def test_alternating_loras_and_strengths_each_give_their_own_image(daemons, lora_dir):
    d = daemons("l1", config={"lora": {"dir": str(lora_dir)}, "model": {"precision": "fp32"}}).start()
    jobs = {job_id: {"prompt": "knolling of 3 red gears", "steps": 4, "seed": 3, **fields}
            for job_id, fields in JOBS.items()}
    for job_id, data in jobs.items():
        submit(d, {"id": job_id, **data})
    wait_all_done(d, list(jobs))
    by_job = images_by_job(d.images())
    served = {job_id: np.asarray(Image.open(by_job[job_id][0]).convert("RGB")) for job_id in jobs}
    expected = direct(lora_dir, jobs)
    for job_id in jobs:
        assert np.array_equal(served[job_id], expected[job_id]), job_id
    assert np.array_equal(served["b2"], served["n1"])  # strength 0 is the base model
    assert len({served[j].tobytes() for j in ("a1", "b1", "a2", "n1", "ab")}) == 5


def test_kill_9_mid_job_replays_with_the_same_lora(daemons, lora_dir):
    d = daemons("l2", config={"lora": {"dir": str(lora_dir)}, "model": {"precision": "fp32"}}).start()
    job = {"id": "k1", "prompt": "flat lay of a green chip <lora:lines:0.9>", "steps": 60, "seed": 5}
    submit(d, job)
    wait_mid_job(d, "k1")
    d.kill()
    assert d.jobs()["k1"]["state"] == "running"
    d.start()
    jobs = wait_all_done(d, ["k1"], timeout=300)
    assert jobs["k1"]["attempts"] == 2
    [path] = images_by_job(d.images())["k1"]
    expected = direct(lora_dir, {"k1": job, "base": {**job, "prompt": "flat lay of a green chip"}})
    served = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(served, expected["k1"]) and not np.array_equal(served, expected["base"])
    assert "<lora:lines:0.9>" in Image.open(path).info["parameters"]
