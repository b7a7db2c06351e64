#!/usr/bin/env bash
# Installs pi0remote with every extra CI can have ([all] for users, [dev] for tests and lint), then runs the whole test suite.
# (README: "Run the tests".) pytest exit code 5 (no tests collected) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export MUJOCO_GL="${MUJOCO_GL:-egl}"
python -m pip install -q -e ".[all,dev]"
# openpi-client pins numpy<2, so its wire-compatibility tests run in their own virtualenv first.
if [ -x scripts/openpi_compat_tests.sh ] && [ "${PI0REMOTE_SKIP_OPENPI_ENV:-0}" != "1" ]; then
  bash scripts/openpi_compat_tests.sh
fi
status=0
python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "no tests were collected: failing" >&2
  exit 1
fi
exit "$status"
