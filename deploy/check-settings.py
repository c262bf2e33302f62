#!/usr/bin/env python3
"""Checks that every USHER_* setting the deployment files give a binary is a
key that binary's configuration has (each binary refuses unknown keys at
start, so a typo here would only show up as a crash loop).

The known keys are read from the configuration structs in the Rust sources
(`pub struct … { pub field: Type }`, nested by type), starting at each
binary's `Config`. The settings are read from:

  * deploy/docker-compose.yml: the `environment` of each service whose
    command runs an Usher binary;
  * rendered Helm manifests (files given with --manifests): the `env` and the
    ConfigMaps referenced by `envFrom` of every container running an Usher
    binary (Deployments and Jobs).

With --run-check-config BIN_DIR, every Usher service of the compose file and
every container of the manifests given with --check-config-manifests is also
started as `<binary> check-config`
with its full environment (ConfigMap, inline values, and made-up values for
its secret keys): the binary itself then loads and validates the settings,
production rules included.

Usage: check-settings.py [--manifests FILE]... [--run-check-config BIN_DIR
       --check-config-manifests FILE...]
Exit status 1 and a list of the unknown settings when any is found.
"""
import base64
import os
import subprocess
import argparse
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRATES = {
    "usher-gateway": ROOT / "gateway" / "src",
    "usher-identity": ROOT / "services" / "identity" / "src",
    "usher-invitation": ROOT / "services" / "invitation" / "src",
    "usher-notification": ROOT / "services" / "notification" / "src",
}
KIT = ROOT / "services" / "kit" / "src"

STRUCT = re.compile(r"pub struct (\w+)\s*\{(.*?)\n\}", re.S)
FIELD = re.compile(r"^\s*pub (\w+):\s*([^,]+),", re.M)
MAPS = ("BTreeMap", "HashMap")


def structs_in(src):
    """name -> [(field, type)] of every braced pub struct under src."""
    found = {}
    for path in sorted(src.rglob("*.rs")):
        for name, body in STRUCT.findall(path.read_text()):
            fields = FIELD.findall(body)
            if fields:
                found.setdefault(name, fields)
    return found


KIT_STRUCTS = structs_in(KIT)


def key_tree(crate_src):
    """Nested dict of the keys of the crate's `Config`; a leaf is None, a map
    of free keys is the string 'map'."""
    own = structs_in(crate_src)

    def lookup(name):
        return own.get(name) or KIT_STRUCTS.get(name)

    def build(name, seen):
        tree = {}
        for field, ty in lookup(name):
            ty = ty.strip()
            inner = re.sub(r"^Option<(.*)>$", r"\1", ty)
            base = inner.split("<")[0].split("::")[-1]
            if base in MAPS:
                tree[field] = "map"
            elif lookup(base) and base not in seen:
                tree[field] = build(base, seen | {base})
            else:
                tree[field] = None
        return tree

    return build("Config", {"Config"})


TREES = {binary: key_tree(src) for binary, src in CRATES.items()}


def known(binary, env_name):
    """Whether USHER_A__B__C names a key of the binary (USHER_CONFIG is the
    file, always allowed)."""
    if env_name == "USHER_CONFIG":
        return True
    node = TREES[binary]
    parts = env_name[len("USHER_"):].lower().split("__")
    for i, part in enumerate(parts):
        if node == "map":
            # issuer -> key: the part is the map's own key, the last one.
            return i == len(parts) - 1
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def binary_of(command):
    for word in command or []:
        name = pathlib.PurePosixPath(str(word)).name
        if name in CRATES:
            return name
    return None


def compose_settings(path):
    doc = yaml.safe_load(path.read_text())
    for service, spec in (doc.get("services") or {}).items():
        binary = binary_of(spec.get("command"))
        env = spec.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        if binary:
            for name in env:
                yield f"{path.name}: service {service}", binary, name
        elif any(str(n).startswith("USHER_") for n in env):
            yield f"{path.name}: service {service}", None, "(no Usher command)"


