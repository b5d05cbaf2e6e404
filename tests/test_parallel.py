"""The MPI layout contract: half groups, sharding, collectives, timings, abort.

Serial tests check the one-rank behaviour and, through mpiexec subprocesses, that a
failing rank ends the whole job and that the MPI tests below also pass on 3 ranks
(the last rank serves both halves, real reductions inside both groups). The
``@pytest.mark.mpi`` tests run under ``mpiexec -n 2 python -m pytest --with-mpi``.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpirefine import logs, parallel, ranks
from mpirefine.errors import InputError
from mpirefine.logs import Timer
from mpirefine.parallel import Parallel, run_guarded
from mpirefine.ranks import limit_threads, shard_bounds

REPO = Path(__file__).resolve().parents[1]


def mpiexec_or_skip() -> str:
    """The mpiexec that matches this interpreter's mpi4py (the mpich wheel's)."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec available")
    return found


def clean_env() -> dict:
    """This environment minus any launcher variables, one BLAS thread per rank."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "MPI_LOCAL", "OMPI_", "HYDRA_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


# ---- one rank ----------------------------------------------------------------------

def test_single_rank_serves_both_halves():
    par = Parallel(MPI.COMM_SELF)
    assert (par.rank, par.size, par.is_root) == (0, 1, True)
    assert par.halves_here == (0, 1)
    for half in (0, 1):
        assert par.is_half_root(half)
        assert par.half_root_world_rank(half) == 0
        assert par.half_size(half) == 1
        assert par.half_comm(half).Get_size() == 1
        assert par.shard(37, half) == slice(0, 37)
    assert (par.local_rank(), par.local_size()) == (0, 1)


def test_single_rank_collectives_are_no_ops(rng):
    par = Parallel(MPI.COMM_SELF)
    original = rng.standard_normal((4, 5)).astype(np.float32)
    for collective in (par.reduce_half, par.allreduce_half, par.bcast_half):
        array = original.copy()
        assert collective(array, 1) is array
        np.testing.assert_array_equal(array, original)
    assert par.bytes_communicated == 0
    with pytest.raises(RuntimeError, match="ranks 0 and 1"):
        par.exchange_roots(original)
    with pytest.raises(ValueError, match="half must be"):
        par.half_comm(2)


def test_non_contiguous_arrays_are_refused():
    par = Parallel(MPI.COMM_SELF)
    with pytest.raises(ValueError, match="C-contiguous"):
        par._on_group(np.zeros((4, 4))[:, ::2], 0, "all", lambda *_args: None)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("n_items", [0, 1, 4, 7, 100])
def test_shard_bounds_cover_once_and_balance(n_items, count):
    parts = [shard_bounds(n_items, i, count) for i in range(count)]
    covered = np.concatenate([np.arange(n_items)[s] for s in parts])
    np.testing.assert_array_equal(covered, np.arange(n_items))
    sizes = [s.stop - s.start for s in parts]
    assert max(sizes) - min(sizes) <= 1


def test_limit_threads_divides_cores_between_local_ranks():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 10**6
    cpus = os.cpu_count()
    env = {"MPI_LOCALNRANKS": "2"}
    assert limit_threads(env) == min(max(1, cpus // 2), usable)
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"]
    env = {"SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert limit_threads(env) == min(max(1, cpus // 4), usable)
    env = {"SLURM_CPUS_PER_TASK": "1", "SLURM_NTASKS_PER_NODE": "8"}
    assert limit_threads(env) == 1
    env = {"OMP_NUM_THREADS": "3"}
    assert limit_threads(env) is None and env == {"OMP_NUM_THREADS": "3"}
    assert ranks.local_ranks_from_environment({}) == 1


def test_timer_accumulates_per_category():
    timer = Timer()
    for _ in range(2):
        with timer("search"):
            time.sleep(0.01)
    with timer("reading"):
        pass
    assert timer.seconds["search"] >= 0.02
    assert set(Timer.CATEGORIES) <= set(timer.seconds) and "reading" in timer.seconds


def test_logger_rank_zero_plain_info_others_prefixed_warnings(capsys):
    log = logs.get_logger("mpirefine.test_rank0", rank=0)
    log.info("resolution 4.2 A")
    log.debug("hidden")
    log = logs.get_logger("mpirefine.test_rank3", rank=3)
    log.info("hidden too")
    log.warning("slow disk")
    out, err = capsys.readouterr()
    assert out == "resolution 4.2 A\n"
    assert err == "[rank 3] WARNING: slow disk\n"


def test_run_guarded_single_rank(capsys):
    assert run_guarded(lambda: None) == 0
    assert run_guarded(lambda: 3) == 3

    def bad_input():
        raise InputError("--pixel-size must be positive, got -1")

    assert run_guarded(bad_input, command="mpirefine refine") == 2
    assert capsys.readouterr().err == (
        "mpirefine refine: error: --pixel-size must be positive, got -1\n")

    def interrupted():
        raise KeyboardInterrupt

    assert run_guarded(interrupted) == 130
    with pytest.raises(ZeroDivisionError):  # one rank: a bug keeps its own traceback
        run_guarded(lambda: 1 / 0)


# ---- several ranks, through mpiexec subprocesses -----------------------------------

FAILING_RANK = textwrap.dedent("""
    import sys
    from mpirefine.errors import InputError
    from mpirefine.parallel import Parallel, run_guarded

    par = Parallel()

    def work():
        if par.rank == 1:
            if sys.argv[1] == "input":
                raise InputError("bad --induced value")
            raise RuntimeError("induced failure")
        par.barrier()  # without the abort, rank 0 would wait here forever

    sys.exit(run_guarded(work, command="mpirefine test"))
