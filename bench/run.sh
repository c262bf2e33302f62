#!/usr/bin/env bash
# Builds the release binaries and runs every benchmark scenario; writes
# bench/results/latest.{md,json}, bench/results/chart.svg and the table in
# bench/README.md. `bash bench/run.sh --quick` is a short version.
# Needs PostgreSQL, Redis and RabbitMQ on 127.0.0.1 (deploy/local/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
# Two builds, so the services are built with exactly their own features (as
# `cargo build --release -p <service>` builds them), not the bench's.
cargo build --release --locked \
  -p usher-identity -p usher-invitation -p usher-notification -p usher-gateway --bins
# usher dev, measured on its embedded backends.
cargo build --release --locked -p usher
cargo build --release --locked -p usher-bench
readme=(--readme bench/README.md)
# A quick or partial run writes its results but leaves the README's full-run
# table alone.
for arg in "$@"; do
  case "$arg" in --quick | --invitations-only | --service-env*) readme=() ;; esac
done
exec "$target/release/usher-bench" --out bench/results "${readme[@]}" "$@"
