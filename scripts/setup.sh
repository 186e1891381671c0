#!/usr/bin/env bash
# Installs everything the project and its tests need on a fresh Debian machine (run as root).
# Idempotent: a second run only checks and exits quickly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive

log() { echo "[setup] $*"; }

# --- system packages ---------------------------------------------------------------------------
# pyfuse3 builds from source: it needs libfuse3 headers, pkg-config, a C compiler and Python headers.
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config attr gcc python3-dev python3-venv ca-certificates)
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
