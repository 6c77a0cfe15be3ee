"""LoRA at run time against diffusers' fused reference, strength 0, INT8/FP16, errors, job shape, PNG."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.bundle import EMBEDDED_MODEL, load_bundle
from edge.config import LoraConfig
from edge.errors import ValidationError
from edge.jobs import Job, Limits, LoraRef, parse_job
from edge.memory import MB, fixed_plan, load_manifest, lora_set_bytes
from edge.output import parse_parameters, save_result
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions
from lora_files import KNOLLING_MODULES, random_kohya_lora, write_safetensors

FIXTURES = Path(__file__).parent / "fixtures"
LORA_DIR = FIXTURES / "lora"
REFERENCE = np.load(LORA_DIR / "reference.npz")
REFERENCE_JOB = json.loads((LORA_DIR / "reference.json").read_text())["job"]
STYLES = ("peft", "kohya", "kohya_sgm")


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def image(pipe, **fields) -> np.ndarray:
    job = parse_job({**REFERENCE_JOB, **fields})
    pipe.check(job)
    return np.asarray(pipe.generate(job).images[0].image)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Pipeline(load_bundle(FIXTURES / "tiny-sd"), RuntimeOptions(threads=1), lora=LoraConfig(dir=str(LORA_DIR)))


FAST = {("peft", 1.0), ("kohya_sgm", 0.5)}  # the fast lane keeps two; the whole suite runs all six


@pytest.mark.parametrize("style, strength", [pytest.param(style, s, marks=() if (style, s) in FAST else pytest.mark.slow)
                                             for style in STYLES for s in (0.5, 1.0)])
def test_matches_diffusers_fused_lora(tiny, style, strength):
    reference = REFERENCE[f"lora_{strength}"]
    assert psnr(reference, REFERENCE["base"]) < 35  # the LoRA changes the image: the bound below means something
    ours = image(tiny, loras=[{"name": style, "strength": strength}])
    assert psnr(ours, reference) >= 40
    assert tiny.lora.switch_seconds["unet"] >= 0 and tiny.lora.switch_seconds["text_encoder"] >= 0


def test_strength_zero_and_no_lora_are_the_base_image_bit_for_bit(tiny):
    base = image(tiny)
    assert psnr(base, REFERENCE["base"]) >= 40
    image(tiny, loras=[{"name": "kohya", "strength": 1.0}])  # a LoRA session in between
    assert np.array_equal(image(tiny, loras=[{"name": "peft", "strength": 0.0}]), base)
    assert np.array_equal(image(tiny), base)


def test_prompt_tag_is_the_same_as_the_field(tiny):
    tagged = image(tiny, prompt=REFERENCE_JOB["prompt"] + " <lora:kohya_sgm:0.5>")
    assert np.array_equal(tagged, image(tiny, loras=[{"name": "kohya_sgm", "strength": 0.5}]))


@pytest.mark.slow
def test_two_loras_add_and_a_small_cache_evicts(tmp_path):
    pipe = Pipeline(load_bundle(FIXTURES / "tiny-sd"), RuntimeOptions(threads=1),
                    lora=LoraConfig(dir=str(LORA_DIR), cache_sessions=1))
    half = {"name": "peft", "strength": 0.5}
    both = image(pipe, loras=[half, {"name": "kohya", "strength": 0.5}])  # 0.5 + 0.5 of one LoRA = 1.0
    assert psnr(both, REFERENCE["lora_1.0"]) >= 40
    assert psnr(image(pipe, loras=[half]), REFERENCE["lora_0.5"]) >= 40
    assert len(pipe.lora._sessions) == 1
    assert np.array_equal(image(pipe, loras=[half, {"name": "kohya", "strength": 0.5}]), both)


@pytest.mark.slow
def test_lowmem_tier_applies_the_lora_per_load(tiny):
    plan = replace(fixed_plan(), tier="int8-lowmem", lowmem=True)
    lowmem = Pipeline(load_bundle(FIXTURES / "tiny-sd"), RuntimeOptions(threads=1), plan,
                      lora=LoraConfig(dir=str(LORA_DIR)))
    ours = image(lowmem, loras=[{"name": "kohya", "strength": 1.0}])
    assert psnr(ours, REFERENCE["lora_1.0"]) >= 40
    assert not lowmem.lora._sessions


@pytest.fixture(scope="module")
def knolling_lora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    random_kohya_lora(folder / "style.safetensors", KNOLLING_MODULES, seed=5, size=4.0)
    return folder


KNOLLING_JOB = {"prompt": "knolling of 3 red gears", "steps": 6, "seed": 11, "guidance": 5.0}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_quantized_variants_take_the_lora_within_their_own_bound(knolling_lora, precision):
    """INT8: re-quantized from the fused weight; the images stay as close to FP32-with-LoRA as the
    variant's images are to FP32 without one (less 1 dB). FP16: the fused weight cast. Means over 4
    seeds: one INT8 image's own distance to FP32 varies by more than that bound (19-31 dB)."""
    bundle = load_bundle(EMBEDDED_MODEL)
    config = LoraConfig(dir=str(knolling_lora))
    fp32 = Pipeline(bundle, RuntimeOptions(threads=1), lora=config)
    variant = Pipeline(bundle, RuntimeOptions(threads=1), fixed_plan({"unet": precision, "text_encoder": precision}),
                       lora=config)
    changed, bound, took, kept = [], [], [], []
    for seed in range(11, 15):
        job = {**KNOLLING_JOB, "seed": seed}
        with_lora = {**job, "loras": [{"name": "style", "strength": 1.0}]}
        base32, base_q, lora32, lora_q = (image(p, **j) for j in (job, with_lora) for p in (fp32, variant))
        changed.append(psnr(lora32, base32))
        bound.append(psnr(base_q, base32))
        took.append(psnr(lora_q, lora32))
        kept.append(psnr(lora_q, base_q))
    assert max(changed) < 30  # the LoRA changes the image
    assert np.mean(took) >= np.mean(bound) - 1, (took, bound)
    assert np.mean(took) > np.mean(kept)  # the variant did take the LoRA


