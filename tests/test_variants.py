"""Precision variants of the embedded model through the real pipeline, quantize, profile, providers."""

import json
import logging

import numpy as np
import onnxruntime as ort
import pytest

from edge.bundle import load_bundle
from edge.jobs import parse_job
from edge.profile import Fidelity, profile_bundle, psnr
from edge.memory import TIERS, load_manifest, tier_plan
from edge.pipeline import Pipeline
from edge.providers import (FP16_NATIVE, RuntimeOptions, make_session, optimization_level, resolve_providers,
                            session_options)
from edge.quantize import MIN_PSNR

ONE = RuntimeOptions(threads=1)
JOB = parse_job({"prompt": "knolling of 2 red gears and a blue battery", "steps": 6, "seed": 5})
FLOOR = {"fp32": None, "fp16": 40.0, "int8": MIN_PSNR, "int8-lowmem": MIN_PSNR}


def image(pipe, job=JOB):
    return np.asarray(pipe.generate(job).images[0].image)


@pytest.fixture(scope="module")
def bundle():
    return load_bundle()


@pytest.fixture(scope="module")
def reference(bundle):
    return image(Pipeline(bundle, ONE, tier_plan(bundle, {}, "fp32")))


def test_embedded_model_ships_every_variant(bundle):
    for comp in bundle.components.values():
        assert set(comp.variants) == {"fp32", "fp16", "int8"}, comp.name
    manifest = load_manifest(bundle)
    for comp in bundle.components:
        for precision in ("fp32", "fp16", "int8"):
            assert manifest["components"][comp][precision]["peak_rss_bytes"] > 0


@pytest.mark.parametrize("tier", list(TIERS))
def test_every_tier_runs_and_stays_faithful(bundle, reference, tier):
    plan = tier_plan(bundle, load_manifest(bundle), tier)
    pipe = Pipeline(bundle, ONE, plan)
    got = image(pipe)
    assert pipe.precision == tier and got.std() > 1
    if FLOOR[tier] is None:
        assert np.array_equal(got, reference)
    else:
        assert psnr(got, reference) >= FLOOR[tier], f"{tier}: {psnr(got, reference):.1f} dB"


@pytest.mark.slow
def test_lowmem_holds_no_session_between_stages_and_matches_int8(bundle):
    lowmem = Pipeline(bundle, ONE, tier_plan(bundle, {}, "int8-lowmem"))
    assert all(m._session is None for m in (lowmem.text_encoder, lowmem.unet, lowmem.vae_decoder))
    assert not lowmem.runtime.cfg_batch and not lowmem.runtime.memory_arena
    loaded = []
    lowmem.generate(JOB, on_step=lambda s: loaded.append(
        (lowmem.text_encoder._session is None, lowmem.unet._session is not None)))
    assert all(te_freed and unet_held for te_freed, unet_held in loaded)  # text encoder freed before denoising
    assert lowmem.unet._session is None
    resident = Pipeline(bundle, RuntimeOptions(threads=1, cfg_batch=False), tier_plan(bundle, {}, "int8"))
    diff = np.abs(image(lowmem).astype(int) - image(resident).astype(int))
    assert diff.max() <= 1


