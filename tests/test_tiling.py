"""Tiled VAE decode: tile layout, seamless blending, PSNR against the whole decode, when it tiles."""

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge.bundle import EMBEDDED_MODEL, load_bundle
from edge.jobs import parse_job
from edge.profile import psnr
from edge.memory import tier_plan
from edge.pipeline import Pipeline, record_inputs
from edge.providers import RuntimeOptions
from edge.tiling import MIN_TILE, choose_tile, decode_bytes, decode_tiled, feather, starts

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("length, tile", [(16, 8), (16, 10), (64, 32), (64, 24), (37, 12), (8, 8)])
def test_tiles_cover_with_equal_sizes_and_the_overlap(length, tile):
    offsets = starts(length, tile, tile // 4)
    assert offsets[0] == 0 and offsets[-1] + min(tile, length) == length
    assert all(b - a <= tile - tile // 4 for a, b in zip(offsets, offsets[1:]))  # overlap at least tile // 4


def test_feather_weights_of_neighbours_sum_to_one():
    ramp = 16
    left, right = feather(64, ramp, False, True), feather(64, ramp, True, False)
    overlap = left[-ramp:] + right[:ramp]  # tiles overlapping by exactly the ramp
    assert np.allclose(overlap, 1.0) and left[0] == 1.0 and right[-1] == 1.0 and (left > 0).all()


def nearest_upsample(z: np.ndarray) -> np.ndarray:
    return z.repeat(8, axis=2).repeat(8, axis=3)[:, :3]


def test_blending_is_exact_for_a_local_decoder():
    """A decoder without any context (nearest upsampling) must come out identical: the weights are
    normalised wherever tiles meet, whatever the overlap."""
    z = np.random.default_rng(0).standard_normal((1, 4, 37, 29)).astype(np.float32)
    for tile in ((8, 8), (12, 20), (37, 10)):
        np.testing.assert_allclose(decode_tiled(nearest_upsample, z, tile, 8), nearest_upsample(z), atol=1e-6)


def dynamic_decoder(bundle_dir: Path) -> None:
    """Make a bundle's decoder dynamic in height and width (exported with a fixed 16x16 latent)."""
    path = bundle_dir / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    for value, names in ((model.graph.input[0], ("latent_height", "latent_width")),
                         (model.graph.output[0], ("height", "width"))):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = names
    del model.graph.value_info[:]
    onnx.save(model, str(path))
    for variant in path.parent.glob("model.*.onnx"):
        variant.unlink()


def final_latents(pipe: Pipeline, seed: int) -> np.ndarray:
    with record_inputs(pipe) as recorded:
        pipe.generate(parse_job({"prompt": "knolling of 3 red gears and a blue battery", "seed": seed, "steps": 8}))
    scaled = recorded["vae_decoder"][-1][pipe._latent_name]
    return (scaled - pipe.bundle.vae_shift_factor) * pipe.bundle.vae_scaling_factor  # as decode() gets them


# Measured (benchmarks/README.md): 12-cell tiles of 16x16 latents 35.4-39.7 dB on both models;
# the SD decoder's group norms see one tile at a time, so it is not exact.
@pytest.mark.parametrize("source", [EMBEDDED_MODEL, FIXTURES / "tiny-sd"], ids=["knolling-tiny", "tiny-sd"])
def test_tiled_decode_psnr_against_whole(tmp_path, source, request):
    import shutil
    shutil.copytree(source, tmp_path / "b")
    dynamic_decoder(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    whole = Pipeline(bundle, RuntimeOptions(threads=1, vae_tiling="off"))
    tiled = Pipeline(bundle, RuntimeOptions(threads=1, vae_tiling="on", vae_tile_size=96))  # 12 latent cells
    for seed in (1, 2):
        latents = final_latents(whole, seed)
        a, b = np.asarray(whole.decode(latents)), np.asarray(tiled.decode(latents))
        assert a.shape == b.shape == (128, 128, 3)
        assert 33.0 < psnr(a, b) < 60.0  # close, and really tiled (a whole decode would be identical)


def test_tiny_decoder_tiles_closely():
    """AutoencoderTiny is convolutions only: tiles differ from the whole only within its receptive
    field of their edges (measured 40.7 dB at 64 px tiles, 48.1 at 96, 53.0 at 128)."""
    bundle = load_bundle(FIXTURES / "tiny-sd", FIXTURES / "tiny-decoder")
    whole = Pipeline(bundle, RuntimeOptions(threads=1, vae_tiling="off"))
    tiled = Pipeline(bundle, RuntimeOptions(threads=1, vae_tiling="on", vae_tile_size=96))
    latents = np.random.default_rng(3).standard_normal((1, 4, 24, 40)).astype(np.float32)
    score = psnr(np.asarray(whole.decode(latents)), np.asarray(tiled.decode(latents)))
    assert score is not None and 44.0 < score < 70.0


SD = dict(scale=8, channels=128)


def test_choose_tile_rules(caplog):
    budget_of = lambda mb: (lambda: mb << 20)  # noqa: E731
    whole_512 = decode_bytes(512 * 512, 128)
    args = dict(tile_px=0, latent=(64, 64), static=(None, None), **SD)
    assert choose_tile("off", lowmem=True, budget=budget_of(1), **args) is None
    assert choose_tile("auto", lowmem=False, budget=budget_of(1), **args) is None  # resident tiers: whole
    assert choose_tile("auto", lowmem=True, budget=lambda: whole_512 + 1, **args) is None  # it fits
    th, tw = choose_tile("auto", lowmem=True, budget=lambda: whole_512 // 4, **args)
    assert th == tw and 24 <= th <= 32 and decode_bytes(th * tw * 64, 128) <= whole_512 // 4
    assert choose_tile("auto", lowmem=True, budget=budget_of(0), **args) == (MIN_TILE, MIN_TILE)
    assert choose_tile("on", lowmem=False, budget=budget_of(10**6), **{**args, "tile_px": 256}) == (32, 32)
    assert choose_tile("on", lowmem=False, budget=budget_of(10**6), **args) is None  # room for it whole
    with caplog.at_level(logging.INFO, "edge.tiling"):
        assert choose_tile("on", lowmem=True, budget=budget_of(1), **{**args, "static": (64, 64)}) is None
    assert "fixed 64x64 latent shape" in caplog.text
    assert choose_tile("on", lowmem=True, budget=budget_of(1), **{**args, "static": (32, 32)}) == (32, 32)


@pytest.mark.slow  # a subprocess or seconds of waiting: the whole suite, not the fast lane
def test_lowmem_tier_tiles_when_the_budget_is_short(tmp_path):
    """int8-lowmem with auto: the whole decode does not fit a (nearly) empty budget, so it tiles."""
    import shutil
    shutil.copytree(EMBEDDED_MODEL, tmp_path / "b")
    dynamic_decoder(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    plan = tier_plan(bundle, {}, "int8-lowmem")
    short = Pipeline(bundle, RuntimeOptions(threads=1), plan, headroom=2**50)  # budget 0
    roomy = Pipeline(bundle, RuntimeOptions(threads=1), plan, headroom=0)
    latents = np.random.default_rng(1).standard_normal((1, 4, 32, 32)).astype(np.float32)
    with short.vae_decoder.loaded():
        tiled = np.asarray(short.decode(latents))
    with roomy.vae_decoder.loaded():
        whole = np.asarray(roomy.decode(latents))
    assert tiled.shape == whole.shape == (256, 256, 3)
    assert 20.0 < psnr(tiled, whole) < 60.0


def test_static_decoder_decodes_whole_under_tiling_on(pipeline, caplog):
    tiled = Pipeline(pipeline.bundle, replace(pipeline.runtime, vae_tiling="on", vae_tile_size=64))
    latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16)).astype(np.float32)
    with caplog.at_level(logging.INFO, "edge.tiling"):
        assert np.array_equal(np.asarray(tiled.decode(latents)), np.asarray(pipeline.decode(latents)))
    assert "untiled" in caplog.text
