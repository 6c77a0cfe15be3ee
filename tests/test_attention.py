"""The attention rewrite (edge.attention) on real exported graphs: found, rewritten, same outputs at every tier."""

import shutil

import numpy as np
import onnxruntime as ort
import pytest

from conftest import TINY_SD

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from edge.attention import AttentionError, find_attention, lean_attention_file, rewrite_attention  # noqa: E402
from edge.quantize import Calibration, convert_fp16, quantize_int8  # noqa: E402

CHUNK = 16  # the fixture's largest attention has 256 queries (VAE mid-block at 16x16 latents)
# The standard Optimum export of the tiny UNet: 8 attentions (self and cross, down and up block),
# 64 queries each; its VAE decoder: 1 attention over 256 positions.
ATTENTIONS = {"unet": 8, "vae_decoder": 1}


def run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def feed_for(path, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    feed = {}
    for value in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs():
        shape = [d if isinstance(d, int) else batch for d in value.shape]
        feed[value.name] = np.asarray(rng.standard_normal(shape) * 2, np.float32 if "float" in value.type else np.int64)
    return feed


def ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def large(path, chunk):
    """Attentions left with more than ``chunk`` query rows."""
    model = onnx.load(str(path), load_external_data=False)
    return [a for a in find_attention(model, path) if a.shape[-2] > chunk]


def keep_original(path, folder):
    """A copy of the model at ``path`` and its external data, in ``folder``."""
    folder.mkdir()
    shutil.copy(path, folder)
    shutil.copy(path.parent / "model.onnx_data", folder)
    return folder / path.name


@pytest.fixture
def exported(tmp_path):
    """The tiny-sd UNet and VAE decoder (standard Optimum export), weights as external data."""
    paths = {}
    for comp in ATTENTIONS:
        (tmp_path / comp).mkdir()
        model = onnx.load(str(TINY_SD / comp / "model.onnx"))
        paths[comp] = tmp_path / comp / "model.onnx"
        onnx.save(model, str(paths[comp]), save_as_external_data=True, location="model.onnx_data")
    return paths


@pytest.mark.parametrize("mode", ["chunk", "mha"])
@pytest.mark.parametrize("comp", sorted(ATTENTIONS))
def test_rewrite_finds_every_attention_and_keeps_outputs(exported, comp, mode, tmp_path):
    path = exported[comp]
    original = keep_original(path, tmp_path / "original")
    weights = (path.parent / "model.onnx_data").read_bytes()
    found = large(path, CHUNK)
    assert len(found) == ATTENTIONS[comp]
    assert lean_attention_file(path, mode, CHUNK) == ATTENTIONS[comp]
    assert (path.parent / "model.onnx_data").read_bytes() == weights  # the graph changed, not the weights
    assert large(path, CHUNK) == []
    softmaxes = ops(path).count("Softmax")
    if mode == "mha":
        assert softmaxes == 0 and ops(path).count("MultiHeadAttention") == ATTENTIONS[comp]
    else:
        slices = sum(-(-a.shape[-2] // CHUNK) for a in found)
        assert softmaxes == ops(original).count("Softmax") - len(found) + slices
    for seed in (0, 1):
        feed = feed_for(path, seed)
        want, got = run(original, feed), run(path, feed)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    assert lean_attention_file(path, mode, CHUNK) == 0  # nothing left to rewrite: the file stays


@pytest.mark.parametrize("mode", ["chunk", "mha"])
def test_fp16_and_int8_variants_of_the_rewritten_graph_match_the_original_ones(exported, tmp_path, mode):
    """Each tier made from the rewritten UNet gives what the same tier made from the export gives."""
    path = exported["unet"]
    original = keep_original(path, tmp_path / "original")
    assert lean_attention_file(path, mode, CHUNK) == ATTENTIONS["unet"]
    feeds = [feed_for(path, seed, batch=1) for seed in range(3)]
    for folder in (original.parent, path.parent):
        convert_fp16(folder / "model.onnx", folder / "model.fp16.onnx", feeds[0])
        quantize_int8("unet", folder / "model.onnx", folder / "model.int8.onnx", Calibration({"unet": feeds}))
    marker = "Split" if mode == "chunk" else "MultiHeadAttention"
    assert marker in ops(path.parent / "model.fp16.onnx") and marker in ops(path.parent / "model.int8.onnx")
    for seed in (7, 8):
        test = feed_for(path, seed, batch=1)
        fp32 = run(original, test)
        for variant in ("model.fp16.onnx", "model.int8.onnx"):
            want, got = run(original.parent / variant, test), run(path.parent / variant, test)
            if mode == "chunk" or variant == "model.fp16.onnx":
                np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(fp32).max(), err_msg=variant)
            else:
                # MultiHeadAttention rounds differently in the last bit, and the INT8 graph's
                # quantizers turn some of that into one quantization step: as far from FP32 as before
                error = [float(np.sqrt(((v - fp32) ** 2).mean())) for v in (want, got)]
                assert error[1] <= 1.05 * error[0], (seed, error)


def baddbmm_graph(mask_rows: int = 1):
    """diffusers' older attention as exported: (Q Kᵀ) * scale + 0 * zeros(scores), plus a mask
    broadcast over ``mask_rows`` rows, then softmax and V."""
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 64, 8])
    kt = helper.make_tensor_value_info("kt", TensorProto.FLOAT, [2, 8, 48])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 48, 8])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, mask_rows, 48])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 64, 8])
    consts = [helper.make_tensor("shape", TensorProto.INT64, [3], [2, 64, 48]),
              helper.make_tensor("alpha", TensorProto.FLOAT, [], [0.35]),
              helper.make_tensor("beta", TensorProto.FLOAT, [], [0.0])]
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["empty"]),
             helper.make_node("Mul", ["empty", "beta"], ["bias"]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"]),
             helper.make_node("Mul", ["qk", "alpha"], ["scaled"]),
             helper.make_node("Add", ["bias", "scaled"], ["biased"]),
             helper.make_node("Add", ["biased", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["out"])]
    graph = helper.make_graph(nodes, "attention", [q, kt, v, mask], [out], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_baddbmm_form_with_a_mask_is_rewritten_and_keeps_outputs(tmp_path):
    rng = np.random.default_rng(3)
    feed = {"q": rng.standard_normal((2, 64, 8)), "kt": rng.standard_normal((2, 8, 48)),
            "v": rng.standard_normal((2, 48, 8)), "mask": rng.standard_normal((1, 1, 48)) * 3}
    feed = {k: v.astype(np.float32) for k, v in feed.items()}
    onnx.save(baddbmm_graph(), str(tmp_path / "original.onnx"))
    want = run(tmp_path / "original.onnx", feed)
    for mode in ("chunk", "mha"):
        path = tmp_path / f"{mode}.onnx"
        onnx.save(baddbmm_graph(), str(path))
        assert lean_attention_file(path, mode, 16) == (1 if mode == "chunk" else 0)  # a mask is more than a scale
        if mode == "chunk":
            assert ops(path).count("Softmax") == 4 and "ConstantOfShape" not in ops(path)  # the zeros are gone
        np.testing.assert_allclose(run(path, feed), want, rtol=0, atol=1e-6)


def test_a_mask_that_differs_per_query_is_left_alone(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(baddbmm_graph(mask_rows=64), str(path))
    assert lean_attention_file(path, "chunk", 16) == 0
    assert ops(path).count("Softmax") == 1


def test_dynamic_spatial_shapes_are_left_alone(tmp_path):
    model = onnx.load(str(TINY_SD / "unet" / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    assert rewrite_attention(model, path, "chunk", CHUNK) == 0


def test_bad_mode_and_chunk_are_refused(tmp_path):
    model = baddbmm_graph()
    with pytest.raises(AttentionError, match="flash"):
        rewrite_attention(model, tmp_path / "m.onnx", "flash")
    with pytest.raises(AttentionError, match="chunk 0"):
        rewrite_attention(model, tmp_path / "m.onnx", "chunk", 0)


@pytest.mark.slow
def test_quantize_rewrites_the_fp32_graph_and_the_images_stay(tmp_path):
    from edge.bundle import load_bundle
    from edge.jobs import parse_job
    from edge.memory import tier_plan
    from edge.pipeline import Pipeline
    from edge.providers import RuntimeOptions
    from edge.quantize import quantize_bundle
    bundle = tmp_path / "tiny-sd"
    shutil.copytree(TINY_SD, bundle)
    job = parse_job({"prompt": "knolling of 2 red gears", "steps": 3, "seed": 4})

    def image(root):
        loaded = load_bundle(root)
        pipe = Pipeline(loaded, RuntimeOptions(threads=1), tier_plan(loaded, {}, "fp32"))
        return np.asarray(pipe.generate(job).images[0].image, dtype=np.int16)

    before = image(bundle)
    manifest = quantize_bundle(bundle, steps=2, max_feeds=4, prompts=1, fidelity_steps=2,
                               components=("unet", "vae_decoder"), precisions=("int8",))
    for comp, count in ATTENTIONS.items():
        assert manifest["components"][comp]["fp32"]["method"].startswith(f"as exported, with {count} full-score")
        assert ops(bundle / comp / "model.onnx").count("MultiHeadAttention") == count
        assert "psnr_db" in manifest["components"][comp]["int8"]
    assert "fp32" not in manifest["components"].get("text_encoder", {})  # not asked for: left as exported
    assert np.abs(image(bundle) - before).max() <= 1  # the FP32 tier's image, to the rounding of a pixel