""")


@pytest.mark.parametrize("kind, status, message", [
    ("bug", 1, "mpirefine: rank 1 of 2 failed: RuntimeError: induced failure"),
    ("input", 2, "mpirefine test: error: bad --induced value"),
])
def test_failing_rank_ends_the_job_quickly(kind, status, message):
    start = time.monotonic()
    result = subprocess.run(
        [mpiexec_or_skip(), "-n", "2", sys.executable, "-c", FAILING_RANK, kind],
        capture_output=True, text=True, timeout=60, env=clean_env(), cwd=REPO)
    assert time.monotonic() - start < 30
    assert result.returncode == status, result.stderr
    assert message in result.stderr
    if kind == "bug":
        assert "Traceback" in result.stderr


LAYOUT_3 = textwrap.dedent("""
    import json
    import numpy as np
    from mpirefine.parallel import Parallel

    par = Parallel()
    records = []
    for half in par.halves_here:
        partial = np.full(3, par.rank + 1.0)
        par.reduce_half(partial, half)
        piece = par.shard(12, half)
        records.append(dict(rank=par.rank, half=half, group=par.half_comm(half).Get_size(),
                            root=par.is_half_root(half), shard=[piece.start, piece.stop],
                            reduced=partial.tolist()))
    records = sum(par.gather_obj(records) or [], [])
    if par.is_root:
        print(json.dumps(records))
