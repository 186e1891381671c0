#!/usr/bin/env bash
# One command from a fresh machine to a working clearmlfs mount:
#   set up (scripts/setup.sh), start a local SeaweedFS S3 server, write .demo/clearml.conf for it,
#   mount at .demo/mnt (or MOUNTPOINT), copy a file in with cp, read it back with cat, then keep the
#   mount up until Ctrl-C, when it unmounts and stops the server.
#
# Usage: scripts/demo.sh [--check] [--skip-setup] [MOUNTPOINT]
#   --check       stop right after the cp/cat round trip (for tests and CI); also DEMO_CHECK=1
#   --skip-setup  do not run scripts/setup.sh (already set up);          also DEMO_SKIP_SETUP=1
#   DEMO_DIR      where the server data, conf, cache and logs go (default .demo/, git-ignored)
# Safe to run again after a killed run: a stale mount or server of an earlier run is cleaned up first.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO="$(realpath -m "${DEMO_DIR:-$ROOT/.demo}")"  # DEMO_DIR: tests keep theirs apart from yours
VENV="$ROOT/.venv"
CHECK="${DEMO_CHECK:-0}"
SKIP_SETUP="${DEMO_SKIP_SETUP:-0}"
MNT=""
for arg in "$@"; do
    case "$arg" in
        --check) CHECK=1 ;;
        --skip-setup) SKIP_SETUP=1 ;;
        -h | --help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "demo: unknown option $arg" >&2; exit 2 ;;
        *) MNT="$arg" ;;
    esac
done
MNT="$(realpath -m "${MNT:-$DEMO/mnt}")"
BUCKET=demo
KEY=demo-key
SECRET=demo-secret  # a throwaway local server's key, not a secret worth hiding
WEED_PID_FILE="$DEMO/weed.pid"
MOUNT_PID_FILE="$DEMO/mount.pid"

log() { echo "[demo] $*"; }
die() { echo "[demo] error: $*" >&2; exit 1; }

# --- 1. set up --------------------------------------------------------------------------------------
if [ "$SKIP_SETUP" != 1 ]; then
    bash "$ROOT/scripts/setup.sh"
fi
[ -x "$VENV/bin/weed" ] && [ -x "$VENV/bin/clearmlfs" ] || die "$VENV is incomplete: run scripts/setup.sh"
PY="$VENV/bin/python"
mkdir -p "$DEMO/weed-data" "$DEMO/cache"

