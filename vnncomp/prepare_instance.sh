#!/usr/bin/env bash
# VNN-COMP: prepare_instance.sh v1 <category> <onnx> <vnnlib> — loads and parses the instance once (fail early).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="prepare_instance.sh v1 <category> <onnx> <vnnlib>"
check_version "${1:-}" "$USAGE"
if [ "$#" -ne 4 ]; then echo "prepare_instance.sh: usage: $USAGE" >&2; exit 1; fi
exec "$PYTHON" -m experiments.vnncomp prepare "$2" "$3" "$4"
