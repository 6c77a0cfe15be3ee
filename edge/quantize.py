"""``edge-imagegen quantize``: write FP16 and INT8 variants next to each FP32 component.

First each FP32 graph's full-score attention is rewritten in place (:mod:`edge.attention`), so
the variants made from it, and the FP32 tier itself, never hold a whole score matrix.

    <component>/model.fp16.onnx   FP16 weights and activations; ops without a CPU FP16 kernel in
                                  this onnxruntime stay FP32 (found by loading and running the model)
    <component>/model.int8.onnx   UNet and VAE decoder: static QDQ quantization (per-channel INT8
                                  weights, UINT8 activations) calibrated on inputs captured from FP32
                                  runs of a prompt set; the text encoder: dynamic quantization of
                                  its MatMuls (its activations are a few hundred tokens, cheap to
                                  quantize on the fly, and static ranges help little)

Each variant is then checked in the whole pipeline, that component swapped and the others FP32:
a variant whose images fall below ``min_psnr`` against FP32 is deleted, and ``variants.json``
says why (VAE decoders often are: their output is the image itself).

Needs the ``onnx`` package (``pip install edge-imagegen[quantize]``); run time does not.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attention import CHUNK, describe, lean_attention_file
from .bundle import VARIANT_FILES, Bundle, load_bundle
from .errors import EdgeError
from .jobs import parse_job
from .images import png_base64
from .memory import fixed_plan, trim_heap
from .onnx_files import model_bytes, unoptimized_session
from .pipeline import Pipeline, record_inputs
from .profile import Fidelity, single_items
from .providers import RuntimeOptions
from .variants import update_manifest

log = logging.getLogger(__name__)

CALIBRATION_PROMPTS = (
    "knolling of 2 red gears and a blue battery on a pure white background",
    "exploded view of a green circuit board, a black chip and four silver screws",
    "flat lay of a yellow spring, an orange washer and a purple lens, top-down",
    "parts laid out: a pink bearing, a cyan nut and a grey screw",
    "exploded view of a camera lens assembly, technical illustration",
    "knolling photography of a disassembled mechanical keyboard",
)
# Below this the composition of the final image visibly changes, not just its fine grain.
MIN_PSNR = 20.0
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB limit, with margin
_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(")


class QuantizeError(EdgeError):
    """A variant could not be produced."""


@dataclass
class Calibration:
    feeds: dict[str, list[dict[str, np.ndarray]]]


def _onnx():
    try:
        import onnx
    except ImportError:
        raise QuantizeError("quantize needs the onnx package: pip install 'edge-imagegen[quantize]'") from None
    return onnx


def capture(bundle: Bundle, steps: int, max_feeds: int, prompts: int) -> Calibration:
    """Run FP32 generations and keep the inputs each component saw, thinned to ``max_feeds``."""
    pipe = Pipeline(bundle, RuntimeOptions(), fixed_plan(reason="quantize"))
    with record_inputs(pipe) as recorded:
        for seed, prompt in enumerate(CALIBRATION_PROMPTS[:prompts]):
            job = {"prompt": prompt, "steps": steps, "seed": seed, "guidance": 7.5}
            image = pipe.generate(parse_job(job)).images[0].image
            if pipe.vae_encoder is not None:  # the encoder sees what the model draws, through an img2img job
                pipe.generate(parse_job({**job, "init_image": png_base64(image), "strength": 0.5}))
    feeds = {}
    for name, inputs in recorded.items():
        keep = np.linspace(0, len(inputs) - 1, min(max_feeds, len(inputs))).round().astype(int)
        feeds[name] = [inputs[i] for i in sorted(set(keep))]
    return Calibration(feeds)


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes whose inputs are both activations: attention's QK^T and scores x V.

    They are left in float: their inputs are the largest tensors of the UNet (heads x tokens x
    tokens), calibrating them would hold all of them at once, and quantizing softmax outputs
    costs much more accuracy than it saves time.
    """
    onnx = _onnx()
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


def _big(path: Path) -> bool:
    return model_bytes(path) > EXTERNAL_DATA_BYTES


def _inferred(src: Path) -> Path:
    """The shape-inferred copy onnxruntime's quantizers write beside the model (left behind if they fail)."""
    return src.with_name(f"{src.stem}-inferred{src.suffix}")


def _dynamic(src: Path, dst: Path, op_types: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                         use_external_data_format=_big(src))
    finally:
        _inferred(src).unlink(missing_ok=True)


STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm")


