"""The MPI layout of a refinement: world, half-set groups, sharding, collectives, logging.

This is the only module that imports mpi4py; math modules never see a communicator.
Even world ranks align half A (half 0), odd ones half B (half 1); world ranks 0 and 1
are the groups' roots, the "root pair" that reconstructs (docs/architecture.md §1). One rank
serves both halves in turn. The CLI calls :func:`limit_threads` before NumPy loads
(BLAS reads its thread count once), so numpy and mpi4py.MPI (whose import
initialises MPI) are imported only inside the functions that need them.

Never hang, never run twice (docs/parallel.md, "Failures"): :func:`run_guarded` turns
a failure, Ctrl-C or a closed output pipe on any rank into the end of every rank; a
thread acts on SIGINT and on a second SIGTERM even while the main thread waits inside
MPI; an optional collective watchdog (MPIREFINE_COLLECTIVE_TIMEOUT_S) names the ranks
that do not arrive; and a launch whose environment promises several ranks to an MPI
that sees one (N copies of the whole job) is refused.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import sys
import threading
import time
import traceback

from mpirefine.errors import InputError
from mpirefine.logs import Timer
from mpirefine.ranks import (
    _leading_int,
    launch_problem,
    seconds_from_environment,
    shard_bounds,
    world_rank_size,
)

# Exit statuses of the ends that mpirefine chooses itself (docs/parallel.md, "Failures").
EXIT_INPUT_ERROR = 2       # bad input or launch; one line on stderr
EXIT_PREEMPTED = 75        # refine stopped on SIGTERM after a complete checkpoint (EX_TEMPFAIL)
EXIT_WATCHDOG = 124        # a collective waited longer than MPIREFINE_COLLECTIVE_TIMEOUT_S
EXIT_INTERRUPTED = 130     # SIGINT (Ctrl-C), as a shell reports 128 + 2
EXIT_CLOSED_OUTPUT = 141   # standard output closed (`| head`), as a shell reports 128 + SIGPIPE
EXIT_TERMINATED = 143      # a second SIGTERM, or no stop within the grace period: 128 + 15


# Before MPI_Abort: time for the launcher to forward what this rank printed, which it
# may otherwise drop when it kills the job (seen with hydra on a loaded machine).
_ABORT_PAUSE_S = 0.3


def abort(message: str, code: int = 1, *, tag_rank: bool = True):
    """Print ``message`` to stderr and end the job with exit status ``code``.

    With more than one rank this is COMM_WORLD.Abort: the launcher kills every rank,
    so none hangs in a collective that the failed rank will never join. MPI is
    initialised here if it was not yet (a rank that dies before MPI_Init can leave the
    others waiting for it). With one rank: sys.exit(code) (os._exit outside the main
    thread, where sys.exit would end only that thread). An empty message prints nothing.
    """
    rank, size = world_rank_size()
    if tag_rank and size > 1 and message:
        message = f"[rank {rank} of {size}] {message}"
    with contextlib.suppress(Exception):  # a closed stdout must not stop the abort
        sys.stdout.flush()
    if message:
        print(message, file=sys.stderr, flush=True)
    if size > 1:
        from mpi4py import MPI

        time.sleep(_ABORT_PAUSE_S)
        MPI.COMM_WORLD.Abort(code)
    if threading.current_thread() is not threading.main_thread():
        os._exit(code)
    sys.exit(code)


def _abort_from_thread(message: str, code: int):
    """End the job from a helper thread: COMM_WORLD.Abort once MPI is up (every rank
    ends, one-rank jobs too), else os._exit. Never returns."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        print(message, file=sys.stderr, flush=True)
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        time.sleep(_ABORT_PAUSE_S)
        mpi.COMM_WORLD.Abort(code)
    os._exit(code)


