"""Where each layer's weight is in an exported ONNX graph: the map LoRA targets are matched against.

Exporters (torch.onnx through Optimum, and this project's own) keep the module path in node names:
``/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul`` reads the weight of
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``. The weight itself may be an
initializer with a generated name (``onnx::MatMul_1234``, a Linear's weight transposed to
[in, out]), a Conv's [out, in, kh, kw] initializer, a Gemm's (``transB`` says which way round), or
behind a DequantizeLinear (static INT8: int8 values, per-channel scale and zero point, and an int32
bias whose scale is the input's times the weight's) or consumed by MatMulInteger (dynamic INT8: one
scale for the tensor). The map is built once per model file and kept for the process.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError
from .onnx_graph import Graph, Node, read_graph

log = logging.getLogger(__name__)

WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "MatMulInteger")


@dataclass(frozen=True)
class BiasRef:
    """A static-INT8 layer's int32 bias: re-quantized when the weight's scale changes."""

    name: str
    scale: str
    input_scale: str


@dataclass(frozen=True)
class WeightRef:
    module: str  # the torch module path, e.g. down_blocks.1.attentions.0.proj_in
    layout: str  # "in_out" ([in, out]: MatMul, Gemm without transB), "out_in" (Gemm transB=1), "conv"
    name: str  # the initializer the operator reads (the int8 values of a quantized layer)
    shape: tuple[int, ...]
    data_type: int  # ONNX TensorProto data type of ``name``
    scale: str | None = None  # quantized: the scale initializer (per channel, or one per tensor)
    zero_point: str | None = None
    axis: int | None = None  # the channel axis of a per-channel scale
    bias: BiasRef | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def flat(self) -> str:
        """The module path the way kohya writes it: every '.' an '_'."""
        return self.module.replace(".", "_")


def module_of(node: Node) -> str | None:
    """``/a.0/b/c/MatMul`` -> ``a.0.b.c``; None for nodes that do not carry a module path."""
    if not node.name.startswith("/") or node.name.count("/") < 2:
        return None
    return ".".join(node.name[1:].split("/")[:-1])


def _weight(graph: Graph, producers: dict[str, Node], node: Node) -> WeightRef | None:
    module = module_of(node)
    if module is None or len(node.inputs) < 2:
        return None
    source, scale = node.inputs[1], None
    producer = producers.get(source)
    if producer is not None and producer.op_type == "Cast" and producer.inputs[0] in graph.initializers:
        source = producer.inputs[0]  # an FP16 export's weight cast for an op kept in FP32
    elif producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0] in graph.initializers:
        source, scale = producer.inputs[0], producer
    if source not in graph.initializers:
        return None  # activations times activations (attention scores): no weight
    init = graph.initializers[source]
    if node.op_type == "Conv":
        layout = "conv"
    elif node.op_type == "Gemm":
        layout = "out_in" if node.ints.get("transB", 0) else "in_out"
    else:
        layout = "in_out"
    if len(init.dims) != (4 if layout == "conv" else 2):
        return None
    if scale is not None:
        bias = None
        if len(node.inputs) > 2 and node.op_type in ("Conv", "Gemm"):
            bias_dq, input_dq = producers.get(node.inputs[2]), producers.get(node.inputs[0])
            if bias_dq is not None and bias_dq.op_type == "DequantizeLinear" and input_dq is not None:
                bias = BiasRef(bias_dq.inputs[0], bias_dq.inputs[1], input_dq.inputs[1])
        return WeightRef(module, layout, source, init.dims, init.data_type, scale.inputs[1], scale.inputs[2],
                         scale.ints.get("axis", 1), bias)
    if node.op_type == "MatMulInteger":
        scale_name = source[: -len("_quantized")] + "_scale" if source.endswith("_quantized") else None
        if scale_name not in graph.initializers or len(node.inputs) < 4:
            return None
        return WeightRef(module, layout, source, init.dims, init.data_type, scale_name, node.inputs[3])
    return WeightRef(module, layout, source, init.dims, init.data_type)


@functools.lru_cache(maxsize=16)
def _cached(path: str, size: int, mtime_ns: int) -> tuple[Graph, dict[str, WeightRef]]:
    graph = read_graph(Path(path))
    producers = {out: node for node in graph.nodes for out in node.outputs}
    weights: dict[str, WeightRef] = {}
    for node in graph.nodes:
        if node.op_type in WEIGHT_OPS:
            ref = _weight(graph, producers, node)
            if ref is not None and ref.module not in weights:
                weights[ref.module] = ref
    for ref in weights.values():
        if ref.zero_point is not None and np.any(graph.array(ref.zero_point) != 0):
            raise BundleError(f"{path}: {ref.module}'s int8 weight has non-zero zero points; only the symmetric "
                              f"scheme `edge-imagegen quantize` writes can take a LoRA")
    log.debug("%s: %d weight layers mapped", path, len(weights))
    return graph, weights


def weight_map(path: Path) -> tuple[Graph, dict[str, WeightRef]]:
    """The graph and its weight layers by module path, built once per file (and file version)."""
    stat = Path(path).stat()
    return _cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
