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
# The HTML report's browser test (tests/test_report_browser.py) drives Debian's chromium and chromium-driver. Install
# them quietly when running as root with apt-get; never fail set-up over it (the test skips without chromium).
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  { timeout 900 apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || { timeout 300 apt-get update -qq >/dev/null 2>&1 \
         && timeout 900 apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; } \
    || echo "note: chromium not installed; the report's browser test will be skipped" >&2
fi
echo "moe-trace installed in .venv (torch $(python -c 'import torch; print(torch.__version__)'))"
