#!/usr/bin/env bash
# Installs the peers `herald bench` measures Herald against, from the
# package registries, into bench/.venv (Python: FastAPI, uvicorn, websockets).
# `herald bench` runs without them and says which ratios it could not measure.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check \
  'fastapi>=0.110' 'uvicorn[standard]>=0.29' 'websockets>=12'
echo "peers installed in $(pwd)/.venv"
