"""Footprints count every byte a model loads: external-data files named by its initializers."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from edge.bundle import EMBEDDED_MODEL, load_bundle
from edge.errors import BundleError, MemoryBudgetError
from edge.memory import MB, Budget, choose_plan, footprint
from edge.onnx_files import external_data_files, model_bytes

FIXTURES = Path(__file__).parent / "fixtures"


def matmul_model(rng: np.random.Generator, sizes=(64, 256, 64)) -> onnx.ModelProto:
    """y = relu(x @ W1) @ W2: a real model with weights large enough to go to external data."""
    w1 = numpy_helper.from_array(rng.standard_normal(sizes[:2]).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal(sizes[1:]).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, sizes[0]])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, sizes[2]])],
                              initializer=[w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("location, per_tensor", [("model.onnx_data", False), ("weights.pb", False),
                                                  (None, True)])
def test_external_files_are_found_and_counted(tmp_path, location, per_tensor):
    path = tmp_path / "model.onnx"
    onnx.save(matmul_model(np.random.default_rng(0)), str(path), save_as_external_data=True,
              all_tensors_to_one_file=not per_tensor, location=location, size_threshold=0)
    # what the onnx package itself says the graph names
    graph = onnx.load(str(path), load_external_data=False).graph
    named = list(dict.fromkeys(e.value for t in graph.initializer for e in t.external_data if e.key == "location"))
    files = external_data_files(path)
    assert [f.name for f in files] == named and len(files) == (2 if per_tensor else 1)
    assert model_bytes(path) == path.stat().st_size + sum(f.stat().st_size for f in files)
    assert model_bytes(path) > (64 * 256 + 256 * 64) * 4 > path.stat().st_size * 10  # the weights are outside
    out = ort.InferenceSession(str(path)).run(None, {"x": np.ones((1, 64), np.float32)})[0]
    assert out.shape == (1, 64)  # ONNX Runtime loads the same files


def test_inline_models_have_no_external_files():
    for comp in ("text_encoder", "unet", "vae_decoder"):
        for path in (EMBEDDED_MODEL / comp).glob("model*.onnx"):
            assert external_data_files(path) == [] and model_bytes(path) == path.stat().st_size
    path = FIXTURES / "tiny-sd" / "unet" / "model.onnx"
    assert model_bytes(path) == path.stat().st_size


def test_missing_external_file_names_both_paths(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(matmul_model(np.random.default_rng(1)), str(path), save_as_external_data=True,
              location="weights.pb", size_threshold=0)
    (tmp_path / "weights.pb").unlink()
    with pytest.raises(BundleError, match=r"weights.pb: missing; .*model.onnx keeps weights there"):
        model_bytes(path)
    path.write_bytes(b"\x3a\xff\xff\xff\xff\x0f")  # graph field claiming 4 GB in a 6-byte file
    with pytest.raises(BundleError, match="not a readable ONNX protobuf"):
        model_bytes(path)


def test_tier_estimate_counts_external_weights(bundle_copy):
    """Without variants.json, a UNet whose weights moved to weights.pb must not look tiny."""
    (bundle_copy / "variants.json").unlink()
    for f in (bundle_copy / "unet").glob("model.*.onnx"):
        f.unlink()  # only fp32: every tier loads the same UNet
    unet = bundle_copy / "unet" / "model.onnx"
    inline = unet.stat().st_size
    onnx.save(onnx.load(str(unet)), str(unet), save_as_external_data=True, location="weights.pb", size_threshold=0)
    assert unet.stat().st_size < inline / 10  # the graph file alone would say a tenth
    bundle = load_bundle(bundle_copy)
    need, measured = footprint(bundle, {}, "unet", "fp32")
    assert not measured and need == 2 * model_bytes(unet) >= 2 * inline
    plan = choose_plan(bundle, Budget(10**12, None, 0))
    assert plan.tier == "fp32" and "estimated" in plan.reason
    # a budget the graph file alone would have fitted into: refused, with the real figure
    lowmem_need = max(footprint(bundle, {}, c, p, True)[0] for c, p in plan.precisions.items())
    assert lowmem_need - MB > 2 * unet.stat().st_size
    with pytest.raises(MemoryBudgetError, match=f"needs {lowmem_need // MB} MB"):
        choose_plan(bundle, Budget(lowmem_need - MB, None, 0))
    assert bundle.summary()["components"]["unet"]["fp32"] == model_bytes(unet)
    assert ort.InferenceSession(str(unet)).get_inputs()[0].name == "sample"  # loads from weights.pb
