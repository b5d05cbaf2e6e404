"""Against RELION itself: particles that relion_project made (RELION 5.0.1) and maps
that relion_reconstruct made from them (RELION 3.1.3), see the data set's README.md.

These pin our conventions to a program we did not write:

- projection: our slice of ferritin_chainA.mrc at every pose of clean.star, shifted by
  -origin and multiplied by our CTF, must match RELION's clean.mrcs image; flipping the
  origin sign, the CTF sign or transposing the Euler matrix must break the match;
- reconstruction: `mpirefine reconstruct` on noisy.star / clean.star must be as good
  against the truth as RELION's recon_noisy.mrc / recon_clean.mrc, and close to them;
- CryoSPARC: the same particles written as a .cs must give the same map.

The data ship in tests/data/relion_projected (the first 200 of RELION's 400 particles;
its README.md says which program made each file); the ``relion_projected`` fixture in
conftest.py finds them, and a missing file fails the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpirefine.fourier.filters import shell_resolution_A
from mpirefine.fourier.project import project_images, volume_ft
from mpirefine.fourier.transforms import freq_grid_2d
from mpirefine.io import ImageSource, read_particles, read_volume, write_cs
from mpirefine.physics.ctf import evaluate_ctf
from mpirefine.postprocess.fsc import crossing_shell, fsc_curve, resolution_A

REPO = Path(__file__).resolve().parents[1]
N_PARTICLES = 200               # kept of RELION's 400 (tests/data/relion_projected/README.md)

pytestmark = pytest.mark.shipped_data


@pytest.fixture(scope="module")
def data_dir(relion_projected) -> Path:
    """tests/data/relion_projected (conftest.py)."""
    return relion_projected


def corr_rows(a, b) -> np.ndarray:
    """Pearson correlation of each pair of images."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def reconstruct_cli(particles: Path, out: Path) -> Path:
    """`mpirefine reconstruct PARTICLES --out OUT` in a fresh interpreter; returns OUT."""
    proc = subprocess.run([sys.executable, "-m", "mpirefine", "reconstruct", str(particles),
                           "--out", str(out), "--cpu"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, f"reconstruct failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def truth(data_dir):
    vol, px = read_volume(data_dir / "ferritin_chainA.mrc")
    return vol, px


@pytest.fixture(scope="module")
def noisy_out(data_dir, tmp_path_factory):
    return reconstruct_cli(data_dir / "noisy.star", tmp_path_factory.mktemp("noisy") / "out")


@pytest.fixture(scope="module")
def clean_out(data_dir, tmp_path_factory):
    return reconstruct_cli(data_dir / "clean.star", tmp_path_factory.mktemp("clean") / "out")


def vol(path):
    return read_volume(path)[0]


def describe(curve, px) -> str:
    res = shell_resolution_A(len(curve) * 2 - 2, px)
    return ", ".join(f"{s}:{c:.3f}({r:.1f}Å)" for s, (c, r) in enumerate(zip(curve, res)) if s)


# ------------------------------------------------------------------------- projection

@pytest.fixture(scope="module")
def projection_setup(data_dir, truth):
    vol_, px = truth
    ps = read_particles(data_dir / "clean.star")
    assert len(ps) == N_PARTICLES and ps.box == vol_.shape[0] and ps.pixel_size_A == px
    with ImageSource(ps) as source:
        relion = source.images(np.arange(len(ps)))
    n = ps.box
    ky, kx = freq_grid_2d(n, np)
    ctf = evaluate_ctf(ps.ctf, kx / (n * px), ky / (n * px)) * ps.scale[:, None, None]

    def ours(rotations=None, origin_sign=1.0, ctf_sign=1.0):
        rot = ps.rotations if rotations is None else rotations
        shifts_px = -origin_sign * ps.shifts_A / px
        return project_images(volume_ft(vol_), rot, shifts_px=shifts_px, ctf=ctf_sign * ctf)

    return ps, relion, ours


def test_projection_matches_relion_project_for_every_particle(projection_setup):
    """Euler matrix, origin sign (centre at -origin/px), CTF formula and sign: our
    projection of the truth correlates > 0.99 with RELION's image, particle by particle."""
    ps, relion, ours = projection_setup
    c = corr_rows(ours(), relion)
    msg = (f"correlation with clean.mrcs over {len(c)} particles: min {c.min():.5f}, "
           f"median {np.median(c):.5f} (worst particle row {int(np.argmin(c)) + 1})")
    assert c.min() > 0.99, msg


def test_flipped_conventions_break_the_match(projection_setup):
    """The match above is not an accident: the wrong origin sign, CTF sign or Euler
    transpose each destroy it."""
    ps, relion, ours = projection_setup
    px = ps.pixel_size_A
    c_origin = corr_rows(ours(origin_sign=-1.0), relion)
    # a flip only matters where the origin is not ~0: look at |origin| >= 1 px
    moved = np.hypot(*ps.shifts_A.T) / px >= 1.0
    # more than half of the particles (was "> 200" of 400; measured 327/400, 155/200)
    assert moved.sum() > len(ps) // 2
    assert np.median(c_origin) < 0.9, f"origin flipped: median {np.median(c_origin):.3f}"
    assert c_origin[moved].max() < 0.9, \
        f"origin flipped, |origin| >= 1 px: max {c_origin[moved].max():.3f}"
    c_ctf = corr_rows(ours(ctf_sign=-1.0), relion)
    assert c_ctf.max() < 0.9, f"CTF sign flipped: max {c_ctf.max():.3f}"
    c_rot = corr_rows(ours(rotations=ps.rotations.transpose(0, 2, 1)), relion)
    assert np.median(c_rot) < 0.9, f"Euler matrix transposed: median {np.median(c_rot):.3f}"


# --------------------------------------------------------------------- reconstruction

def test_noisy_reconstruction_matches_relion_reconstruct(data_dir, noisy_out, truth):
    """map_unfil.mrc (all particles, unregularised: what relion_reconstruct makes)
    reaches FSC 0.5 against the truth within one shell of recon_noisy.mrc, and agrees
    with recon_noisy.mrc itself to FSC >= 0.9 out to 8 Å."""
    t, px = truth
    n = t.shape[0]
    relion = vol(data_dir / "recon_noisy.mrc")
    ours = vol(noisy_out / "map_unfil.mrc")
    f_relion = fsc_curve(relion, t)
    f_ours = fsc_curve(ours, t)
    s_relion, s_ours = crossing_shell(f_relion, 0.5), crossing_shell(f_ours, 0.5)
    # README's figure for RELION 3.1.3 on the 200 shipped particles: 7.93 Å (RELION
    # 5.0.1's map of all 400 particles reached 7.40 Å, and so did RELION 3.1.3's)
    assert abs(resolution_A(f_relion, n, px, 0.5) - 7.9) < 0.3
    assert abs(s_ours - s_relion) <= 1.0, (
        f"FSC 0.5 vs truth: ours shell {s_ours:.2f} ({n * px / s_ours:.2f} Å), RELION "
        f"shell {s_relion:.2f} ({n * px / s_relion:.2f} Å)\nours: {describe(f_ours, px)}\n"
        f"RELION: {describe(f_relion, px)}")
    f_pair = fsc_curve(ours, relion)
    to_8A = shell_resolution_A(n, px) >= 8.0
    assert np.all(f_pair[to_8A] >= 0.9), f"ours vs recon_noisy.mrc: {describe(f_pair, px)}"


def test_noisy_gold_standard_map_and_resolution(data_dir, noisy_out, truth):
    """map.mrc (FSC-weighted average of the half maps) crosses 0.5 against the truth
    within one shell of where the half maps' FSC crosses 0.143 (Rosenthal & Henderson:
    FSC_true = sqrt(2 FSC / (1 + FSC)) = 0.5 there), not far below RELION's map of all
    the particles, and the GSFSC resolution is sensible."""
    t, px = truth
    n = t.shape[0]
    f_relion = fsc_curve(vol(data_dir / "recon_noisy.mrc"), t)
    f_map = fsc_curve(vol(noisy_out / "map.mrc"), t)
    s_relion, s_map = crossing_shell(f_relion, 0.5), crossing_shell(f_map, 0.5)
    summary = json.loads((noisy_out / "summary.json").read_text())
    res = summary["resolution_A_0143"]
    assert np.isfinite(res) and 5.0 <= res <= 12.0, f"GSFSC resolution {res} Å"
    s_gold = n * px / res
    # Measured: 400 particles (RELION 5.0.1 map): s_map 12.05, s_gold 12.32, s_relion 12.97;
    # the 200 shipped (RELION 3.1.3 map):         s_map 10.12, s_gold 10.37, s_relion 12.10.
    assert abs(s_map - s_gold) <= 1.0, (
        f"map.mrc FSC 0.5 vs truth at shell {s_map:.2f}, half-map FSC 0.143 at shell "
        f"{s_gold:.2f} ({res:.2f} Å)\nmap.mrc: {describe(f_map, px)}")
    # map.mrc averages two half maps of 100 particles each, filtered by their FSC; RELION's
    # map is one unfiltered reconstruction of all 200, so map.mrc crosses lower, and the
    # gap grows as the particles get fewer: it was "within 1 shell" with all 400 particles
    # (gap 0.92), and is 1.98 with the 200 shipped.  2.5 shells keeps a broken half-map
    # pipeline from passing; the relation to s_gold above is the tight check.
    assert s_relion - 2.5 <= s_map <= s_relion + 1.0, (
        f"map.mrc FSC 0.5 vs truth at shell {s_map:.2f}, RELION at {s_relion:.2f}\n"
        f"map.mrc: {describe(f_map, px)}")


def test_clean_reconstruction_matches_truth(data_dir, clean_out, truth):
    """Noise-free particles: FSC >= 0.9 against the truth up to 0.8 × Nyquist; RELION's
    recon_clean.mrc stays above 0.5 to Nyquist, and so must ours."""
    t, px = truth
    n = t.shape[0]
    f_ours = fsc_curve(vol(clean_out / "map_unfil.mrc"), t)
    f_relion = fsc_curve(vol(data_dir / "recon_clean.mrc"), t)
    upto = int(np.floor(0.8 * (n // 2)))
    assert np.all(f_ours[: upto + 1] >= 0.9), f"ours vs truth: {describe(f_ours, px)}"
    assert crossing_shell(f_relion, 0.5) == n // 2        # RELION's claim in the README
    assert crossing_shell(f_ours, 0.5) == n // 2, f"ours vs truth: {describe(f_ours, px)}"


def test_cryosparc_cs_gives_the_same_map(data_dir, noisy_out, tmp_path):
    """noisy.star rewritten as a CryoSPARC .cs (pose rotvec, shift in px, CTF fields)
    reconstructs to the same map."""
    ps = read_particles(data_dir / "noisy.star")
    cs = tmp_path / "noisy.cs"
    write_cs(cs, ps, None, ps.shifts_A, ps.split, ps.scale)
    out = reconstruct_cli(cs, tmp_path / "out")
    star_map = vol(noisy_out / "map_unfil.mrc")
    cs_map = vol(out / "map_unfil.mrc")
    f = fsc_curve(cs_map, star_map)
    assert np.all(f > 0.999), f".cs vs .star map_unfil: {describe(f, ps.pixel_size_A)}"