""")


def test_three_ranks_share_the_last_rank_between_the_halves():
    result = subprocess.run(
        [mpiexec_or_skip(), "-n", "3", sys.executable, "-c", LAYOUT_3],
        capture_output=True, text=True, timeout=60, env=clean_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["rank"], r["half"]) for r in records] == [(0, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r["group"] == 2 for r in records)
    assert [r["root"] for r in records] == [True, True, False, False]
    # every rank does a third of the work: 8 of half A's 12 items for rank 0, 8 of
    # half B's for rank 1, and the last 4 of each half for rank 2
    assert [r["shard"] for r in records] == [[0, 8], [0, 8], [8, 12], [8, 12]]
    assert records[0]["reduced"] == [4.0] * 3  # (0 + 1) + (2 + 1) on half A's root
    assert records[1]["reduced"] == [5.0] * 3  # (1 + 1) + (2 + 1) on half B's root


@pytest.mark.slow
def test_mpi_tests_also_pass_on_three_ranks():
    """The suite's MPI tests at an odd size: half A's group has two ranks."""
    result = subprocess.run(
        [mpiexec_or_skip(), "-n", "3", sys.executable, "-m", "pytest", "-q",
         "-p", "no:cacheprovider", "--with-mpi", "-m", "mpi", __file__],
        capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# ---- under mpiexec -n 2 (or more) --with-mpi ---------------------------------------

@pytest.mark.mpi(min_size=2)
def test_half_groups_and_roots():
    par = Parallel()
    shared = par.size - 1 if par.size % 2 else None
    assert par.halves_here == ((0, 1) if par.rank == shared else (par.rank % 2,))
    for half in (0, 1):
        members = [r for r in range(par.size) if r % 2 == half or r == shared]
        assert par.half_size(half) == len(members)
        if half in par.halves_here:
            assert par.half_comm(half).Get_size() == len(members)
        else:
            with pytest.raises(ValueError, match="serves half"):
                par.half_comm(half)
        assert par.is_half_root(half) == (par.rank == half)
    assert [par.half_root_world_rank(h) for h in (0, 1)] == [0, 1]
    local = par.allgather_obj((MPI.Get_processor_name(), par.local_rank(), par.local_size()))
    for node in {name for name, _, _ in local}:
        ranks_here = sorted(r for name, r, _ in local if name == node)
        assert ranks_here == list(range(len(ranks_here)))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, np.int64])
def test_reduce_half_sums_over_the_group(xp, dtype):
    par = Parallel()
    for half in par.halves_here:
        array = xp.full((3, 4), par.rank + 1, dtype=dtype)
        assert par.reduce_half(array, half) is array
        members = [r for r in range(par.size) if half in _halves_of(r, par.size)]
        expected = sum(r + 1 for r in members)
        if par.is_half_root(half):
            assert (xp.asarray(array) == expected).all()
        total = xp.full(5, par.rank + 1, dtype=dtype)
        par.allreduce_half(total, half)
        assert (total == expected).all()


def _halves_of(rank, size):
    """The halves a rank serves: its parity, and both for the last of an odd count."""
    return (0, 1) if size % 2 and rank == size - 1 else (rank % 2,)


@pytest.mark.mpi(min_size=2)
def test_bcast_half_copies_the_root_array(xp):
    par = Parallel()
    for half in par.halves_here:
        array = xp.full((2, 3), 10.0 * (half + 1) if par.is_half_root(half) else -1.0)
        par.bcast_half(array, half)
        assert (array == 10.0 * (half + 1)).all()


@pytest.mark.mpi(min_size=2)
def test_exchange_roots_swaps_the_half_maps(xp):
    par = Parallel()
    mine = xp.full((4, 4, 4), float(par.rank), dtype=xp.float32)
    if par.rank > 1:
        with pytest.raises(RuntimeError):
            par.exchange_roots(mine)
        return
    before = par.bytes_communicated
    other = par.exchange_roots(mine)
    assert type(other) is type(mine) and other.shape == mine.shape
    assert (other == float(1 - par.rank)).all()
    assert par.bytes_communicated - before == 2 * mine.nbytes
    assert par.comm_seconds > 0


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("n_items", [0, 1, 2, 7, 101])
def test_shards_cover_each_half_exactly_once(n_items):
    par = Parallel()
    mine = [(half, par.shard(n_items, half)) for half in par.halves_here]
    pieces = sum(par.allgather_obj([(h, p.start, p.stop) for h, p in mine]), [])
    for h in (0, 1):
        covered = np.concatenate(
            [np.arange(start, stop) for hh, start, stop in pieces if hh == h] + [[]])
        np.testing.assert_array_equal(np.sort(covered), np.arange(n_items))
    # every rank gets about the same total work (the shared rank half of each half)
    work = par.allgather_obj(sum(p.stop - p.start for _, p in mine))
    assert max(work) - min(work) <= 2


@pytest.mark.mpi(min_size=2)
def test_object_collectives_and_scalar_reductions():
    par = Parallel()
    assert par.bcast_obj({"seed": 7} if par.is_root else None) == {"seed": 7}
    assert par.allgather_obj(par.rank) == list(range(par.size))
    gathered = par.gather_obj(par.rank * 2)
    assert gathered == (list(range(0, 2 * par.size, 2)) if par.is_root else None)
    assert par.allreduce_obj(par.rank + 1) == par.size * (par.size + 1) // 2
    assert par.allreduce_obj(par.rank, op="max") == par.size - 1
    assert par.allreduce_obj(par.rank, op="min") == 0
    with pytest.raises(ValueError, match="op must be"):
        par.allreduce_obj(1, op="prod")


@pytest.mark.mpi(min_size=2)
def test_gather_timings_reaches_rank_zero():
    par = Parallel()
    with par.timer("search"):
        time.sleep(0.01 * (par.rank + 1))
    par.barrier()
    timings = par.gather_timings()
    if not par.is_root:
        assert timings is None
        return
    assert [t["rank"] for t in timings] == list(range(par.size))
    for t in timings:
        assert t["seconds"]["search"] >= 0.01 * (t["rank"] + 1)
        assert t["comm_seconds"] >= t["seconds"]["idle"] >= 0


def test_cuda_aware_mpi_can_be_forced_either_way():
    assert parallel.cuda_aware_mpi({"MPIREFINE_CUDA_AWARE": "1"}) is True
    assert parallel.cuda_aware_mpi({"MPIREFINE_CUDA_AWARE": "no"}) is False
    # asked of MPI itself otherwise: the mpich wheel is not CUDA-aware
    assert isinstance(parallel.cuda_aware_mpi({}), bool)


# ---- honest timings, the distributed reconstruction's collectives ---------------------

def test_nested_timer_blocks_count_each_second_once():
    timer = Timer()
    with timer("reconstruction"):
        time.sleep(0.02)
        with timer("communication"):
            time.sleep(0.03)
        time.sleep(0.01)
    s = timer.seconds
    assert 0.03 <= s["communication"] < 0.05
    assert 0.03 <= s["reconstruction"] < 0.05      # the inner 0.03 s is not in here
    with timer("search"):
        pass
    assert not timer._open


def test_collectives_inside_a_timed_block_count_as_communication_only():
    par = Parallel(MPI.COMM_SELF)
    with par.timer("reconstruction"):
        par.barrier()
        par.bcast_obj(1)
    assert set(par.collectives) == {"barrier", "bcast_obj"}
    assert par.collectives["barrier"]["calls"] == 1
    assert par.comm_seconds == pytest.approx(
        sum(c["seconds"] for c in par.collectives.values()))
    assert par.timer.seconds["reconstruction"] >= 0


def test_single_rank_slab_collectives_hand_the_array_back(rng):
    par = Parallel(MPI.COMM_SELF)
    assert par.slab_layout() == {0: 0, 1: 0}
    assert par.slab_partner(0) == 0 and par.slab_order(1) == [0]
    a = rng.standard_normal(10).astype(np.float32)
    assert np.array_equal(par.ireduce_scatter_half(a, [10], 0).wait(), a)
    assert np.array_equal(par.iallreduce(a).wait(), a)
    assert np.array_equal(par.alltoallv_half(a, [10], [10], 1), a)
    assert np.array_equal(par.allgatherv_half(a, [10], 1), a)
    assert np.array_equal(par.gatherv_half(a, [10], 1), a)
    assert np.array_equal(par.partner_sendrecv(a, 0), a)
    assert par.bytes_communicated == 0


NODE_LAYOUT = textwrap.dedent("""
    import json
    import numpy as np
    from mpirefine.parallel import Parallel

    par = Parallel()
    par.slab_layout()
    out = {}
    for half in par.halves_here:
        counts = [3, 0, 5, 2]
        send = np.arange(10, dtype=np.float64) * (par.rank + 1)
        got = par.ireduce_scatter_half(send, counts, half).wait()
        out[half] = dict(order=par.slab_order(half), index=par.slab_layout()[half],
                         partner=par.slab_partner(half), got=got.tolist())
    records = par.gather_obj((par.rank, out))
    if par.is_root:
        print(json.dumps(records))
