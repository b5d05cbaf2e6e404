"""Checkpoint and restart: a 2-rank refinement killed mid-run (SIGKILL of one rank, or
SIGTERM of the whole job) and resumed with --continue ends as the uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from refine_data import refine_args

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (install the mpich wheel)")
ITERATIONS = ("--max-iterations", "4", "--disable-auto-batchsize", "--cpu")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")


def command(ranks, *args):
    return [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpirefine", *args]


def run(ranks, *args):
    res = subprocess.run(command(ranks, *args), capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def uninterrupted(refine_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("restart") / "whole")
    run(2, *refine_args(refine_dataset, out, *ITERATIONS))
    return out


def start_and_interrupt(refine_dataset, out, how):
    """Start a 2-rank refinement, wait for its first checkpoint, then interrupt it."""
    proc = subprocess.Popen(command(2, *refine_args(refine_dataset, out, *ITERATIONS)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    ckpt = os.path.join(out, "checkpoint.h5")
    deadline = time.time() + 300
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)       # as SLURM does at the time limit
    else:
        ranks = _children_running_python(proc.pid)
        assert ranks, "no rank processes found"
        os.kill(max(ranks), signal.SIGKILL)    # one rank dies
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not os.path.exists(os.path.join(out, "summary.json"))
    return stdout + stderr


def _children_running_python(pid):
    """PIDs of the processes below ``pid`` whose command line runs mpirefine."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            todo.append(kid)
            try:
                if b"mpirefine" in Path(f"/proc/{kid}/cmdline").read_bytes():
                    found.append(kid)
            except OSError:
                pass
    return found


@pytest.mark.parametrize("how", ["sigterm", "sigkill_one_rank"])
def test_killed_job_continues_to_the_same_result(refine_dataset, uninterrupted, tmp_path, how):
    from mpirefine.io import read_particles, read_volume
    from mpirefine.postprocess.fsc import fsc_curve
    from mpirefine.synthetic.evaluate import pose_errors_deg

    out = str(tmp_path / "killed")
    log = start_and_interrupt(refine_dataset, out, how)
    if how == "sigterm":
        assert "--continue" in log, log[-2000:]
    run(1 if how == "sigterm" else 2, "refine", "--continue", out)   # also on another rank count
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
