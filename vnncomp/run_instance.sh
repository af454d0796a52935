#!/usr/bin/env bash
# VNN-COMP: run_instance.sh v1 <category> <onnx> <vnnlib> <results_file> <timeout> — writes the results file.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="run_instance.sh v1 <category> <onnx> <vnnlib> <results_file> <timeout>"
check_version "${1:-}" "$USAGE"
if [ "$#" -ne 6 ]; then echo "run_instance.sh: usage: $USAGE" >&2; exit 1; fi
exec "$PYTHON" -m experiments.vnncomp run "$2" "$3" "$4" "$5" "$6"
