#!/usr/bin/env bash
# The identity and invitation suites with every core saturated: two busy
# loops per core run beside them for the whole run (bounded to 30 minutes).
# A test that fails here but not on an idle machine is a bug at its cause (a
# deadline shorter than the scheduling delays of a busy host, a test helper
# that stalls the shared Redis), never something to retry.
# Usage: deploy/local/test-under-load.sh [cargo test args]
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/services.sh
packages=(-p usher-identity -p usher-invitation)
cargo test "${packages[@]}" --no-run

hogs=()
stop_hogs() { kill "${hogs[@]}" 2>/dev/null || true; }
trap stop_hogs EXIT
for _ in $(seq $(($(nproc) * 2))); do
  timeout 1800 sh -c 'while :; do :; done' &
  hogs+=("$!")
done
echo "test-under-load: ${#hogs[@]} busy loops on $(nproc) cores" >&2
cargo test "${packages[@]}" "$@"
