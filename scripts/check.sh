#!/usr/bin/env bash
# Lint, type-check and run the test suite inside .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
mypy
pytest -q "$@"
