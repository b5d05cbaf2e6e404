"""The MPI layout of a refinement: world, half-set groups, sharding, collectives, logging.

This is the only module that imports mpi4py; math modules never see a communicator.
Even world ranks align half A (half 0), odd ones half B (half 1); world ranks 0 and 1
are the groups' roots, the "root pair" that reconstructs (docs/architecture.md §1). One rank
serves both halves in turn. The CLI calls :func:`limit_threads` before NumPy loads
(BLAS reads its thread count once), so numpy and mpi4py.MPI (whose import
initialises MPI) are imported only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback

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


def abort(message: str, code: int = 1, *, tag_rank: bool = True):
    """Print ``message`` to stderr and end the job with exit status ``code``.

    With more than one rank this is COMM_WORLD.Abort: the launcher kills every rank,
    so none hangs in a collective that the failed rank will never join. MPI is
    initialised here if it was not yet (a rank that dies before MPI_Init can leave the
    others waiting for it). With one rank: sys.exit(code).
    """
    rank, size = world_rank_size()
    if tag_rank and size > 1:
        message = f"[rank {rank} of {size}] {message}"
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    if size > 1:
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(code)
    sys.exit(code)


def run_guarded(fn, *args, command: str = "mpirefine", **kwargs) -> int:
    """Call ``fn(*args, **kwargs)`` and turn its failure into an exit status.

    Returns fn's integer result (None counts as 0). An :class:`InputError` prints
    ``<command>: error: <message>`` on one line and returns 2 (with several ranks:
    aborts the job with 2). Any other exception with several ranks prints
    ``mpirefine: rank R of N failed: <type>: <message>`` and the traceback, then aborts
    the job with 1; with one rank it propagates unchanged. Ctrl-C returns 130.
    """
    try:
        result = fn(*args, **kwargs)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except InputError as exc:
        line = f"{command}: error: {exc}"
        if world_rank_size()[1] > 1:
            abort(line, 2, tag_rank=False)
        print(line, file=sys.stderr, flush=True)
        return 2
    except Exception as exc:
        rank, size = world_rank_size()
        if size == 1:
            raise
        abort(f"mpirefine: rank {rank} of {size} failed: {type(exc).__name__}: {exc}\n"
              f"{traceback.format_exc()}", 1, tag_rank=False)
    return 0 if result is None else int(result)


_LOG_HANDLER_FLAG = "_mpirefine_handler"


def get_logger(name: str = "mpirefine", rank: int | None = None, level: int | None = None):
    """A logger that rank 0 uses for INFO to stdout and other ranks for warnings only.

    Rank 0 writes plain messages; other ranks write to stderr with a ``[rank R]``
    prefix so interleaved lines stay attributable. Calling it again reconfigures.
    """
    rank = world_rank_size()[0] if rank is None else rank
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if getattr(handler, _LOG_HANDLER_FLAG, False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s: %(message)s"))
    setattr(handler, _LOG_HANDLER_FLAG, True)
    logger.addHandler(handler)
    if level is None:
        level = logging.INFO if rank == 0 else logging.WARNING
    logger.setLevel(level)
    logger.propagate = False
    return logger


class Timer:
    """Per-category wall seconds of one rank: ``with timer("search"): ...``.

    A refinement uses search, backprojection, communication (MPI collectives, added by
    :class:`Parallel`) and idle (waiting at barriers); other names are accepted too.
    """

    CATEGORIES = ("search", "backprojection", "communication", "idle")

    def __init__(self):
        self.seconds: dict[str, float] = dict.fromkeys(self.CATEGORIES, 0.0)
        self.counts: dict[str, float] = {}

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] = self.seconds.get(category, 0.0) + seconds

    def count(self, name: str, amount: float) -> None:
        """Add to a work counter (e.g. the search's poses scored and GEMM FLOPs)."""
        self.counts[name] = self.counts.get(name, 0.0) + float(amount)

    @contextlib.contextmanager
    def __call__(self, category: str):
        start = time.perf_counter()
        try:
            yield self
        finally:
            self.add(category, time.perf_counter() - start)


def shard_bounds(n_items: int, index: int, count: int) -> slice:
    """Part ``index`` of [0, n_items) cut into ``count`` contiguous parts whose sizes
    differ by at most one (the first ``n_items % count`` parts are the larger)."""
    if not 0 <= index < count:
        raise ValueError(f"part {index} is not in 0..{count - 1}")
    base, extra = divmod(int(n_items), count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


def _check_half(half: int) -> None:
    if half not in (0, 1):
        raise ValueError(f"half must be 0 (A) or 1 (B), got {half!r}")


def _is_cupy(array) -> bool:
    return type(array).__module__.startswith("cupy")


def _require_contiguous(array) -> None:
    # Checked also where nothing is sent, so a strided view fails on one rank too.
    if not array.flags.c_contiguous:
        raise ValueError(f"collectives work in place on C-contiguous arrays; got strides "
                         f"{array.strides} for shape {array.shape}")


def cuda_aware_mpi(environ=None) -> bool:
    """Whether MPI can read and write GPU memory directly.

    MPIREFINE_CUDA_AWARE=1 or 0 decides; otherwise MPI itself is asked
    (MPIX_Query_cuda_support, mpi4py >= 4: ``MPI.Query_cuda_support()``), and the
    answer is no when it cannot say (the mpich wheel is not CUDA-aware).
    """
    env = os.environ if environ is None else environ
    forced = env.get("MPIREFINE_CUDA_AWARE", "").strip().lower()
    if forced in ("1", "yes", "true", "0", "no", "false"):
        return forced in ("1", "yes", "true")
    try:
        from mpi4py import MPI

        return bool(MPI.Query_cuda_support())
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def _host_buffer(array, cuda_aware: bool = False):
    """The memory MPI reads and writes for ``array``: NumPy arrays themselves; CuPy
    arrays themselves with a CUDA-aware MPI (after the stream is synchronised, since
    MPI does not know about it), else a host copy (two PCIe transfers per call)."""
    _require_contiguous(array)
    if _is_cupy(array):
        if cuda_aware:
            import cupy

            cupy.cuda.get_current_stream().synchronize()
            return array
        return array.get()
    return array


class Parallel:
    """World and half-set communicators of one job, with timed collectives.

    ``comm``: an mpi4py communicator, None for COMM_WORLD; construction is collective.
    ``halves_here``: the halves this rank serves: (rank % 2,), except (0, 1) with one
    rank and for the last rank of an odd-sized job, which serves both halves (see
    :meth:`shard`).  ``bytes_communicated``: payload bytes of this rank's array
    collectives (the array size per call; both directions for exchange_roots).
    ``comm_seconds``: wall seconds in MPI calls, host staging included. ``timer``:
    collectives add to its "communication" category, barriers to "idle".
    """

    def __init__(self, comm=None):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_root = self.rank == 0
        # With an odd number of ranks the last one (even, so in half A) also joins half
        # B: each group then has (size + 1) / 2 ranks and the work can be dealt so that
        # every rank, and so both groups, finish together.
        self.shared_rank = self.size - 1 if self.size % 2 == 1 and self.size > 1 else None
        self._members = {h: [r for r in range(self.size)
                             if r % 2 == h or r == self.shared_rank or self.size == 1]
                         for h in (0, 1)}
        if self.size == 1:
            self.halves_here = (0, 1)
            self._groups = {0: self.comm, 1: self.comm}  # a size-1 communicator serves both
        else:
            self.halves_here = tuple(h for h in (0, 1) if self.rank in self._members[h])
            self._groups = {}
            for half in (0, 1):  # Split is collective over all ranks; key=rank keeps the roots
                color = 0 if self.rank in self._members[half] else MPI.UNDEFINED
                group = self.comm.Split(color=color, key=self.rank)
                if group != MPI.COMM_NULL:
                    self._groups[half] = group
        self._node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.bytes_communicated = 0
        self.comm_seconds = 0.0
        self.timer = Timer()
        self.device_index: int | None = None
        self.cuda_aware = False      # set by select_device when the rank uses a GPU

    def half_comm(self, half: int):
        """The communicator of ``half``'s group; only ranks serving that half have it."""
        _check_half(half)
        if half not in self.halves_here:
            raise ValueError(f"rank {self.rank} serves half {self.halves_here[0]}, not {half}")
        return self._groups[half]

    def half_size(self, half: int) -> int:
        """Number of ranks in ``half``'s group (known on every rank)."""
        _check_half(half)
        return len(self._members[half])

    def half_root_world_rank(self, half: int) -> int:
        _check_half(half)
        return 0 if self.size == 1 else half

    def is_half_root(self, half: int) -> bool:
        return half in self.halves_here and self.rank == self.half_root_world_rank(half)

    def shard(self, n_items: int, half: int) -> slice:
        """This rank's contiguous share of [0, n_items) within ``half``'s group.

        Shares differ by at most one item, except that the shared rank of an odd-sized
        job takes half a share in each of its two halves, so that it does as much work
        as every other rank: with 3 ranks, ranks 0 and 1 take 2/3 of their half each
        and rank 2 the last third of both."""
        group = self.half_comm(half)
        index, count = group.Get_rank(), group.Get_size()
        if self.shared_rank is None:
            return shard_bounds(n_items, index, count)
        weights = [2] * (count - 1) + [1]  # the shared rank is last in both groups
        edges = [round(n_items * sum(weights[:i]) / sum(weights)) for i in range(count + 1)]
        return slice(edges[index], edges[index + 1])

    def local_rank(self) -> int:
        """Rank among the ranks sharing this node (picks the GPU)."""
        return self._node.Get_rank()

    def local_size(self) -> int:
        return self._node.Get_size()

    def select_device(self, prefer: str = "auto"):
        """numpy or cupy for this rank (``prefer``: "auto", "gpu" or "cpu", as in
        backend.choose_backend); with cupy, make GPU ``local_rank % n_gpus`` current."""
        from mpirefine import backend

        try:
            xp = backend.choose_backend(prefer)
        except RuntimeError as exc:  # --gpu without a usable GPU is a user error
            raise InputError(str(exc)) from exc
        if backend.backend_name(xp) == "cupy":
            n_gpus = xp.cuda.runtime.getDeviceCount()
            self.device_index = self.local_rank() % n_gpus
            xp.cuda.Device(self.device_index).use()
            self.cuda_aware = cuda_aware_mpi()
        return xp

    @contextlib.contextmanager
    def _timed(self, category: str = "communication"):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.comm_seconds += elapsed
            self.timer.add(category, elapsed)

    def _on_group(self, array, half: int, updated: str, call):
        """Run ``call(group, host_buffer, is_group_root)``; copy back where ``updated``
        ("root", "others" or "all") says the buffer changed."""
        group = self.half_comm(half)
        if group.Get_size() == 1:
            _require_contiguous(array)
            return array
        is_root = group.Get_rank() == 0
        with self._timed():
            host = _host_buffer(array, self.cuda_aware)
            call(group, host, is_root)
            if host is not array and (updated == "all" or (updated == "root") == is_root):
                array.set(host)
            self.bytes_communicated += host.nbytes
        return array

    def reduce_half(self, array, half: int):
        """Sum ``array`` over ``half``'s group onto its root, in place; returns ``array``.

        The sum is valid on the half root only (other ranks keep their contribution).
        """
        mpi = self._mpi
        return self._on_group(array, half, "root", lambda group, host, root: group.Reduce(
            mpi.IN_PLACE if root else host, host if root else None, op=mpi.SUM, root=0))

    def allreduce_half(self, array, half: int):
        """Sum ``array`` over ``half``'s group, in place on every rank of the group."""
        mpi = self._mpi
        return self._on_group(array, half, "all", lambda group, host, _root: group.Allreduce(
            mpi.IN_PLACE, host, op=mpi.SUM))

    def bcast_half(self, array, half: int):
        """Copy the half root's ``array`` into every group member's ``array`` (same shape)."""
        return self._on_group(array, half, "others",
                              lambda group, host, _root: group.Bcast(host, root=0))

    def exchange_roots(self, array_mine):
        """Swap same-shape, same-dtype arrays between world ranks 0 and 1 (the root
        pair); returns the other rank's. Not for one rank, which holds both halves."""
        if self.size == 1 or self.rank > 1:
            raise RuntimeError(f"exchange_roots is for world ranks 0 and 1 of a multi-rank "
                               f"job, not rank {self.rank} of {self.size}")
        import numpy as np

        other = 1 - self.rank
        with self._timed():
            send = _host_buffer(array_mine, self.cuda_aware)
            received = send.copy() if send is array_mine else np.empty_like(send)
            self.comm.Sendrecv(send, dest=other, sendtag=17, recvbuf=received,
                               source=other, recvtag=17)
            self.bytes_communicated += send.nbytes + received.nbytes
            if _is_cupy(array_mine) and not _is_cupy(received):
                import cupy

                received = cupy.asarray(received)
        return received

    def bcast_obj(self, obj, root: int = 0):
        with self._timed():
            return self.comm.bcast(obj, root=root)

    def gather_obj(self, obj, root: int = 0):
        """A list of every rank's ``obj`` on ``root`` (None elsewhere)."""
        with self._timed():
            return self.comm.gather(obj, root=root)

    def allgather_obj(self, obj) -> list:
        with self._timed():
            return self.comm.allgather(obj)

    def allreduce_obj(self, x, op: str = "sum"):
        """``x`` (a number or a NumPy array, sent pickled like the other ``*_obj``
        collectives) reduced over all ranks with op "sum", "max" or "min"."""
        ops = {"sum": self._mpi.SUM, "max": self._mpi.MAX, "min": self._mpi.MIN}
        if op not in ops:
            raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
        with self._timed():
            return self.comm.allreduce(x, op=ops[op])

    def barrier(self) -> None:
        """Wait for all ranks; the wait counts as "idle" (load imbalance)."""
        with self._timed("idle"):
            self.comm.Barrier()

    def gather_timings(self):
        """On rank 0, a list by rank of {"rank", "seconds" (per Timer category),
        "counts" (the Timer's work counters), "comm_seconds", "bytes_communicated"};
        None elsewhere."""
        record = {"rank": self.rank, "seconds": dict(self.timer.seconds),
                  "counts": dict(self.timer.counts),
                  "comm_seconds": self.comm_seconds,
                  "bytes_communicated": self.bytes_communicated}
        return self.gather_obj(record, root=0)
