"""Lean attention: rewrite full-score attention so no graph holds more than a slice of its scores.

The PyTorch exporter writes diffusers' attention as ``MatMul(P, V)`` of ``P = Softmax(MatMul(Q, Kᵀ))``
(scaled before or after the first MatMul; diffusers' older ``baddbmm`` form adds a zero-filled
score-sized tensor). At 512x512 the SD UNet's first self-attention has 4096 queries and keys:
heads x 4096 x 4096 floats, 512 MB per image, several such buffers alive in one call. Rewritten:

``chunk``  the queries are split into ``chunk``-row slices, each slice's scores, softmax and product
           with V computed in turn and the results concatenated: the memory planner reuses one
           slice's buffers for the next. Exact: every score row is computed as before.
``mha``    ONNX Runtime's ``com.microsoft.MultiHeadAttention`` contrib op (batch x heads folded
           into its batch, one head), which computes attention in blocks on the CPU provider.

Done with the ``onnx`` package at ``quantize`` time (:func:`lean_attention_file`; quantize checks
that it is installed), so every tier made from the rewritten FP32 graph has it; run time never
needs ``onnx``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgeError
from .onnx_files import unoptimized_session

log = logging.getLogger(__name__)

CHUNK = 512  # query rows per slice: the project's SD 1.5 export's, 64 MB of scores per head-batch
MODES = ("chunk", "mha")
_ELEMENTWISE = ("Mul", "Div", "Add", "Sub")
MS_DOMAIN = "com.microsoft"


class AttentionError(EdgeError):
    """The attention rewrite was asked for something it cannot do."""


@dataclass
class Step:
    """An elementwise op between the scores and the softmax (the scale, a mask, a zero bias)."""
    node: object  # NodeProto
    main: int  # which input carries the scores
    drop: bool  # adds or subtracts zeros (diffusers' ``baddbmm`` with beta 0): left out


@dataclass
class Attention:
    """One ``MatMul(Softmax(MatMul(Q, Kᵀ) ...), V)`` found in a graph."""
    scores: object  # NodeProto: MatMul(Q, Kᵀ)
    chain: list[Step]
    softmax: object
    product: object  # MatMul(softmax, V)
    shape: tuple  # the score tensor's dims, as measured at batch 1


class _Index:
    """Nodes, producers, consumers, constant values and measured shapes of one graph."""

    def __init__(self, model, path: Path):
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in model.graph.initializer}
        wanted = {n for node in self.nodes if node.op_type in ("Softmax", "MatMul", *_ELEMENTWISE)
                  for n in (*node.input, *node.output) if n and n not in self.initializers}
        self.shapes = measured_shapes(model, path, sorted(wanted))

    def only_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 else None

    def constant(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper
        init = self.initializers.get(name)
        if init is not None:
            return None if init.data_location == init.EXTERNAL else numpy_helper.to_array(init)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def is_zero(self, name: str) -> bool:
        """All zeros: a zero constant or ``ConstantOfShape``, reshaped, cast or multiplied."""
        value = self.constant(name)
        if value is not None:
            return not value.any()
        node = self.producer.get(name)
        if node is None:
            return False
        if node.op_type == "ConstantOfShape":
            from onnx import numpy_helper
            fill = [numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"]
            return not fill or not fill[0].any()
        if node.op_type in ("Cast", "Expand", "Reshape", "Identity"):
            return self.is_zero(node.input[0])
        return node.op_type == "Mul" and any(self.is_zero(i) for i in node.input)

    def query_free(self, name: str) -> bool:
        """The same for every query row (broadcast over the score rows): a slice can use it whole."""
        init = self.initializers.get(name)
        shape = tuple(init.dims) if init is not None else self.shapes.get(name)
        return shape is not None and (len(shape) < 2 or shape[-2] == 1)


def measured_shapes(model, path: Path, names: list[str]) -> dict[str, tuple]:
    """The dims of tensors ``names`` in one ONNX Runtime run of ``model`` at batch 1 on zeros.

    ONNX's shape inference cannot follow the exporter's Shape/Gather/Concat/Reshape chains, so the
    shapes are measured: a Shape node per tensor, its output a graph output (the tensors themselves
    are freed as in a plain run). Inputs with a symbolic dim past the batch (height, width, tokens)
    give {}: a slice size fixed now would be wrong at another size.
    """
    import onnx
    feed = {}
    initializers = {t.name for t in model.graph.initializer}
    for value in (v for v in model.graph.input if v.name not in initializers):  # old IRs list weights as inputs
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if None in dims[1:]:
            log.info("%s: input %s has dynamic dims %s; attention left as it is", path, value.name, dims)
            return {}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feed[value.name] = np.zeros([dims[0] or 1, *dims[1:]] if dims else [], dtype)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for i, name in enumerate(names):
        probe.graph.node.append(onnx.helper.make_node("Shape", [name], [f"lean_shape{i}"]))
        probe.graph.output.append(onnx.helper.make_tensor_value_info(f"lean_shape{i}", onnx.TensorProto.INT64, None))
    session = unoptimized_session(probe, path, ".attention-shapes.onnx")
    values = session.run([f"lean_shape{i}" for i in range(len(names))], feed)
    return {name: tuple(int(d) for d in value) for name, value in zip(names, values)}


def _step(index: _Index, node) -> Step | None:
    if node.op_type not in _ELEMENTWISE or len(node.input) != 2:
        return None
    zero = [index.is_zero(i) for i in node.input]
    free = [z or index.query_free(i) for i, z in zip(node.input, zero)]
    if free.count(False) != 1:
        return None
    main = free.index(False)
    if node.op_type in ("Div", "Sub") and main != 0:  # c / scores, c - scores: not a scale or a bias
        return None
    if zero[1 - main] and node.op_type in ("Mul", "Div"):
        return None
    return Step(node, main, zero[1 - main])


def _walk_to_scores(index: _Index, softmax) -> tuple[object, list[Step]] | None:
    """From the softmax's input back through single-use elementwise steps to the scores MatMul."""
    chain, name, user = [], softmax.input[0], softmax
    while True:
        node = index.producer.get(name)
        if node is None or index.only_consumer(name) is not user:
            return None
        if node.op_type == "MatMul":
            return node, chain
        step = _step(index, node)
        if step is None:
            return None
        chain.insert(0, step)
        name, user = node.input[step.main], node


