#!/usr/bin/env bash
# Set up edge-imagegen in ./.venv on a fresh Debian/Ubuntu machine and generate one image with
# the embedded model. Prints the path of the PNG written. Usage: ./quickstart.sh ["prompt"]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup-env.sh
ensure_python
make_venv .
PROMPT=${1:-"knolling of 2 red gears and a blue battery"}
exec .venv/bin/edge-imagegen generate "$PROMPT" --seed 9 --out outputs