def calibrate_minmax(src: Path, feeds: list[dict[str, np.ndarray]], op_types=STATIC_OP_TYPES) -> dict:
    """Min and max of every float input and output of ``op_types`` nodes over ``feeds``.

    What onnxruntime's MinMax calibrator computes (the same tensors, per tensor, not per channel),
    without its copies: it keeps the loaded model, an opset-updated copy, its own copy and the
    augmented model it saves, all with weights, next to its session, and the 3.4 GB SD 1.5 UNet
    ran out of 24 GB that way. Here the augmented graph is saved without weights next to the
    original, so that its external-data references still resolve, and the session loads the
    weights once. Each ReduceMin/ReduceMax pair runs right after its tensor is produced, so no
    activation lives longer than in a plain run.
    """
    onnx = _onnx()
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    graph = model.graph
    floats = {v.name for v in [*graph.value_info, *graph.input, *graph.output]
              if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    floats -= {t.name for t in graph.initializer}
    wanted = {t for n in graph.node if n.op_type in op_types for t in (*n.input, *n.output) if t in floats}
    outputs = {o.name for o in graph.output}

    def reducers(tensor: str) -> list:
        nodes = []
        for op in ("ReduceMin", "ReduceMax"):
            out = f"{tensor}__{op}"  # all axes, keepdims=0: a scalar
            nodes.append(onnx.helper.make_node(op, [tensor], [out], keepdims=0, name=out))
            graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, []))
        return nodes

    order = [r for t in sorted(wanted) if t in {i.name for i in graph.input} for r in reducers(t)]
    for node in list(graph.node):
        order.append(node)
        order += [r for t in node.output if t in wanted for r in reducers(t)]
    del graph.node[:]
    graph.node.extend(order)
    session = unoptimized_session(model, src, ".calibration.onnx")
    names = [o.name for o in session.get_outputs() if o.name not in outputs]
    low = {n: np.inf for n in names}
    high = {n: -np.inf for n in names}
    for feed in single_items(feeds):
        for name, value in zip(names, session.run(names, feed)):
            table = low if name.endswith("__ReduceMin") else high
            table[name] = min(table[name], float(value)) if table is low else max(table[name], float(value))
    return {t: (low[f"{t}__ReduceMin"], high[f"{t}__ReduceMax"]) for t in wanted}


def _static(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data
    ranges = calibrate_minmax(src, feeds)
    cache = src.parent / ".calibration.json"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
        t: (np.array([lo], np.float32), np.array([hi], np.float32)) for t, (lo, hi) in ranges.items()}), cache)
    try:
        quantize_static(src, dst, None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(STATIC_OP_TYPES), calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=activation_matmuls(src), use_external_data_format=_big(src),
                        calibration_cache_path=cache)
    finally:
        cache.unlink(missing_ok=True)
        _inferred(src).unlink(missing_ok=True)


def _report(conn, fn, *args) -> None:
    """The child's side of :func:`_in_child`: send None, or the error that stopped ``fn``."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - any error goes back to the parent, named
        conn.send(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None
    conn.send(None)


def _in_child(fn, *args) -> str | None:
    """Run ``fn`` in a fresh process: None if it finished, else why not. A child that was killed
    (by the kernel's OOM killer, typically) says ``killed by signal N``; one that failed, its error."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_report, args=(child, fn, *args))
    proc.start()
    child.close()
    try:
        error = parent.recv()
    except EOFError:  # it died before it could say anything
        error = "exited without a word"
    proc.join()
    if proc.exitcode is not None and proc.exitcode < 0:
        return f"killed by signal {-proc.exitcode}"
    return error if proc.exitcode != 0 or error else None


def quantize_int8(component: str, src: Path, dst: Path, calibration: Calibration) -> str:
    _onnx()
    if component == "text_encoder":
        _dynamic(src, dst, ["MatMul", "Gemm"])
        return "dynamic INT8 (MatMul, Gemm)"
    feeds = calibration.feeds[component]
    # In a child process: ONNX Runtime's calibrator needs several copies of the model in memory and
    # an SD 1.5 UNet at 512x512 can exhaust even 24 GB; then fall back to dynamic quantization.
    failure = _in_child(_static, src, dst, feeds)
    if failure is None:
        return (f"static QDQ INT8 (Conv, MatMul and Gemm with constant weights; per-channel weights; "
                f"MinMax over {len(feeds)} captured inputs)")
    if not failure.startswith("killed"):  # an error, not memory: dynamic INT8 would meet it too
        raise QuantizeError(f"{component}: static INT8 quantization of {src} failed: {failure}")
    log.warning("%s: static calibration was %s (out of memory?); using dynamic INT8 instead", component, failure)
    _dynamic(src, dst, ["Conv", "MatMul", "Gemm"])
    return ("dynamic INT8 (Conv, MatMul, Gemm): static calibration ran out of memory on this machine; "
            "dynamic saves memory but little or no time")


def convert_fp16(src: Path, dst: Path, probe: dict[str, np.ndarray]) -> str:
    """FP16 everywhere ONNX Runtime's CPU provider has a kernel; the rest stays FP32."""
    onnx = _onnx()
    # Shape inference on the file, not in memory: protobuf cannot serialise a model over 2 GB.
    inferred = src.parent / ".shapes.onnx"
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    try:
        blocked: list[str] = []
        while (missing := _fp16_attempt(inferred, dst, probe, blocked, _big(src))) is not None:
            if len(blocked) >= 20:
                raise QuantizeError(f"{dst}: too many ops without FP16 CPU kernels ({', '.join(blocked)})")
            blocked.append(missing)
    finally:
        inferred.unlink(missing_ok=True)
    return "FP16" + (f"; kept in FP32 for lack of a CPU FP16 kernel: {', '.join(blocked)}" if blocked else "")


def _fp16_attempt(inferred: Path, dst: Path, probe: dict[str, np.ndarray], blocked: list[str],
                  external: bool) -> str | None:
    """Convert and run once; the op type ONNX Runtime has no FP16 kernel for, or None if it ran."""
    onnx = _onnx()
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    model = convert_float_to_float16(onnx.load(str(inferred)), keep_io_types=True, disable_shape_infer=True,
                                     op_block_list=DEFAULT_OP_BLOCK_LIST + blocked)
    data = dst.parent / (dst.name + "_data")
    data.unlink(missing_ok=True)  # onnx appends to an existing external-data file (an earlier attempt's)
    onnx.save(model, str(dst), save_as_external_data=external, location=data.name)
    try:
        out = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, probe)[0]
    except Exception as exc:  # noqa: BLE001 - ORT's errors are untyped; we parse the op name
        missing = _MISSING_KERNEL.search(str(exc))
        if not missing:
            raise QuantizeError(f"{dst}: FP16 model fails in ONNX Runtime: {exc}") from None
        return missing.group(1)
    if not np.isfinite(out).all():
        raise QuantizeError(f"{dst}: FP16 model gives non-finite outputs (FP16 overflow)")
    return None


