import json
from pathlib import Path
import threading

import numpy as np
import pytest

from edge.bundle import load_bundle
from edge.errors import BundleError, CancelledError, ValidationError
from edge.jobs import parse_job
from edge.pipeline import Pipeline, gaussian, make_rng
from edge.providers import RuntimeOptions

FIXTURES = Path(__file__).parent / "fixtures"


def job(**kw):
    return parse_job({"prompt": "knolling of 3 red gears on white", "steps": 3, "seed": 1, **kw})


def pixels(result, i=0):
    return np.asarray(result.images[i].image)


def test_whole_generation_through_onnxruntime(pipeline):
    steps = []
    result = pipeline.generate(job(count=2), on_step=steps.append)
    assert [img.seed for img in result.images] == [1, 2]
    assert result.images[0].image.size == (128, 128) and result.images[0].image.mode == "RGB"
    assert [(s.image, s.step) for s in steps] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert len(result.timings["steps"]) == 6
    assert {"tokenize", "encode", "decode", "total"} <= set(result.timings)
    assert pixels(result).std() > 1  # not a blank image
    assert not np.array_equal(pixels(result, 0), pixels(result, 1))


def test_same_seed_same_pixels_and_seed_k_is_image_k(pipeline):
    a = pipeline.generate(job(count=2))
    b = pipeline.generate(job(seed=2))
    c = pipeline.generate(job())
    assert np.array_equal(pixels(a, 0), pixels(c, 0))
    assert np.array_equal(pixels(a, 1), pixels(b, 0))


def test_prompt_and_guidance_change_the_image(pipeline):
    base = pixels(pipeline.generate(job()))
    assert not np.array_equal(base, pixels(pipeline.generate(job(prompt="exploded view of a blue battery"))))
    assert not np.array_equal(base, pixels(pipeline.generate(job(guidance=1.0))))


def test_cfg_batched_equals_sequential(pipeline):
    seq = Pipeline(pipeline.bundle, RuntimeOptions(threads=1, cfg_batch=False))
    a, b = pixels(pipeline.generate(job())), pixels(seq.generate(job()))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "lcm", "dpmpp_2m", "dpmpp_2m_karras"])
def test_every_scheduler_runs(pipeline, name):
    result = pipeline.generate(job(scheduler=name, steps=2))
    assert result.scheduler == name and pixels(result).std() > 1


def test_noise_recipe_is_fixed():
    """The noise recipe is part of the contract: a seed must give these values on every machine."""
    noise = gaussian(make_rng(123), (1, 4, 16, 16))
    assert noise.dtype == np.float32
    assert noise[0, 0, 0, :3].tolist() == [-0.9891213774681091, -0.3677866458892822, 1.2879252433776855]


def test_wrong_size_names_field(pipeline):
    with pytest.raises(ValidationError, match="width: this model was exported with a fixed size of 128x128"):
        pipeline.check(job(width=256))
    with pytest.raises(ValidationError) as info:
        pipeline.check(job(height=64))
    assert info.value.field == "height"


@pytest.mark.parametrize("fields, field, words", [
    ({"scheduler": "lcm", "steps": 60}, "steps", "between 1 and 50"),
    ({"scheduler": "pndm"}, "scheduler", "choose one of euler, euler_a, ddim"),
    ({"steps": 5}, None, None),
])
def test_check_knows_the_scheduler_limits(pipeline, fields, field, words):
    """What only the scheduler knows is refused by check(), which the service runs at submit."""
    if field is None:
        pipeline.check(job(**fields))
        return
    with pytest.raises(ValidationError) as info:
        pipeline.check(job(**fields))
    assert info.value.field == field and words in str(info.value)


def test_cancel_between_steps(pipeline):
    cancel = threading.Event()

    def on_step(s):
        if s.step == 2:
            cancel.set()

    with pytest.raises(CancelledError, match="before step 3"):
        pipeline.generate(job(steps=5), on_step=on_step, cancel=cancel)


