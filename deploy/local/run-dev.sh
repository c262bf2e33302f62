#!/usr/bin/env bash
# Runs Usher on this machine: starts the local PostgreSQL, Redis and RabbitMQ
# (installing them where missing), then every service and the gateway in one
# process with `usher dev`. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/services.sh
exec cargo run --release -p usher -- dev "$@"
