#!/usr/bin/env bash
# Make sure the embedded dataset (Fashion-MNIST's four IDX files) is at $1; install Debian's
# dataset-fashion-mnist when it is missing from the default place and we may use apt-get.
set -euo pipefail
root=${1:-/usr/share/datasets/fashion-mnist}
default=/usr/share/datasets/fashion-mnist
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() { for f in "${files[@]}"; do [[ -s $root/$f ]] || return 1; done; }

have_all && exit 0
if [[ $root != "$default" ]]; then
  echo "error: Fashion-MNIST not found at FMNIST_ROOT=$root (expected ${files[*]})" >&2
  exit 1
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "error: Fashion-MNIST is missing from $default and this user cannot install it." >&2
  echo "       Run as root:  apt-get update && apt-get install -y dataset-fashion-mnist" >&2
  echo "       or set FMNIST_ROOT to a folder holding ${files[*]}" >&2
  exit 1
fi
echo "Installing Debian's dataset-fashion-mnist (embedded demo dataset)..."
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }; then
  echo "error: apt-get could not install dataset-fashion-mnist (no package mirror reachable?)" >&2
  exit 1
fi
have_all || { echo "error: dataset-fashion-mnist installed but $root lacks ${files[*]}" >&2; exit 1; }
