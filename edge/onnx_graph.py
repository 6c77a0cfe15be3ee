"""Read-only view of an ONNX graph's nodes and initializers, without the ``onnx`` package.

The LoRA code needs to know which initializer holds each layer's weight and to read a few of
them; this walks the protobuf with :mod:`edge.onnx_files`' helpers over a memory map, keeping
offsets instead of bytes, so a graph with gigabytes of inline weights costs only the pages that
hold field tags. Field numbers are onnx.proto's.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BundleError
from .onnx_files import MODEL_GRAPH, VARINT, _fields, _varint, _walk

GRAPH_NODE, GRAPH_INITIALIZER = 1, 5
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE = 1, 2, 3, 4, 5
ATTR_NAME, ATTR_I = 1, 3
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW_DATA = 1, 2, 8, 9
TENSOR_FLOAT_DATA, TENSOR_INT32_DATA, TENSOR_INT64_DATA = 4, 5, 7
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 13, 14
EXTERNAL = 1
# TensorProto.DataType -> numpy
NUMPY_TYPES = {1: np.dtype("<f4"), 2: np.dtype("u1"), 3: np.dtype("i1"), 6: np.dtype("<i4"), 7: np.dtype("<i8"),
               10: np.dtype("<f2"), 11: np.dtype("<f8")}


@dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ints: dict[str, int]  # integer attributes (axis, transB, ...)


@dataclass(frozen=True)
class Initializer:
    name: str
    dims: tuple[int, ...]
    data_type: int
    # where the values are: ("raw", start, end) in the graph file, ("external", file, offset, length),
    # or ("field", field number, start, end) for values stored in float_data/int32_data/int64_data
    where: tuple


@dataclass
class Graph:
    path: Path
    nodes: list[Node] = field(default_factory=list)
    initializers: dict[str, Initializer] = field(default_factory=dict)

    def array(self, name: str) -> np.ndarray:
        """The values of one initializer, as numpy (a copy)."""
        init = self.initializers[name]
        if init.data_type not in NUMPY_TYPES:
            raise BundleError(f"{self.path}: initializer {name} has ONNX data type {init.data_type}, not read here")
        dtype, count = NUMPY_TYPES[init.data_type], math.prod(init.dims)
        kind = init.where[0]
        if kind == "external":
            _, file, offset, length = init.where
            with open(self.path.parent / file, "rb") as f:
                f.seek(offset)
                data = f.read(length if length is not None else count * dtype.itemsize)
        else:
            with open(self.path, "rb") as f:
                f.seek(init.where[-2])
                data = f.read(init.where[-1] - init.where[-2])
        if kind == "field":  # packed repeated field: float32 as fixed32, the rest as varints
            if init.where[1] == TENSOR_FLOAT_DATA:
                values = np.frombuffer(data, "<f4")
            else:
                values = np.array(_packed_varints(data), dtype=np.int64)
                if init.data_type == 10:  # float16 bits travel in int32_data
                    values = values.astype(np.uint16).view(np.float16)
            return values.astype(dtype).reshape(init.dims)
        if len(data) != count * dtype.itemsize:
            raise BundleError(f"{self.path}: initializer {name} has {len(data)} bytes, its shape needs "
                              f"{count * dtype.itemsize}")
        return np.frombuffer(data, dtype).reshape(init.dims).copy()


def _signed(value: int) -> int:
    """int64 fields travel as 64-bit two's complement varints."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _packed_varints(data: bytes) -> list[int]:
    values, pos = [], 0
    while pos < len(data):
        value, pos = _varint(data, pos)
        values.append(_signed(value))
    return values


def _scalars(buf, start: int, end: int) -> dict[int, list[int]]:
    """The varint fields of one message (``_fields`` yields only the length-delimited ones)."""
    out: dict[int, list[int]] = {}
    for number, wire, value, _ in _walk(buf, start, end):
        if wire == VARINT:
            out.setdefault(number, []).append(_signed(value))
    return out


def _text(buf, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8")


def _node(buf, start: int, end: int) -> Node:
    inputs, outputs, name, op_type, ints = [], [], "", "", {}
    for f, s, e in _fields(buf, start, end):
        if f == NODE_INPUT:
            inputs.append(_text(buf, s, e))
        elif f == NODE_OUTPUT:
            outputs.append(_text(buf, s, e))
        elif f == NODE_NAME:
            name = _text(buf, s, e)
        elif f == NODE_OP_TYPE:
            op_type = _text(buf, s, e)
        elif f == NODE_ATTRIBUTE:
            attr_name = next((_text(buf, a, b) for af, a, b in _fields(buf, s, e) if af == ATTR_NAME), "")
            value = _scalars(buf, s, e).get(ATTR_I)
            if value:
                ints[attr_name] = value[0]
    return Node(name, op_type, tuple(inputs), tuple(outputs), ints)


def _initializer(buf, start: int, end: int) -> Initializer:
    scalars = _scalars(buf, start, end)
    dims = list(scalars.get(TENSOR_DIMS, []))
    name, where, external = "", None, {}
    for f, s, e in _fields(buf, start, end):
        if f == TENSOR_NAME:
            name = _text(buf, s, e)
        elif f == TENSOR_DIMS:  # packed dims, as some writers emit them
            dims.extend(_packed_varints(bytes(buf[s:e])))
        elif f == TENSOR_RAW_DATA:
            where = ("raw", s, e)
        elif f in (TENSOR_FLOAT_DATA, TENSOR_INT32_DATA, TENSOR_INT64_DATA):
            where = ("field", f, s, e)
        elif f == TENSOR_EXTERNAL_DATA:
            entry = {ef: _text(buf, a, b) for ef, a, b in _fields(buf, s, e)}
            external[entry.get(1)] = entry.get(2)
    if scalars.get(TENSOR_DATA_LOCATION, [0])[0] == EXTERNAL:
        length = external.get("length")
        where = ("external", external["location"], int(external.get("offset") or 0),
                 int(length) if length else None)
    if where is None:  # no values at all: an empty tensor
        where = ("raw", start, start)
    return Initializer(name, tuple(dims), scalars.get(TENSOR_DATA_TYPE, [0])[0], where)


def read_graph(path: Path) -> Graph:
    """Nodes and initializers of the model at ``path`` (values stay in the file until asked for)."""
    graph = Graph(Path(path))
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for field_no, gs, ge in _fields(buf, 0, len(buf)):
                if field_no != MODEL_GRAPH:
                    continue
                for gfield, s, e in _fields(buf, gs, ge):
                    if gfield == GRAPH_NODE:
                        graph.nodes.append(_node(buf, s, e))
                    elif gfield == GRAPH_INITIALIZER:
                        init = _initializer(buf, s, e)
                        graph.initializers[init.name] = init
    except (OSError, ValueError, IndexError, UnicodeDecodeError, KeyError) as exc:
        raise BundleError(f"{path}: not a readable ONNX model ({exc})") from None
    return graph
