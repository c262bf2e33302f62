#!/usr/bin/env bash
# Installs (where missing) and starts PostgreSQL, Redis and RabbitMQ on
# 127.0.0.1 with the credentials Usher's defaults expect:
#   PostgreSQL 5432, user postgres, trust auth on loopback
#   Redis 6379, no persistence
#   RabbitMQ 5672, guest/guest
# Idempotent: services already running are left alone. Debian/Ubuntu (apt).
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

export DEBIAN_FRONTEND=noninteractive
missing=()
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# PostgreSQL
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$version" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    as_root pg_createcluster "$version" main >/dev/null
  fi
  log "starting postgresql $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 60); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.5; done
  pg_isready -h 127.0.0.1 -p 5432 -q || { log "postgresql did not start"; exit 1; }
fi
# Trust on loopback for the postgres user (what a fresh cluster needs for the defaults).
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  log "allowing trust auth on loopback in $hba"
  as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  sleep 1
fi
psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null

# Redis
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting redis"
  mkdir -p /tmp/usher-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
    --dir /tmp/usher-redis --logfile /tmp/usher-redis/redis.log
  for _ in $(seq 1 40); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.25; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null

# RabbitMQ
if ! as_root rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  log "starting rabbitmq"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do as_root rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
as_root rabbitmqctl await_startup --timeout 60 >/dev/null
log "postgresql, redis and rabbitmq are up"
