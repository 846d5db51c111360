#!/usr/bin/env bash
# Install the programs the pipelines and their tests call, when missing.
#   scripts/ensure-tools.sh run    what `make run` needs: espeak-ng (speech)
#                                  and fonts-noto-core (the PDFs' fonts for
#                                  scripts typst's own lack: Thai, Bengali, ...)
#   scripts/ensure-tools.sh [test] that, and what the tests need:
#                                  poppler-utils (pdftotext/pdftoppm),
#                                  chromium and chromium-driver (the console's
#                                  browser test), strace (the file store's
#                                  flush test), moto (an S3 server for the
#                                  store tests), schemathesis (the API fuzzer
#                                  of scripts/fuzz-api.sh), kubernetes-validate
#                                  (scripts/validate-manifests.sh) and promtool
#                                  (the alert rules' checks, same script).
# Debian's packages go through apt-get, with sudo when not root.
set -euo pipefail
mode=${1:-test}
case "$mode" in
  run|test) ;;
  *) echo "ensure-tools: unknown mode '$mode' (run or test)" >&2; exit 2 ;;
esac

# apt-get install "$@", as root or through sudo; without either, say what
# to install instead of failing on apt's lock file.
apt_install() {
  local as=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      as=(sudo)
    else
      echo "ensure-tools: missing $*: install them (apt-get install $*) or run as root" >&2
      exit 1
    fi
  fi
  echo "ensure-tools: installing $*" >&2
  "${as[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  "${as[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
[ -e /usr/share/fonts/truetype/noto/NotoSansDevanagari-Regular.ttf ] || missing+=(fonts-noto-core)
if [ "$mode" = run ]; then
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  exit 0
fi
command -v pdftotext >/dev/null 2>&1 || missing+=(poppler-utils)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v strace >/dev/null 2>&1 || missing+=(strace)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

# promtool comes with Debian's `prometheus` package (the server too, which is
# installed and not started): the release tarballs are on GitHub, which the
# machines here cannot reach, and apt checks the package against the signed
# archive. Without recommends: the rules' tests need nothing else.
if ! command -v promtool >/dev/null 2>&1; then
  echo "ensure-tools: prometheus is for promtool (alert rule checks and tests)" >&2
  apt_install --no-install-recommends prometheus
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
