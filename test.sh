#!/usr/bin/env bash
# Set up edge-imagegen with its test extras in ./.venv (installing Mosquitto for the broker tests and
# Chromium for the page's browser tests when missing) and run the whole test suite. Extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup-env.sh
ensure_python
ensure_mosquitto
ensure_chromium
make_venv '.[test]'
# The installed package is what gets tested (not the source tree), so packaging mistakes fail here.
exec .venv/bin/pytest "$@"
