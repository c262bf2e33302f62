#!/usr/bin/env bash
# Runs `usher dev` on this machine's real PostgreSQL, Redis and RabbitMQ
# (started, and installed with apt where missing, by services.sh) instead of
# its embedded backends. `cargo run --release -p usher -- dev` alone needs
# none of them. Extra arguments go to `usher dev`; Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/services.sh
exec cargo run --release -p usher -- dev \
  --database-url "${USHER_DEV_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/usher}" \
  --redis-url "${USHER_DEV_REDIS_URL:-redis://127.0.0.1:6379}" \
  --amqp-url "${USHER_DEV_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}" \
  "$@"