def discard_stdout() -> None:
    """Point standard output at /dev/null after its reader went away (``| head``), so
    that no later write or Python's final flush raises BrokenPipeError again."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def run_guarded(fn, *args, command: str = "mpirefine", **kwargs) -> int:
    """Call ``fn(*args, **kwargs)`` and turn its failure into an exit status.

    Returns fn's integer result (None counts as 0). An :class:`InputError` prints
    ``<command>: error: <message>`` on one line and returns 2 (with several ranks:
    aborts the job with 2). Any other exception with several ranks prints
    ``mpirefine: rank R of N failed: <type>: <message>`` and the traceback, then aborts
    the job with 1; with one rank it propagates unchanged. Ctrl-C returns 130 (with
    several ranks: aborts the job with 130); a closed standard output (BrokenPipeError)
    ends quietly with 141. While ``fn`` runs, a thread watches SIGINT and SIGTERM so
    that they act even while the main thread waits inside MPI (see :func:`defer_sigterm`).
    """
    watching = _SIGNALS.start()
    try:
        result = fn(*args, **kwargs)
    except KeyboardInterrupt:
        line = f"{command}: interrupted"
        if world_rank_size()[1] > 1:
            abort(f"{line} (SIGINT); stopping every rank", EXIT_INTERRUPTED)
        print(line, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away: nobody to tell
        discard_stdout()
        if world_rank_size()[1] > 1:
            abort("", EXIT_CLOSED_OUTPUT)
        return EXIT_CLOSED_OUTPUT
    except InputError as exc:
        line = f"{command}: error: {exc}"
        if world_rank_size()[1] > 1:
            abort(line, EXIT_INPUT_ERROR, tag_rank=False)
        print(line, file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    except Exception as exc:
        rank, size = world_rank_size()
        if size == 1:
            raise
        abort(f"mpirefine: rank {rank} of {size} failed: {type(exc).__name__}: {exc}\n"
              f"{traceback.format_exc()}", 1, tag_rank=False)
    finally:
        if watching:
            _SIGNALS.stop()
    return 0 if result is None else int(result)


# ---- signals -----------------------------------------------------------------------

TERM_GRACE_VARIABLE = "MPIREFINE_TERM_GRACE_S"
DEFAULT_TERM_GRACE_S = 300.0


class _SignalWatch:
    """A thread that acts on SIGINT and SIGTERM even while the main thread waits inside
    MPI. Python runs signal handlers in the main thread only, between bytecodes, so a
    rank blocked in a collective would never see them; but Python's C-level handler
    also writes the signal's number to the pipe of ``signal.set_wakeup_fd``, which this
    thread reads. It is started by :func:`run_guarded` in the main thread.

    SIGINT with several ranks: abort every rank (130). SIGTERM, once :func:`defer_sigterm`
    asked for it: the first is only remembered (:func:`sigterm_requested`); a second
    one, or the grace period's end without the job having stopped, aborts (143).
    """

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.term_deferred = False
        self.term_requested = False
        self.grace_s: float | None = DEFAULT_TERM_GRACE_S
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1

    def start(self) -> bool:
        """Start watching (main thread only); False if not started here."""
        if self.thread is not None or threading.current_thread() is not threading.main_thread():
            return False
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(read_fd)
            os.close(write_fd)
            return False
        self._pipe = (read_fd, write_fd)
        self.thread = threading.Thread(target=self._run, name="mpirefine-signals", daemon=True)
        self.thread.start()
        return True

    def stop(self) -> None:
        if self.thread is None or self._pipe is None:
            return
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(self._previous_fd)
        with contextlib.suppress(OSError):
            os.write(self._pipe[1], b"\0")  # 0 is no signal's number: "stop"
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            for fd in self._pipe:
                os.close(fd)
        self.thread, self._pipe = None, None

    def handle_sigterm(self, _signum=None, _frame=None) -> None:
        """The Python-level SIGTERM handler of :func:`defer_sigterm`."""
        self.term_requested = True

    def _run(self) -> None:
        read_fd = self._pipe[0]
        terms, deadline = 0, None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([read_fd], [], [], timeout)
            if not ready:
                _abort_from_thread(self._tagged(
                    f"mpirefine: the job has not stopped {self.grace_s:g} s after SIGTERM "
                    f"({TERM_GRACE_VARIABLE}); stopping every rank now, without waiting "
                    "for the next checkpoint"), EXIT_TERMINATED)
            for signum in os.read(read_fd, 64):
                if signum == 0:
                    return
                if signum == signal.SIGINT:
                    self._interrupt()
                elif signum == signal.SIGTERM and self.term_deferred:
                    terms += 1
                    self.term_requested = True
                    if terms > 1:
                        _abort_from_thread(self._tagged(
                            "mpirefine: second SIGTERM; stopping every rank now, without "
                            "waiting for the next checkpoint"), EXIT_TERMINATED)
                    if self.grace_s is not None:
                        deadline = time.monotonic() + self.grace_s
                    if world_rank_size()[0] == 0:
                        grace = ("" if self.grace_s is None else
                                 f", or no stop within {self.grace_s:g} s ({TERM_GRACE_VARIABLE}),")
                        print(f"mpirefine: SIGTERM: stopping at the next checkpoint; a second "
                              f"SIGTERM{grace} stops every rank at once", file=sys.stderr, flush=True)

    @staticmethod
    def _interrupt() -> None:
        mpi = sys.modules.get("mpi4py.MPI")
        # Without MPI up, or with one rank, the main thread's KeyboardInterrupt does it.
        if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
            return
        if mpi.COMM_WORLD.Get_size() > 1:
            _abort_from_thread(_SignalWatch._tagged(
                "mpirefine: interrupted (SIGINT); stopping every rank"), EXIT_INTERRUPTED)

    @staticmethod
    def _tagged(message: str) -> str:
        rank, size = world_rank_size()
        return f"[rank {rank} of {size}] {message}" if size > 1 else message


_SIGNALS = _SignalWatch()


def defer_sigterm() -> None:
    """Make SIGTERM a request to stop at the next safe point instead of an immediate end.

    After this, the first SIGTERM only sets :func:`sigterm_requested`; the caller
    checks it when its work can be saved (refine: after each iteration's checkpoint).
    A second SIGTERM, or MPIREFINE_TERM_GRACE_S seconds after the first (default 300;
    0 or "off": no limit) without the process having ended, aborts the job with
    status 143; :func:`run_guarded`'s thread does it, so it works while the main thread
    waits in a collective. Call in the main thread (elsewhere it does nothing).
    """
    grace = seconds_from_environment(TERM_GRACE_VARIABLE, DEFAULT_TERM_GRACE_S)
    try:
        signal.signal(signal.SIGTERM, _SIGNALS.handle_sigterm)
    except ValueError:  # not the main thread (e.g. under a test runner's thread)
        return
    _SIGNALS.grace_s = grace
    _SIGNALS.term_requested = False
    _SIGNALS.term_deferred = True


def sigterm_requested() -> bool:
    """Whether a SIGTERM arrived since :func:`defer_sigterm`."""
    return _SIGNALS.term_requested


# ---- collective watchdog -----------------------------------------------------------

COLLECTIVE_TIMEOUT_VARIABLE = "MPIREFINE_COLLECTIVE_TIMEOUT_S"
_HEARTBEAT_TAG = 17017


class _Activity:
    """What this process's main thread does in MPI, for the watchdog: ``state`` is
    (collectives entered, the current one's name or None, monotonic time it was
    entered or the last one left, the last one's name). One tuple, replaced whole, so
    the watchdog thread always reads a consistent state."""

    def __init__(self):
        self.state: tuple = (0, None, time.monotonic(), None)
        self._depth = 0

    def enter(self, name: str) -> None:
        self._depth += 1
        if self._depth == 1:
            self.state = (self.state[0] + 1, name, time.monotonic(), name)

    def leave(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            count, _name, _since, last = self.state
            self.state = (count, None, time.monotonic(), last)


_ACTIVITY = _Activity()


def _collective_name() -> str:
    """The public Parallel method that the running collective was called through."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_filename == __file__ and not code.co_name.startswith("_"):
            return code.co_name
        frame = frame.f_back
    return "a collective"


def _rank_list(ranks, limit: int = 8) -> str:
    ranks = sorted(ranks)
    text = ", ".join(str(r) for r in ranks[:limit])
    more = f" and {len(ranks) - limit} more" if len(ranks) > limit else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {text}{more}"


class _Watchdog:
    """Ends the job when a rank has waited in a collective longer than a timeout, and
    says which ranks did not come.

    Every rank runs a thread that, every ``period`` seconds, sends rank 0 a heartbeat
    with this rank's :class:`_Activity` over a private duplicate of COMM_WORLD (this
    needs MPI_THREAD_MULTIPLE, mpi4py's default). Rank 0's thread keeps the latest of
    each and aborts once some rank has waited ``timeout`` seconds, naming the ranks
    behind: those outside MPI (computing, or stuck) and those whose heartbeat stopped.
    A rank whose wait passes the timeout by a margin without rank 0 acting aborts by
    itself (rank 0 is then the one not responding). Without MPI_THREAD_MULTIPLE every
    rank only watches its own waits.
    """

    def __init__(self):
        self.decided = False
        self.thread: threading.Thread | None = None
        self.timeout = 0.0

    def start(self, comm, mpi) -> None:
        """Collective over ``comm`` (COMM_WORLD) on first use: rank 0's setting decides."""
        if self.decided:
            return
        local = seconds_from_environment(COLLECTIVE_TIMEOUT_VARIABLE, None)
        timeout = comm.bcast(local, root=0)
        self.decided = True
        if not timeout:
            return
        self.timeout = float(timeout)
        self.period = min(max(self.timeout / 5.0, 0.1), 10.0)
        self.margin = max(5.0 * self.period, 5.0)
        self.talks = mpi.Query_thread() == mpi.THREAD_MULTIPLE
        self.mpi = mpi
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mpirefine-watchdog", daemon=True)
        self.thread.start()
        atexit.register(self.stop)  # before mpi4py's MPI_Finalize, which runs later

    def stop(self) -> None:
        if self.thread is not None:
            self.stopping.set()
            self.thread.join(timeout=10)
            self.thread = None

    @property
    def running(self) -> bool:
        return self.thread is not None

    def _run(self) -> None:
        pending, heard = [], {}
        started = time.monotonic()
        try:
            while not self.stopping.wait(self.period):
                now = time.monotonic()
                count, name, since, last = _ACTIVITY.state
                mine = (count, name, now - since, last)
                if self.talks and self.rank == 0:
                    heard[0] = (mine, now)
                    status = self.mpi.Status()
                    while (message := self.comm.improbe(source=self.mpi.ANY_SOURCE,
                                                        tag=_HEARTBEAT_TAG,
                                                        status=status)) is not None:
                        heard[status.Get_source()] = (message.recv(), time.monotonic())
                    verdict = self._verdict(heard, time.monotonic(), started)
                    if verdict:
                        _abort_from_thread(verdict, EXIT_WATCHDOG)
                    continue
                if self.talks:
                    pending.append(self.comm.isend(mine, dest=0, tag=_HEARTBEAT_TAG))
                    pending = [request for request in pending if not request.Test()]
                limit = self.timeout + (self.margin if self.talks else 0.0)
                if name is not None and mine[2] >= limit:
                    _abort_from_thread(self._alone(mine), EXIT_WATCHDOG)
        except Exception as exc:  # never let the watchdog itself take the job down
            print(f"[rank {self.rank}] mpirefine: collective watchdog stopped: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            deadline = time.monotonic() + 5
            while pending and time.monotonic() < deadline:  # small heartbeats: eager sends
                pending = [request for request in pending if not request.Test()]
                time.sleep(0.01)

    def _header(self) -> str:
        return f"mpirefine: collective watchdog ({COLLECTIVE_TIMEOUT_VARIABLE}={self.timeout:g} s)"

    def _alone(self, mine) -> str:
        count, name, waited, _last = mine
        why = ("and rank 0's watchdog has not stopped the job, so rank 0 is not responding "
               "(stopped, or its main thread holds Python's lock)" if self.talks else
               "for ranks that do not come (this MPI has no MPI_THREAD_MULTIPLE, so the "
               "watchdog cannot ask which)")
        return (f"{self._header()}: rank {self.rank} has waited {waited:.1f} s in {name} (its "
                f"collective #{count}) {why}; stopping every rank")

    def _verdict(self, heard: dict, now: float, started: float) -> str | None:
        """The abort message once some rank has waited ``timeout`` in a collective."""
        states = {}
        for rank, ((count, name, waited, last), at) in heard.items():
            states[rank] = (count, name, waited + (now - at), last, now - at)
        overdue = [r for r, s in states.items() if s[1] is not None and s[2] >= self.timeout]
        if not overdue:
            return None
        stale = max(self.timeout, 3.0 * self.period)
        silent = [r for r in range(self.size)
                  if (r not in states and now - started >= stale) or (r in states and states[r][4] > stale)]
        busy = [r for r in range(self.size) if r in states and r not in silent and states[r][1] is None]
        # every rank in a collective, overdue or not yet (it may have come later)
        waiting = sorted(r for r, s in states.items() if s[1] is not None and r not in silent)
        waiting = waiting or sorted(overdue)
        longest = max(states[r][2] for r in waiting)
        places = {(states[r][1], states[r][0]) for r in waiting}
        if len(places) == 1:
            (name, count), = places
            where = f"in {name} (collective #{count})"
        else:
            where = "in " + "; ".join(f"rank {r}: {states[r][1]} #{states[r][0]}" for r in waiting[:8])
        text = f"{self._header()}: {_rank_list(waiting)} waited up to {longest:.1f} s {where}"
        behind = []
        for r in sorted(set(silent) | set(busy)):
            if r in silent:
                age = states[r][4] if r in states else now - started
                behind.append(f"rank {r} (no heartbeat for {age:.0f} s: stopped, or its main "
                              "thread holds Python's lock)")
            else:
                count, _name, waited, last, _age = states[r]
                since = (f"since its collective #{count}, {last}" if count else
                         "and has not reached a collective yet")
                behind.append(f"rank {r} (outside MPI for {waited:.1f} s, {since})")
        if behind:
            more = f"; and {len(behind) - 8} more" if len(behind) > 8 else ""
            text += "; behind: " + "; ".join(behind[:8]) + more
        else:
            text += ("; no rank is outside MPI, so the ranks wait in collectives that do not "
                     "match: " + "; ".join(f"rank {r}: {s[1]} #{s[0]}"
                                           for r, s in sorted(states.items())[:8]))
        return text + "; stopping every rank"


_WATCHDOG = _Watchdog()


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
        if comm is None and self.size == 1 and (problem := launch_problem(
                1, library=MPI.Get_library_version().splitlines()[0].strip())):
            raise InputError(problem)  # N copies of a one-rank job would overwrite each other
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
        self.collectives: dict[str, dict] = {}   # per public collective: calls, seconds, bytes
        self._slabs: dict | None = None          # slab layout, made by slab_layout()
        self._pending: list = []                 # non-blocking collectives in flight
        self.timer = Timer()
        self.device_index: int | None = None
        self.cuda_aware = False      # set by select_device when the rank uses a GPU
        if comm is None and self.size > 1:
            _WATCHDOG.start(self.comm, MPI)  # MPIREFINE_COLLECTIVE_TIMEOUT_S, off by default

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
        backend.choose_device); with cupy, make GPU ``local_rank % n_gpus`` current,
        once a kernel, an FFT and a matrix product have run on it."""
        from mpirefine import backend

        try:
            xp, device = backend.choose_device(prefer, self.local_rank())
        except RuntimeError as exc:  # --gpu without a usable GPU is a user error
            raise InputError(str(exc)) from exc
        if device is not None:
            self.device_index = device
            xp.cuda.Device(device).use()
            self.cuda_aware = cuda_aware_mpi()
        return xp

    @contextlib.contextmanager
    def _timed(self, category: str = "communication", name: str | None = None):
        name = name or _collective_name()
        _ACTIVITY.enter(name if _WATCHDOG.running else "a collective")
        start = time.perf_counter()
        sent_before = self.bytes_communicated
        try:
            with self.timer(category):  # innermost: not also counted by an enclosing block
                yield
        finally:
            _ACTIVITY.leave()
            elapsed = time.perf_counter() - start
            self.comm_seconds += elapsed
            stats = self.collectives.setdefault(name, {"calls": 0, "seconds": 0.0, "bytes": 0})
            stats["calls"] += 1
            stats["seconds"] += elapsed
            stats["bytes"] += self.bytes_communicated - sent_before

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

    def allreduce_half(self, array, half: int, op: str = "sum"):
        """Reduce ``array`` over ``half``'s group with op "sum", "max" or "min", in place
        on every rank of the group."""
        mpi = self._mpi
        ops = {"sum": mpi.SUM, "max": mpi.MAX, "min": mpi.MIN}
        return self._on_group(array, half, "all", lambda group, host, _root: group.Allreduce(
            mpi.IN_PLACE, host, op=ops[op]))

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
        """On rank 0, a list by rank of {"rank", "seconds" (per Timer category, each
        second counted once), "counts" (the Timer's work counters), "comm_seconds" (all
        time inside MPI calls: the communication and idle categories),
        "bytes_communicated", "collectives" (per public collective: calls, seconds,
        bytes)}; None elsewhere."""
        record = {"rank": self.rank, "seconds": dict(self.timer.seconds),
                  "counts": dict(self.timer.counts),
                  "comm_seconds": self.comm_seconds,
                  "bytes_communicated": self.bytes_communicated,
                  "collectives": {k: dict(v) for k, v in self.collectives.items()}}
        return self.gather_obj(record, root=0)

    # ---- the distributed reconstruction: slabs of the half groups ----------------
    #
    # Each half group's G ranks own one slab each of the half's grids (docs/parallel.md,
    # "Distributed reconstruction"). Slab s of half A and slab s of half B cover the same
    # frequencies, so their owners (the "partners") can combine the two halves voxel by
    # voxel; slab 0 is the half root's. Counts and sizes below are in array elements.

    def slab_layout(self) -> dict:
        """{half: slab index of this rank} for the halves it serves (same on later calls).

        Collective over every rank on the first call. Slabs are ranked so that a
        reduce-scatter can first sum within each node and then across nodes: with L ranks
        of a half on each of M nodes (the node of :meth:`local_rank`; every node the same
        L, no rank shared between the halves), slab j·M + m belongs to the j-th of the
        half's ranks on the m-th node (the half root's node first); otherwise slab s is
        the group's rank s. MPIREFINE_RANKS_PER_NODE=k treats every k consecutive
        world ranks as one node (to try the node-aware layout on one machine).
        """
        if self._slabs is None:
            self._slabs = self._make_slabs()
        return {h: g["index"] for h, g in self._slabs.items()}

    def _make_slabs(self) -> dict:
        mpi = self._mpi
        forced = _leading_int(os.environ.get("MPIREFINE_RANKS_PER_NODE"))
        node = (self.rank // forced if forced else
                self._node.allreduce(self.rank, op=mpi.MIN))  # a node is named by its first rank
        with self._timed(name="slab_layout"):
            nodes = self.comm.allgather(node) if self.size > 1 else [node]
        orders, levels = {}, {}
        for half in (0, 1):
            members = self._members[half]
            by_node: dict[int, list[int]] = {}
            for r in members:
                by_node.setdefault(nodes[r], []).append(r)
            root_node = nodes[self.half_root_world_rank(half)]
            node_order = sorted(by_node, key=lambda k: (k != root_node, k))
            per_node = {len(v) for v in by_node.values()}
            if len(per_node) == 1 and len(by_node) > 1 and per_node != {1} \
                    and self.shared_rank is None:
                L = per_node.pop()
                orders[half] = [by_node[k][j] for j in range(L) for k in node_order]
                levels[half] = (L, len(node_order), node_order)
            else:
                orders[half] = list(members)
                levels[half] = None
        slabs = {}
        for half in (0, 1):
            if half not in self.halves_here:
                continue
            order, index = orders[half], orders[half].index(self.rank)
            group = self._groups[half]
            entry = {"index": index, "order": order,
                     "partner": orders[1 - half][index] if len(orders[1 - half]) > index else None,
                     "comm": group if self.size == 1 else group.Split(color=0, key=index),
                     "node_comm": None, "cross_comm": None, "levels": levels[half]}
            if levels[half] is not None:
                L, M, node_order = levels[half]
                j, m = divmod(index, M)
                entry["node_comm"] = group.Split(color=node_order.index(nodes[self.rank]), key=j)
                entry["cross_comm"] = group.Split(color=j, key=m)
            slabs[half] = entry
        return slabs

    def _slab(self, half: int) -> dict:
        _check_half(half)
        if half not in self.halves_here:
            raise ValueError(f"rank {self.rank} serves half {self.halves_here[0]}, not {half}")
        self.slab_layout()
        return self._slabs[half]

    def slab_partner(self, half: int) -> int:
        """World rank that holds the other half's slab with this rank's index in ``half``
        (this rank itself for the rank an odd-sized job shares between the halves)."""
        return self._slab(half)["partner"]

    def slab_order(self, half: int) -> list:
        """World ranks of ``half``'s group by slab index."""
        return list(self._slab(half)["order"])

    def ireduce_scatter_half(self, array, counts, half: int) -> "_Pending":
        """Start summing ``array`` (flat, float32 or float64, NumPy or CuPy; the same
        length sum(counts) on every rank of ``half``'s group) over the group; part s
        (counts[s] items, parts in order) ends on the rank with slab index s. Returns a
        handle whose ``wait()`` gives this rank's part (same array type as ``array``).
        Node-aware layouts sum within each node first, then across nodes (the second
        step starts in ``wait()``)."""
        import numpy as np

        slab = self._slab(half)
        counts = [int(c) for c in counts]
        _require_contiguous(array)
        mine = counts[slab["index"]]
        if len(slab["order"]) == 1:
            return _Pending(self, None, array[:mine], name="ireduce_scatter_half")
        mpi = self._mpi
        with self._timed(name="ireduce_scatter_half"):
            send = _host_buffer(array, self.cuda_aware)
            if slab["levels"] is None:
                recv = np.empty(mine, send.dtype)
                request = slab["comm"].Ireduce_scatter(send, recv, counts, op=mpi.SUM)
                self.bytes_communicated += send.nbytes
                return _Pending(self, request, recv, like=array, keep=send,
                                name="ireduce_scatter_half")
            L, M, _ = slab["levels"]
            chunks = [sum(counts[j * M:(j + 1) * M]) for j in range(L)]
            j, _m = divmod(slab["index"], M)
            chunk = np.empty(chunks[j], send.dtype)
            request = slab["node_comm"].Ireduce_scatter(send, chunk, chunks, op=mpi.SUM)
            self.bytes_communicated += send.nbytes

        def across_nodes():
            recv = np.empty(mine, chunk.dtype)
            slab["cross_comm"].Reduce_scatter(chunk, recv, counts[j * M:(j + 1) * M], op=mpi.SUM)
            self.bytes_communicated += chunk.nbytes
            return recv

        return _Pending(self, request, None, then=across_nodes, like=array, keep=send,
                        name="ireduce_scatter_half")

    def iallreduce(self, array) -> "_Pending":
        """Start summing ``array`` (NumPy, float64 or float32) over all ranks; ``wait()``
        returns the sum (a new array). One rank: the array itself."""
        import numpy as np

        _require_contiguous(array)
        if self.size == 1:
            return _Pending(self, None, array, name="iallreduce")
        with self._timed(name="iallreduce"):
            recv = np.empty_like(array)
            request = self.comm.Iallreduce(array, recv, op=self._mpi.SUM)
            self.bytes_communicated += array.nbytes
        return _Pending(self, request, recv, keep=array, name="iallreduce")

    def progress(self) -> None:
        """Let MPI move the non-blocking collectives in flight (call it now and then
        from long computations between starting and waiting for them)."""
        self._pending = [p for p in self._pending if not p.test()]

    def _vector_call(self, name: str, array, call, out_items: int, out_dtype):
        """Stage ``array`` on the host, run ``call(send, recv)`` with a new host array
        of ``out_items`` items, and return it in ``array``'s array type (or None when
        ``out_items`` is None)."""
        import numpy as np

        with self._timed(name=name):
            send = _host_buffer(array, self.cuda_aware)
            recv = None if out_items is None else np.empty(int(out_items), out_dtype)
            call(send, recv)
            self.bytes_communicated += send.nbytes + (0 if recv is None else recv.nbytes)
            return None if recv is None else _like(recv, array)

    def alltoallv_half(self, array, send_counts, recv_counts, half: int):
        """All-to-all within ``half``'s group, by slab index: this rank's flat ``array``
        holds send_counts[s] items for slab s after those for slabs < s; returns the
        recv_counts[s] items from each slab s, in slab order (flat)."""
        slab = self._slab(half)
        _require_contiguous(array)
        if len(slab["order"]) == 1:
            return array
        real, factor = _real_view(array)

        def call(send, recv):
            sv, rv = _real_view(send)[0], _real_view(recv)[0]
            sc = [int(c) * factor for c in send_counts]
            rc = [int(c) * factor for c in recv_counts]
            slab["comm"].Alltoallv([sv, (sc, _displacements(sc))], [rv, (rc, _displacements(rc))])

        return self._vector_call("alltoallv_half", array, call, sum(recv_counts), array.dtype)

    def allgatherv_half(self, array, counts, half: int):
        """Every slab's flat ``array`` (counts[s] items from slab s), concatenated in slab
        order, on every rank of ``half``'s group."""
        slab = self._slab(half)
        _require_contiguous(array)
        if len(slab["order"]) == 1:
            return array
        _, factor = _real_view(array)

        def call(send, recv):
            rc = [int(c) * factor for c in counts]
            slab["comm"].Allgatherv(_real_view(send)[0], [_real_view(recv)[0], (rc, _displacements(rc))])

        return self._vector_call("allgatherv_half", array, call, sum(counts), array.dtype)

    def gatherv_half(self, array, counts, half: int):
        """Every slab's flat ``array`` concatenated in slab order on ``half``'s root (slab
        0); None on the other ranks of the group."""
        slab = self._slab(half)
        _require_contiguous(array)
        if len(slab["order"]) == 1:
            return array
        root = slab["index"] == 0
        _, factor = _real_view(array)

        def call(send, recv):
            rc = [int(c) * factor for c in counts]
            target = [_real_view(recv)[0], (rc, _displacements(rc))] if root else None
            slab["comm"].Gatherv(_real_view(send)[0], target, root=0)

        return self._vector_call("gatherv_half", array, call, sum(counts) if root else None,
                                 array.dtype)

    def partner_sendrecv(self, array, half: int):
        """Swap same-shape arrays with :meth:`slab_partner` (world point-to-point); returns
        the partner's. The shared rank of an odd-sized job is its own partner: a copy."""
        partner = self.slab_partner(half)
        _require_contiguous(array)
        if partner == self.rank:
            return array.copy()

        def call(send, recv):
            self.comm.Sendrecv(send, dest=partner, sendtag=23, recvbuf=recv.reshape(send.shape),
                               source=partner, recvtag=23)

        return self._vector_call("partner_sendrecv", array, call, array.size,
                                 array.dtype).reshape(array.shape)

    def send_array(self, array, dest: int) -> None:
        """Send ``array`` to world rank ``dest`` (which calls :meth:`recv_array`)."""
        def call(send, _recv):
            self.comm.Send(send, dest=dest, tag=29)

        self._vector_call("send_array", array, call, None, None)

    def recv_array(self, shape, dtype, source: int):
        """A NumPy array of ``shape`` and ``dtype`` from world rank ``source``'s
        :meth:`send_array`."""
        import numpy as np

        with self._timed(name="recv_array"):
            recv = np.empty(shape, dtype)
            self.comm.Recv(recv, source=source, tag=29)
            self.bytes_communicated += recv.nbytes
        return recv

    def reduce_sum(self, array, root: int = 0):
        """Sum of every rank's ``array`` (NumPy) on world rank ``root``; None elsewhere."""
        import numpy as np

        _require_contiguous(array)
        if self.size == 1:
            return array.copy()
        with self._timed(name="reduce_sum"):
            recv = np.empty_like(array) if self.rank == root else None
            self.comm.Reduce(array, recv, op=self._mpi.SUM, root=root)
            self.bytes_communicated += array.nbytes
        return recv


class _Pending:
    """A non-blocking collective in flight (see :meth:`Parallel.ireduce_scatter_half`).

    ``wait()`` finishes it (timed as communication) and returns its result, converted
    to the array type of ``like``; ``then`` is a blocking second step run after the
    first completes. ``keep`` holds the send buffer alive until then."""

    def __init__(self, par, request, result, *, then=None, like=None, keep=None, name="wait"):
        self.par, self.request, self.result = par, request, result
        self.then, self.like, self.keep, self.name = then, like, keep, name
        self.done = request is None
        if not self.done:
            par._pending.append(self)

    def test(self) -> bool:
        """Progress; True once the (first step of the) operation has completed."""
        if not self.done:
            self.done = bool(self.request.Test())
        return self.done

    def wait(self):
        if self.request is not None:
            with self.par._timed(name=self.name):
                self.request.Wait()
                if self.then is not None:
                    self.result = self.then()
                self.par.bytes_communicated += self.result.nbytes
            self.request, self.keep, self.done = None, None, True
            if self in self.par._pending:
                self.par._pending.remove(self)
        if self.like is not None:
            return _like(self.result, self.like)
        return self.result


def _displacements(counts) -> list:
    out, total = [], 0
    for c in counts:
        out.append(total)
        total += c
    return out


def _real_view(array):
    """(array viewed as its real component type, items per element): complex arrays
    travel as pairs of reals, so MPI needs no complex datatype."""
    if array.dtype.kind == "c":
        return array.view(array.dtype.char.lower()), 2   # F → f (float32), D → d (float64)
    return array, 1


def _like(received, like):
    """``received`` (a host array) as the array type of ``like`` (CuPy or NumPy)."""
    if _is_cupy(like) and not _is_cupy(received):
        import cupy

        return cupy.asarray(received)
    return received
