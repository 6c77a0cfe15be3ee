#!/usr/bin/env bash
# Run the provider tests against an onnxruntime build with a non-CPU execution provider:
# onnxruntime-openvino (x86-64 Linux wheels on PyPI, OpenVINOExecutionProvider on the CPU).
# It replaces the `onnxruntime` module, so it gets its own venv (.venv-openvino).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-openvino/bin/python ] || python3 -m venv .venv-openvino
.venv-openvino/bin/pip install -q onnxruntime-openvino pillow pyyaml paho-mqtt pytest onnx
.venv-openvino/bin/pip install -q --no-deps .
.venv-openvino/bin/python -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'
exec .venv-openvino/bin/pytest -q tests/test_variants.py -k "provider" -rs "$@"
