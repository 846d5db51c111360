#!/usr/bin/env bash
# Offline, strict validation of what manifests/ ships (`make validate-manifests`,
# part of `make test`): every manifest and the `kubectl kustomize manifests/`
# output against the Kubernetes OpenAPI schemas bundled in kubernetes-validate
# (PyPI, installed by scripts/ensure-tools.sh), WorkerPools against the
# generated CRD, pod specs and the Dockerfile against the secure defaults;
# manifests/observability/ against the vendored prometheus-operator CRDs, its
# alert rules with `promtool check rules` and their unit tests with
# `promtool test rules`. The checks themselves: scripts/validate_manifests.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  echo "validate-manifests: kubernetes-validate is missing: run scripts/ensure-tools.sh" >&2
  exit 1
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "validate-manifests: promtool is missing: run scripts/ensure-tools.sh" >&2
  exit 1
fi
promtool check rules manifests/observability/rules.yaml
promtool test rules manifests/observability/rules.test.yaml
kustomized=()
if command -v kubectl >/dev/null 2>&1; then
  base="$(mktemp)" observability="$(mktemp)"
  trap 'rm -f "$base" "$observability"' EXIT
  kubectl kustomize manifests/ >"$base"
  kubectl kustomize manifests/observability/ >"$observability"
  kustomized=("$base" "$observability")
else
  echo "validate-manifests: kubectl is not installed: the kustomize output is not checked" >&2
fi
exec python3 scripts/validate_manifests.py . "${kustomized[@]}"
