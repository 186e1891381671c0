#!/usr/bin/env bash
# Builds libfuse (>= 3.16, for kernel passthrough) into VENV/libfuse-VERSION and pyfuse3 3.5.0 against it, with
# the project's patches (docs/pyfuse3-patches.md). Run by scripts/setup.sh as a process of its own: any
# failure exits non-zero, and setup.sh then installs the stock pyfuse3 instead.
#   usage: build-pyfuse3.sh VENV
# Environment: LIBFUSE_SOURCES="VERSION=SHA256 ..." (tried in order), LIBFUSE_POOL (the URL they are under),
# LIBFUSE_TARBALL (a local copy of one of them: no download), BUILD_DIR (scratch space, removed at the end).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$1"
PYFUSE3_VERSION=3.5.0
PATCHES=(scripts/pyfuse3-passthrough.patch scripts/pyfuse3-write-views.patch scripts/pyfuse3-parallel-dirops.patch
         scripts/pyfuse3-readdir-cache.patch)
# Debian's pool keeps only the versions its current releases use: each known version is tried, and its
# tarball must match the SHA-256 Debian's .dsc gives for it.
LIBFUSE_SOURCES="${LIBFUSE_SOURCES:-3.17.2=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f}"
LIBFUSE_POOL="${LIBFUSE_POOL:-https://deb.debian.org/debian/pool/main/f/fuse3}"

log() { echo "[build-pyfuse3] $*"; }

work="${BUILD_DIR:-$ROOT/.tools/build}"
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

version=""
for source in $LIBFUSE_SOURCES; do
    candidate="${source%%=*}" sha="${source#*=}"
    if [ -n "${LIBFUSE_TARBALL:-}" ]; then
        cp "$LIBFUSE_TARBALL" "$work/libfuse.tar.gz"
    elif ! curl -fsSL --retry 2 --connect-timeout 20 --max-time 300 -o "$work/libfuse.tar.gz" \
        "$LIBFUSE_POOL/fuse3_${candidate}.orig.tar.gz"; then
        log "libfuse $candidate: not downloadable from $LIBFUSE_POOL"
        continue
    fi
    if echo "$sha  $work/libfuse.tar.gz" | sha256sum -c --quiet - 2>/dev/null; then
        version="$candidate"
        break
    fi
    log "libfuse $candidate: SHA-256 mismatch, not used"
done
[ -n "$version" ] || { log "no libfuse source could be had"; exit 1; }

prefix="$VENV/libfuse-$version"
log "libfuse $version into $prefix"
tar xzf "$work/libfuse.tar.gz" -C "$work"
python3 -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q meson ninja </dev/null
(
    cd "$work/fuse-$version"
    PATH="$work/tools/bin:$PATH" meson setup build --prefix="$prefix" --libdir=lib \
        -Dbuildtype=release -Dutils=false -Dexamples=false -Dtests=false >"$work/meson.log"
    PATH="$work/tools/bin:$PATH" ninja -C build install >"$work/ninja.log"
)
log "pyfuse3 $PYFUSE3_VERSION, patched (${PATCHES[*]}), against it"
"$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "pyfuse3==$PYFUSE3_VERSION" -d "$work" </dev/null
tar xzf "$work/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$work"
(
    cd "$work/pyfuse3-$PYFUSE3_VERSION"
    for p in "${PATCHES[@]}"; do patch -p1 -s <"$ROOT/$p"; done
    rm -f src/pyfuse3/__init__.c  # generated from the unpatched .pyx: Cython makes it again
)
PKG_CONFIG_PATH="$prefix/lib/pkgconfig" LDFLAGS="-Wl,-rpath,$prefix/lib" \
    "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$work/pyfuse3-$PYFUSE3_VERSION" </dev/null
# (not imported: trio, which it needs, is installed later)
grep -q session_fd_number "$VENV"/lib/python3*/site-packages/pyfuse3/__init__.pyx
