#!/usr/bin/env bash
# Checks the deployment files (CI runs it; about 20 s):
#   1. the Helm chart lints strictly, with the default values and with
#      helm/examples/values-production.yaml;
#   2. both render, and every rendered manifest validates against the
#      Kubernetes schemas of each of KUBE_VERSIONS, strictly (unknown fields
#      fail; the ServiceMonitor CRD has no schema there and is only warned of);
#   3. bad values are refused by values.schema.json (a negative replica
#      count, a wrong type, an unknown environment, an unknown key, a bad
#      anti-affinity or trace setting) — the script fails if one is NOT
#      refused; the production example renders pod anti-affinity on every
#      Deployment, the trace exporter's setting and its egress;
#   4. deploy/docker-compose.yml parses, and every USHER_* setting the compose
#      file and the rendered chart give a binary is a key of its config;
#   5. where the binaries are built (USHER_BIN_DIR, else target/debug or
#      $CARGO_TARGET_DIR/debug when newer than the sources), each binary loads and validates the compose
#      settings and the production example's settings (`check-config`).
#
# Helm: $HELM if set, else `helm` on PATH, else the helm stand-in
# ../shared/tools/helm next to the repository (TOOLING.md), else
# deploy/helm-sdk.py (Helm's Go SDK from PyPI). Installs helm-python-sdk (for
# the last two) and kubernetes-validate with pip when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# The chart's kubeVersion floor (gRPC probes are GA in 1.27) up to a recent one.
KUBE_VERSIONS=${KUBE_VERSIONS:-1.27 1.30 1.33}
CHART=helm/usher
PROD_VALUES=helm/examples/values-production.yaml