def manifest_settings(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    configmaps = {
        d["metadata"]["name"]: d.get("data") or {}
        for d in docs
        if d.get("kind") == "ConfigMap"
    }
    for doc in docs:
        if doc.get("kind") not in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            binary = binary_of((container.get("command") or []) + (container.get("args") or []))
            if not binary:
                continue
            where = f"{path.name}: {doc['kind']} {doc['metadata']['name']}/{container['name']}"
            for var in container.get("env") or []:
                yield where, binary, var["name"]
            for source in container.get("envFrom") or []:
                ref = source.get("configMapRef")
                if ref:
                    if ref["name"] not in configmaps:
                        yield where, binary, f"(missing ConfigMap {ref['name']})"
                        continue
                    for name in configmaps[ref["name"]]:
                        yield where, binary, name


def dummy_secret(key):
    """A made-up value of the right form for a secret key of the chart."""
    if key.endswith("database-url"):
        return "postgres://usher:password@postgres.example.internal:5432/" + key.split("-")[0]
    if key == "redis-url":
        return "rediss+sentinel://:password@sentinel-0.example.internal:26379,sentinel-1.example.internal:26379,sentinel-2.example.internal/usher"
    if key == "amqp-url":
        return "amqps://usher:password@rabbitmq.example.internal:5671/usher"
    if key == "smtp-password":
        return "password"
    # token-hmac-key, seal-key, *-signing-key: 32 random bytes in base64.
    return base64.b64encode(os.urandom(32)).decode()


def container_envs(path):
    """(where, binary, env dict) of every Usher container in the manifests."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d.get("kind") == "ConfigMap"}
    for doc in docs:
        if doc.get("kind") not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            binary = binary_of((container.get("command") or []) + (container.get("args") or []))
            if not binary:
                continue
            env = {}
            for source in container.get("envFrom") or []:
                if "configMapRef" in source:
                    env.update(configmaps.get(source["configMapRef"]["name"], {}))
            for var in container.get("env") or []:
                if "value" in var:
                    env[var["name"]] = str(var["value"])
                elif "secretKeyRef" in var.get("valueFrom", {}):
                    env[var["name"]] = dummy_secret(var["valueFrom"]["secretKeyRef"]["key"])
            yield f"{path.name}: {doc['kind']} {doc['metadata']['name']}/{container['name']}", binary, env


def compose_envs(path):
    """(where, binary, env dict) of every Usher service of the compose file."""
    doc = yaml.safe_load(path.read_text())
    for service, spec in (doc.get("services") or {}).items():
        binary = binary_of(spec.get("command"))
        if binary:
            env = {k: str(v) for k, v in (spec.get("environment") or {}).items()}
            yield f"{path.name}: service {service}", binary, env


def run_check_config(bin_dir, manifests, compose):
    """Runs `<binary> check-config` for every container; returns failures."""
    failures, count = [], 0
    sources = [compose_envs(compose)] + [container_envs(path) for path in manifests]
    for source in sources:
        for where, binary, env in source:
            count += 1
            env = dict(env, PATH=os.environ.get("PATH", "/usr/bin:/bin"))
            result = subprocess.run(
                [str(pathlib.Path(bin_dir) / binary), "check-config"],
                env=env, capture_output=True, text=True, cwd="/", timeout=60,
            )
            if result.returncode != 0:
                failures.append(
                    f"{where}: {binary} check-config refused it: {result.stderr.strip()}"
                )
    print(f"check-config: {count} containers, {len(failures)} refused")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifests", action="append", default=[], type=pathlib.Path)
    parser.add_argument("--compose", default=ROOT / "deploy" / "docker-compose.yml", type=pathlib.Path)
    parser.add_argument("--run-check-config", metavar="BIN_DIR")
    parser.add_argument("--check-config-manifests", action="append", default=[], type=pathlib.Path)
    args = parser.parse_args()

    bad, count = [], 0
    sources = [compose_settings(args.compose)] + [manifest_settings(m) for m in args.manifests]
    for source in sources:
        for where, binary, name in source:
            count += 1
            if binary is None or not name.startswith("USHER_") or not known(binary, name):
                bad.append(f"{where}: {name} is not a setting of {binary}")
    print(f"settings: {count} checked, {len(bad)} unknown")
    if args.run_check_config:
        bad += run_check_config(args.run_check_config, args.check_config_manifests, args.compose)
    for line in bad:
        print(line, file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
