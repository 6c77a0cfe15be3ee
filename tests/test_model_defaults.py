"""A bundle's edge.json: its model's recommended steps, guidance and scheduler as job defaults."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_harness import daemons  # noqa: F401 (fixture)
from edge.bundle import load_bundle
from edge.loader import model_defaults, with_model_defaults
from edge.config import load_config
from edge.errors import BundleError
from edge.jobs import Defaults, parse_job


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd="/")


def test_recommended_values_become_the_job_defaults(bundle_copy):
    (bundle_copy / "edge.json").write_text('{"steps": 2, "guidance": 1, "scheduler": "euler_a"}')
    bundle = load_bundle(bundle_copy)
    assert bundle.recommended == {"steps": 2, "guidance": 1.0, "scheduler": "euler_a"}
    defaults, sources = model_defaults(load_config(overrides={"defaults.negative_prompt": "blurry"}), bundle)
    assert defaults == Defaults(negative_prompt="blurry", steps=2, guidance=1.0, scheduler="euler_a")
    assert sources == {"negative_prompt": "config", "steps": "edge.json", "guidance": "edge.json",
                       "scheduler": "edge.json", "count": "built-in", "width": "built-in", "height": "built-in"}
    job = parse_job({"prompt": "a gear"}, defaults=defaults)
    assert (job.steps, job.guidance, job.scheduler, job.negative_prompt) == (2, 1.0, "euler_a", "blurry")
    job = parse_job({"prompt": "a gear", "steps": 9, "guidance": 5, "scheduler": "ddim"}, defaults=defaults)
    assert (job.steps, job.guidance, job.scheduler) == (9, 5.0, "ddim")  # the job's own fields win
    config = with_model_defaults(load_config(overrides={"model.path": str(bundle_copy)}))
    assert config.defaults == Defaults(steps=2, guidance=1.0, scheduler="euler_a")  # what serve validates with


def test_a_value_the_users_config_sets_wins_over_edge_json(bundle_copy, tmp_path):
    (bundle_copy / "edge.json").write_text('{"steps": 2, "guidance": 1, "scheduler": "euler_a"}')
    path = tmp_path / "config.yaml"
    # steps set, guidance left out, scheduler null ("the bundle's"): only steps is the user's
    path.write_text(f"model:\n  path: {bundle_copy}\ndefaults:\n  steps: 20\n  scheduler: null\n")
    config = load_config(path)
    assert with_model_defaults(config).defaults == Defaults(steps=20, guidance=1.0, scheduler="euler_a")
    _, sources = model_defaults(config, load_bundle(bundle_copy))
    assert (sources["steps"], sources["guidance"], sources["scheduler"]) == ("config", "edge.json", "edge.json")
    config = load_config(path, {"defaults.guidance": 7.5})  # the command line's --set counts as the user's
    assert with_model_defaults(config).defaults == Defaults(steps=20, guidance=7.5, scheduler="euler_a")
    job = parse_job({"prompt": "a gear", "steps": 3}, defaults=with_model_defaults(config).defaults)
    assert job.steps == 3  # and a job's own field over both


def test_the_shipped_config_file_leaves_the_bundle_its_say(bundle_copy):
    """configs/default.yaml is what the install copies to /etc: it must not pin steps and guidance."""
    (bundle_copy / "edge.json").write_text('{"steps": 1, "guidance": 0.0}')
    config = load_config(Path(__file__).parents[1] / "configs" / "default.yaml", {"model.path": str(bundle_copy)})
    defaults = with_model_defaults(config).defaults
    assert (defaults.steps, defaults.guidance) == (1, 0.0)


def test_without_edge_json_the_config_defaults_stay(bundle_copy):
    assert load_bundle(bundle_copy).recommended == {}
    config = load_config(overrides={"model.path": str(bundle_copy), "defaults.steps": 7})
    assert with_model_defaults(config).defaults.steps == 7
    assert model_defaults(load_config(), load_bundle(bundle_copy))[0] == Defaults()


@pytest.mark.parametrize("text, words", [
    ('{"step": 2}', "edge.json: step: unknown key; known keys: steps, guidance, scheduler"),
    ('{"steps": "two"}', "edge.json: steps: must be a int, got 'two'"),
    ('{"steps": 0}', "edge.json: steps: must be 1 or more, got 0"),
    ('{"guidance": true}', "edge.json: guidance: must be a number"),
    ('{"guidance": -1}', "edge.json: guidance: must be 0 or more"),
    ('{"scheduler": "pndm"}', "edge.json: scheduler: 'pndm' is not one of euler, euler_a"),
    ('[1]', "edge.json: holds a JSON list"),
])
def test_bad_edge_json_names_the_file_and_key(bundle_copy, text, words):
    (bundle_copy / "edge.json").write_text(text)
    with pytest.raises(BundleError, match=words.replace("(", r"\(")):
        load_bundle(bundle_copy)


@pytest.mark.slow  # a subprocess or seconds of waiting: the whole suite, not the fast lane
def test_generate_and_doctor_use_them(bundle_copy, tmp_path):
    (bundle_copy / "edge.json").write_text('{"steps": 2, "guidance": 1.0, "scheduler": "euler_a"}')
    proc = cli("generate", "knolling of 2 red gears", "--seed", "3", "--model", str(bundle_copy),
               "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads(Path(proc.stdout.split()[0]).with_suffix(".json").read_text())
    request = sidecar["request"]
    assert (request["steps"], request["guidance"], request["scheduler"]) == (2, 1.0, "euler_a")
    assert sidecar["sampler"] == "Euler a" and len(sidecar["timings"]["steps"]) == 2
    proc = cli("generate", "knolling of 2 red gears", "--seed", "3", "--steps", "3", "--model", str(bundle_copy),
               "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    request = json.loads(Path(proc.stdout.split()[0]).with_suffix(".json").read_text())["request"]
    assert (request["steps"], request["guidance"], request["scheduler"]) == (3, 1.0, "euler_a")
    doctor = json.loads(cli("doctor", "--model", str(bundle_copy)).stdout)
    assert doctor["model"]["recommended"] == {"steps": 2, "guidance": 1.0, "scheduler": "euler_a"}
    assert doctor["defaults"]["steps"] == {"value": 2, "from": "edge.json"}
    assert doctor["defaults"]["count"] == {"value": 1, "from": "built-in"}
    config = tmp_path / "config.yaml"
    config.write_text("defaults:\n  steps: 30\n")
    doctor = json.loads(cli("doctor", "--model", str(bundle_copy), "--config", str(config)).stdout)
    assert doctor["defaults"]["steps"] == {"value": 30, "from": "config"}
    assert doctor["defaults"]["guidance"] == {"value": 1.0, "from": "edge.json"}


@pytest.mark.slow  # a subprocess or seconds of waiting: the whole suite, not the fast lane
def test_serve_uses_them_for_jobs_that_leave_them_out(bundle_copy, daemons):
    (bundle_copy / "edge.json").write_text('{"steps": 2, "guidance": 1.0, "scheduler": "euler_a"}')
    d = daemons("rec", config={"model": {"path": str(bundle_copy)}}).start()
    for job, steps in (({"prompt": "a gear", "seed": 1}, 2), ({"prompt": "a gear", "seed": 1, "steps": 3}, 3)):
        with d.client() as c:  # one connection per watch: the server closes it after the result
            messages = list(c.submit_and_watch(job))
        assert messages[-1]["status"] == "ok", messages[-1]
        assert [m["step"] for m in messages if m.get("event") == "progress"] == list(range(1, steps + 1))
        with d.client() as c:
            stored = c.request({"op": "get", "id": messages[0]["id"]})["job"]["job"]
            assert (stored["steps"], stored["guidance"], stored["scheduler"]) == (steps, 1.0, "euler_a")
