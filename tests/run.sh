#!/usr/bin/env bash
# The test command of the README: sets up .venv on a fresh machine, then runs the suite.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k router`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source launchers/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # several ranks share 2 cores in tests
exec python -m pytest tests -q -ra --timeout=600 "$@"
