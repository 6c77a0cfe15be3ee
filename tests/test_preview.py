"""Per-step previews: the bundle's fitted coefficients against its own VAE decoder, the SD 1.x fallback,
a tiny decoder where the bundle decodes with one."""

import json
import shutil

import numpy as np
import pytest

from conftest import TINY_SD
from edge.bundle import load_bundle
from edge.errors import BundleError
from edge.jobs import Job
from edge.pipeline import Pipeline
from edge.preview import (PREVIEW_FILE, PREVIEW_SIDE, SD1_WEIGHTS, DecoderPreview, LatentPreview, load_preview,
                          make_preview)
from edge.providers import RuntimeOptions
from edge.runner import PipelineRunner

TINY_DECODER = TINY_SD.parent / "tiny-decoder"


def test_the_embedded_models_preview_approximates_its_decoder(pipeline):
    preview = PipelineRunner(pipeline).preview
    assert preview is not None and preview.source.endswith(PREVIEW_FILE)
    steps = []
    result = pipeline.generate(Job(prompt="two red gears and a blue nut", steps=12, seed=31, id="pv"),
                               on_step=steps.append)
    assert [s.step for s in steps] == list(range(1, 13)) and all(s.latents is not None for s in steps)
    approx = preview.rgb(steps[-1].latents).astype(np.float32)
    decoded = np.asarray(result.images[0].image, dtype=np.float32)
    pooled = decoded.reshape(16, 8, 16, 8, 3).mean(axis=(1, 3))  # one latent: 8x8 pixels
    error = np.sqrt(np.mean((approx - pooled) ** 2))
    sd1 = np.clip(np.tensordot(steps[-1].latents[0], np.asarray(SD1_WEIGHTS), ([0], [0])) * 127.5 + 127.5, 0, 255)
    assert error < 30 < np.sqrt(np.mean((sd1 - pooled) ** 2))  # of 255: close, and far closer than SD 1.x's
    png = preview.png(steps[5].latents)
    assert png.startswith(b"\x89PNG") and len(png) < 2000


def test_a_four_channel_bundle_without_its_own_file_uses_the_sd1_coefficients():
    preview = load_preview(TINY_SD / "vae_decoder", 4)
    assert preview.source == "SD 1.x" and preview.weights.shape == (4, 3)
    assert load_preview(TINY_SD / "vae_decoder", 16) is None  # no known map: no previews


def test_a_malformed_preview_file_names_itself(bundle_copy):
    path = bundle_copy / "vae_decoder" / PREVIEW_FILE
    path.write_text(json.dumps({"weights": [[1, 2, 3]], "bias": [0, 0, 0]}))
    with pytest.raises(BundleError, match=r"preview.json: weights must be 4x3"):
        load_preview(path.parent, 4)
    path.write_text("{")
    with pytest.raises(BundleError, match="not a preview file"):
        load_preview(path.parent, 4)


def test_a_tiny_decoder_makes_the_previews(tiny_sd_pipeline):
    """With model.decoder (or a bundle's own) AutoencoderTiny, a preview is that decoder's image of the
    step's denoised estimate: at the last Euler step, the image itself."""
    pipe = Pipeline(load_bundle(TINY_SD, TINY_DECODER), RuntimeOptions(threads=1))
    preview = PipelineRunner(pipe).preview
    assert isinstance(preview, DecoderPreview) and preview.source == str(TINY_DECODER)
    steps = []
    result = pipe.generate(Job(prompt="a gear", steps=3, seed=5, id="tiny", scheduler="euler"), on_step=steps.append)
    image = np.asarray(result.images[0].image)
    assert np.array_equal(preview.rgb(steps[-1].latents), image) and image.std() > 5
    assert not np.array_equal(preview.rgb(steps[0].latents), image)
    assert isinstance(PipelineRunner(tiny_sd_pipeline).preview, LatentPreview)  # a full VAE: the linear map
    linear = PipelineRunner(pipe, "linear").preview  # http.preview: linear keeps the denoising loop's steps short
    assert isinstance(linear, LatentPreview)
    assert linear.rgb(steps[-1].latents).shape == (*steps[-1].latents.shape[2:], 3)  # a pixel per latent


def test_a_tiny_decoders_preview_is_pooled_to_its_side_limit():
    preview = make_preview(load_bundle(TINY_SD, TINY_DECODER), 4, RuntimeOptions(threads=1))
    latents = np.random.default_rng(0).standard_normal((1, 4, 64, 48)).astype(np.float32)  # a 512x384 image
    pooled = latents.reshape(1, 4, 32, 2, 24, 2).mean(axis=(3, 5))
    small = preview.rgb(latents)
    assert small.shape == (PREVIEW_SIDE, PREVIEW_SIDE * 3 // 4, 3)
    assert np.array_equal(small, preview.rgb(pooled))
    assert preview.png(latents).startswith(b"\x89PNG")


def test_a_tiny_decoder_exported_for_one_size_previews_unpooled(tmp_path):
    """A static latent size cannot take pooled latents: such a decoder previews at full size."""
    onnx = pytest.importorskip("onnx")
    folder = tmp_path / "static-decoder"
    shutil.copytree(TINY_DECODER, folder)
    model = onnx.load(str(folder / "model.onnx"))
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], (40, 36)):
        dim.dim_value = value
    onnx.save(model, str(folder / "model.onnx"))
    preview = make_preview(load_bundle(TINY_SD, folder), 4, RuntimeOptions(threads=1))
    latents = np.random.default_rng(1).standard_normal((1, 4, 40, 36)).astype(np.float32)
    assert preview.rgb(latents).shape == (320, 288, 3)  # 320 px > PREVIEW_SIDE, yet not pooled
