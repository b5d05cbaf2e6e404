"""What the launch environment says about this rank, read without MPI: ranks on the
node and BLAS/OpenMP threads per rank (:func:`limit_threads`, called before NumPy
loads), the world rank and size a launcher promised (:func:`launch_problem` refuses a
launch whose N processes each run alone), durations from environment variables, and
how work is cut into contiguous shares (:func:`shard_bounds`).

mpi4py is never imported here (only :mod:`mpirefine.parallel` does); nor is NumPy.
"""

from __future__ import annotations

import math
import os
import sys

from mpirefine.errors import InputError

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Ranks on this node, as each launcher advertises it: MPICH/hydra, Open MPI, SLURM.
_LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                         "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
# Set per process by launchers (hydra/PMI, Open MPI, srun steps): read without MPI_Init.
_WORLD_VARIABLES = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"))


def _leading_int(text: str | None) -> int | None:
    """The integer that ``text`` starts with (SLURM writes counts like "4(x2)")."""
    text = (text or "").strip()
    digits = text[: len(text) - len(text.lstrip("0123456789"))]
    return int(digits) if digits else None


def local_ranks_from_environment(environ=None) -> int:
    """Number of ranks the launcher started on this node (1 when not under a launcher)."""
    env = os.environ if environ is None else environ
    counts = (_leading_int(env.get(name)) for name in _LOCAL_SIZE_VARIABLES)
    return next((n for n in counts if n), 1)


def limit_threads(environ=None) -> int | None:
    """Give each rank an equal share of this node's cores for BLAS/OpenMP threads.

    Call before numpy is imported. If OMP_NUM_THREADS is set, does nothing and returns
    None; else sets OMP/OPENBLAS/MKL_NUM_THREADS (unless set) and returns the count:
    SLURM_CPUS_PER_TASK when given, else max(1, cpu_count // ranks on this node),
    capped by the CPUs this process may run on (a launcher may have bound it).
    """
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return None
    threads = _leading_int(env.get("SLURM_CPUS_PER_TASK")) or max(
        1, (os.cpu_count() or 1) // local_ranks_from_environment(env))
    if hasattr(os, "sched_getaffinity"):
        threads = max(1, min(threads, len(os.sched_getaffinity(0))))
    for name in THREAD_VARIABLES:
        env.setdefault(name, str(threads))
    return threads


def world_rank_size() -> tuple[int, int]:
    """(rank, size) of COMM_WORLD: from MPI if initialised, else from launcher variables.

    Never initialises MPI, so error handling can ask before deciding how to exit.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()
    for rank_name, size_name in _WORLD_VARIABLES:
        size = _leading_int(os.environ.get(size_name))
        if size:
            return _leading_int(os.environ.get(rank_name)) or 0, size
    return 0, 1


def seconds_from_environment(name: str, default: float | None, environ=None) -> float | None:
    """A duration in seconds from environment variable ``name``: ``default`` when unset
    or empty; None (turned off) for 0, "off" or "none"; InputError for anything else
    that is not a positive number."""
    env = os.environ if environ is None else environ
    text = (env.get(name) or "").strip().lower()
    if not text:
        return default
    if text in ("0", "0.0", "off", "none", "no"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise InputError(f"{name}={env.get(name)!r}: give a number of seconds, or 0 to turn it off")
    return value


# ---- launch check ------------------------------------------------------------------

ALLOW_SINGLETON_VARIABLE = "MPIREFINE_ALLOW_SINGLETON"
# SLURM_STEP_ID of steps that srun did not launch: the batch script, the extern and
# interactive steps (numbers near 2**32 in slurm.h, or their names).
_SLURM_SPECIAL_STEP = 0xFFFFFFF0


def promised_world_size(environ=None) -> tuple[int, str] | None:
    """(ranks, variable): the size of COMM_WORLD that the launcher's environment
    promises this process, or None when no launcher says.

    The variables of the launcher that started the process come first: PMI_SIZE
    (MPICH's hydra, srun --mpi=pmi2, Intel MPI), OMPI_COMM_WORLD_SIZE (Open MPI);
    then SLURM's step size, but only inside an srun step (SLURM_STEP_ID is a step
    number), since a batch script run by sbatch without srun also has SLURM_NTASKS;
    then the launcher's count of ranks on this node (MPI_LOCALNRANKS,
    OMPI_COMM_WORLD_LOCAL_SIZE), a lower bound.
    """
    env = os.environ if environ is None else environ
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if (size := _leading_int(env.get(name))) is not None:
            return size, name
    step = (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "").strip()
    if step.isdigit() and int(step) < _SLURM_SPECIAL_STEP:
        for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"):
            if (size := _leading_int(env.get(name))) is not None:
                return size, name
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if (size := _leading_int(env.get(name))) is not None:
            return size, name
    return None


def launch_problem(mpi_size: int, environ=None, library: str = "") -> str | None:
    """Why this launch would run the whole job once per process, in one line, or None.

    That happens when the launcher promises several ranks (:func:`promised_world_size`)
    but MPI sees a job of one: mpi4py was built against another MPI than the
    launcher's, or srun did not give the MPI its process-management interface.
    MPIREFINE_ALLOW_SINGLETON=1 accepts it (independent one-rank jobs on purpose).
    """
    env = os.environ if environ is None else environ
    if mpi_size != 1 or env.get(ALLOW_SINGLETON_VARIABLE, "").strip().lower() in (
            "1", "yes", "true"):
        return None
    promise = promised_world_size(env)
    if promise is None or promise[0] <= 1:
        return None
    size, name = promise
    mpi = f" ({' '.join(library.split())})" if library else ""
    return (f"the launcher started this process as one of {size} ranks ({name}={env[name]}) "
            f"but MPI{mpi} sees a job of 1 rank, so each process would run the whole job "
            "alone. mpi4py must use the launcher's MPI: start mpirefine with the mpiexec of "
            "the MPI that mpi4py was built with (the venv's own with the mpich wheel); under "
            "SLURM give srun the --mpi=pmi2 or --mpi=pmix that it needs (srun --mpi=list), or "
            "build mpi4py against the site's MPI (docs/install.md). "
            f"{ALLOW_SINGLETON_VARIABLE}=1 accepts independent one-rank jobs")


def shard_bounds(n_items: int, index: int, count: int) -> slice:
    """Part ``index`` of [0, n_items) cut into ``count`` contiguous parts whose sizes
    differ by at most one (the first ``n_items % count`` parts are the larger)."""
    if not 0 <= index < count:
        raise ValueError(f"part {index} is not in 0..{count - 1}")
    base, extra = divmod(int(n_items), count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))
