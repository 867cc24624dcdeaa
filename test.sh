#!/usr/bin/env bash
# Runs every check Herald has: formatting, lints, unit and integration tests.
# It installs what the tests need first, so it works on a fresh machine:
#   - Debian's chromium, for the dashboard tests;
#   - a Python venv with `websockets` (the seeds' own clients), `playwright`
#     (drives the system chromium; no browser download) and `schemathesis`
#     (fuzzes every route from /openapi.json);
#   - Debian's PostgreSQL server, for a throwaway cluster the integration
#     suite runs against in a second pass (HERALD_TEST_BACKEND=postgres);
#   - the benchmark peers (bench/setup.sh), which the benchmark smoke test runs.
set -euo pipefail
cd "$(dirname "$0")"

# `apt-get install`, running `apt-get update` the first time only.
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

echo "==> Chromium for the dashboard tests (Debian package)"
if ! command -v chromium >/dev/null 2>&1; then
  apt_install chromium
fi

echo "==> Python clients of the seeds and Playwright (venv in target/test-venv)"
venv=target/test-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check 'websockets>=12' 'playwright>=1.40' \
  'schemathesis>=4,<5'
export HERALD_TEST_PYTHON="$PWD/$venv/bin/python"

echo "==> Benchmark peers (bench/setup.sh: FastAPI + uvicorn in bench/.venv)"
bash bench/setup.sh >/dev/null

echo "==> PostgreSQL for the Postgres pass (throwaway cluster)"
newest_initdb() {
  ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true
}
if [ -z "$(newest_initdb)" ]; then
  apt_install postgresql
fi
pg_bin=$(dirname "$(newest_initdb)")
# initdb refuses to run as root: on CI (root) the cluster belongs to the
# `postgres` user the Debian package creates; otherwise to whoever runs this.
if [ "$(id -u)" = 0 ]; then
  pg_user=postgres
  as_pg() { (cd / && runuser -u "$pg_user" -- "$@"); }
else
  pg_user=$(id -un)
  as_pg() { "$@"; }
fi
# The cluster (data, unix socket, log) lives in target/test-pg, made afresh
# each run. $pg_user must be able to reach it: if some parent of target/ is
# closed to it (a checkout under /root, say), the cluster goes to a temporary
# directory instead, rather than this script loosening the checkout's modes.
pg_root=$PWD/target/test-pg
rm -rf "$pg_root"
mkdir -p "$pg_root/data"
if [ "$(id -u)" = 0 ]; then chown -R "$pg_user" "$pg_root"; fi
pg_tmp=
if ! as_pg test -w "$pg_root/data"; then
  rm -rf "$pg_root"
  pg_tmp=1
  pg_root=$(mktemp -d "${TMPDIR:-/tmp}/herald-test-pg.XXXXXX")
  mkdir "$pg_root/data"
  if [ "$(id -u)" = 0 ]; then chown -R "$pg_user" "$pg_root"; fi
fi
pg_data=$pg_root/data
chmod 700 "$pg_data"
# A port free right now (the kernel's pick).
pg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The bootstrap superuser is `herald` (so tests can CREATE DATABASE); trust
# auth, C locale (no locale packages needed), no fsync anywhere: the cluster
# is thrown away. Every test opens its own pools, hence the many connections.
as_pg "$pg_bin/initdb" -D "$pg_data" -U herald -A trust -E UTF8 --locale=C --no-sync >"$pg_root/initdb.log"
cat >>"$pg_data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$pg_root'
max_connections = 500
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
stop_pg() {
  as_pg "$pg_bin/pg_ctl" -D "$pg_data" -m immediate stop >/dev/null 2>&1 || true
  # A temporary cluster keeps only its log (target/test-pg goes next run).
  if [ -n "$pg_tmp" ]; then rm -rf "$pg_data"; fi
}
# Stop it however the script ends: success, a failing step, Ctrl-C or TERM.
trap stop_pg EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if ! as_pg "$pg_bin/pg_ctl" -D "$pg_data" -l "$pg_root/postgres.log" -w -t 60 start >/dev/null; then
  cat "$pg_root/postgres.log" >&2
  exit 1
fi
echo "    $("$pg_bin/postgres" --version) on 127.0.0.1:$pg_port, log in $pg_root/postgres.log"
export HERALD_TEST_POSTGRES_URL="postgres://herald@127.0.0.1:$pg_port/postgres"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

echo "==> cargo test (SQLite)"
cargo test --quiet

echo "==> cargo test --test api (Postgres: every integration test again)"
# tests/api/postgres.rs always runs on Postgres; it ran in the first pass.
# Here the crash matrix runs with two nodes sharing the run.
HERALD_TEST_BACKEND=postgres cargo test --quiet --test api -- --skip postgres::
