#!/usr/bin/env bash
# Offline, strict validation of what manifests/ ships (`make validate-manifests`,
# part of `make test`): every manifest and the `kubectl kustomize manifests/`
# output against the Kubernetes OpenAPI schemas bundled in kubernetes-validate
# (PyPI, installed by scripts/ensure-tools.sh), WorkerPools against the
# generated CRD, pod specs and the Dockerfile against the secure defaults.
# The checks themselves: scripts/validate_manifests.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  echo "validate-manifests: kubernetes-validate is missing: run scripts/ensure-tools.sh" >&2
  exit 1
fi
kustomized=""
if command -v kubectl >/dev/null 2>&1; then
  kustomized="$(mktemp)"
  trap 'rm -f "$kustomized"' EXIT
  kubectl kustomize manifests/ >"$kustomized"
else
  echo "validate-manifests: kubectl is not installed: the kustomize output is not checked" >&2
fi
exec python3 scripts/validate_manifests.py . $kustomized
