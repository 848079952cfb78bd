#!/usr/bin/env bash
# Install the peers that benchmarks/accuracy.py compares against:
#   * ANTsPy in its own venv (antspyx pins numpy < 2.4, the project's venv may not);
#   * elastix/transformix and GNU time from Debian.
# Environment: ANTS_VENV (default /work/bench/ants-venv), PYTHON (default python3),
# SKIP_APT=1 to leave the system packages alone.
set -euo pipefail

ANTS_VENV="${ANTS_VENV:-/work/bench/ants-venv}"
PYTHON="${PYTHON:-python3}"

if [[ "${SKIP_APT:-0}" != 1 ]]; then
    SUDO=""
    if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends elastix time
fi

if [[ ! -x "$ANTS_VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$ANTS_VENV"
fi
"$ANTS_VENV/bin/python" -m pip install --upgrade pip
"$ANTS_VENV/bin/python" -m pip install antspyx nibabel

echo "--- installed"
"$ANTS_VENV/bin/python" -c "import ants, nibabel; print('antspyx', ants.__version__)"
command -v elastix transformix || echo "elastix not on PATH"
elastix --version || true
