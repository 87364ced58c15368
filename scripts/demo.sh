#!/usr/bin/env bash
# `make demo`: the main job end to end on local parts.
#
# Today (offline part): build a real two-layer OCI image on the spot with umoci, convert it into a
# SOCI-enabled image with `soci convert --standalone`, and show what was indexed: the SOCI index, the zTOC
# of each layer, and one file read back through its zTOC (only the spans holding it are inflated).
# The registry, containerd and the lazy-pull steps join this script as the daemon lands.
set -euo pipefail
cd "$(dirname "$0")/.."
SOCI=$PWD/.venv/bin/soci
WORK=$(mktemp -d /tmp/soci-demo.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n== %s\n' "$*"; }

step "build an OCI image with umoci in $WORK"
cd "$WORK"
umoci init --layout layout >/dev/null
umoci new --image layout:demo
umoci unpack --image layout:demo bundle >/dev/null
mkdir -p bundle/rootfs/etc bundle/rootfs/usr/lib
echo "hello from a lazily indexed layer" > bundle/rootfs/etc/hello.txt
umoci repack --refresh-bundle --image layout:demo bundle >/dev/null
py=$(ls -d /usr/lib/python3.* | head -n1)
cp -a "$py" bundle/rootfs/usr/lib/
umoci repack --refresh-bundle --image layout:demo bundle >/dev/null
umoci gc --layout layout

step "soci convert --standalone (span size 1 MiB, min layer size 0)"
"$SOCI" convert --standalone --format oci-dir --span-size 1048576 --min-layer-size 0 layout converted

step "soci index list --oci-layout converted"
"$SOCI" index list --oci-layout converted

step "soci ztoc list --oci-layout converted"
"$SOCI" ztoc list --oci-layout converted

ztoc=$("$SOCI" ztoc list --oci-layout converted -q | tail -n1)
step "soci ztoc info $ztoc (first lines)"
"$SOCI" ztoc info --oci-layout converted "$ztoc" | head -n 20

for z in $("$SOCI" ztoc list --oci-layout converted -q); do
  if "$SOCI" ztoc info --oci-layout converted "$z" | grep -q '"etc/hello.txt"'; then
    step "soci ztoc get-file $z etc/hello.txt"
    "$SOCI" ztoc get-file --oci-layout converted "$z" etc/hello.txt
  fi
done

step "done"
