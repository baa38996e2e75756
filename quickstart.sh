#!/usr/bin/env bash
# Install deit-lt into ./.venv and run the whole DeiT-LT pipeline on the bundled digits data (CPU, no download).
#
#   bash quickstart.sh                 # install + demo (teacher, DeiT-LT student, ViT + cRT/tau-norm, table)
#   bash quickstart.sh --install-only  # just the install (what CI does before the tests)
#
# The install uses uv when it can get it (a re-install from its cache takes seconds instead of minutes: torch
# brings several GB of CUDA libraries), plain pip otherwise. Versions come from constraints.txt.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
start=$(date +%s)

[ -x .venv/bin/python ] || "$PY" -m venv .venv
if .venv/bin/python -m pip install -q --disable-pip-version-check uv >/dev/null 2>&1; then
  # compile bytecode at install time: imports of torch/timm are seconds faster in every later process (and
  # environments with PYTHONDONTWRITEBYTECODE never cache it themselves)
  .venv/bin/python -m uv pip install -q --compile-bytecode --python .venv/bin/python -c constraints.txt -e ".[dev]"
else
  echo "[quickstart] uv unavailable, installing with pip (slower)"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
fi
echo "[quickstart] installed in $(( $(date +%s) - start )) s"

if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi
exec .venv/bin/python tools/quickstart.py "$@"