# --- errors, named fields, at submit ---------------------------------------------------------------
def test_errors_name_the_field_and_what_is_wrong(tiny, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    pipe = Pipeline(load_bundle(FIXTURES / "tiny-sd"), RuntimeOptions(threads=1), lora=LoraConfig(dir=str(folder)))
    shutil.copy(LORA_DIR / "kohya.safetensors", folder / "good.safetensors")
    (folder / "text.safetensors").write_text("this is not a LoRA")
    (folder / "short.safetensors").write_bytes((LORA_DIR / "kohya.safetensors").read_bytes()[:50000])
    write_safetensors(folder / "nomatch.safetensors", {"model.diffusion_model.x.weight": np.zeros((2, 2), np.float32)})
    random_kohya_lora(folder / "knolling.safetensors", KNOLLING_MODULES, seed=1)  # another architecture

    def error(name):
        with pytest.raises(ValidationError) as info:
            pipe.check(parse_job({"prompt": "a gear", "loras": [{"name": name, "strength": 1}]}))
        assert info.value.field == "loras"
        return str(info.value)

    assert "no such LoRA" in error("missing") and "good" in error("missing")
    assert "not a valid safetensors file" in error("text") and "text.safetensors" in error("text")
    assert "cut short" in error("short")
    assert "model.diffusion_model.x.weight" in error("nomatch") and "none of the keys" in error("nomatch")
    message = error("knolling")
    assert "another architecture" in message and ("[" in message or "no counterpart" in message)
    pipe.check(parse_job({"prompt": "a gear", "loras": [{"name": "good", "strength": 1}]}))


def test_shape_mismatch_names_the_layer_and_both_shapes(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    write_safetensors(folder / "wide.safetensors", {f"{stem}.lora_down.weight": np.zeros((4, 96), np.float32),
                                                    f"{stem}.lora_up.weight": np.zeros((96, 4), np.float32)})
    pipe = Pipeline(load_bundle(FIXTURES / "tiny-sd"), RuntimeOptions(threads=1), lora=LoraConfig(dir=str(folder)))
    with pytest.raises(ValidationError, match=r"layer down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1"
                       r"\.to_q is \[64, 64\] in this model but the LoRA's update for it is \[96, 96\]"):
        pipe.check(parse_job({"prompt": "a gear", "loras": [{"name": "wide"}]}))


@pytest.mark.parametrize("data, field, words", [
    ({"loras": [{"name": "a", "strength": 2.0}]}, "loras.a.strength", "between 0 and 1.5"),
    ({"loras": [{"name": "a", "strength": -0.1}]}, "loras.a.strength", "between 0 and 1.5"),
    ({"loras": [{"name": "../etc/passwd"}]}, "loras", "letters, digits"),
    ({"loras": {"name": "a"}}, "loras", "must be a list"),
    ({"loras": [{"name": "a", "weight": 1}]}, "loras", "name and optional strength"),
    ({"loras": [{"name": "a"}, {"name": "a"}]}, "loras", "twice"),
    ({"loras": [{"name": f"l{i}"} for i in range(5)]}, "loras", "limit is 4"),
    ({"prompt": "<lora:a:0.5>"}, "prompt", "must not be empty"),
    ({"prompt": "gear <lora:a:lots>"}, "loras", "must be a number"),
])
def test_job_field_errors(data, field, words):
    with pytest.raises(ValidationError) as info:
        parse_job({"prompt": "a gear", **data})
    assert info.value.field == field and words in str(info.value)


def test_prompt_tags_are_parsed_out_and_journal_round_trip():
    job = parse_job({"prompt": "knolling of <lora:lines:0.8> 3 gears <lora:parts>", "loras": [{"name": "x"}]})
    assert job.prompt == "knolling of 3 gears"
    assert job.loras == (LoraRef("x", 1.0), LoraRef("lines", 0.8), LoraRef("parts", 1.0))
    again = Job.from_dict(json.loads(json.dumps(job.to_dict())))  # how the journal reads a job back
    assert again == job
    limits = Limits(max_lora_strength=2.0)
    assert parse_job({"prompt": "g", "loras": [{"name": "a", "strength": 2}]}, limits).loras[0].strength == 2.0


def test_png_parameters_and_sidecar_carry_the_loras(tiny, tmp_path):
    job = parse_job({**REFERENCE_JOB, "steps": 2, "id": "l1", "loras": [{"name": "kohya", "strength": 0.8}]})
    tiny.check(job)
    result = tiny.generate(job)
    [path] = save_result(result, tmp_path, "l1", model="tiny-sd", provider="cpu", precision="fp32")
    text = Image.open(path).info["parameters"]
    sha = tiny.lora.library.get("kohya").sha256
    assert text.splitlines()[0] == REFERENCE_JOB["prompt"] + " <lora:kohya:0.8>"
    assert f'Lora hashes: "kohya: {sha[:12]}"' in text
    params = parse_parameters(text)
    assert params["Lora hashes"] == f"kohya: {sha[:12]}" and params["Model"] == "tiny-sd"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["loras"] == [{"name": "kohya", "strength": 0.8, "sha256": sha}]


@pytest.mark.slow
def test_cli_lora_flag_generate(tmp_path):
    import subprocess
    import sys
    config = tmp_path / "config.yaml"
    config.write_text(f"lora:\n  dir: {LORA_DIR}\nmodel:\n  path: {FIXTURES / 'tiny-sd'}\n")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edge.cli", *args, "--config", str(config)], capture_output=True,
                              text=True, timeout=120, cwd="/")

    proc = cli("generate", REFERENCE_JOB["prompt"], "--negative", "shadow", "--steps", "8", "--seed", "7",
               "--scheduler", "euler", "--lora", "kohya:0.5", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert psnr(np.asarray(Image.open(path).convert("RGB")), REFERENCE["lora_0.5"]) >= 40
    assert "<lora:kohya:0.5>" in Image.open(path).info["parameters"]
    bad = cli("generate", "a gear", "--lora", "kohya:9", "--out", str(tmp_path / "out"))
    assert bad.returncode == 2 and "loras.kohya.strength: must be between 0 and 1.5, got 9" in bad.stderr


@pytest.mark.slow
def test_doctor_lists_the_loras_and_what_each_fits(tmp_path):
    import subprocess
    import sys
    folder = tmp_path / "loras"
    folder.mkdir()
    random_kohya_lora(folder / "parts.safetensors", KNOLLING_MODULES, seed=3)
    shutil.copy(LORA_DIR / "kohya_sgm.safetensors", folder / "tiny.safetensors")
    config = tmp_path / "config.yaml"
    config.write_text(f"lora:\n  dir: {folder}\n  cache_sessions: 3\n")
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "doctor", "--config", str(config)], capture_output=True,
                          text=True, timeout=120, cwd="/")
    report = json.loads(proc.stdout)
    cache, found = report["lora_cache"], report["loras"]["found"]
    bundle = load_bundle(EMBEDDED_MODEL)
    assert cache["mb_per_set"] == lora_set_bytes(bundle, load_manifest(bundle), report["precision"]["components"]) // MB
    assert 0 <= cache["sets"] <= 3 and "lora.cache_sessions 3" in cache["reason"]
    assert found["parts"]["fits"] == {"text_encoder": "2 layers", "unet": "5 layers"}
    assert found["parts"]["sha256"] == __import__("hashlib").sha256((folder / "parts.safetensors").read_bytes()).hexdigest()
    assert "another architecture" in found["tiny"]["error"]
