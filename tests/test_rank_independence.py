"""Results that must not depend on the rank count or on an interruption.

- ``--minimize-scale``: the per-particle scales fitted in one iteration are used by
  every rank in the next, so 1 and 2 ranks give the same maps, poses and scales.
- ``--continue`` with a static ``--mask`` and a point group: the resumed job is built
  exactly as the new one was (the mask turned and shifted with the input volume by
  the symmetry alignment), so it ends as the uninterrupted run.
"""

import json
import os

import numpy as np
import pytest
from refine_data import (
    MPIEXEC,
    assert_same_refinement,
    refine_args,
    run_mpirefine,
    start_and_interrupt,
)

from mpirefine.fourier.filters import lowpass
from mpirefine.geometry.spheres import soft_sphere
from mpirefine.io import read_particles, read_volume, write_mrc
from mpirefine.synthetic.models import chain_centroids, model_volume, read_pdb, shipped_model_path
from mpirefine.synthetic.simulate import simulate_dataset

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (install the mpich wheel)")

C4_BOX, C4_PIXEL_A, C4_PARTICLES, C4_SNR = 40, 3.7, 300, 0.3
C4_CHAINS = ["A", "H", "C", "B"]     # related by the 4-fold on Z of the shipped model


def test_minimize_scale_gives_the_same_result_on_one_and_two_ranks(refine_dataset, tmp_path):
    args = ("--max-iterations", "3", "--disable-auto-batchsize", "--cpu", "--minimize-scale")
    out = {r: str(tmp_path / f"r{r}") for r in (1, 2)}
    for ranks, folder in out.items():
        run_mpirefine(ranks, *refine_args(refine_dataset, folder, *args))
    assert_same_refinement(out[1], out[2])
    p1, p2 = (read_particles(os.path.join(out[r], "particles.star")) for r in (1, 2))
    np.testing.assert_allclose(p1.scale, p2.scale, rtol=1e-4)
    assert np.ptp(p1.scale) > 0.01, "the scales were never fitted"


@pytest.fixture(scope="module")
def c4_off_centre(tmp_path_factory):
    """Four apoferritin chains about a 4-fold, placed off the box centre so that the
    symmetry alignment must shift the input volume; a static mask that is not
    symmetric about the box centre either."""
    coords, chains, _ = read_pdb(shipped_model_path())
    keep = np.isin(chains, C4_CHAINS)
    centre = coords[keep].mean(axis=0) + np.array([6.0, -4.0, 0.0])   # Å, off the 4-fold
    assert set(chain_centroids(coords, chains)) >= set(C4_CHAINS)
    truth = model_volume(box=C4_BOX, pixel_size_A=C4_PIXEL_A, chains=C4_CHAINS, center_A=centre)
    folder = tmp_path_factory.mktemp("c4_off_centre")
    simulate_dataset(truth, C4_PIXEL_A, C4_PARTICLES, folder, snr=C4_SNR, seed=11, overwrite=True)
    write_mrc(os.path.join(folder, "start_20A.mrc"), lowpass(truth, 20.0, C4_PIXEL_A), C4_PIXEL_A)
    mask = np.roll(soft_sphere(C4_BOX, 15.0, 3.0, np), (1, -2, 2), axis=(0, 1, 2))
    write_mrc(os.path.join(folder, "mask.mrc"), mask.astype(np.float32), C4_PIXEL_A)
    return str(folder)


def test_continue_with_a_static_mask_and_a_point_group_ends_as_the_whole_run(c4_off_centre,
                                                                            tmp_path):
    def args(out):
        return ["refine", os.path.join(c4_off_centre, "particles.star"),
                os.path.join(c4_off_centre, "start_20A.mrc"), "--out", out, "--overwrite",
                "--symmetry", "C4", "--mask", os.path.join(c4_off_centre, "mask.mrc"),
                "--max-iterations", "3", "--disable-auto-batchsize", "--cpu"]

    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    run_mpirefine(2, *args(whole))
    start_and_interrupt(args(killed), killed, "sigterm")
    run_mpirefine(1, "refine", "--continue", killed)
    s1 = json.load(open(os.path.join(whole, "summary.json")))
    s2 = json.load(open(os.path.join(killed, "summary.json")))
    assert s1["symmetry_alignment"] is not None
    assert np.linalg.norm(s1["symmetry_alignment"]["shift_A"]) > 1.0, "the test needs a shift"
    assert s2["symmetry_alignment"] == s1["symmetry_alignment"]
    m1, _ = read_volume(os.path.join(whole, "mask_refine.mrc"))
    m2, _ = read_volume(os.path.join(killed, "mask_refine.mrc"))
    np.testing.assert_allclose(m2, m1, atol=1e-6)
    assert_same_refinement(whole, killed)
