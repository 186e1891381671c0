#!/usr/bin/env bash
# Installs everything the project and its tests need on a fresh Debian machine (run as root).
# Idempotent: a second run only checks and exits quickly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive

log() { echo "[setup] $*"; }

# --- system packages ---------------------------------------------------------------------------
# pyfuse3 builds from source: it needs libfuse3 headers, pkg-config, a C compiler and Python headers; `patch`
# and `curl` build the libfuse below.
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config attr gcc python3-dev python3-venv ca-certificates patch curl)
command -v node >/dev/null 2>&1 || APT_PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    # "install ok installed" is the only status meaning the package is really there (not "rc" etc.).
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
else
    log "system packages present"
fi

# --- Python virtualenv ---------------------------------------------------------------------------
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
# --- pyfuse3 with FUSE passthrough --------------------------------------------------------------
# Kernel passthrough (Linux >= 6.9) lets the kernel read a cached file itself, at the speed of a local
# file; it needs libfuse >= 3.16, newer than Debian 12's 3.14, and two things pyfuse3 3.5 does not pass
# on (scripts/pyfuse3-passthrough.patch). So: Debian 13's libfuse source (checked against the hash in
# its .dsc), built into the venv, and pyfuse3 built against it. Without passthrough the mount works as
# before, through the FUSE page cache. A second patch (scripts/pyfuse3-write-views.patch) hands write
# handlers a view of libfuse's buffer instead of a copy of each write.
PYFUSE3_PATCHES=(scripts/pyfuse3-passthrough.patch scripts/pyfuse3-write-views.patch)
LIBFUSE_VERSION=3.17.2
LIBFUSE_SHA256=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
LIBFUSE_URL="https://deb.debian.org/debian/pool/main/f/fuse3/fuse3_${LIBFUSE_VERSION}.orig.tar.gz"
PYFUSE3_VERSION=3.5.0
LIBFUSE_PREFIX="$VENV/libfuse-$LIBFUSE_VERSION"
PYFUSE3_STAMP="$VENV/.pyfuse3-passthrough-stamp"
pyfuse3_want="$(cat "${PYFUSE3_PATCHES[@]}" <(echo "$LIBFUSE_VERSION $PYFUSE3_VERSION") | sha256sum | cut -d' ' -f1)"
build_pyfuse3() {
    local work="$ROOT/.tools/build"
    rm -rf "$work" && mkdir -p "$work"
    log "libfuse $LIBFUSE_VERSION from $LIBFUSE_URL"
    curl -fsSL --retry 3 -o "$work/libfuse.tar.gz" "$LIBFUSE_URL"
    echo "$LIBFUSE_SHA256  $work/libfuse.tar.gz" | sha256sum -c --quiet -
    tar xzf "$work/libfuse.tar.gz" -C "$work"
    python3 -m venv "$work/tools"
    "$work/tools/bin/python" -m pip install -q meson ninja </dev/null
    (
        cd "$work/fuse-$LIBFUSE_VERSION"
        PATH="$work/tools/bin:$PATH" meson setup build --prefix="$LIBFUSE_PREFIX" --libdir=lib \
            -Dbuildtype=release -Dutils=false -Dexamples=false -Dtests=false >"$work/meson.log"
        PATH="$work/tools/bin:$PATH" ninja -C build install >"$work/ninja.log"
    )
    log "pyfuse3 $PYFUSE3_VERSION, patched (${PYFUSE3_PATCHES[*]}), against it"
    "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "pyfuse3==$PYFUSE3_VERSION" -d "$work" </dev/null
    tar xzf "$work/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$work"
    (
        cd "$work/pyfuse3-$PYFUSE3_VERSION"
        for p in "${PYFUSE3_PATCHES[@]}"; do patch -p1 -s <"$ROOT/$p"; done
        rm -f src/pyfuse3/__init__.c  # generated from the unpatched .pyx: Cython makes it again
    )
    PKG_CONFIG_PATH="$LIBFUSE_PREFIX/lib/pkgconfig" LDFLAGS="-Wl,-rpath,$LIBFUSE_PREFIX/lib" \
        "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$work/pyfuse3-$PYFUSE3_VERSION" </dev/null
    rm -rf "$work"
}
if [ ! -f "$PYFUSE3_STAMP" ] || [ "$(cat "$PYFUSE3_STAMP")" != "$pyfuse3_want" ] \
    || ! "$VENV/bin/python" -c "import pyfuse3; pyfuse3.session_fd_number; pyfuse3.Operations.write_views" 2>/dev/null; then
    build_pyfuse3
    echo "$pyfuse3_want" >"$PYFUSE3_STAMP"
else
    log "pyfuse3 with passthrough present"
fi

# Re-install only when pyproject.toml changed: the stamp holds its hash.
STAMP="$VENV/.clearmlfs-setup-stamp"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    log "pip install -e '.[test]'"
    "$VENV/bin/python" -m pip install -q --upgrade pip </dev/null
    "$VENV/bin/python" -m pip install -q -e '.[test]' </dev/null
    echo "$want" >"$STAMP"
else
    log "python packages up to date"
fi

# --- Azurite (Azure Blob emulator) in a project-local folder ------------------------------------
AZURITE_BIN="$ROOT/.tools/azurite/node_modules/.bin/azurite-blob"
if [ ! -x "$AZURITE_BIN" ]; then
    log "npm install azurite@3 into .tools/azurite"
    mkdir -p "$ROOT/.tools/azurite"
    npm install --prefix "$ROOT/.tools/azurite" --no-audit --no-fund --loglevel=error azurite@3 </dev/null
else
    log "azurite present"
fi

log "done"
