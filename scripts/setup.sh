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
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config attr gcc python3-dev python3-venv ca-certificates patch curl rsync)
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
# --- pyfuse3 ------------------------------------------------------------------------------------
# Kernel passthrough (Linux >= 6.9) and write views need libfuse >= 3.16 (Debian 12 has 3.14) and a patched
# pyfuse3, which scripts/pyfuse3.sh builds into the venv (docs/pyfuse3-patches.md); if it cannot, or
# CLEARMLFS_PYFUSE3=stock asks for it, it installs the registry's pyfuse3 instead. The choice sticks (a later
# `make test` keeps it) until CLEARMLFS_PYFUSE3=patched or =stock is given again.
PYFUSE3_STAMP="$VENV/.pyfuse3-stamp"
previous_mode="$(cut -d' ' -f1 "$PYFUSE3_STAMP" 2>/dev/null || true)"
export CLEARMLFS_PYFUSE3="${CLEARMLFS_PYFUSE3:-${previous_mode:-patched}}"
pyfuse3_want="$CLEARMLFS_PYFUSE3 $(cat scripts/pyfuse3.sh scripts/build-pyfuse3.sh scripts/pyfuse3-*.patch \
    | sha256sum | cut -d' ' -f1)"
if [ ! -f "$PYFUSE3_STAMP" ] || [ "$(cat "$PYFUSE3_STAMP")" != "$pyfuse3_want" ] \
    || ! "$VENV/bin/python" -c "import pyfuse3" 2>/dev/null; then
    bash scripts/pyfuse3.sh "$VENV"
    echo "$pyfuse3_want" >"$PYFUSE3_STAMP"
else
    log "pyfuse3 present ($CLEARMLFS_PYFUSE3)"
fi

# Re-install only when pyproject.toml or constraints.txt changed: the stamp holds their hash. The constraints
# are the versions the suite last passed with.
STAMP="$VENV/.clearmlfs-setup-stamp"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    log "pip install -e '.[test]'"
    "$VENV/bin/python" -m pip install -q --upgrade pip </dev/null
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[test]' </dev/null
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