def _find(index: _Index) -> list[Attention]:
    found = []
    for node in index.nodes:
        if node.op_type != "Softmax":
            continue
        shape = index.shapes.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        product = index.only_consumer(node.output[0])
        if (shape is None or len(shape) < 3 or axis not in (-1, len(shape) - 1) or product is None
                or product.op_type != "MatMul" or product.input[0] != node.output[0]):
            continue
        walked = _walk_to_scores(index, node)
        if walked is not None:
            found.append(Attention(walked[0], walked[1], node, product, shape))
    return found


def find_attention(model, path: Path) -> list[Attention]:
    """Every full-score attention in ``model`` (an ``onnx.ModelProto`` loaded from ``path``; runs it
    once to measure its shapes)."""
    return _find(_Index(model, path))


def _chunk_nodes(att: Attention, chunk: int) -> tuple[list, list] | None:
    """Nodes and initializers computing ``att`` ``chunk`` query rows at a time (None: rows unknown or few)."""
    rows = att.shape[-2]
    if rows is None or rows <= chunk:
        return None
    import onnx
    make = onnx.helper.make_node
    sizes = [min(chunk, rows - start) for start in range(0, rows, chunk)]
    base = att.product.output[0]
    split = onnx.helper.make_tensor(f"{base}/lean_split", onnx.TensorProto.INT64, [len(sizes)], sizes)
    queries = [f"{base}/lean_q{i}" for i in range(len(sizes))]
    nodes = [make("Split", [att.scores.input[0], split.name], queries, axis=-2, name=f"{base}/lean_Split")]
    pieces = []
    for i, query in enumerate(queries):  # slice after slice, so the memory planner reuses the buffers
        current = f"{base}/lean_scores{i}"
        nodes.append(make("MatMul", [query, att.scores.input[1]], [current], name=current))
        for step in att.chain:
            if step.drop:
                continue
            inputs = list(step.node.input)
            inputs[step.main] = current
            current = f"{step.node.output[0]}/lean{i}"
            nodes.append(make(step.node.op_type, inputs, [current], name=current))
        probs = f"{base}/lean_probs{i}"
        nodes.append(make("Softmax", [current], [probs], axis=-1, name=probs))
        pieces.append(f"{base}/lean_out{i}")
        nodes.append(make("MatMul", [probs, att.product.input[1]], [pieces[-1]], name=pieces[-1]))
    nodes.append(make("Concat", pieces, [base], axis=-2, name=f"{base}/lean_Concat"))
    return nodes, [split]


def _scale(index: _Index, chain: list[Step]) -> float | None:
    """The constant factor the chain applies to the scores (None: it does more than scale)."""
    scale = 1.0
    for step in chain:
        if step.drop:
            continue
        value = index.constant(step.node.input[1 - step.main])
        if step.node.op_type not in ("Mul", "Div") or value is None or value.size != 1:
            return None
        scale = scale * float(value.item()) if step.node.op_type == "Mul" else scale / float(value.item())
    return scale


