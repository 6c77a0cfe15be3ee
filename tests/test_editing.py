"""Edit jobs against diffusers (references of tools/make_edit_references.py) and their invariants."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from edge import images, schedulers
from edge.bundle import load_bundle
from edge.errors import ValidationError
from edge.jobs import RESIZE_MODES, Limits, admit, decode_payload, parse_job
from edge.memory import tier_plan
from edge.pipeline import Pipeline, gaussian, make_rng
from edge.providers import RuntimeOptions

FIXTURES = Path(__file__).parent / "fixtures"
TINY_SD = FIXTURES / "tiny-sd"
REF = np.load(FIXTURES / "edit_reference.npz")
BASE_JOB = json.loads(str(REF["base_job"]))
IMAGE_PNG, MASK_PNG = REF["image_png"].tobytes(), REF["mask_png"].tobytes()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return images.b64encode(data)


def bundle_with_unet(tmp: Path, unet: str | None, encoder: bool = True) -> Path:
    """tiny-sd's folders (links), with another UNet and/or without the VAE encoder."""
    root = tmp / f"bundle-{unet or 'plain'}-{encoder}"
    root.mkdir()
    shutil.copy(TINY_SD / "model_index.json", root)
    for sub in ("scheduler", "tokenizer", "text_encoder", "vae_decoder", "unet", "vae_encoder"):
        if sub == "vae_encoder" and not encoder:
            continue
        source = FIXTURES / unet / "unet" if sub == "unet" and unet else TINY_SD / sub
        (root / sub).symlink_to(source)
    return root


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Pipeline]:
    tmp = tmp_path_factory.mktemp("bundles")
    return {"plain": Pipeline(load_bundle(TINY_SD), RuntimeOptions(threads=1)),
            "inpainting": Pipeline(load_bundle(bundle_with_unet(tmp, "tiny-sd-inpaint")), RuntimeOptions(threads=1)),
            "instruct": Pipeline(load_bundle(bundle_with_unet(tmp, "tiny-sd-pix2pix")), RuntimeOptions(threads=1))}


def edit_job(**fields):
    return parse_job({**BASE_JOB, "init_image": b64(IMAGE_PNG), **fields})


def first(result) -> np.ndarray:
    return np.asarray(result.images[0].image)


# --- against diffusers ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["img2img_0.3_euler", "img2img_0.75_euler", "img2img_0.75_ddim"])
def test_img2img_matches_diffusers(kinds, case):
    fields = json.loads(str(REF[f"{case}/fields"]))
    result = kinds["plain"].generate(edit_job(**fields))
    assert len(result.timings["steps"]) == int(BASE_JOB["steps"] * fields["strength"])
    assert psnr(first(result), REF[f"{case}/image"]) >= 40


@pytest.mark.parametrize("case, kind", [("inpaint_4ch", "plain"), ("inpaint_9ch", "inpainting")])
def test_inpainting_matches_diffusers(kinds, case, kind):
    fields = json.loads(str(REF[f"{case}/fields"]))
    result = kinds[kind].generate(edit_job(mask=b64(MASK_PNG), **fields))
    # Where the blurred mask is fully white the image is the model's alone (no original composited back).
    blurred = images.prepare_mask(Image.open(io.BytesIO(MASK_PNG)), (128, 128), 128, 128, "just_resize",
                                  fields["mask_blur"], [])
    inside = np.asarray(blurred) == 255
    assert inside.sum() > 1000
    assert psnr(first(result)[inside], REF[f"{case}/image"][inside]) >= 40


def test_instruct_pix2pix_matches_diffusers(kinds):
    result = kinds["instruct"].generate(edit_job(image_guidance=1.5))
    assert len(result.timings["steps"]) == BASE_JOB["steps"]
    assert psnr(first(result), REF["pix2pix/image"]) >= 40
    assert "Image CFG scale" in result.parameters


def test_image_guidance_changes_the_edit(kinds):
    a, b = (first(kinds["instruct"].generate(edit_job(image_guidance=g))) for g in (1.5, 3.0))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("name", schedulers.NAMES)
