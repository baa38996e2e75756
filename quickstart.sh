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
  .venv/bin/python -m uv pip install -q --python .venv/bin/python -c constraints.txt -e ".[dev]"
else
  echo "[quickstart] uv unavailable, installing with pip (slower)"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
fi
# Bytecode for what the tools and tests import, written once here: where PYTHONDONTWRITEBYTECODE is set, every
# process would otherwise recompile torch's and timm's modules at start (12 s instead of 5 s here). One import pass
# over our packages compiles just those (about 15 s); `uv pip install --compile-bytecode` compiles every file of the
# environment, a minute on 2 cores, mostly modules no tool imports.
env -u PYTHONDONTWRITEBYTECODE .venv/bin/python - <<'PY'
import importlib, pkgutil
import deit_lt, teachers
for pkg in (deit_lt, teachers):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
        importlib.import_module(m.name)
for name in ('accelerate.commands.launch', 'matplotlib.pyplot', 'wandb', 'wandb.sdk.wandb_init', 'pytest', 'xdist'):
    importlib.import_module(name)
PY
echo "[quickstart] installed in $(( $(date +%s) - start )) s"

if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi
exec .venv/bin/python tools/quickstart.py "$@"