def _mha_nodes(index: _Index, att: Attention) -> tuple[list, list] | None:
    """``att`` as one MultiHeadAttention (batch and heads folded into its batch, one head), or None
    where shapes are not static past the batch or the chain is more than a constant scale."""
    import onnx
    make = onnx.helper.make_node
    q, kt, v = att.scores.input[0], att.scores.input[1], att.product.input[1]
    shapes = [index.shapes.get(n) for n in (q, kt, v, att.product.output[0])]
    scale = _scale(index, att.chain)
    if scale is None or any(s is None or len(s) != len(shapes[0]) or None in s[1:] for s in shapes):
        return None
    (rows, depth), keys, out = shapes[0][-2:], shapes[1][-1], shapes[3]
    base = att.product.output[0]
    dims = {"q": [-1, rows, depth], "k": [-1, keys, depth], "v": [-1, keys, shapes[2][-1]], "out": [-1, *out[1:]]}
    inits = [onnx.helper.make_tensor(f"{base}/lean_{k}_shape", onnx.TensorProto.INT64, [len(d)], d)
             for k, d in dims.items()]
    perm = [*range(len(shapes[1]) - 2), len(shapes[1]) - 1, len(shapes[1]) - 2]
    nodes = [make("Reshape", [q, inits[0].name], [f"{base}/lean_q"], name=f"{base}/lean_q"),
             make("Transpose", [kt], [f"{base}/lean_kbnsh"], perm=perm, name=f"{base}/lean_kbnsh"),
             make("Reshape", [f"{base}/lean_kbnsh", inits[1].name], [f"{base}/lean_k"], name=f"{base}/lean_k"),
             make("Reshape", [v, inits[2].name], [f"{base}/lean_v"], name=f"{base}/lean_v"),
             make("MultiHeadAttention", [f"{base}/lean_q", f"{base}/lean_k", f"{base}/lean_v"], [f"{base}/lean_mha"],
                  domain=MS_DOMAIN, num_heads=1, scale=scale, name=f"{base}/lean_mha"),
             make("Reshape", [f"{base}/lean_mha", inits[3].name], [base], name=f"{base}/lean_out")]
    return nodes, inits


def _live(nodes: list, outputs: set[str]) -> list:
    """``nodes`` less those nothing uses any more (what made the zeros a dropped bias added)."""
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in nodes for a in n.attribute):
        return nodes  # subgraphs use outer names that are not node inputs: keep everything
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]


def rewrite_attention(model, path: Path, mode: str = "chunk", chunk: int = CHUNK) -> int:
    """Rewrite every full-score attention of ``model`` (loaded from ``path``, whose folder holds its
    external weights) in place; returns how many were rewritten."""
    if mode not in MODES:
        raise AttentionError(f"attention mode {mode!r} is not one of {', '.join(MODES)}")
    if chunk < 1:
        raise AttentionError(f"attention chunk {chunk}: must be at least 1 query row")
    index = _Index(model, path)
    graph = model.graph
    replaced, gone = {}, set()
    for att in _find(index):
        made = _chunk_nodes(att, chunk) if mode == "chunk" else _mha_nodes(index, att)
        if made is None:
            continue
        replaced[id(att.product)] = made[0]
        graph.initializer.extend(made[1])
        old = [att.scores, *(s.node for s in att.chain), att.softmax, att.product]
        gone |= {id(n) for n in old}
        dead = {o for n in old[:-1] for o in n.output}
        kept = [v for v in graph.value_info if v.name not in dead]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    if not replaced:
        return 0
    order = []
    for node in index.nodes:
        if id(node) in replaced:
            order.extend(replaced[id(node)])
        elif id(node) not in gone:
            order.append(node)
    del graph.node[:]
    graph.node.extend(_live(order, {o.name for o in graph.output}))
    if mode == "mha" and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        import onnx
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return len(replaced)


def describe(mode: str, chunk: int = CHUNK) -> str:
    """How a rewritten attention is computed, for logs and variants.json."""
    return f"in slices of {chunk} query rows" if mode == "chunk" else "as com.microsoft.MultiHeadAttention"


def lean_attention_file(path: Path, mode: str = "chunk", chunk: int = CHUNK) -> int:
    """Rewrite the attention of the model file at ``path`` (its external weights untouched); returns
    how many were rewritten. The file is replaced atomically, and only when something changed."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    count = rewrite_attention(model, path, mode, chunk)
    if count:
        tmp = path.with_name(path.name + ".lean-tmp")
        onnx.save(model, str(tmp))
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
        log.info("%s: %d attention(s) rewritten, computed %s", path, count, describe(mode, chunk))
    return count
