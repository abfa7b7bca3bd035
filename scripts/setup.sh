#!/usr/bin/env bash
# Set up a development environment in .venv: torch (CPU wheel where there is no GPU), negguide with its
# test and docs extras, and the example third-party plugin. Run from anywhere: `bash scripts/setup.sh`.
set -euo pipefail

cd "$(dirname "$0")/.."
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"

run() {
    echo "+ $*"
    "$@"
}

echo "== negguide setup in $(pwd)/.venv"
run "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip)

# torch first, so that resolving negguide's dependencies never pulls a multi-GB CUDA build on a CPU machine.
# 1. a local torch wheel on pip's find-links (PIP_FIND_LINKS or pip.conf); its own dependencies
#    (filelock, sympy, ...) come from the index in the next step;
# 2. no GPU: the CPU wheel from PyTorch's CPU index;
# 3. a GPU: the default wheel from PyPI.
echo "== torch ${TORCH_VERSION}"
if "${PIP[@]}" install --no-index --no-deps "torch==${TORCH_VERSION}" >/dev/null 2>&1; then
    echo "+ ${PIP[*]} install --no-index --no-deps torch==${TORCH_VERSION}   (local wheel)"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
    run "${PIP[@]}" install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
else
    run "${PIP[@]}" install "torch==${TORCH_VERSION}"
fi

echo "== negguide (editable) with the test and docs extras"
run "${PIP[@]}" install -e ".[test,docs]"

echo "== the example third-party plugin (examples/negguide-example)"
run "${PIP[@]}" install -e examples/negguide-example

run .venv/bin/python -c "import torch, negguide; print('negguide', negguide.__version__, '| torch', torch.__version__)"
echo "== done. Try: .venv/bin/negguide demo"