def test_finish_ends_the_job_with_the_current_images_denoised_estimate(pipeline):
    """AUTOMATIC1111's interrupt: the image under way is decoded from the step's x0 estimate, the
    rest of the batch is not made, and a warning says so."""
    finish, estimates = threading.Event(), []

    def on_step(s):
        estimates.append(s.latents.copy())
        if s.image == 1 and s.step == 2:
            finish.set()

    result = pipeline.generate(job(steps=5, count=3, seed=20), on_step=on_step, finish=finish)
    assert [i.seed for i in result.images] == [20, 21] and len(estimates) == 7  # 5 steps of image 1, 2 of image 2
    assert np.array_equal(np.asarray(result.images[1].image), np.asarray(pipeline.decode(estimates[-1])))
    assert result.warnings[-1] == ("interrupted: image 2 of 3 ends at step 2 of 5 (its denoised estimate there); "
                                   "1 more not made")
    whole = pipeline.generate(job(steps=5, count=1, seed=20))  # image 1 ran all its steps: the same image
    assert np.array_equal(np.asarray(whole.images[0].image), np.asarray(result.images[0].image))


def test_long_prompt_reports_dropped_tokens(pipeline):
    result = pipeline.generate(job(prompt="gear " * 100, steps=1))
    assert result.tokens_dropped["prompt"] == 100 - 75


@pytest.mark.parametrize("victim, words", [
    ("unet/model.onnx", "unet/model.onnx: missing; expected the unet ONNX model"),
    ("model_index.json", "model_index.json: missing"),
    ("tokenizer/merges.txt", "merges.txt: missing"),
    ("scheduler/scheduler_config.json", "scheduler_config.json: missing"),
])
def test_missing_bundle_file_named(bundle_copy, victim, words):
    (bundle_copy / victim).unlink()
    with pytest.raises(BundleError, match=words):
        load_bundle(bundle_copy)


def test_malformed_json_and_onnx_named(bundle_copy):
    (bundle_copy / "scheduler" / "scheduler_config.json").write_text("{oops")
    with pytest.raises(BundleError, match="scheduler_config.json: not valid JSON"):
        load_bundle(bundle_copy)
    (bundle_copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    (bundle_copy / "vae_decoder" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(BundleError, match="vae_decoder/model.onnx: ONNX Runtime could not load it"):
        Pipeline(load_bundle(bundle_copy), RuntimeOptions(threads=1))


def test_vae_scaling_factor_read_from_config(bundle_copy, pipeline):
    cfg = bundle_copy / "vae_decoder" / "config.json"
    data = json.loads(cfg.read_text())
    assert load_bundle(bundle_copy).vae_scaling_factor == pytest.approx(data["scaling_factor"])
    data["scaling_factor"] = data["scaling_factor"] * 2
    cfg.write_text(json.dumps(data))
    other = Pipeline(load_bundle(bundle_copy), RuntimeOptions(threads=1))
    assert not np.array_equal(pixels(other.generate(job(steps=1))), pixels(pipeline.generate(job(steps=1))))
    del data["scaling_factor"]
    cfg.write_text(json.dumps(data))
    assert load_bundle(bundle_copy).vae_scaling_factor == pytest.approx(0.18215)  # SD 1.x's, when absent


def test_matches_diffusers_reference(tiny_sd_pipeline):
    """tools/check_optimum_bundle.py ran diffusers' StableDiffusionPipeline on the same weights and
    initial latents; our tokenizer, scheduler, CFG and VAE scaling must reproduce its image."""
    ref = np.load(FIXTURES / "pipeline_reference.npz")
    fields = {k: ref[k].item() for k in ("prompt", "negative_prompt", "steps", "guidance", "seed", "scheduler")}
    ours = pixels(tiny_sd_pipeline.generate(parse_job(fields)))
    diff = np.abs(ours.astype(int) - ref["image"].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.01
