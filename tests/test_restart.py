"""Checkpoint and restart: a 2-rank refinement killed mid-run (SIGKILL of one rank, or
SIGTERM of the whole job) and resumed with --continue ends as the uninterrupted run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from refine_data import MPIEXEC, refine_args, run_mpirefine, start_and_interrupt

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (install the mpich wheel)")
ITERATIONS = ("--max-iterations", "4", "--disable-auto-batchsize", "--cpu")


@pytest.fixture(scope="module")
def uninterrupted(refine_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("restart") / "whole")
    run_mpirefine(2, *refine_args(refine_dataset, out, *ITERATIONS))
    return out


@pytest.mark.parametrize("how", ["sigterm", "sigkill_one_rank"])
def test_killed_job_continues_to_the_same_result(refine_dataset, uninterrupted, tmp_path, how):
    from mpirefine.io import read_particles, read_volume
    from mpirefine.postprocess.fsc import fsc_curve
    from mpirefine.synthetic.evaluate import pose_errors_deg

    out = str(tmp_path / "killed")
    log = start_and_interrupt(refine_args(refine_dataset, out, *ITERATIONS), out, how)
    if how == "sigterm":
        assert "--continue" in log, log[-2000:]
    run_mpirefine(1 if how == "sigterm" else 2, "refine", "--continue", out)   # also on another rank count
    for half in "AB":
        a, _ = read_volume(os.path.join(uninterrupted, f"map_half_{half}.mrc"))
        b, _ = read_volume(os.path.join(out, f"map_half_{half}.mrc"))
        assert np.all(fsc_curve(a, b)[1:] >= 0.99)
    p1 = read_particles(os.path.join(uninterrupted, "particles.star"))
    p2 = read_particles(os.path.join(out, "particles.star"))
    same = pose_errors_deg(p1.rotations, p2.rotations) < 0.01
    assert same.mean() >= 0.99, same.mean()
    s1 = json.load(open(os.path.join(uninterrupted, "summary.json")))
    s2 = json.load(open(os.path.join(out, "summary.json")))
    assert [i["iteration"] for i in s1["iterations"]] == [i["iteration"] for i in s2["iterations"]]
    assert s2["final_resolution_A"] == pytest.approx(s1["final_resolution_A"], rel=1e-3)


def test_continue_needs_a_checkpoint(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mpirefine", "refine", "--continue", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "checkpoint.h5" in res.stderr