def _remove_variant(folder: Path, precision: str) -> None:
    """The variant's model and external-data files (onnx appends to an existing data file)."""
    for f in folder.glob(VARIANT_FILES[precision] + "*"):
        f.unlink()


def _lean_attention(bundle: Bundle, notes: dict[str, dict[str, dict]], mode: str, chunk: int) -> None:
    """Rewrite the FP32 graphs' attention in place; a rewritten graph's ``fp32`` entry is replaced
    (measurements of the old graph no longer hold)."""
    for comp in notes:
        count = lean_attention_file(bundle.components[comp].variants["fp32"], mode, chunk)
        if count:
            notes[comp]["fp32"] = {"method": f"as exported, with {count} full-score attentions computed "
                                             f"{describe(mode, chunk)}"}


def quantize_bundle(root: Path, steps: int = 8, max_feeds: int = 48, min_psnr: float = MIN_PSNR,
                    prompts: int = len(CALIBRATION_PROMPTS), fidelity_steps: int = 8,
                    components: tuple[str, ...] | None = None, precisions: tuple[str, ...] = ("fp16", "int8"),
                    attention: str | None = "mha", attention_chunk: int = CHUNK) -> dict:
    """Write the ``precisions`` variants of ``components`` (None: all the bundle has) and their
    manifest entries; returns the manifest. Entries of other components and variants are left as they were.

    First each component's FP32 graph has its full-score attention rewritten (``attention``: a mode
    of :mod:`edge.attention`, None: left as exported), so every tier, FP32 included, gets it."""
    _onnx()  # missing: stop now with the install hint, not after the calibration runs
    bundle = load_bundle(root)
    components = tuple(bundle.components) if components is None else components
    notes: dict[str, dict[str, dict]] = {comp: {} for comp in components}
    if attention:
        _lean_attention(bundle, notes, attention, attention_chunk)
        bundle = load_bundle(root)
    calibration = capture(bundle, steps, max_feeds, prompts)
    trim_heap()  # the FP32 pipeline is gone: give its memory back before the calibration child starts
    for comp in components:
        src = bundle.components[comp].variants["fp32"]
        probe = calibration.feeds[comp][-1]
        makers = {"fp16": lambda s, d: convert_fp16(s, d, probe),
                  "int8": lambda s, d: quantize_int8(comp, s, d, calibration)}
        for precision in precisions:
            dst = src.parent / VARIANT_FILES[precision]
            _remove_variant(src.parent, precision)  # an earlier attempt's
            log.info("%s: writing %s", comp, dst)
            try:
                notes[comp][precision] = {"method": makers[precision](src, dst)}
                for f in src.parent.glob(VARIANT_FILES[precision] + "*"):
                    shutil.copymode(src, f)  # onnx writes external data 0600: the service user must read it
            except QuantizeError as exc:
                notes[comp][precision] = {"rejected": str(exc)}
                _remove_variant(src.parent, precision)
    bundle = load_bundle(root)  # now with the new files
    check = Fidelity(bundle, fidelity_steps)
    for comp, variants in notes.items():
        for precision, entry in variants.items():
            if "rejected" in entry or precision == "fp32":
                continue
            score = check.score({comp: precision})
            entry.update(score)
            if score["psnr_db"] < min_psnr:
                entry["rejected"] = (f"images at {score['psnr_db']:.1f} dB PSNR against FP32, below the "
                                     f"{min_psnr:g} dB floor: kept at higher precision")
                _remove_variant(bundle.components[comp].folder, precision)

    def record(manifest: dict) -> None:  # replace whole entries: older measurements are of older files
        for comp, variants in notes.items():
            manifest.setdefault("components", {}).setdefault(comp, {}).update(variants)

    return update_manifest(root, record)
