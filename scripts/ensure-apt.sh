#!/usr/bin/env bash
# Installs the Debian packages soci-py needs for building, testing and the demo, when any is missing.
# Idempotent: with everything present it only runs dpkg-query. Service start-up by package scripts is
# suppressed during the install (the tests start their own registry and containerd on free ports).
set -euo pipefail

PKGS=(
  build-essential pkg-config zlib1g-dev python3-dev python3-venv
  fuse3 libfuse3-dev
  docker-registry apache2-utils
  containerd runc
  umoci skopeo
  pigz libisal-dev
  squashfuse squashfs-tools busybox-static attr
  iproute2 systemd systemd-container debootstrap rpm binutils
)

missing=()
for p in "${PKGS[@]}"; do
  st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$st" == "install ok installed" ]] || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
  echo "ensure-apt: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
  exit 1
fi

echo "ensure-apt: installing ${missing[*]}" >&2
created_policy=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
cleanup() { [[ $created_policy -eq 1 ]] && rm -f /usr/sbin/policy-rc.d; true; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || apt-get update
apt-get install -y -qq --no-install-recommends "${missing[@]}"
