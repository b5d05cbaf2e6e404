"""A small simulated dataset shared by the refinement tests (made once per session)."""

import os

import numpy as np

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
