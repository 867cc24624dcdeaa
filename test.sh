#!/usr/bin/env bash
# Runs every check Herald has: formatting, lints, unit and integration tests.
# It installs what the tests need first, so it works on a fresh machine:
#   - a Python venv with the `websockets` package, for the seeds' own clients.
set -euo pipefail
cd "$(dirname "$0")"

echo "==> Python clients of the seeds (venv in target/test-venv)"
venv=target/test-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check 'websockets>=12'
export HERALD_TEST_PYTHON="$PWD/$venv/bin/python"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

echo "==> cargo test"
cargo test --quiet
