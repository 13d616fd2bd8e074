#!/usr/bin/env bash
# Install the distribution packages vmdp needs (Debian/Ubuntu), only those missing.
set -euo pipefail
pkgs=(qemu-system-x86 qemu-utils libnbd-bin python3-libnbd python3-venv e2fsprogs)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