""")


def test_node_aware_reduce_scatter_sums_within_nodes_first():
    """8 ranks as 2 nodes of 4 (MPIREFINE_RANKS_PER_NODE=4): each half has 2 ranks on
    each node, so slab j·M + m belongs to the j-th of the half's ranks on node m, and
    the reduce-scatter (within nodes, then across) still gives each slab the sum."""
    env = dict(clean_env(), MPIREFINE_RANKS_PER_NODE="4")
    result = subprocess.run([mpiexec_or_skip(), "-n", "8", sys.executable, "-c", NODE_LAYOUT],
                            capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    records = dict(json.loads(result.stdout.strip().splitlines()[-1]))
    orders = {0: [0, 4, 2, 6], 1: [1, 5, 3, 7]}
    counts, edges = [3, 0, 5, 2], [0, 3, 3, 8, 10]
    for rank, out in records.items():
        half = int(rank) % 2
        rec = out[str(half)]
        assert rec["order"] == orders[half]
        s = orders[half].index(int(rank))
        assert rec["index"] == s and rec["partner"] == orders[1 - half][s]
        total = sum(r + 1 for r in orders[half])
        assert rec["got"] == [v * total for v in range(edges[s], edges[s] + counts[s])]


@pytest.mark.mpi(min_size=2)
def test_slab_collectives_move_each_slab_to_its_owner(xp):
    par = Parallel()
    for half in par.halves_here:
        order = par.slab_order(half)
        G, s = len(order), par.slab_layout()[half]
        assert order[0] == par.half_root_world_rank(half) and order[s] == par.rank
        counts = [k + 1 for k in range(G)]
        # reduce-scatter: slab t gets the sum of every rank's part t
        send = xp.arange(sum(counts), dtype=xp.float32) + par.rank
        got = par.ireduce_scatter_half(send, counts, half).wait()
        start = sum(counts[:s])
        expected = sum(np.arange(start, start + counts[s]) + r for r in order)
        assert type(got) is type(send) and np.allclose(xp.asnumpy(got) if xp is not np else got,
                                                       expected)
        # all-to-all: slab s sends (s, t) values, t pieces of t + 1 items, to slab t
        blocks = xp.concatenate([xp.full(t + 1, 100 * s + t, dtype=xp.complex64) for t in range(G)])
        got = par.alltoallv_half(blocks, [t + 1 for t in range(G)], [s + 1] * G, half)
        expected = np.concatenate([np.full(s + 1, 100 * t + s) for t in range(G)])
        assert np.array_equal(xp.asnumpy(got) if xp is not np else got, expected)
        # all-gather and gather of rows in slab order
        mine = xp.full(s + 1, s, dtype=xp.float64)
        expected = np.concatenate([np.full(t + 1, t) for t in range(G)])
        got = par.allgatherv_half(mine, counts, half)
        assert np.array_equal(xp.asnumpy(got) if xp is not np else got, expected)
        got = par.gatherv_half(mine, counts, half)
        if s == 0:
            assert np.array_equal(xp.asnumpy(got) if xp is not np else got, expected)
        else:
            assert got is None
        peak = par.allreduce_half(np.array([float(par.rank)]), half, op="max")
        assert peak[0] == max(order)


@pytest.mark.mpi(min_size=2)
def test_partners_hold_the_same_slab_of_the_other_half():
    par = Parallel()
    layout = par.slab_layout()
    for half in par.halves_here:
        partner = par.slab_partner(half)
        got = par.partner_sendrecv(np.array([par.rank, layout[half]], np.int64), half)
        assert got[0] == partner and got[1] == layout[half]
    # point to point and the world reductions
    if par.rank == 1:
        par.send_array(np.arange(4.0), 0)
    elif par.rank == 0:
        assert par.recv_array((4,), np.float64, 1).tolist() == [0, 1, 2, 3]
    total = par.reduce_sum(np.array([par.rank + 1.0]))
    if par.is_root:
        assert total[0] == par.size * (par.size + 1) / 2
    else:
        assert total is None
    pending = par.iallreduce(np.array([1.0, par.rank]))
    par.progress()
    assert pending.wait().tolist() == [par.size, par.size * (par.size - 1) / 2]
    timings = par.gather_timings()
    if par.is_root:
        for t in timings:
            calls = t["collectives"]
            if t["rank"] < 2:   # the shared rank of an odd layout is its own partner
                assert calls["partner_sendrecv"]["calls"] >= 1
            assert calls["iallreduce"]["bytes"] > 0
