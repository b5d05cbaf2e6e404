"""A small simulated dataset shared by the refinement tests (made once per session)."""

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

from mpirefine.synthetic.models import asymmetric_chains, model_volume
from mpirefine.synthetic.simulate import simulate_dataset

BOX, PIXEL_A, N_PARTICLES, SNR = 40, 2.4, 700, 0.1


def make_dataset(folder: str):
    volume = model_volume(box=BOX, pixel_size_A=PIXEL_A, chains=asymmetric_chains(),
                          center_A="chains")
    return simulate_dataset(volume, PIXEL_A, N_PARTICLES, folder, snr=SNR, seed=3, overwrite=True)


def refine_args(data, out, *extra):
    return ["refine", os.path.join(data, "particles.star"), os.path.join(data, "start_20A.mrc"),
            "--out", out, "--overwrite", "--max-iterations", "6", *extra]


def median_pose_error(data, out):
    from mpirefine.io import read_particles
    from mpirefine.synthetic.evaluate import pose_errors_deg

    true = read_particles(os.path.join(data, "particles_true.star"))
    found = read_particles(os.path.join(out, "particles.star"))
    return float(np.median(pose_errors_deg(found.rotations, true.rotations)))


# ----------------------------------------------------------------- running mpirefine under MPI

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")


def mpirefine_command(ranks, *args):
    return [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpirefine", *args]


def run_mpirefine(ranks, *args):
    """``mpiexec -n ranks mpirefine args``, one BLAS thread per rank; must succeed."""
    res = subprocess.run(mpirefine_command(ranks, *args), capture_output=True, text=True,
                         timeout=600, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def start_and_interrupt(args, out, how):
    """Start ``mpirefine args`` on 2 ranks, wait for its first checkpoint in ``out``, then
    interrupt it: "sigterm" to the whole job (as SLURM does at the time limit) or
    "sigkill_one_rank".  Returns the job's output."""
    proc = subprocess.Popen(mpirefine_command(2, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    ckpt = os.path.join(out, "checkpoint.h5")
    deadline = time.time() + 300
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        ranks = _children_running_python(proc.pid)
        assert ranks, "no rank processes found"
        os.kill(max(ranks), signal.SIGKILL)
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


# ----------------------------------------------------------------- comparing two refinements

def half_maps(out):
    from mpirefine.io import read_volume

    return [read_volume(os.path.join(out, f"map_half_{h}.mrc"))[0] for h in "AB"]


def assert_same_refinement(out1, out2):
    """Half maps with FSC >= 0.999 at every shell, >= 99 % of the poses identical."""
    from mpirefine.io import read_particles
    from mpirefine.postprocess.fsc import fsc_curve
    from mpirefine.synthetic.evaluate import pose_errors_deg

    for m1, m2 in zip(half_maps(out1), half_maps(out2)):
        curve = fsc_curve(m1, m2)
        assert np.all(curve[1:] >= 0.999), curve
    p1 = read_particles(os.path.join(out1, "particles.star"))
    p2 = read_particles(os.path.join(out2, "particles.star"))
    same = (pose_errors_deg(p1.rotations, p2.rotations) < 0.01) & \
        (np.abs(p1.shifts_A - p2.shifts_A).max(axis=1) < 1e-3)
    assert same.mean() >= 0.99, same.mean()
    np.testing.assert_array_equal(p1.split, p2.split)
    s1 = json.load(open(os.path.join(out1, "summary.json")))
    s2 = json.load(open(os.path.join(out2, "summary.json")))
    assert s1["final_resolution_A"] == pytest.approx(s2["final_resolution_A"], rel=0.02)
