"""What a rank reports: log lines (rank 0 to stdout, others' warnings to stderr with
their rank) and its timings by category (:class:`Timer`)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from mpirefine.ranks import world_rank_size

_LOG_HANDLER_FLAG = "_mpirefine_handler"


class _StreamHandler(logging.StreamHandler):
    """A StreamHandler that lets a closed output pipe (BrokenPipeError) reach
    :func:`run_guarded`, which ends quietly, instead of printing a logging traceback
    for every later line."""

    def handleError(self, record):
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            raise  # the exception that emit() is handling
        super().handleError(record)


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
    handler = _StreamHandler(sys.stdout if rank == 0 else sys.stderr)
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

    Blocks may nest; each second counts once, in the innermost open category (a
    collective inside ``with timer("reconstruction")`` counts as communication only),
    so the categories add up to at most the rank's wall time. A refinement uses
    search, backprojection (insertion), communication (time inside MPI calls, added by
    :class:`Parallel`), idle (waiting at barriers for slower ranks or for the root
    pair's own work), reconstruction (the slab work every rank does), root (work only
    the root pair does), checkpoint, and others that the loop names.
    ``add(category, s)`` records seconds measured elsewhere; the caller makes sure no
    open block covers them too.
    """

    CATEGORIES = ("search", "backprojection", "communication", "idle")

    def __init__(self):
        self.seconds: dict[str, float] = dict.fromkeys(self.CATEGORIES, 0.0)
        self.counts: dict[str, float] = {}
        self._open: list[list] = []     # [category, since] of the open blocks, innermost last

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] = self.seconds.get(category, 0.0) + seconds

    def count(self, name: str, amount: float) -> None:
        """Add to a work counter (e.g. the search's poses scored and GEMM FLOPs)."""
        self.counts[name] = self.counts.get(name, 0.0) + float(amount)

    @contextlib.contextmanager
    def __call__(self, category: str):
        now = time.perf_counter()
        if self._open:  # the enclosing block stops counting while this one runs
            outer = self._open[-1]
            self.add(outer[0], now - outer[1])
        block = [category, now]
        self._open.append(block)
        try:
            yield self
        finally:
            end = time.perf_counter()
            self._open.pop()
            self.add(category, end - block[1])
            if self._open:
                self._open[-1][1] = end
