#!/usr/bin/env bash
# Create .venv and install moe-trace with its dev tools.
# On a machine without an NVIDIA GPU, torch comes as a CPU-only build (a wheel already on this machine's
# disk if pip's find-links has one, else PyTorch's CPU index) so set-up never pulls a multi-GB CUDA build.
# A machine with a GPU, or a venv that already has torch, keeps its normal torch.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "torch>=2.4"
  else
    pip install -q --no-index --no-deps "torch>=2.4" 2>/dev/null \
      || pip install -q --no-deps "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
    # torch's own dependencies, keeping the CPU build just installed
    pip install -q "torch==$(python -c 'from importlib.metadata import version; print(version("torch"))')"
  fi
fi
pip install -q -e ".[dev]"
echo "moe-trace installed in .venv (torch $(python -c 'import torch; print(torch.__version__)'))"