def test_add_noise_matches_diffusers(name):
    config = load_bundle(TINY_SD).scheduler_config
    scheduler = schedulers.from_config(config, name)
    scheduler.set_timesteps(10)
    got = scheduler.add_noise(REF["add_noise/x0"], REF["add_noise/noise"], 4)
    np.testing.assert_allclose(got, REF[f"add_noise/{name}"], atol=2e-6)


# --- invariants -----------------------------------------------------------------------------------
def test_strength_zero_returns_the_vae_round_trip(kinds):
    pipe = kinds["plain"]
    result = pipe.generate(edit_job(strength=0.0))
    assert result.timings["steps"] == []
    # The round trip by hand: posterior sample (the job's first draw) * scaling_factor, decoded.
    rng = make_rng(BASE_JOB["seed"])
    moments = pipe.encode_image(images.to_pixels(Image.open(io.BytesIO(IMAGE_PNG))))
    latents = moments.sample(lambda shape: gaussian(rng, shape)) * np.float32(pipe.bundle.vae_scaling_factor)
    assert np.array_equal(first(result), np.asarray(pipe.decode(latents)))


@pytest.mark.parametrize("kind, blur", [("plain", 4), ("inpainting", 4), ("plain", 0)])
def test_pixels_outside_the_blurred_mask_are_the_original(kinds, kind, blur):
    result = kinds[kind].generate(edit_job(mask=b64(MASK_PNG), mask_blur=blur, steps=4))
    out, original = first(result), np.asarray(Image.open(io.BytesIO(IMAGE_PNG)))
    # The mask is the rectangle (40, 32)-(95, 88); a Gaussian of radius r reaches < 3r + 2 pixels.
    reach = 3 * blur + 2 if blur else 0
    outside = np.ones((128, 128), bool)
    outside[max(32 - reach, 0):89 + reach, max(40 - reach, 0):96 + reach] = False
    assert np.array_equal(out[outside], original[outside])
    inside = ~outside
    assert not np.array_equal(out[inside], original[inside])  # and the masked part was repainted
    assert result.parameters == {"Denoising strength": "1", "Mask blur": str(blur)}


def test_img2img_strength_controls_how_far_the_image_moves(kinds):
    original = np.asarray(Image.open(io.BytesIO(IMAGE_PNG)))
    low, high = (psnr(first(kinds["plain"].generate(edit_job(strength=s))), original) for s in (0.2, 0.9))
    assert low > high


def test_lowmem_tier_loads_the_encoder_only_while_encoding(kinds):
    bundle = load_bundle(TINY_SD)
    plan = tier_plan(bundle, {}, "int8-lowmem")
    assert "vae_encoder" in plan.precisions
    lowmem = Pipeline(bundle, RuntimeOptions(threads=1), plan)
    job = edit_job(strength=0.5)
    assert lowmem.vae_encoder._session is None
    out = first(lowmem.generate(job))
    assert lowmem.vae_encoder._session is None
    assert psnr(out, first(kinds["plain"].generate(job))) >= 40


# --- inputs -----------------------------------------------------------------------------------------
def test_mask_of_another_size_and_colour_is_resized_and_converted_with_notes(kinds):
    rgb_mask = Image.open(io.BytesIO(MASK_PNG)).convert("RGB").resize((64, 64), Image.Resampling.NEAREST)
    result = kinds["plain"].generate(edit_job(mask=b64(png(rgb_mask)), steps=2))
    assert any("converted from RGB to greyscale" in n for n in result.warnings)
    assert any("resized from 64x64 to the init image's 128x128" in n for n in result.warnings)


def test_init_image_of_another_size_is_resized_by_resize_mode(kinds):
    wide = Image.open(io.BytesIO(IMAGE_PNG)).resize((256, 128))
    for mode in RESIZE_MODES:
        result = kinds["plain"].generate(edit_job(init_image=b64(png(wide, "JPEG")), resize_mode=mode, steps=2))
        assert result.images[0].image.size == (128, 128)


def test_resize_modes_as_automatic1111():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8))
    assert images.resize(image, 64, 80, "just_resize").size == (64, 80)
    crop = images.resize(image, 100, 100, "crop_and_resize")  # scale 1: the centre 100x100
    assert np.array_equal(np.asarray(crop), np.asarray(image)[:, 50:150])
    fill = np.asarray(images.resize(image, 100, 100, "resize_and_fill"))
    np.testing.assert_array_equal(fill[25:75], np.asarray(image.resize((100, 50), images.LANCZOS)))
    assert (fill[:25] == fill[0]).all() and (fill[75:] == fill[99]).all()  # edge rows stretched
    with pytest.raises(ValidationError, match="resize_mode"):
        images.resize(image, 100, 100, "stretch")


