#!/usr/bin/env bash
# Installs everything lifeboat needs on Debian 12 (as root): system packages and a virtual
# environment in .venv with the project and its development tools. Safe to run again.
# Sourcing it (tests do) defines apt_get and installs nothing.
set -euo pipefail

APT_PACKAGES=(
  qemu-utils qemu-system-x86 libvirt-daemon-system libvirt-dev pkg-config
  nbdkit nbdkit-plugin-python libnbd-bin fio
  syslinux syslinux-common mtools dosfstools fdisk e2fsprogs cpio busybox-static
  restic borgbackup rclone python3-venv python3-dev gcc qemu-guest-agent
  chromium
  golang-go golang-github-vmware-govmomi-dev  # issue 14: the vCenter simulator (tests/targets/vcsim)
  linux-image-amd64 ipxe-qemu dnsmasq-base gdisk nbd-client dmsetup  # issue 13 (pxe): recovery kernel, iPXE ROMs, libvirt DHCP, sgdisk; instant mode
  # issue 15: the openstack target's tests run real Keystone and Glance on PostgreSQL; its bench the openstack CLI
  python3-keystone python3-glance python3-keystonemiddleware python3-psycopg2 postgresql python3-openstackclient
  libguestfs-tools python3-guestfs fuse2fs xfsprogs btrfs-progs ntfs-3g  # issue 16: file-level restore
)

# apt-get, waiting while another package manager holds its lock (the dpkg frontend lock, or the
# package lists' lock that `apt-get update` takes) instead of failing at once with exit 100: up
# to APT_LOCK_WAIT seconds (default 600), saying so every 30 s. apt's own DPkg::Lock::Timeout is
# not used: apt 2.6 applies it to the dpkg locks only, not to the lists lock, and prints a line
# a second. An apt-get that could not lock changed nothing, so running it again is safe.
apt_get() {
  local wait=${APT_LOCK_WAIT:-600} err rc
  local deadline=$((SECONDS + wait)) note=$SECONDS
  err=$(mktemp)
  while :; do
    rc=0
    LC_ALL=C apt-get "$@" 2>"$err" || rc=$?
    if [ "$rc" -eq 0 ] || ! grep -q "Could not get lock" "$err"; then
      cat "$err" >&2
      rm -f "$err"
      return "$rc"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      cat "$err" >&2
      rm -f "$err"
      echo "setup: gave up after ${wait} s waiting for another package manager's lock" >&2
      return "$rc"
    fi
    if [ "$SECONDS" -ge "$note" ]; then
      echo "setup: waiting for another package manager (up to ${wait} s): $(grep -m1 "Could not get lock" "$err")" >&2
      note=$((SECONDS + 30))
    fi
    sleep 2
  done
}

main() {
  cd "$(dirname "$0")/.."
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt_get update -q
    apt_get install -y -q "${missing[@]}" >&2
  fi

  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  local stamp=.venv/.lifeboat-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip >&2
    # compat mode: a .pth line with the checkout's path instead of setuptools' import finder, which
    # cost every `lifeboat` command ~10 ms to load (3 % of a dirty-bitmap incremental)
    .venv/bin/pip install -q -e '.[dev]' --config-settings editable_mode=compat >&2
    touch "$stamp"
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
