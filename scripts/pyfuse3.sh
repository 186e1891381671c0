#!/usr/bin/env bash
# Installs pyfuse3 into VENV: the patched build (scripts/build-pyfuse3.sh: kernel passthrough, write views,
# parallel lookups), or, when that cannot be had or CLEARMLFS_PYFUSE3=stock asks for it, the registry's pyfuse3,
# with one warning line saying what is lost. The mount works either way.
#   usage: pyfuse3.sh VENV
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$1"
MODE="${CLEARMLFS_PYFUSE3:-patched}"
PYFUSE3_VERSION=3.5.0

stock() {
    "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "pyfuse3==$PYFUSE3_VERSION" </dev/null
}

case "$MODE" in
    stock)
        echo "[setup] pyfuse3 $PYFUSE3_VERSION from the registry (CLEARMLFS_PYFUSE3=stock)"
        stock
        ;;
    patched)
        if ! bash "$ROOT/scripts/build-pyfuse3.sh" "$VENV"; then
            echo "[setup] WARNING: could not build the patched libfuse/pyfuse3; installing the stock pyfuse3:" \
                "no kernel passthrough, no write views, lookups of a folder one at a time, no listings cached by the" \
                "kernel (the mount works without them)" >&2
            stock
        fi
        ;;
    *)
        echo "[setup] CLEARMLFS_PYFUSE3 must be 'patched' or 'stock', not '$MODE'" >&2
        exit 2
        ;;
esac