def _huge_png_header(width: int, height: int) -> bytes:
    """A real small PNG whose IHDR claims another size (CRC fixed): only the header is read."""
    import struct
    import zlib
    data = bytearray(png(Image.new("L", (8, 8))))
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize("field, value, words", [
    ("init_image", b64(b"this is not an image at all"), "not an image"),
    ("init_image", "%%%not base64%%%", "not valid base64"),
    ("init_image", b64(IMAGE_PNG[: len(IMAGE_PNG) // 2]), "could not be decoded"),
    ("init_image", b64(png(Image.new("RGB", (1, 1)))), "at least 8"),
    ("init_image", b64(_huge_png_header(20000, 20000)), "refused as a decompression bomb"),  # Pillow's guard
    ("init_image", b64(_huge_png_header(5000, 5000)), "more than limits.max_image_pixels (16777216)"),
    ("init_image", b64(png(Image.new("RGB", (64, 64)), "GIF")), "use PNG, JPEG or WebP"),
    ("mask", b64(b"GIF89a garbage"), "not an image"),
    ("strength", 1.5, "between 0 and 1"),
    ("strength", -0.1, "between 0 and 1"),
    ("mask_blur", 500, "between 0 and 64"),
    ("resize_mode", "zoom", "choose one of just_resize"),
])
def test_bad_edit_fields_are_named(field, value, words):
    with pytest.raises(ValidationError) as info:
        edit_job(**{field: value})
    assert info.value.field == field and words in str(info.value)


def test_image_over_max_image_bytes_is_refused():
    limit = r"init_image: is \d+ bytes, the limit is 1000 \(limits.max_image_bytes\)"
    with pytest.raises(ValidationError, match=limit):
        parse_job({"prompt": "p", "init_image": b64(IMAGE_PNG)}, Limits(max_image_bytes=1000))


def test_mask_and_strength_need_an_init_image():
    for field, value in (("mask", b64(MASK_PNG)), ("strength", 0.5)):
        with pytest.raises(ValidationError, match=f"^{field}: needs init_image"):
            parse_job({"prompt": "p", field: value})


def test_edit_job_payload_may_exceed_max_payload_bytes():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    payload = json.dumps({"prompt": "p", "init_image": b64(png(noise))}).encode()
    assert len(payload) > Limits().max_payload_bytes
    assert decode_payload(payload, Limits())["init_image"]
    with pytest.raises(ValidationError, match="limits.max_payload_bytes plus two images"):
        decode_payload(payload, Limits(max_image_bytes=1000))


def test_edit_on_a_bundle_without_vae_encoder(tmp_path):
    pipe = Pipeline(load_bundle(bundle_with_unet(tmp_path, None, encoder=False)), RuntimeOptions(threads=1))
    with pytest.raises(ValidationError, match="init_image: this model has no vae_encoder/: export it with "
                                              "`optimum-cli export onnx"):
        pipe.generate(edit_job())
    assert first(pipe.generate(parse_job({**BASE_JOB, "steps": 1}))).std() > 0  # text to image still works


def test_fields_the_model_cannot_take(kinds):
    with pytest.raises(ValidationError, match="^image_guidance: this model does not take it"):
        kinds["plain"].edit_kind(edit_job(image_guidance=1.5))
    with pytest.raises(ValidationError, match="^mask: this model edits by instruction"):
        kinds["instruct"].edit_kind(edit_job(mask=b64(MASK_PNG)))
    with pytest.raises(ValidationError, match="^strength: InstructPix2Pix runs the whole schedule"):
        kinds["instruct"].edit_kind(edit_job(strength=0.5))
    with pytest.raises(ValidationError, match="^init_image: is required"):
        kinds["instruct"].edit_kind(parse_job(BASE_JOB))


def test_text_to_image_on_an_inpainting_model_repaints_everything(kinds):
    result = kinds["inpainting"].generate(parse_job({**BASE_JOB, "steps": 2}))
    assert first(result).std() > 0 and result.parameters == {}
