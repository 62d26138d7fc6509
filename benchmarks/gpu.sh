#!/usr/bin/env bash
# The prepared run for a lent GPU machine: about 8 minutes, one JSON (benchmarks/gpu.py says what it measures).
#   bash benchmarks/gpu.sh --out gpu.json          # on the GPU machine, with the package installed
#   bash benchmarks/gpu.sh --dry-run --out dry.json  # toy sizes on the CPU (the test suite runs this)
set -euo pipefail
exec python "$(dirname "$0")/gpu.py" "$@"
