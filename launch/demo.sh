#!/usr/bin/env bash
# The mpirefine demo on a fresh machine with only Python >= 3.11: set up the venv as
# launch/run_tests.sh does, then run the demo on 2 MPI ranks (one per half set):
#   mpiexec -n 2 mpirefine demo --out demo_out [your arguments]
# Each rank gets one BLAS thread. Environment: MPIREFINE_DEMO_RANKS (default 2),
# MPIEXEC (launcher, default the venv's mpiexec), PYTHON and MPIREFINE_VENV as for
# run_tests.sh. Arguments are passed to `mpirefine demo` (see `mpirefine demo --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/run_tests.sh"
ensure_venv
cd "$MPIREFINE_REPO"

if ! "$VENV_PYTHON" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("mpirefine.cli.demo") is None)'; then
    echo "error: this checkout has no 'mpirefine demo' subcommand yet (mpirefine/cli/demo.py)" >&2
    exit 1
fi

export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
set -x
"$VENV_MPIEXEC" -n "${MPIREFINE_DEMO_RANKS:-2}" "$VENV_BIN/mpirefine" demo --out demo_out "$@"
