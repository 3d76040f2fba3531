#!/usr/bin/env bash
# Set up what cap needs on a fresh Debian machine: the Fashion-MNIST package and a venv with the
# pinned Python stack. Idempotent: a second run only checks. Used by `make demo`, `make test` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bootstrap] %s\n' "$*" >&2; }

APT_PACKAGES=(dataset-fashion-mnist)
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
log "ready: $(.venv/bin/python -c 'import torch, cap; print("torch", torch.__version__, "cap", cap.__version__)')"
