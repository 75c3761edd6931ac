#!/usr/bin/env bash
# Create .venv and install moe-trace with its dev tools and the `cluster` extra (Dask, for --cluster and its
# tests); run with --help for the options.
# On a machine without an NVIDIA GPU, torch comes as a CPU-only build (a wheel already on this machine's
# disk if pip's find-links has one, else PyTorch's CPU index) so set-up never pulls a multi-GB CUDA build.
# A machine with a GPU, or a venv that already has torch, keeps its normal torch.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/setup.sh [--no-browser]

Creates .venv and installs moe-trace with its dev tools and the Dask cluster extra (pip shows its progress).
When run as root with apt-get and chromium is missing, also installs the system packages chromium and
chromium-driver for the report's browser test; it says so before it starts.

  --no-browser  do not install chromium (tests/test_report_browser.py then skips, saying why)
  -h, --help    show this help
EOF
}

browser=1
for arg in "$@"; do
  case "$arg" in
    --no-browser) browser=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown option $arg" >&2; usage >&2; exit 2 ;;
  esac
done

step() { echo "==> $*"; }

cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
  step "using the existing .venv"
else
  step "creating .venv with ${PYTHON:-python3}"
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if python -c "import torch" >/dev/null 2>&1; then
  step "keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  step "installing torch (NVIDIA GPU found: the default CUDA build, a large download)"
  pip install "torch>=2.4"
else
  step "installing a CPU-only torch (no NVIDIA GPU): a local wheel if pip's find-links has one, else PyTorch's CPU index"
  pip install --no-index --no-deps "torch>=2.4" 2>/dev/null \
    || pip install --no-deps "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
  step "installing torch's own dependencies (keeping the CPU build)"
  pip install "torch==$(python -c 'from importlib.metadata import version; print(version("torch"))')"
fi
step "installing moe-trace, its dev tools and the Dask cluster extra (pip install -e '.[dev,cluster]')"
pip install -e ".[dev,cluster]"

# The HTML report's browser test (tests/test_report_browser.py) drives Debian's chromium and chromium-driver.
# Never fail set-up over them: the test skips, with the reason, when they are missing.
if { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  step "chromium and chromedriver already installed (for the report's browser test)"
elif [ "$browser" = 0 ]; then
  step "skipping chromium (--no-browser): the report's browser test will be skipped"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  step "installing system packages chromium and chromium-driver with apt-get, for the report's browser test" \
       "(up to a few minutes; scripts/setup.sh --no-browser skips this)"
  export DEBIAN_FRONTEND=noninteractive
  { timeout 900 apt-get install -y -q chromium chromium-driver \
    || { step "apt-get update, then installing chromium again" \
         && timeout 300 apt-get update -q && timeout 900 apt-get install -y -q chromium chromium-driver; }; } \
    || echo "note: chromium not installed; the report's browser test will be skipped" >&2
else
  step "not installing chromium (needs root and apt-get): the report's browser test will be skipped"
fi
echo "moe-trace installed in .venv (torch $(python -c 'import torch; print(torch.__version__)'))"
