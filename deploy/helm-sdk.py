#!/usr/bin/env python3
"""The few `helm` commands deploy/check-chart.sh needs, on Helm's own Go SDK
(the PyPI package helm-python-sdk), for machines without a `helm` binary:

  helm-sdk.py version
  helm-sdk.py lint CHART [--strict] [-n NS] [-f VALUES]... [--set K=V]...
  helm-sdk.py template RELEASE CHART [-n NS] [-f VALUES]... [--set K=V]...

Values files and --set merge as in Helm (later ones win, maps deep-merged);
the chart's values.schema.json is applied by the SDK. `template` prints the
manifests (not NOTES.txt) as one YAML stream; errors exit 1.
"""
import argparse
import sys

import helm_python


def deep_merge(into, update):
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def values_of(args):
    values = {}
    for path in args.values:
        with open(path, encoding="utf-8") as f:
            deep_merge(values, helm_python.values_from_yaml(f.read()) or {})
    for expression in args.set:
        deep_merge(values, helm_python.parse_set_string(expression))
    return values


def main():
    parser = argparse.ArgumentParser(prog="helm-sdk.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("version")
    lint = commands.add_parser("lint")
    template = commands.add_parser("template")
    template.add_argument("release")
    for command in (lint, template):
        command.add_argument("chart")
        command.add_argument("-f", "--values", action="append", default=[])
        command.add_argument("--set", action="append", default=[])
        command.add_argument("-n", "--namespace", default="default")
    lint.add_argument("--strict", action="store_true")
    args = parser.parse_args()

    try:
        if args.command == "version":
            print(f"helm SDK {helm_python.helm_sdk_version()} (helm-python-sdk)")
        elif args.command == "lint":
            report = helm_python.lint(
                args.chart, values_of(args), strict=args.strict, namespace=args.namespace
            )
            failed = bool(report.get("errors"))
            for message in report.get("messages") or []:
                # Severities: 1 info, 2 warning, 3+ error; --strict fails on warnings.
                severity = message["severity"]
                label = {1: "INFO", 2: "WARNING"}.get(severity, "ERROR")
                print(f"[{label}] {message['path']}: {message['error']}")
                failed |= severity >= 3 or (args.strict and severity >= 2)
            for error in report.get("errors") or []:
                print(f"[ERROR] {error}")
            print(f"lint: {'failed' if failed else 'passed'}")
            return 1 if failed else 0
        else:
            with helm_python.Chart.load(args.chart) as chart:
                rendered = chart.render(
                    values_of(args), name=args.release, namespace=args.namespace, is_install=True
                )
            for path in sorted(rendered):
                body = rendered[path].strip()
                if body and not path.endswith("NOTES.txt"):
                    print(f"---\n# Source: {path}\n{body}")
    except helm_python.HelmError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
