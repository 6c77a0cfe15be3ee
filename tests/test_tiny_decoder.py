"""Tiny decoders (diffusers AutoencoderTiny, TAESD-style): recognised, scaled right, equal to diffusers.

tests/fixtures/tiny-decoder is a randomly initialised AutoencoderTiny exported by
tools/make_vae_decoders.py, with diffusers' own decode of fixed latents (reference.npz).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.bundle import load_bundle
from edge.errors import BundleError
from edge.memory import MB, footprint
from edge.profile import psnr
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions

FIXTURES = Path(__file__).parent / "fixtures"
TINY_DECODER = FIXTURES / "tiny-decoder"
TINY_SD = FIXTURES / "tiny-sd"


def as_image(pixels: np.ndarray) -> np.ndarray:
    """diffusers' postprocessing of a decode in [-1, 1] to uint8 HWC."""
    return np.round(np.clip(pixels / 2 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def test_recognised_from_its_config():
    bundle = load_bundle(TINY_SD, TINY_DECODER)
    assert bundle.tiny_decoder and bundle.vae_scaling_factor == 1.0 and bundle.vae_shift_factor == 0.0
    assert bundle.vae_scale == 8 and bundle.vae_channels == 32
    assert bundle.components["vae_decoder"].path == TINY_DECODER / "model.onnx"
    plain = load_bundle(TINY_SD)
    assert not plain.tiny_decoder and plain.vae_scaling_factor == 0.18215


def test_decode_matches_diffusers():
    """Through Pipeline.decode: the UNet's latents go in undivided, [-1, 1] comes out."""
    ref = np.load(TINY_DECODER / "reference.npz")
    pipe = Pipeline(load_bundle(TINY_SD, TINY_DECODER), RuntimeOptions(threads=1))
    ours = np.asarray(pipe.decode(ref["latents"]))
    theirs = as_image(ref["images"][0])
    assert ours.shape == theirs.shape == (96, 128, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # float rounding at a .5 boundary at most
    score = psnr(ours, theirs)
    assert score is None or score >= 40.0
    assert theirs.std() > 20  # the reference spreads over the colour range: parity says something
    raw = pipe.vae_decoder(latent_sample=ref["latents"])
    assert np.abs(raw - ref["images"]).max() < 1e-4


def test_divided_latents_would_not_match():
    """The check above can fail: decoding latents / 0.18215 (the AutoencoderKL convention) is far off."""
    ref = np.load(TINY_DECODER / "reference.npz")
    pipe = Pipeline(load_bundle(TINY_SD, TINY_DECODER), RuntimeOptions(threads=1))
    wrong = np.asarray(pipe.decode(ref["latents"] / 0.18215))
    assert psnr(wrong, as_image(ref["images"][0])) < 20.0


def test_bundle_whose_own_decoder_is_tiny(tmp_path):
    """A bundle that ships an AutoencoderTiny as vae_decoder/, config without scaling_factor."""
    shutil.copytree(TINY_SD, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "vae_decoder")
    shutil.copytree(TINY_DECODER, tmp_path / "b" / "vae_decoder")
    config_path = tmp_path / "b" / "vae_decoder" / "config.json"
    config = json.loads(config_path.read_text())
    del config["scaling_factor"], config["block_out_channels"]
    config_path.write_text(json.dumps(config))
    bundle = load_bundle(tmp_path / "b")
    assert bundle.tiny_decoder and bundle.vae_scaling_factor == 1.0 and bundle.vae_scale == 8
    ref = np.load(TINY_DECODER / "reference.npz")
    ours = np.asarray(Pipeline(bundle, RuntimeOptions(threads=1)).decode(ref["latents"]))
    assert np.abs(ours.astype(int) - as_image(ref["images"][0]).astype(int)).max() <= 1


def test_decoder_folder_errors(tmp_path):
    with pytest.raises(BundleError, match="model.decoder: .*nope: not a folder"):
        load_bundle(TINY_SD, tmp_path / "nope")
    shutil.copytree(TINY_DECODER, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))
    with pytest.raises(BundleError, match="model.decoder: .* decodes 16-channel latents; the UNet .* makes 4"):
        load_bundle(TINY_SD, tmp_path / "d")
    (tmp_path / "d" / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx: missing"):
        load_bundle(TINY_SD, tmp_path / "d")


@pytest.mark.slow  # a subprocess or seconds of waiting: the whole suite, not the fast lane
def test_generate_with_model_decoder_from_the_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  path: {TINY_SD}\n  decoder: {TINY_DECODER}\n")
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "generate", "a red gear", "--steps", "2", "--seed", "5",
                           "--config", str(config), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    image = np.asarray(Image.open(proc.stdout.split()[0]))
    assert image.shape == (128, 128, 3)
    # the same job with the bundle's own decoder draws a different image from the same latents
    plain = subprocess.run([sys.executable, "-m", "edge.cli", "generate", "a red gear", "--steps", "2", "--seed", "5",
                            "--model", str(TINY_SD), "--out", str(tmp_path / "plain")],
                           capture_output=True, text=True, timeout=120, cwd="/")
    assert plain.returncode == 0, plain.stderr
    assert not np.array_equal(image, np.asarray(Image.open(plain.stdout.split()[0])))


def test_the_bundles_measurements_do_not_stand_for_a_replacement_decoder(tmp_path):
    shutil.copytree(TINY_SD, tmp_path / "b")
    measured = {"peak_rss_bytes": 5000 * MB, "lowmem_peak_rss_bytes": 4000 * MB}
    (tmp_path / "b" / "variants.json").write_text(json.dumps({"version": 1, "components": {
        "vae_decoder": {"fp32": measured}}}))
    manifest = json.loads((tmp_path / "b" / "variants.json").read_text())
    own = load_bundle(tmp_path / "b")
    assert footprint(own, manifest, "vae_decoder", "fp32") == (5000 * MB, True)
    replaced = load_bundle(tmp_path / "b", TINY_DECODER)
    assert footprint(replaced, manifest, "vae_decoder", "fp32", lowmem=True) == (
        2 * (TINY_DECODER / "model.onnx").stat().st_size, False)
