"""The refinement is the same program on 1, 2, 3 and 4 ranks: same half maps and poses.

One or two ranks reconstruct on the root pair; three and four distribute the
reconstruction over the half groups (docs/parallel.md): each rank reduce-scatters its
accumulator, divides and transforms its slabs, and the FSC is summed from slab
partials. Only the order of floating-point sums may differ (this 2-core machine runs
3 and 4 ranks oversubscribed).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from refine_data import BOX, assert_same_refinement, refine_args

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (install the mpich wheel)")

RANKS = (1, 2, 3, 4)


def run_refine(ranks, data, out, *extra, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               **(env_extra or {}))
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpirefine",
           *refine_args(data, out, "--max-iterations", "3", "--cpu", *extra)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def runs(refine_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("mpi_runs")
    return {r: (str(base / f"r{r}"), run_refine(r, refine_dataset, str(base / f"r{r}")))
            for r in RANKS}


@pytest.mark.parametrize("ranks", RANKS[1:])
def test_more_ranks_give_the_half_maps_and_poses_of_one(runs, ranks):
    assert_same_refinement(runs[1][0], runs[ranks][0])
    summary = json.load(open(os.path.join(runs[ranks][0], "summary.json")))
    assert summary["n_ranks"] == ranks and len(summary["timings_per_rank"]) == ranks


def test_distributed_reconstruction_moves_only_the_sphere(runs):
    """With 3 and 4 ranks every rank reduce-scatters, in single precision, the voxels
    inside the padded grid's Nyquist sphere only: about half of 12·(2n)²(n + 1) bytes
    per half served and iteration; no rank reduces a whole accumulator to a root."""
    from mpirefine.fourier.reconstruct import SlabLayout

    n = BOX
    whole = 12 * (2 * n) ** 2 * (n + 1)
    sphere = 12 * int(SlabLayout(n, 2, 2).voxels.sum())
    assert sphere < 0.65 * whole
    for ranks in (3, 4):
        summary = json.load(open(os.path.join(runs[ranks][0], "summary.json")))
        iterations = len(summary["iterations"])
        for t in summary["timings_per_rank"]:
            calls = t["collectives"]
            assert "reduce_half" not in calls
            halves = 2 if ranks == 3 and t["rank"] == 2 else 1
            sent = calls["ireduce_scatter_half"]
            assert sent["calls"] == 2 * halves * iterations      # start and finish
            # what it sent plus the slab it got back
            assert sphere * halves * iterations <= sent["bytes"] <= 2 * sphere * halves * iterations


def test_timings_count_each_second_once(runs):
    """Per rank the categories add up to no more than the wall time: the collectives
    inside the reconstruction count as communication only, waiting at barriers as
    idle; every rank of a distributed run reports its own reconstruction work."""
    for ranks in RANKS:
        summary = json.load(open(os.path.join(runs[ranks][0], "summary.json")))
        for t in summary["timings_per_rank"]:
            seconds = t["seconds"]
            assert sum(seconds.values()) <= summary["wall_seconds"] * 1.001 + 0.01, seconds
            assert seconds["communication"] + seconds["idle"] <= t["comm_seconds"] + 1e-6
            assert seconds["reconstruction"] > 0
            assert sum(c["seconds"] for c in t["collectives"].values()) == \
                pytest.approx(t["comm_seconds"], rel=1e-6, abs=1e-9)
        rank0 = summary["timings_per_rank"][0]
        assert rank0["seconds"]["checkpoint"] >= 0
        assert rank0["counts"]["checkpoint_write_seconds"] > 0   # the writer thread's


def test_node_aware_reduction_gives_the_same_refinement(runs, refine_dataset, tmp_path):
    """Eight ranks as two 'nodes' of four (MPIREFINE_RANKS_PER_NODE): each half has two
    ranks per node, so the sums are reduce-scattered within each node first, then
    across (tests/test_parallel.py checks that layout); results unchanged."""
    out = str(tmp_path / "nodes")
    run_refine(8, refine_dataset, out, env_extra={"MPIREFINE_RANKS_PER_NODE": "4"})
    assert_same_refinement(runs[1][0], out)


def test_symmetry_is_enforced_alike_on_one_and_three_ranks(refine_dataset, tmp_path):
    """With enforced symmetry each rank of a distributed run symmetrises its own sums
    before the reduce-scatter (the root did it after the reduction)."""
    outs = {}
    for ranks in (1, 3):
        outs[ranks] = str(tmp_path / f"c2_{ranks}")
        run_refine(ranks, refine_dataset, outs[ranks], "--symmetry", "C2", "--max-iterations", "2")
    assert_same_refinement(outs[1], outs[3])
