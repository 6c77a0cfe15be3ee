"""A strict reader of ``.safetensors`` files, without torch and without the ``safetensors`` package.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(plus an optional ``__metadata__`` object of strings), then the tensors' raw little-endian bytes,
offsets counted from the end of the header. About sixty lines read it, where the package would be a
compiled dependency on every board; and being strict here is what turns a file cut short by a
failed copy or a file that is not safetensors at all into an error naming the file and the cause,
instead of garbage weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
          "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
          "U8": np.dtype("u1"), "BOOL": np.dtype("?")}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section
    end: int


class SafetensorsFile:
    """The tensors of one file; :meth:`array` returns float tensors as float32 numpy arrays."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{self.path}: cannot read it ({exc.strerror})") from None
        self.tensors, self.metadata, self._data = _parse(self.path, data)

    def array(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        raw = np.frombuffer(self._data, DTYPES[info.dtype], offset=info.begin,
                            count=math.prod(info.shape)).reshape(info.shape)
        if info.dtype == "BF16":  # bfloat16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32) if raw.dtype.kind == "f" else raw.copy()


def _parse(path: Path, data: bytes) -> tuple[dict[str, TensorInfo], dict[str, str], memoryview]:
    def bad(why: str) -> BundleError:
        return BundleError(f"{path}: not a valid safetensors file ({why})")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes; even the header length takes 8")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER:
        raise bad(f"a header of {size} bytes is more than the {MAX_HEADER} allowed")
    if 8 + size > len(data):
        raise bad(f"cut short: the header alone needs {8 + size} bytes, the file has {len(data)}")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map names to strings")
    body = memoryview(data)[8 + size:]
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r}: needs dtype, shape and data_offsets [begin, end]") from None
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r}: dtype {dtype} is not supported (supported: {', '.join(DTYPES)})")
        if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)) or begin > end:
            raise bad(f"tensor {name!r}: bad shape {list(shape)} or offsets [{begin}, {end}]")
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            raise bad(f"tensor {name!r}: {end - begin} bytes do not hold a {dtype} tensor of shape {list(shape)}")
        if end > len(body):
            raise bad(f"cut short: tensor {name!r} ends at byte {end} of the data, the file has {len(body)}")
        tensors[name] = TensorInfo(dtype, shape, begin, end)
    covered = 0  # the format forbids holes and overlaps: the tensors tile the data section
    for info in sorted(tensors.values(), key=lambda t: t.begin):
        if info.begin != covered:
            raise bad(f"tensor data overlaps or leaves a hole at byte {covered}")
        covered = info.end
    if covered != len(body):
        raise bad(f"{len(body) - covered} bytes after the last tensor")
    return tensors, metadata, body
