# Sourced by the VNN-COMP wrapper scripts: the repository root, the Python to use, the version check.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the interpreter: $POLYTOPE_LAB_PYTHON, else the venv install_tool.sh made, else python3
if [ -n "${POLYTOPE_LAB_PYTHON:-}" ]; then PYTHON="$POLYTOPE_LAB_PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"
else PYTHON=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

check_version() {   # check_version <given> <usage>
    if [ "$1" != "v1" ]; then
        echo "$(basename "$0"): expected version word 'v1', got '$1'; usage: $2" >&2
        exit 1
    fi
}
