#!/usr/bin/env bash
# Installs what vmbond's build, demo, tests and benchmarks need on Debian:
# QEMU and its tools, the guest builder's packages, and the standard tools
# the interoperability tests and benchmarks compare against. Idempotent.
set -euo pipefail
pkgs=(qemu-system-x86 qemu-utils busybox-static syslinux syslinux-common mtools dosfstools
      fdisk cryptsetup-bin fio nbdkit libnbd-bin openssl curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "Go 1.26 or newer is required (https://go.dev/dl/)" >&2; exit 1; }
cd "$(dirname "$0")/.." && go mod download
