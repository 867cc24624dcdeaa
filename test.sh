#!/usr/bin/env bash
# Runs every check Herald has: formatting, lints, unit and integration tests.
# It installs what the tests need first, so it works on a fresh machine:
#   - Debian's chromium, for the dashboard tests;
#   - a Python venv with `websockets` (the seeds' own clients) and `playwright`
#     (drives the system chromium; no browser download).
set -euo pipefail
cd "$(dirname "$0")"

echo "==> Chromium for the dashboard tests (Debian package)"
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "==> Python clients of the seeds and Playwright (venv in target/test-venv)"
venv=target/test-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check 'websockets>=12' 'playwright>=1.40'
export HERALD_TEST_PYTHON="$PWD/$venv/bin/python"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

echo "==> cargo test"
cargo test --quiet
