#!/usr/bin/env python3
"""The PrometheusRule of manifests/observability/, made from rules.yaml.

rules.yaml (a plain Prometheus rules file) is the one source of the alerts;
prometheusrule.yaml carries the same groups for the prometheus-operator.

usage: observability-rules.py            print the PrometheusRule
       observability-rules.py --write    write manifests/observability/prometheusrule.yaml
       observability-rules.py --check    exit 1 when the committed file differs
"""

import pathlib
import sys

import yaml

DIR = pathlib.Path(__file__).resolve().parent.parent / "manifests/observability"
HEADER = """\
# Generated from rules.yaml by scripts/observability-rules.py --write: edit
# rules.yaml, not this file (`make validate-manifests` fails when they differ).
"""


class Literal(str):
    """A multi-line string written as a YAML block, as in rules.yaml."""


def block(dumper, text):
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


yaml.SafeDumper.add_representer(Literal, block)


def as_blocks(node):
    if isinstance(node, dict):
        return {k: as_blocks(v) for k, v in node.items()}
    if isinstance(node, list):
        return [as_blocks(v) for v in node]
    if isinstance(node, str) and "\n" in node:
        return Literal(node)
    return node


def prometheus_rule():
    rules = yaml.safe_load((DIR / "rules.yaml").read_text())
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "backlog",
            "labels": {"app.kubernetes.io/name": "backlog", "app.kubernetes.io/component": "alerts"},
        },
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.safe_dump(as_blocks(document), sort_keys=False, width=100)


def main(argv):
    text = prometheus_rule()
    target = DIR / "prometheusrule.yaml"
    if argv[1:] == ["--write"]:
        target.write_text(text)
    elif argv[1:] == ["--check"]:
        if not target.exists() or target.read_text() != text:
            print(f"{target}: differs from rules.yaml: run scripts/observability-rules.py --write", file=sys.stderr)
            return 1
    elif argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
