"""The refinement is the same program on 1, 2 and 3 ranks: same half maps and poses."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from refine_data import refine_args

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (install the mpich wheel)")


def run_refine(ranks, data, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpirefine",
           *refine_args(data, out, "--max-iterations", "3", "--cpu", *extra)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def runs(refine_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("mpi_runs")
    return {r: (str(base / f"r{r}"), run_refine(r, refine_dataset, str(base / f"r{r}"))) for r in (1, 2)}


def _maps(out):
    from mpirefine.io import read_volume

    return [read_volume(os.path.join(out, f"map_half_{h}.mrc"))[0] for h in "AB"]


def test_two_ranks_give_the_same_half_maps_and_poses_as_one(runs):
    from mpirefine.io import read_particles
    from mpirefine.postprocess.fsc import fsc_curve
    from mpirefine.synthetic.evaluate import pose_errors_deg

    (out1, _), (out2, _) = runs[1], runs[2]
    for m1, m2 in zip(_maps(out1), _maps(out2)):
        curve = fsc_curve(m1, m2)
        assert np.all(curve[1:] >= 0.99), curve
    p1 = read_particles(os.path.join(out1, "particles.star"))
    p2 = read_particles(os.path.join(out2, "particles.star"))
    same = (pose_errors_deg(p1.rotations, p2.rotations) < 0.01) & \
        (np.abs(p1.shifts_A - p2.shifts_A).max(axis=1) < 1e-3)
    assert same.mean() >= 0.99, same.mean()
    np.testing.assert_array_equal(p1.split, p2.split)
    s1 = json.load(open(os.path.join(out1, "summary.json")))
    s2 = json.load(open(os.path.join(out2, "summary.json")))
    assert s2["n_ranks"] == 2 and len(s2["timings_per_rank"]) == 2
    assert s1["final_resolution_A"] == pytest.approx(s2["final_resolution_A"], rel=0.02)


def test_three_ranks_uneven_groups_work(refine_dataset, tmp_path, runs):
    from mpirefine.postprocess.fsc import fsc_curve

    out3 = str(tmp_path / "r3")
    run_refine(3, refine_dataset, out3)
    for m1, m3 in zip(_maps(runs[1][0]), _maps(out3)):
        assert np.all(fsc_curve(m1, m3)[1:] >= 0.99)
    assert json.load(open(os.path.join(out3, "summary.json")))["n_ranks"] == 3
