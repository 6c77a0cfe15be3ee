"""The strict safetensors reader and the ONNX graph walk, against the onnx package's own reading."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge.bundle import EMBEDDED_MODEL
from edge.errors import BundleError
from edge.lora_graph import weight_map
from edge.onnx_graph import read_graph
from edge.safetensors_file import SafetensorsFile
from lora_files import write_safetensors
from test_lora import FIXTURES, LORA_DIR


def test_reads_what_it_wrote_in_every_float_type(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16: the top half of each float32
    path = write_safetensors(tmp_path / "a.safetensors", {"f32": values, "f16": values.astype(np.float16),
                                                          "n": np.asarray([3], np.int64)}, {"k": "v"})
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    end = header["n"]["data_offsets"][1]
    header["bf"] = {"dtype": "BF16", "shape": [2, 3], "data_offsets": [end, end + 12]}
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:] + bf16.tobytes())
    f = SafetensorsFile(path)
    assert f.metadata == {"k": "v"} and f.array("f32").dtype == np.float32
    assert np.array_equal(f.array("f32"), values)
    assert np.array_equal(f.array("f16"), values.astype(np.float16).astype(np.float32))
    assert np.abs(f.array("bf") - values).max() < 1e-2 and f.array("n").tolist() == [3]


def _header_file(tmp_path, header, data=b""):
    text = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("header, data, words", [
    ({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "dtype F8_E4M3 is not supported"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "cut short"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not hold"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"", "needs dtype, shape and data_offsets"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "hole"),
    ([1, 2], b"", "not an object"),
])
def test_malformed_files_are_refused_naming_the_file(tmp_path, header, data, words):
    path = _header_file(tmp_path, header, data)
    with pytest.raises(BundleError, match=words) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("raw, words", [(b"", "even the header length"), (b"\xff" * 8 + b"{}", "more than"),
                                        ((100).to_bytes(8, "little") + b"{}", "cut short"),
                                        ((4).to_bytes(8, "little") + b"\xff\xfe{}", "not JSON")])
def test_not_safetensors_at_all(tmp_path, raw, words):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    with pytest.raises(BundleError, match=words):
        SafetensorsFile(path)


def test_the_reference_files_read_whole():
    f = SafetensorsFile(LORA_DIR / "kohya.safetensors")
    assert any(k.endswith(".alpha") for k in f.tensors) and all(f.array(k).dtype == np.float32 for k in f.tensors)


@pytest.mark.parametrize("path", [FIXTURES / "tiny-sd" / "unet" / "model.onnx",
                                  EMBEDDED_MODEL / "unet" / "model.int8.onnx",
                                  EMBEDDED_MODEL / "text_encoder" / "model.int8.onnx",
                                  EMBEDDED_MODEL / "unet" / "model.fp16.onnx"])
def test_graph_walk_reads_what_onnx_reads(path):
    model = onnx.load(str(path))
    graph = read_graph(path)
    assert [(n.name, n.op_type, n.inputs) for n in graph.nodes] == \
        [(n.name, n.op_type, tuple(n.input)) for n in model.graph.node]
    for init in model.graph.initializer:
        assert np.array_equal(graph.array(init.name), numpy_helper.to_array(init)), init.name


def test_external_data_and_the_weight_map(tmp_path):
    model = onnx.load(str(FIXTURES / "tiny-sd" / "unet" / "model.onnx"))
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}  # saving moves them out
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="weights.pb",
              size_threshold=0)
    graph, weights = weight_map(tmp_path / "model.onnx")
    ref = weights["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert ref.layout == "in_out" and ref.name.startswith("onnx::MatMul") and graph.initializers[ref.name].where[0] == "external"
    assert np.array_equal(graph.array(ref.name), original[ref.name])
    assert weights["time_embedding.linear_1"].layout == "out_in"  # Gemm with transB=1
    assert weights["down_blocks.1.resnets.0.conv1"].layout == "conv"


def test_weight_map_of_static_and_dynamic_int8():
    _, unet = weight_map(EMBEDDED_MODEL / "unet" / "model.int8.onnx")
    conv = unet["up_blocks.1.resnets.0.conv1"]
    assert conv.quantized and conv.axis == 0 and conv.bias is not None and conv.name.endswith("_quantized")
    assert unet["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].axis == 1
    _, te = weight_map(EMBEDDED_MODEL / "text_encoder" / "model.int8.onnx")
    q = te["text_model.encoder.layers.0.self_attn.q_proj"]
    assert q.quantized and q.axis is None and q.scale.endswith("_scale")


def test_not_an_onnx_file(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        read_graph(tmp_path / "model.onnx")
