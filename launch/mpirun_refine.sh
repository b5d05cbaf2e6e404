#!/usr/bin/env bash
# Run `mpirefine refine` on N MPI ranks of this machine (one rank per GPU is best).
#
#   launch/mpirun_refine.sh -n 4 [--dry-run] [mpirefine refine arguments...]
#
# Each rank gets cores/N BLAS/OpenMP threads. The launcher is, in order: $MPIEXEC;
# the mpiexec installed beside mpirefine (the mpich wheel's, which matches the MPI
# that the pip-installed mpi4py links); mpirun or mpiexec from PATH (a site MPI, for
# an mpi4py built against it). mpirefine itself is $MPIREFINE, else the one in
# $MPIREFINE_VENV or <repo>/.venv, else from PATH.
# --dry-run prints the environment and command instead of running them. The wrapper's
# options (-n, --dry-run, --help) may stand anywhere; all other words go to refine.
set -euo pipefail

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
}
die() { echo "mpirun_refine.sh: error: $*" >&2; exit 2; }

ranks="" dry_run=0 refine_args=()
while (( $# > 0 )); do
    case "$1" in
        -n|-np|--ranks) (( $# >= 2 )) || die "$1 needs a number of ranks"; ranks="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage ;;
        *) refine_args+=("$1"); shift ;;
    esac
done
[[ -n "$ranks" ]] || die "give the number of ranks with -n N (one per GPU)"
[[ "$ranks" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$ranks'"
if (( ranks > 1 && ranks % 2 == 1 )); then
    echo "mpirun_refine.sh: note: with $ranks ranks half A's group has one rank more" \
         "than half B's; an even count balances the two half sets" >&2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_bin="${MPIREFINE_VENV:-$repo/.venv}/bin"
mpirefine="${MPIREFINE:-}"
if [[ -z "$mpirefine" ]]; then
    if [[ -x "$venv_bin/mpirefine" ]]; then mpirefine="$venv_bin/mpirefine"
    elif command -v mpirefine >/dev/null 2>&1; then mpirefine="$(command -v mpirefine)"
    else die "mpirefine is not installed: run launch/run_tests.sh or 'pip install -e .'"
    fi
fi
launcher="${MPIEXEC:-}"
if [[ -z "$launcher" ]]; then
    beside="$(dirname "$mpirefine")"
    if [[ -x "$beside/mpiexec" ]]; then launcher="$beside/mpiexec"
    elif command -v mpirun >/dev/null 2>&1; then launcher="$(command -v mpirun)"
    elif command -v mpiexec >/dev/null 2>&1; then launcher="$(command -v mpiexec)"
    else die "no MPI launcher found: install mpirefine (brings mpich) or load your site's MPI"
    fi
fi

cores="$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null || echo 1)"
threads=$(( cores / ranks ))
(( threads >= 1 )) || threads=1
thread_env=(OMP_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads")

command=("$launcher" -n "$ranks")
# Open MPI's mpirun forwards environment variables to remote nodes only when asked.
if "$launcher" --version 2>/dev/null | grep -qi "open mpi"; then
    command+=(-x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS -x MKL_NUM_THREADS)
fi
command+=("$mpirefine" refine ${refine_args[@]+"${refine_args[@]}"})

if (( dry_run )); then
    echo "${thread_env[*]}"
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
export "${thread_env[@]}"
exec "${command[@]}"
