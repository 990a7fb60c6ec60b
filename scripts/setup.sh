#!/usr/bin/env bash
# Installs everything lifeboat needs on Debian 12 (as root): system packages and a virtual
# environment in .venv with the project and its development tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-utils qemu-system-x86 libvirt-daemon-system libvirt-dev pkg-config
  nbdkit nbdkit-plugin-python libnbd-bin fio
  syslinux syslinux-common mtools dosfstools fdisk e2fsprogs cpio busybox-static
  restic borgbackup python3-venv python3-dev gcc qemu-guest-agent
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${missing[@]}" >&2
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.lifeboat-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >&2
  # compat mode: a .pth line with the checkout's path instead of setuptools' import finder, which
  # cost every `lifeboat` command ~10 ms to load (3 % of a dirty-bitmap incremental)
  .venv/bin/pip install -q -e '.[dev]' --config-settings editable_mode=compat >&2
  touch "$stamp"
fi
