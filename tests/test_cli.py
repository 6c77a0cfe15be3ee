import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.console import ProgressBar
from edge.output import parse_parameters
from edge.jobs import Step


def cli(*args):
    # cwd "/" so that `-m` imports the installed package, not the source tree
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd="/")


@pytest.mark.slow  # a subprocess or seconds of waiting: the whole suite, not the fast lane
def test_generate_prints_paths_embeds_seed_and_reproduces(tmp_path):
    runs = []
    for name in ("a", "b"):
        proc = cli("generate", "knolling of 2 red gears", "--steps", "3", "--seed", "1234", "--count", "2",
                   "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        paths = [Path(p) for p in proc.stdout.split()]
        assert len(paths) == 2 and all(p.is_file() for p in paths)
        assert "seed 1234" in proc.stderr and "step 3/3" in proc.stderr
        runs.append(paths)
    for i, path in enumerate(runs[0]):
        params = parse_parameters(Image.open(path).info["parameters"])
        assert params["Seed"] == str(1234 + i) and params["Steps"] == "3" and params["Size"] == "128x128"
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(runs[1][i])))
        assert json.loads(path.with_suffix(".json").read_text())["seed"] == 1234 + i


def test_random_seed_is_reported(tmp_path):
    proc = cli("generate", "a lens", "--steps", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    seed = Image.open(proc.stdout.strip()).info["parameters"].split("Seed: ")[1].split(",")[0]
    assert f"seed {seed}," in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["", "--steps", "2"], "error: prompt: must not be empty"),
    (["x", "--steps", "-1"], "error: steps: must be between 1 and 150, got -1"),
    (["x", "--guidance", "99"], "error: guidance: must be between 0 and 30, got 99"),
    (["x", "--width", "256"], "error: width: this model was exported with a fixed size of 128x128; got 256"),
    (["x", "--scheduler", "pndm"], "error: scheduler: 'pndm' is not supported; choose one of euler"),
    (["x", "--model", "/nonexistent"], "error: /nonexistent: not a folder; expected a model bundle"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    proc = cli("generate", *args, "--out", str(tmp_path))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_bad_config_is_a_clear_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("runtime:\n  threads: many\n")
    proc = cli("generate", "x", "--config", str(config))
    assert proc.returncode == 2 and "runtime.threads: must be int" in proc.stderr


def test_doctor_reports_runtime_and_model():
    proc = cli("doctor")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "CPUExecutionProvider" in info["providers_in_build"]
    assert info["model"]["name"] == "knolling-tiny" and info["physical_cores"] >= 1
    assert set(info["model"]["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_terminal_and_plain_lines_elsewhere():
    tty, plain = FakeTerminal(), io.StringIO()
    for stream in (tty, plain):
        bar = ProgressBar(stream)
        for step in (1, 2):
            bar(Step(image=0, count=1, step=step, steps=2, seconds=0.5))
    assert tty.getvalue().startswith("\r[" + "#" * 15 + "." * 15 + "] image 1/1 step 1/2")
    assert tty.getvalue().endswith("step 2/2 (0.50 s/step)\n") and tty.getvalue().count("\n") == 1
    assert plain.getvalue().splitlines() == ["image 1/1 step 1/2 (0.50 s/step)", "image 1/1 step 2/2 (0.50 s/step)"]


TINY_SD = Path(__file__).parent / "fixtures" / "tiny-sd"


@pytest.mark.slow  # a subprocess or seconds of waiting: the whole suite, not the fast lane
def test_generate_inpaints_from_files_and_records_the_edit(tmp_path):
    import hashlib
    from PIL import ImageDraw
    init, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(init)
    m = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(m).rectangle((32, 32, 95, 95), fill=255)
    m.save(mask)
    proc = cli("generate", "a red gear", "--model", str(TINY_SD.resolve()), "--init-image", str(init),
               "--mask", str(mask), "--strength", "0.6", "--steps", "5", "--seed", "3", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "seed 3, 3 steps" in proc.stderr  # int(5 * 0.6) steps of the schedule ran
    path = Path(proc.stdout.strip())
    params = parse_parameters(Image.open(path).info["parameters"])
    assert params["Denoising strength"] == "0.6" and params["Mask blur"] == "4"
    request = json.loads(path.with_suffix(".json").read_text())["request"]
    assert request["init_image"] == "sha256:" + hashlib.sha256(init.read_bytes()).hexdigest()
    assert request["mask"] == "sha256:" + hashlib.sha256(mask.read_bytes()).hexdigest()
    assert request["strength"] == 0.6


def test_unreadable_init_image_is_named(tmp_path):
    proc = cli("generate", "x", "--init-image", str(tmp_path / "missing.png"))
    assert proc.returncode == 2 and "error: init_image: " in proc.stderr and "cannot read the file" in proc.stderr


def test_quantize_without_onnx_stops_at_once_with_the_install_hint(bundle_copy, monkeypatch, capsys):
    from edge.cli import main
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    before = sorted(p.name for p in bundle_copy.rglob("*"))
    assert main(["quantize", str(bundle_copy)]) == 2
    assert "pip install 'edge-imagegen[quantize]'" in capsys.readouterr().err
    assert sorted(p.name for p in bundle_copy.rglob("*")) == before  # nothing written, nothing removed


@pytest.mark.slow  # a subprocess or seconds of waiting: the whole suite, not the fast lane
def test_an_off_domain_prompt_warns_and_still_writes_the_image(tmp_path):
    run = subprocess.run([sys.executable, "-m", "edge.cli", "generate", "a cat on a sofa", "--steps", "2", "--seed", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd="/", timeout=120)
    assert run.returncode == 0, run.stderr
    assert "warning: prompt: most of its words are unknown to knolling-tiny" in run.stderr
    assert "unknown: cat, sofa" in run.stderr and Path(run.stdout.strip()).is_file()