log() { printf 'check-chart: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
PATH="$PATH:$scripts_dir"
pip_install() { python3 -m pip install -q --disable-pip-version-check "$@" >&2; }

if [ -z "${HELM:-}" ]; then
  if command -v helm >/dev/null 2>&1; then
    HELM=$(command -v helm)
  elif [ -x "$ROOT/../shared/tools/helm" ]; then
    HELM="$ROOT/../shared/tools/helm"
  else
    # Helm's Go SDK from PyPI, driven by our own small wrapper.
    HELM="$ROOT/deploy/helm-sdk.py"
  fi
fi
if head -c 64 "$HELM" | grep -q python; then
  python3 -c 'import helm_python' 2>/dev/null || pip_install helm-python-sdk==0.2.2
fi
command -v kubernetes-validate >/dev/null 2>&1 || pip_install kubernetes-validate==1.37.0
log "helm: $HELM ($("$HELM" version 2>/dev/null | head -n 1))"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1-2. Lint, render and validate both sets of values.
for set in default production; do
  args=()
  [ "$set" = production ] && args=(-f "$PROD_VALUES")
  log "lint --strict ($set values)"
  "$HELM" lint "$CHART" --strict "${args[@]}" >"$work/lint-$set.txt" 2>&1 \
    || { cat "$work/lint-$set.txt" >&2; fail "helm lint ($set values)"; }
  log "template ($set values)"
  "$HELM" template usher "$CHART" -n usher "${args[@]}" >"$work/$set.yaml" 2>"$work/template-$set.err" \
    || { cat "$work/template-$set.err" >&2; fail "helm template ($set values)"; }
  for version in $KUBE_VERSIONS; do
    log "validate against Kubernetes $version, strict ($set values)"
    kubernetes-validate --strict --quiet -k "$version" "$work/$set.yaml" \
      || fail "rendered manifests ($set values) do not validate against Kubernetes $version"
  done
done

# What the chart must contain, whatever the values.
for kind in Deployment Service ConfigMap PodDisruptionBudget NetworkPolicy Job; do
  grep -q "^kind: $kind\$" "$work/production.yaml" || fail "no $kind rendered"
done
for kind in HorizontalPodAutoscaler Ingress ServiceMonitor; do
  grep -q "^kind: $kind\$" "$work/production.yaml" || fail "production example renders no $kind"
done

# 3. The schema refuses bad values (and says it was the schema).
refused() {
  local what=$1; shift
  if "$HELM" template usher "$CHART" "$@" >"$work/bad.yaml" 2>"$work/bad.err"; then
    fail "schema accepted $what"
  fi
  grep -qi "schema" "$work/bad.err" || { cat "$work/bad.err" >&2; fail "$what failed, but not by the schema"; }
  log "refused as it should be: $what"
}
refused "a negative replica count" --set gateway.replicaCount=-1
refused "a replica count that is not a number" --set identity.replicaCount=two
refused "an unknown environment" --set environment=staging
refused "an unknown top-level value" --set replicas=3
refused "plain SMTP in production" --set smtp.tls=none
refused "an unknown anti-affinity" --set podAntiAffinity=always
refused "a sample ratio above 1" --set tracing.sampleRatio=2
refused "an OTLP endpoint that is not a URL" --set tracing.otlpEndpoint=collector
refused "a negative number of Redis replicas to wait for" --set redisWaitReplicas=-1
refused "a Redis wait of no time" --set redisWaitTimeoutMs=0

# Running at scale: the production example spreads every service's
# replicas over nodes and exports traces, with the egress to the collector.
[ "$(grep -c 'podAntiAffinity:' "$work/production.yaml")" -eq 4 ] \
  || fail "production example: not every Deployment has pod anti-affinity"
grep -q 'USHER_TELEMETRY__OTLP_ENDPOINT' "$work/production.yaml" \
  || fail "production example exports no traces"
grep -q '# otlp' "$work/production.yaml" \
  || fail "production example: no egress to the trace collector"
# … and waits for a Redis replica, reaches the sentinels, and gives the
# services the sentinels' password when the Secret has one.
grep -q 'USHER_REDIS__WAIT_REPLICAS: "1"' "$work/production.yaml" \
  || fail "production example: redisWaitReplicas is not passed on"
grep -q -- '- port: 26379' "$work/production.yaml" \
  || fail "production example: no egress to the Redis sentinels"
[ "$(grep -c 'key: redis-sentinel-password' "$work/production.yaml")" -ge 3 ] \
  || fail "the sentinels' password is not offered to gateway, identity and invitation"

# 4. Compose parses; every setting names a real key.
python3 -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' deploy/docker-compose.yml \
  || fail "deploy/docker-compose.yml does not parse"
check_args=(--manifests "$work/default.yaml" --manifests "$work/production.yaml")

# 5. The binaries' own validation, where they are built.
bin_dir=${USHER_BIN_DIR:-}
if [ -z "$bin_dir" ]; then
  for dir in "${CARGO_TARGET_DIR:-target}/debug" target/debug; do
    if [ -x "$dir/usher-gateway" ] && [ -x "$dir/usher-identity" ] \
      && [ -x "$dir/usher-invitation" ] && [ -x "$dir/usher-notification" ]; then
      bin_dir=$dir
      break
    fi
  done
fi
if [ -n "$bin_dir" ] && [ -z "${USHER_BIN_DIR:-}" ] \
  && [ -n "$(find services gateway -name '*.rs' -newer "$bin_dir/usher-gateway" -print -quit)" ]; then
  log "binaries in $bin_dir are older than the sources: skipping check-config"
  bin_dir=
  stale=1
fi
if [ -n "$bin_dir" ]; then
  # Absolute: check-config runs each binary from `/`.
  bin_dir=$(cd "$bin_dir" && pwd)
  log "check-config with the binaries in $bin_dir"
  check_args+=(--run-check-config "$bin_dir" --check-config-manifests "$work/production.yaml")
elif [ -z "${stale:-}" ]; then
  log "binaries not built: skipping check-config (set USHER_BIN_DIR to run it)"
fi
python3 deploy/check-settings.py "${check_args[@]}" || fail "settings"
log "ok"
