#!/usr/bin/env bash
# The one test command: starts what the tests need (installing it where
# missing), then runs every test of the workspace against the real
# PostgreSQL, Redis and RabbitMQ. Usage: deploy/local/test.sh [cargo test args]
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/services.sh
# The browser test drives headless Chromium through chromedriver.
if ! command -v chromedriver >/dev/null 2>&1; then
  echo "test: installing chromium and chromium-driver" >&2
  as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# The Python reference consumer's test (examples/python-consumer) makes a
# virtual environment and installs its pinned packages from PyPI with pip.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "test: installing python3-venv" >&2
  as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3 python3-venv >/dev/null
fi
# Integration tests start the real binaries: build them first.
cargo build --workspace --bins

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "\nworkspace: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
