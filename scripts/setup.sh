#!/usr/bin/env bash
# Installs the system packages the build needs when they are missing, and nothing else.
#
#   libclang-dev     bindgen (used by librocksdb-sys) loads libclang
#   librocksdb-dev   the RocksDB shared library and header we link (see .cargo/config.toml)
#
# Protobuf needs no package: build scripts compile .proto files with protox (pure Rust).
# The script is idempotent and quiet when everything is present, so `make` calls it every time.
set -euo pipefail

packages=(libclang-dev librocksdb-dev)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: missing ${missing[*]}, and this is not a Debian-like system; install them by hand" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "setup: missing ${missing[*]}; run as root or install sudo" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "setup: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
echo "setup: done" >&2
