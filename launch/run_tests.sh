#!/usr/bin/env bash
# Run the whole mpirefine test suite on a machine that has only Python >= 3.11:
# make a virtual environment if there is none, install mpirefine with its test extra
# (this brings the mpich wheel, so MPI needs nothing from the system), then run
#   (0) the linter:                          ruff check .
#   (a) the serial tests:                    python -m pytest -q -m 'not mpi' tests
#   (b) the MPI tests on 2 ranks:  mpiexec -n 2 python -m pytest -q --with-mpi -m mpi tests
#   (c) the GPU path on the CuPy stand-in of tests/gpu_standin (NumPy behind CuPy's
#       rules, counting launches and copies), unless a real CuPy is installed: the
#       backend-parametrised tests with PYTHONPATH=tests/gpu_standin (serial, and MPI on
#       2 ranks), then tests/test_gpu_standin.py (the search and `refine --gpu` on 1 and
#       3 ranks against the NumPy array path, bit for bit, within per-particle budgets)
# Exits non-zero if any part fails ("no tests collected" counts as a failure).
#
# Environment: PYTHON (interpreter that makes the venv, default python3),
# MPIREFINE_VENV (venv directory, default <repo>/.venv), MPIEXEC (MPI launcher,
# default the venv's mpiexec), MPIREFINE_TEST_TIMEOUT (seconds for the MPI part, so a
# deadlocked collective fails the run instead of hanging it; default 1800).
# Extra arguments go to both pytest runs (e.g. -x, -k name).
#
# Other scripts source this file for ensure_venv; sourcing runs no tests.
set -euo pipefail

MPIREFINE_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ensure_venv: create/refresh the venv; sets VENV_BIN, VENV_PYTHON and VENV_MPIEXEC.
ensure_venv() {
    local venv="${MPIREFINE_VENV:-$MPIREFINE_REPO/.venv}"
    local python="${PYTHON:-python3}"
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "== creating virtual environment $venv (with $python)"
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
            echo "error: mpirefine needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
            return 1
        }
        "$python" -m venv "$venv"
    fi
    VENV_BIN="$venv/bin"
    VENV_PYTHON="$VENV_BIN/python"
    # Reinstall only when pyproject.toml changed since the last install: an editable
    # install picks up source edits by itself, and skipping pip keeps reruns offline.
    local stamp="$venv/.mpirefine-installed"
    if [[ ! -f "$stamp" || "$MPIREFINE_REPO/pyproject.toml" -nt "$stamp" ]]; then
        echo "== installing mpirefine[test] into $venv"
        "$VENV_PYTHON" -m pip install --quiet -e "$MPIREFINE_REPO[test]"
        touch "$stamp"
    fi
    # The mpiexec beside the venv's python (the mpich wheel's) matches the MPI that
    # mpi4py links; a site-built mpi4py uses the site's mpiexec from PATH.
    VENV_MPIEXEC="${MPIEXEC:-}"
    if [[ -z "$VENV_MPIEXEC" ]]; then
        if [[ -x "$VENV_BIN/mpiexec" ]]; then VENV_MPIEXEC="$VENV_BIN/mpiexec"; else VENV_MPIEXEC=mpiexec; fi
    fi
}

run_tests() {
    ensure_venv
    cd "$MPIREFINE_REPO"
    local timeout_cmd=()
    if command -v timeout >/dev/null 2>&1; then
        timeout_cmd=(timeout "${MPIREFINE_TEST_TIMEOUT:-1800}")
    fi

    echo "== ruff check (lint)"
    local lint_status=0
    "$VENV_PYTHON" -m ruff check --no-cache . || lint_status=$?

    echo "== serial tests"
    local serial_status=0
    # -rs: every skipped test is listed with its reason; the MPI tests run below
    # (tests/test_gpu_standin.py runs in the stand-in step below)
    "$VENV_PYTHON" -m pytest -q -rs -m "not mpi" --ignore=tests/test_gpu_standin.py tests "$@" \
        || serial_status=$?

    echo "== MPI tests on 2 ranks ($VENV_MPIEXEC)"
    local mpi_status=0
    # One BLAS thread per rank; no shared .pytest_cache written by two ranks at once.
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        ${timeout_cmd[@]+"${timeout_cmd[@]}"} "$VENV_MPIEXEC" -n 2 "$VENV_PYTHON" -m pytest -q -rs -p no:cacheprovider \
        --with-mpi -m mpi tests "$@" || mpi_status=$?

    local standin_status=0
    run_standin_step "$@" || standin_status=$?

    echo "== lint: exit $lint_status; serial tests: exit $serial_status; MPI tests: exit $mpi_status;" \
         "stand-in step: exit $standin_status"
    if (( lint_status != 0 || serial_status != 0 || mpi_status != 0 || standin_status != 0 )); then
        return 1
    fi
    echo "== all tests passed"
}

# (c) The GPU path without a GPU: the CuPy stand-in of tests/gpu_standin.  Never in
# place of a real CuPy: with one installed, the step is skipped (the tests above ran
# the cupy backend wherever a GPU works; benchmarks/gpu_check.sh is the GPU node's check).
run_standin_step() {
    echo "== GPU path on the CuPy stand-in (tests/gpu_standin)"
    if "$VENV_PYTHON" -c 'import importlib.util as u, sys; s = u.find_spec("cupy")
sys.exit(s is None or "gpu_standin" in (s.origin or ""))' 2>/dev/null; then
        echo "== a real CuPy is installed: the stand-in step is skipped (the stand-in never replaces it)"
        return 0
    fi
    local started=$SECONDS status=0 timeout_cmd=()
    if command -v timeout >/dev/null 2>&1; then
        timeout_cmd=(timeout "${MPIREFINE_TEST_TIMEOUT:-1800}")
    fi
    local standin_path="$MPIREFINE_REPO/tests/gpu_standin${PYTHONPATH:+:$PYTHONPATH}"
    # conftest.py's gpu_available() finds the stand-in, so the xp fixture adds "cupy"
    echo "== backend-parametrised tests on the stand-in (serial)"
    PYTHONPATH="$standin_path" OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        "$VENV_PYTHON" -m pytest -q -rs -p no:cacheprovider -m "not mpi" -k cupy \
        --ignore=tests/test_gpu_standin.py tests "$@" || status=$?
    echo "== backend-parametrised tests on the stand-in (MPI, 2 ranks)"
    PYTHONPATH="$standin_path" OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        ${timeout_cmd[@]+"${timeout_cmd[@]}"} "$VENV_MPIEXEC" -n 2 "$VENV_PYTHON" -m pytest -q -rs \
        -p no:cacheprovider --with-mpi -m mpi -k cupy tests "$@" || status=$?
    echo "== search and refine --gpu on the stand-in = the NumPy array path (tests/test_gpu_standin.py)"
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        ${timeout_cmd[@]+"${timeout_cmd[@]}"} "$VENV_PYTHON" -m pytest -q -rs -p no:cacheprovider \
        tests/test_gpu_standin.py "$@" || status=$?
    echo "== stand-in step: $((SECONDS - started)) s"
    return "$status"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    run_tests "$@"
fi