# --- 2. leftovers of an earlier run that did not get to clean up -----------------------------------
# Only our own processes: the pid files name them, the command line confirms it is still them.
stop_recorded() {  # PID_FILE PATTERN
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    if [ -n "$pid" ] && grep -qa -- "$2" "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}
# A mount whose process died leaves "Transport endpoint is not connected" behind; -z detaches it anyway.
fusermount3 -uz "$MNT" 2>/dev/null || true
stop_recorded "$MOUNT_PID_FILE" clearmlfs
stop_recorded "$WEED_PID_FILE" weed
mkdir -p "$MNT"  # only now: on a dead mount even mkdir -p fails

# --- 3. clean up on any exit, Ctrl-C included --------------------------------------------------------
MOUNT_PID=""
WEED_PID=""
cleanup() {
    set +e
    if mountpoint -q "$MNT"; then
        log "unmounting $MNT (uploads anything still dirty first)"
        "$VENV/bin/clearmlfs" umount "$MNT" || fusermount3 -uz "$MNT"
    fi
    if [ -n "$MOUNT_PID" ]; then
        # The foreground mount ends by itself once unmounted; SIGTERM only if it hangs.
        for _ in $(seq 100); do kill -0 "$MOUNT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -TERM "$MOUNT_PID" 2>/dev/null
        wait "$MOUNT_PID" 2>/dev/null
    fi
    mountpoint -q "$MNT" && fusermount3 -uz "$MNT"
    rm -f "$MOUNT_PID_FILE"
    if [ -n "$WEED_PID" ]; then
        log "stopping the SeaweedFS server"
        # weed's graceful stop can hang; its data is flushed by then, so a short grace and SIGKILL.
        stop_recorded "$WEED_PID_FILE" weed
        wait "$WEED_PID" 2>/dev/null
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 4. SeaweedFS with an S3 gateway ----------------------------------------------------------------
# 8333 (weed's usual S3 port) when free, so the printed URLs are stable; every other port is free-picked.
mapfile -t PORTS < <("$PY" - <<'EOF'
import contextlib, socket
def bind(port):
    s = socket.socket(); s.bind(("127.0.0.1", port)); return s
with contextlib.ExitStack() as stack:
    try:
        first = [stack.enter_context(bind(8333))]
    except OSError:
        first = []
    socks = first + [stack.enter_context(bind(0)) for _ in range(8 - len(first))]
    print("\n".join(str(s.getsockname()[1]) for s in socks))
EOF
)
S3_PORT="${PORTS[0]}"
HOST="127.0.0.1:$S3_PORT"
cat >"$DEMO/identities.json" <<EOF
{"identities": [{"name": "demo", "credentials": [{"accessKey": "$KEY", "secretKey": "$SECRET"}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF

start_weed() {
    log "starting SeaweedFS (S3 on $HOST, data in $DEMO/weed-data, log $DEMO/weed.log)"
    # Own session: the terminal's Ctrl-C reaches this script only, which then stops things in order.
    setsid "$VENV/bin/weed" server -dir="$DEMO/weed-data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port="${PORTS[1]}" -master.port.grpc="${PORTS[2]}" \
        -volume.port="${PORTS[3]}" -volume.port.grpc="${PORTS[4]}" \
        -filer.port="${PORTS[5]}" -filer.port.grpc="${PORTS[6]}" \
        -s3 -s3.port="$S3_PORT" -s3.port.grpc="${PORTS[7]}" -s3.config="$DEMO/identities.json" \
        -s3.port.iceberg=0 -s3.port.lance=0 -metricsPort=0 \
        -master.volumeSizeLimitMB=64 -volume.max=100 \
        </dev/null >"$DEMO/weed.log" 2>&1 &
    WEED_PID=$!
    echo "$WEED_PID" >"$WEED_PID_FILE"
}

# Polls (deadline 60 s) until the bucket exists and a real write succeeds: the S3 port answers
# before a volume server has registered.
weed_ready() {
    "$PY" - "$HOST" "$KEY" "$SECRET" "$BUCKET" "$WEED_PID" <<'EOF'
import os, sys, time
import boto3
from botocore.config import Config
host, key, secret, bucket, pid = sys.argv[1:]
client = boto3.client("s3", endpoint_url=f"http://{host}", aws_access_key_id=key, aws_secret_access_key=secret,
                      region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
                      connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(int(pid), 0)
    except OSError:
        sys.exit("SeaweedFS exited")
    try:
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=".ready-probe", Body=b"ok")
        client.delete_object(Bucket=bucket, Key=".ready-probe")
        sys.exit(0)
    except Exception as exc:  # not ready yet
        last = exc
    time.sleep(0.2)
sys.exit(f"SeaweedFS not ready after 60 s: {last!r}")
EOF
}

start_weed
if ! weed_ready; then
    # Data left by a killed server can keep a new one from starting; the demo's data is disposable.
    log "SeaweedFS did not come up with the old data; starting over with an empty data folder"
    stop_recorded "$WEED_PID_FILE" weed
    wait "$WEED_PID" 2>/dev/null || true
    rm -rf "$DEMO/weed-data" && mkdir -p "$DEMO/weed-data"
    start_weed
    weed_ready || { tail -n 30 "$DEMO/weed.log" >&2; die "SeaweedFS did not start (log: $DEMO/weed.log)"; }
fi

# --- 5. clearml.conf, the same file the ClearML SDK would read --------------------------------------
CONF="$DEMO/clearml.conf"
cat >"$CONF" <<EOF
# Written by scripts/demo.sh for the local SeaweedFS server.
sdk {
    aws {
        s3 {
            credentials: [
                { host: "$HOST", key: "$KEY", secret: "$SECRET", secure: false, multipart: true }
            ]
        }
    }
    storage {
        cache { default_base_dir: "$DEMO/cache" }
    }
}
EOF

# --- 6. mount (foreground process, in the background of this script) -------------------------------
log "mounting at $MNT (log $DEMO/mount.log)"
setsid "$VENV/bin/clearmlfs" mount -f --config "$CONF" --log-file "$DEMO/mount.log" "$MNT" \
    </dev/null >>"$DEMO/mount.log" 2>&1 &
MOUNT_PID=$!
echo "$MOUNT_PID" >"$MOUNT_PID_FILE"
for _ in $(seq 300); do
    mountpoint -q "$MNT" && break
    kill -0 "$MOUNT_PID" 2>/dev/null || break
    sleep 0.1
done
if ! mountpoint -q "$MNT"; then
    tail -n 30 "$DEMO/mount.log" >&2
    die "the mount did not come up (log: $DEMO/mount.log)"
fi

# --- 7. round trip through the mount ------------------------------------------------------------------
DIR="$MNT/s3/$HOST/$BUCKET"
echo "hello from clearmlfs, $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$DEMO/hello.txt"
cp "$DEMO/hello.txt" "$DIR/hello.txt"
log "cat $DIR/hello.txt:"
cat "$DIR/hello.txt"
cmp -s "$DEMO/hello.txt" "$DIR/hello.txt" || die "read back differs from what was written"
log "round trip OK: s3://$HOST/$BUCKET/hello.txt"

if [ "$CHECK" = 1 ]; then
    exit 0  # the EXIT trap unmounts and stops the server
fi

cat <<EOF

  clearmlfs is mounted at $MNT
  The bucket s3://$HOST/$BUCKET is the folder:
      $DIR
  Try:
      ls -l "$DIR"
      cp some-file "$DIR/"
      $VENV/bin/clearmlfs ls --config "$CONF" s3://$HOST/$BUCKET
  Mount log: $DEMO/mount.log      Server log: $DEMO/weed.log
  Press Ctrl-C to unmount and stop the server.

EOF
# Returns when the mount ends (e.g. `clearmlfs umount` from another shell) or on Ctrl-C (trap).
wait "$MOUNT_PID" || true
