#!/usr/bin/env bash
# Real images for the vision tests and demo: Fashion-MNIST from Debian's dataset-fashion-mnist.
set -euo pipefail
if [ -n "${PRUNEKIT_FASHION_MNIST:-}" ] || dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian package dataset-fashion-mnist (30 MB)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "Fashion-MNIST missing: install Debian's dataset-fashion-mnist, or set PRUNEKIT_FASHION_MNIST" >&2
  echo "to a folder holding the four *-ubyte.gz files." >&2
  exit 1
fi
