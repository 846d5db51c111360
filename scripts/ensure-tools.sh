#!/usr/bin/env bash
# Install the programs the pipelines and their tests call, when missing:
# espeak-ng (speech), poppler-utils (pdftotext/pdftoppm in tests),
# fonts-noto-core (the PDFs' fonts for scripts typst's own lack: Arabic,
# Devanagari, Thai, ...),
# chromium and chromium-driver (the web console's browser test), moto
# (an S3 server for the artifact store tests), schemathesis (the API
# fuzzer of scripts/fuzz-api.sh), kubernetes-validate (the manifests'
# schema check, scripts/validate-manifests.sh) and promtool (the alert rules'
# check and unit tests, same script).
set -euo pipefail
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v pdftotext >/dev/null 2>&1 || missing+=(poppler-utils)
[ -e /usr/share/fonts/truetype/noto/NotoSansDevanagari-Regular.ttf ] || missing+=(fonts-noto-core)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "ensure-tools: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${missing[@]}" >&2
fi

# promtool comes with Debian's `prometheus` package (the server too, which is
# installed and not started): the release tarballs are on GitHub, which the
# machines here cannot reach, and apt checks the package against the signed
# archive. Without recommends: the rules' tests need nothing else.
if ! command -v promtool >/dev/null 2>&1; then
  echo "ensure-tools: installing prometheus (for promtool: alert rule checks and tests)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends prometheus >&2
fi

# moto's S3 server stands in for S3 in the artifact store's tests: the most
# complete S3 emulator that runs offline, from PyPI.
if ! python3 -c 'import moto.server' >/dev/null 2>&1; then
  echo "ensure-tools: installing moto[server] (S3 emulator for the store tests)" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]>=5,<6' >&2
fi

# schemathesis generates requests from the API's OpenAPI document and checks
# the answers against it (scripts/fuzz-api.sh, `make fuzz-api`).
if ! command -v schemathesis >/dev/null 2>&1; then
  echo "ensure-tools: installing schemathesis (API fuzzer)" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'schemathesis>=4,<5' >&2
fi

# kubernetes-validate bundles the Kubernetes OpenAPI schemas of each release
# and validates offline (scripts/validate-manifests.sh); pinned, so the
# release the manifests are checked against changes only on purpose.
if ! python3 -c 'import kubernetes_validate, sys; sys.exit(kubernetes_validate.__version__ != "1.37.0")' >/dev/null 2>&1; then
  echo "ensure-tools: installing kubernetes-validate (offline Kubernetes schema validator)" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0' >&2
fi
