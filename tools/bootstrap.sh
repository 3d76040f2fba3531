#!/usr/bin/env bash
# Set up what cap needs on a fresh Debian machine: the Fashion-MNIST package and a venv with the
# pinned Python stack. Idempotent: a second run only checks. Used by `make demo`, `make test` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bootstrap] %s\n' "$*" >&2; }

# chromium + fonts-liberation: the headless check of the MLflow UI (tests/browser_ui.py). Node/npm from Debian
# only where none is on PATH (a NodeSource nodejs already provides npm and conflicts with Debian's npm).
APT_PACKAGES=(dataset-fashion-mnist chromium fonts-liberation)
command -v node >/dev/null || APT_PACKAGES+=(nodejs)
command -v npm >/dev/null || APT_PACKAGES+=(npm)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
    log "missing Debian packages: ${missing[*]} (run as root, or: apt-get install ${missing[*]})"; exit 1
  fi
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  log "installing Debian packages: ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.cap-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  log "installing the pinned stack into .venv (torch is a large wheel: a few minutes the first time)"
  .venv/bin/pip install -q -e '.[dev,bench]'
  # test data only: foolbox ships 20 real ImageNet JPEGs; its own dependencies are not needed
  .venv/bin/pip install -q --no-deps foolbox==3.3.4
  touch "$STAMP"
fi
# playwright-core for the browser check, pinned by tests/browser/package-lock.json; no browser download
NPM_STAMP=tests/browser/node_modules/.cap-installed
if [ ! -f "$NPM_STAMP" ] || [ tests/browser/package-lock.json -nt "$NPM_STAMP" ]; then
  log "installing tests/browser/node_modules (npm ci)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  touch "$NPM_STAMP"
fi
log "ready: $(.venv/bin/python -c 'import torch, cap; print("torch", torch.__version__, "cap", cap.__version__)')"
