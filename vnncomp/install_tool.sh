#!/usr/bin/env bash
# VNN-COMP: install_tool.sh v1 — creates <repo>/.venv and installs polytope_lab as the README does.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_version "${1:-}" "install_tool.sh v1"
if [ "$#" -ne 1 ]; then echo "install_tool.sh: usage: install_tool.sh v1" >&2; exit 1; fi
cd "$ROOT"
python3 -m venv .venv
.venv/bin/pip install torch==2.13.0
.venv/bin/pip install -e .
.venv/bin/python -c "import polytope_lab, onnxruntime; print('polytope_lab installed')"
