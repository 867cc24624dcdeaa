#!/usr/bin/env bash
# Installs the peers `herald bench` measures Herald against, from the
# package registries: FastAPI, uvicorn and websockets in bench/.venv (PyPI),
# graphile-worker and pg in bench/peers/node_modules (npm).
# `herald bench` runs without them and says which ratios it could not measure.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check \
  'fastapi>=0.110' 'uvicorn[standard]>=0.29' 'websockets>=12'
if command -v npm >/dev/null 2>&1; then
  (cd peers && npm install --no-audit --no-fund --loglevel=error >/dev/null)
else
  echo "npm not found: the graphile-worker peer is not installed" >&2
fi
echo "peers installed in $(pwd)/.venv and $(pwd)/peers/node_modules"
