"""The files an ONNX model loads: the graph file and the external-data files its initializers name.

Exporters put large weights beside the graph (``model.onnx_data``, ``weights.pb``, one file per
tensor, any name): a 3.4 GB UNet can have a 1 MB ``model.onnx``. The names are in each
initializer's ``TensorProto.external_data`` (key ``location``), so they are read from the graph
with a minimal protobuf walk instead of the ``onnx`` package, which is not a runtime dependency.
The walk skips every length-delimited field it does not need over a memory map, so a model with
gigabytes of inline weights costs only the pages holding the field tags of its initializers.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Iterator

from .errors import BundleError

# Field numbers from onnx.proto
MODEL_GRAPH = 7
GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 5, 15
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_EXTERNAL_DATA = 13
ENTRY_KEY, ENTRY_VALUE = 1, 2
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def _varint(buf: mmap.mmap | bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _walk(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, a, b) of each field of one message: a length-delimited field's
    (start, end), a varint's (value, 0); fixed-width fields (unused by what we read) are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == LENGTH:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("field runs past its message")
            yield key >> 3, wire, pos, pos + length
            pos += length
        elif wire == VARINT:
            value, pos = _varint(buf, pos)
            yield key >> 3, wire, value, 0
        elif wire in (FIXED64, FIXED32):
            pos += 8 if wire == FIXED64 else 4
        else:
            raise ValueError(f"wire type {wire} is not used by ONNX")


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of one message."""
    return ((field, a, b) for field, wire, a, b in _walk(buf, start, end) if wire == LENGTH)


def _tensor_locations(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[str]:
    for field, s, e in _fields(buf, start, end):
        if field == TENSOR_EXTERNAL_DATA:
            entry = {f: bytes(buf[a:b]).decode("utf-8") for f, a, b in _fields(buf, s, e)}
            if entry.get(ENTRY_KEY) == "location" and ENTRY_VALUE in entry:
                yield entry[ENTRY_VALUE]


def _locations(buf: mmap.mmap | bytes) -> Iterator[str]:
    for field, gs, ge in _fields(buf, 0, len(buf)):
        if field != MODEL_GRAPH:
            continue
        for gfield, s, e in _fields(buf, gs, ge):
            if gfield == GRAPH_INITIALIZER:
                yield from _tensor_locations(buf, s, e)
            elif gfield == GRAPH_SPARSE_INITIALIZER:
                for sfield, ts, te in _fields(buf, s, e):
                    if sfield in (SPARSE_VALUES, SPARSE_INDICES):
                        yield from _tensor_locations(buf, ts, te)


def external_data_files(path: Path) -> list[Path]:
    """The external-data files the graph's initializers name, each once, in the order first named."""
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise BundleError(f"{path}: empty file; expected an ONNX model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                names = list(dict.fromkeys(_locations(buf)))
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not a readable ONNX protobuf ({exc})") from None
    files = [path.parent / name for name in names]
    for file in files:
        if not file.is_file():
            raise BundleError(f"{file}: missing; {path} keeps weights there (external data)")
    return files


def model_bytes(path: Path) -> int:
    """Bytes ONNX Runtime reads to load ``path``: the graph file plus its external-data files."""
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(path))


def unoptimized_session(model, beside: Path, name: str):
    """An ONNX Runtime session of ``model`` (an in-memory ``onnx.ModelProto``, e.g. with extra
    outputs) with every tensor kept: saved as ``name`` beside the file it came from, so that its
    external-data names resolve, and removed once loaded (dev-time tools only: needs ``onnx``)."""
    import onnx
    import onnxruntime as ort
    staged = beside.parent / name
    onnx.save(model, str(staged))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no tensor fused away
        return ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
    finally:
        staged.unlink(missing_ok=True)
