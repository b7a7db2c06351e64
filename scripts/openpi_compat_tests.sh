#!/usr/bin/env bash
# openpi compatibility tests against openpi's own client (docs/openpi.md).
#
# openpi-client pins numpy < 2, so it cannot live in the main environment: this script creates (or reuses)
# the virtualenv .venv-openpi with numpy < 2, openpi-client from the package index and this package
# (editable, with its test extra), then runs tests/test_openpi_compat.py there. Non-interactive; exits
# non-zero when the environment cannot be built or a test fails.
#
#   scripts/openpi_compat_tests.sh [pytest args...]
#   PYTHON=python3.11 scripts/openpi_compat_tests.sh     # interpreter for the virtualenv (3.10 to 3.12)
#   OPENPI_VENV=/tmp/venv scripts/openpi_compat_tests.sh # somewhere else than .venv-openpi
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${OPENPI_VENV:-.venv-openpi}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1

# numpy < 2 has wheels for CPython 3.9 to 3.12 only.
pick_python() {
    local candidates=("${PYTHON:-}" python3.12 python3.11 python3.10 python3 python)
    for py in "${candidates[@]}"; do
        [ -n "$py" ] || continue
        command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

# Rebuild when pyproject.toml changes (new dependencies); otherwise reuse what is there.
stamp="$(cat pyproject.toml "$0" | cksum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.pi0remote-stamp" 2>/dev/null)" != "$stamp" ] \
    || ! "$VENV/bin/python" -c 'import numpy, openpi_client.websocket_client_policy, pi0remote, pytest' 2>/dev/null; then
    if [ ! -x "$VENV/bin/python" ]; then
        py="$(pick_python)" || { echo "openpi_compat_tests: need Python 3.10-3.12 (numpy < 2); set PYTHON=" >&2; exit 2; }
        echo "openpi_compat_tests: creating $VENV with $("$py" --version 2>&1)"
        "$py" -m venv "$VENV"
    fi
    echo "openpi_compat_tests: installing numpy<2, openpi-client and pi0remote[test] into $VENV"
    "$VENV/bin/python" -m pip install --quiet "numpy<2" openpi-client -e ".[test]"
    echo "$stamp" > "$VENV/.pi0remote-stamp"
fi

# The openpi-client tests skip when it is missing; here it must be present.
"$VENV/bin/python" - <<'PY'
import numpy, openpi_client, websockets
from openpi_client import websocket_client_policy  # noqa: F401
print(f"openpi_compat_tests: numpy {numpy.__version__}, openpi-client {openpi_client.__version__}, websockets {websockets.__version__}")
PY

exec "$VENV/bin/python" -m pytest tests/test_openpi_compat.py -p no:cacheprovider "$@"