def test_missing_provider_falls_back_to_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_providers(("xnnpack", "dnnl", "cpu"), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "XnnpackExecutionProvider is not in this onnxruntime build" in caplog.text
    assert "DnnlExecutionProvider is not in this onnxruntime build" in caplog.text
    assert resolve_providers(("xnnpack",), ["XnnpackExecutionProvider", "CPUExecutionProvider"]) == [
        "XnnpackExecutionProvider", "CPUExecutionProvider"]


def test_configured_missing_provider_still_generates(bundle, reference, caplog):
    runtime = RuntimeOptions(threads=1, providers=("xnnpack", "cpu"), component_providers={"unet": ("dnnl",)})
    with caplog.at_level(logging.WARNING):
        pipe = Pipeline(bundle, runtime, tier_plan(bundle, {}, "fp32"))
    assert pipe.provider == "CPUExecutionProvider" and "DnnlExecutionProvider" in caplog.text
    assert np.array_equal(image(pipe), reference)


def test_optimized_model_cache_is_written_then_used(bundle, tmp_path, caplog):
    runtime = RuntimeOptions(threads=1, optimized_cache=str(tmp_path / "cache"))
    path = bundle.components["unet"].path
    make_session(path, runtime, "unet")
    cached = list((tmp_path / "cache").glob("unet-*.onnx"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    make_session(path, runtime, "unet")
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    cached[0].write_bytes(b"cut short by a power cut")
    with caplog.at_level(logging.WARNING):
        make_session(path, runtime, "unet")
    assert "rebuilding it" in caplog.text and cached[0].stat().st_size > 1000


@pytest.mark.slow
def test_quantize_writes_variants_and_rejects_below_floor(bundle_copy):
    pytest.importorskip("onnx")
    from edge.quantize import quantize_bundle
    for f in bundle_copy.glob("*/model.*.onnx"):
        f.unlink()
    (bundle_copy / "variants.json").unlink()
    for f in bundle_copy.glob("*/model.onnx"):
        f.chmod(0o640)  # the variants must take the source's mode, whatever onnx would write
    manifest = quantize_bundle(bundle_copy, steps=3, max_feeds=8)
    for comp in ("text_encoder", "unet", "vae_decoder"):
        for precision in ("fp16", "int8"):
            entry = manifest["components"][comp][precision]
            assert "method" in entry and "psnr_db" in entry
            assert (bundle_copy / comp / f"model.{precision}.onnx").is_file() == ("rejected" not in entry)
    assert manifest["components"]["unet"]["int8"]["method"].startswith("static QDQ INT8")
    assert {f.stat().st_mode & 0o777 for f in bundle_copy.glob("*/model.*.onnx*")} == {0o640}
    assert manifest["components"]["text_encoder"]["int8"]["method"].startswith("dynamic INT8")
    strict = quantize_bundle(bundle_copy, steps=3, max_feeds=8, min_psnr=200,
                             components=("unet", "vae_decoder"), precisions=("int8",))  # --only, --precision
    for comp in ("unet", "vae_decoder"):
        assert "below the 200 dB floor" in strict["components"][comp]["int8"]["rejected"]
        assert not (bundle_copy / comp / "model.int8.onnx").exists()
    untouched = [("text_encoder", "int8"), ("text_encoder", "fp16"), ("unet", "fp16"), ("vae_decoder", "fp16")]
    for comp, precision in untouched:
        assert strict["components"][comp][precision] == manifest["components"][comp][precision]
        assert (bundle_copy / comp / f"model.{precision}.onnx").is_file() == ("rejected" not in strict["components"][comp][precision])


@pytest.mark.slow
def test_lean_calibration_gives_onnxruntimes_minmax_ranges(bundle, tmp_path):
    """edge.quantize calibrates without onnxruntime's model copies; the ranges must be its ranges."""
    pytest.importorskip("onnx")
    from onnxruntime.quantization import create_calibrator

    from edge.profile import single_items
    from edge.quantize import STATIC_OP_TYPES, calibrate_minmax, capture
    feeds = capture(bundle, steps=2, max_feeds=3, prompts=1).feeds["unet"]
    src = bundle.components["unet"].variants["fp32"]
    ours = calibrate_minmax(src, feeds)
    calibrator = create_calibrator(src, list(STATIC_OP_TYPES), augmented_model_path=str(tmp_path / "aug.onnx"))
    items = iter(single_items(feeds))
    reader = type("Reader", (), {"get_next": lambda self: next(items, None), "rewind": lambda self: None})()
    calibrator.collect_data(reader)
    theirs = calibrator.compute_data()
    assert set(ours) == set(theirs.data) and len(ours) > 50
    for name, (low, high) in ours.items():
        ref_low, ref_high = (float(np.asarray(v).ravel()[0]) for v in theirs[name].range_value)
        assert low == pytest.approx(ref_low, rel=1e-6, abs=1e-6) and high == pytest.approx(ref_high, rel=1e-6, abs=1e-6), name


@pytest.mark.slow
def test_profile_records_measurements(bundle_copy):
    manifest = profile_bundle(load_bundle(bundle_copy), ONE, calls=1)
    unet = manifest["components"]["unet"]
    for precision in ("fp32", "fp16", "int8"):
        assert unet[precision]["bytes"] > 0 and 0 < unet[precision]["peak_rss_bytes"] < 2**31
        assert unet[precision]["call_seconds"] > 0 and unet[precision]["load_seconds"] > 0
    assert unet["int8"]["bytes"] < unet["fp32"]["bytes"]
    lowmem = {c: [p for p, e in v.items() if "lowmem_peak_rss_bytes" in e] for c, v in manifest["components"].items()}
    assert lowmem == {"text_encoder": ["int8"], "unet": ["int8"], "vae_decoder": ["int8"], "vae_encoder": ["int8"]}
    assert 0 < unet["int8"]["lowmem_peak_rss_bytes"] < unet["int8"]["peak_rss_bytes"]  # batch 1, no arena
    assert json.loads((bundle_copy / "variants.json").read_text())["profiled_on"]["onnxruntime"]


@pytest.mark.slow
def test_fidelity_is_perfect_for_fp32(bundle):
    assert Fidelity(bundle, steps=2).score({}) == {"psnr_db": None, "max_abs_diff": 0}


@pytest.mark.skipif("OpenVINOExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs the onnxruntime-openvino build: tools/check_provider_build.sh runs this")
def test_non_cpu_provider_runs_the_pipeline(bundle, reference):
    """The provider path for real: an installable x86-64 build whose first provider is not the CPU one."""
    runtime = RuntimeOptions(threads=1, providers=("openvino", "cpu"), provider_options={"openvino": {"device_type": "CPU"}})
    pipe = Pipeline(bundle, runtime, tier_plan(bundle, {}, "fp32"))
    assert pipe.provider == "OpenVINOExecutionProvider"
    assert psnr(image(pipe), reference) > 35


def test_prepack_off_reaches_onnxruntime_and_runs(bundle, reference):
    lean = RuntimeOptions(threads=1, prepack=False)
    assert session_options(lean, ["CPUExecutionProvider"]).get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # the default: not set at all
        session_options(ONE, ["CPUExecutionProvider"]).get_session_config_entry("session.disable_prepacking")
    got = image(Pipeline(bundle, lean, tier_plan(bundle, {}, "fp32")))
    assert np.abs(got.astype(int) - reference.astype(int)).max() <= 2  # other kernels, other rounding only


def test_auto_optimizes_fp16_variants_for_native_fp16_kernels(bundle, monkeypatch):
    """auto: "all" (the NHWC FP16 convolution's layout pass) for FP16 files where the build has FP16
    kernels (aarch64), "extended" otherwise; a level the user names is used as named."""
    unet = bundle.components["unet"].variants
    auto = RuntimeOptions(threads=1)
    assert auto.graph_optimization == "auto"
    assert optimization_level(auto, unet["fp16"]) == ("all" if FP16_NATIVE else "extended")
    monkeypatch.setattr("edge.providers.FP16_NATIVE", True)
    assert [optimization_level(auto, unet[p]) for p in ("fp32", "fp16", "int8")] == ["extended", "all", "extended"]
    assert optimization_level(RuntimeOptions(graph_optimization="basic"), unet["fp16"]) == "basic"
    assert session_options(auto, ["CPUExecutionProvider"]).graph_optimization_level == \
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def test_the_fp16_tier_at_level_all_stays_faithful(bundle, reference):
    """What auto runs on aarch64, run here too: level "all" on the FP16 variants keeps the FP16 floor."""
    pipe = Pipeline(bundle, RuntimeOptions(threads=1, graph_optimization="all"), tier_plan(bundle, {}, "fp16"))
    assert psnr(image(pipe), reference) > FLOOR["fp16"]


@pytest.mark.slow
def test_a_released_model_gives_its_weights_back(tmp_path):
    """The lowmem tier's promise, measured: a 64 MB model held only inside ``loaded()``."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from edge.pipeline import OnnxModel
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "big.onnx"))

    def rss_mb() -> int:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) // 1024

    base = rss_mb()
    model = OnnxModel("unet", tmp_path / "big.onnx", RuntimeOptions(threads=1, memory_arena=False), resident=False)
    assert rss_mb() - base < 32  # read its inputs, kept nothing of it
    with model.loaded():
        assert model(x=np.ones((1, 4096), np.float32)).shape == (1, 4096)
        assert rss_mb() - base >= 64
    assert rss_mb() - base < 32


def test_a_quantize_child_reports_how_it_ended():
    import os
    from edge.quantize import _in_child
    assert _in_child(int, "5") is None
    assert _in_child(int, "five") == "ValueError: invalid literal for int() with base 10: 'five'"
    assert _in_child(os.abort) == "killed by signal 6"  # what the OOM killer's SIGKILL looks like too


def test_static_int8_that_fails_for_a_reason_other_than_memory_says_why_and_leaves_nothing(bundle_copy, caplog):
    pytest.importorskip("onnx")
    from edge.quantize import Calibration, QuantizeError, quantize_int8
    src = bundle_copy / "unet" / "model.onnx"
    src.write_bytes(src.read_bytes()[:5000])  # cut short: no dynamic fallback can read it either
    before = sorted(p.name for p in src.parent.iterdir())
    feeds = {"unet": [{"sample": np.zeros((1, 4, 16, 16), np.float32)}]}
    with pytest.raises(QuantizeError, match=r"^unet: static INT8 quantization of .*model\.onnx failed: \w+"):
        quantize_int8("unet", src, src.with_name("model.int8.onnx"), Calibration(feeds))
    assert "dynamic INT8 instead" not in caplog.text
    assert sorted(p.name for p in src.parent.iterdir()) == before
