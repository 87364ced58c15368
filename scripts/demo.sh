#!/usr/bin/env bash
# `make demo`: the main job end to end on local parts.
#
# Build a real two-layer OCI image on the spot with umoci, convert it into a SOCI-enabled image with
# `soci convert --standalone`, show what was indexed, push it to a local docker-registry with htpasswd
# auth, then mount it lazily with `soci mount` and read files: only the spans that hold them are fetched.
# containerd and the snapshotter daemon join this script when the daemon lands.
set -euo pipefail
cd "$(dirname "$0")/.."
SOCI=$PWD/.venv/bin/soci
PY=$PWD/.venv/bin/python
WORK=$(mktemp -d /tmp/soci-demo.XXXXXX)
REG_PID=""
MOUNT_PID=""
cleanup() {
  [[ -n "$MOUNT_PID" ]] && kill "$MOUNT_PID" 2>/dev/null && wait "$MOUNT_PID" 2>/dev/null || true
  [[ -n "$REG_PID" ]] && kill "$REG_PID" 2>/dev/null && wait "$REG_PID" 2>/dev/null || true
  if [[ -d "$WORK" ]]; then
    { grep -F " $WORK/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

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

step "start docker-registry with htpasswd auth on a free loopback port"
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PASS=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(12))')
mkdir -p "$WORK/registry"
htpasswd -Bbn demo "$PASS" > "$WORK/registry/htpasswd"
cat > "$WORK/registry/config.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $WORK/registry/data
http:
  addr: 127.0.0.1:$PORT
auth:
  htpasswd:
    realm: soci-demo
    path: $WORK/registry/htpasswd
YML
docker-registry serve "$WORK/registry/config.yml" > "$WORK/registry/log" 2>&1 &
REG_PID=$!
"$PY" - "$PORT" <<'PYEOF'
import sys, time, urllib.error, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/", timeout=1)
        break
    except urllib.error.HTTPError:
        break  # 401: the registry answers
    except OSError:
        time.sleep(0.05)
PYEOF
REF="127.0.0.1:$PORT/demo/app:v1"

step "soci push --oci-layout converted $REF (credentials: --user)"
"$SOCI" push --plain-http --user "demo:$PASS" --oci-layout converted "$REF" | tail -n 3

step "soci mount $REF (lazy: layers are served from the registry on first read)"
mkdir -p "$WORK/mnt" "$WORK/root"
"$SOCI" --root "$WORK/root" mount --plain-http --user "demo:$PASS" "$REF" "$WORK/mnt" > "$WORK/mount.log" 2>&1 &
MOUNT_PID=$!
for _ in $(seq 300); do grep -q '^mounted ' "$WORK/mount.log" && break; sleep 0.1; done
cat "$WORK/mount.log"
echo "--- cat /etc/hello.txt through the lazy mount:"
cat "$WORK/mnt/etc/hello.txt"
echo "--- head of a python module through the lazy mount:"
pyfile=$(cd "$WORK/mnt" && ls usr/lib/python3.*/os.py | head -n1)
head -n 3 "$WORK/mnt/$pyfile"
kill -INT "$MOUNT_PID"
wait "$MOUNT_PID" || true
MOUNT_PID=""
echo "--- what soci mount fetched:"
grep -E '^(unmounted|fetched|  )' "$WORK/mount.log" || tail -n 5 "$WORK/mount.log"
image_bytes=$(du -sb converted/blobs | cut -f1)
echo "image size in the layout: $image_bytes bytes"

step "done"
