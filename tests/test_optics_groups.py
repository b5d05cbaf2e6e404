"""Optics groups of different pixel sizes and boxes (RELION 3.1 files, CryoSPARC exposure
groups): every particle is brought onto the reference grid, and a reconstruction of the
mixed set is the reconstruction of one uniform group.

One noise-free simulation of 124 px at 1.25 Å (the package's simulator) is cut and
resampled by this file's own Fourier resampler (:func:`resample`, independent of
mpirefine.refinement.images) into groups: 1.25 Å at 64 px (the reference), 1.24 Å,
1.25 Å at another box, and 1.55 Å (coarser: its images are Fourier padded, and its CTF
must end at its own Nyquist frequency).  The same particles cut to 64 px at 1.25 Å
are the uniform set.  `mpirefine reconstruct` of both must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from mpirefine.fourier.filters import shell_resolution_A
from mpirefine.io import read_particles, read_volume, write_particles, write_relion_star, write_stack
from mpirefine.io.particles import ImageGrid, resampling_plan
from mpirefine.postprocess.fsc import crossing_shell, fsc_curve
from mpirefine.refinement.images import ImagePrep, ctf_grid, fourier_resample, prepare_images
from mpirefine.synthetic.models import model_volume
from mpirefine.synthetic.simulate import simulate_dataset

REPO = Path(__file__).resolve().parents[1]
BASE_BOX, PIXEL, BOX = 124, 1.25, 64    # simulated grid; the reference grid is (BOX, PIXEL)
N = 1200
NOISY_SNR = 0.3                          # over the 124 px box, as the simulator defines it
# (pixel size Å, box px) of the groups, made from the 124 px / 1.25 Å images:
#   1.24 Å: Fourier pad 124 -> 125 px;  1.55 Å: Fourier crop 124 -> 100 px; then cut.
EXACT_GROUPS = [(1.25, 64), (1.24, 124), (1.25, 96)]   # nothing cut away
CUT_GROUPS = [(1.25, 64), (1.24, 64), (1.25, 96), (1.55, 52)]       # all about 80 Å wide


def resample(images: np.ndarray, size: int) -> np.ndarray:
    """Plain NumPy Fourier resampling: crop or zero-pad the centred 2-D transform, pixel
    values kept; centre at index n // 2 before and size // 2 after."""
    n = images.shape[-1]
    f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1))), axes=(-2, -1))
    out = np.zeros(images.shape[:-2] + (size, size), complex)
    k = min(n, size)
    out[..., size // 2 - k // 2:size // 2 - k // 2 + k, size // 2 - k // 2:size // 2 - k // 2 + k] = \
        f[..., n // 2 - k // 2:n // 2 - k // 2 + k, n // 2 - k // 2:n // 2 - k // 2 + k]
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(out, axes=(-2, -1))), axes=(-2, -1))
    return (img.real * (size / n) ** 2).astype(np.float32)


def cut(images: np.ndarray, size: int) -> np.ndarray:
    o = images.shape[-1] // 2 - size // 2
    return np.ascontiguousarray(images[..., o:o + size, o:o + size])


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Noise-free particles at 124 px / 1.25 Å with true poses, and the truth at 64 px."""
    root = tmp_path_factory.mktemp("optics_groups")
    volume = model_volume(BASE_BOX, PIXEL, chains=["A"], center_A="chains")
    sim = simulate_dataset(volume, PIXEL, N, root / "sim", snr=np.inf, seed=3, stack_size=N)
    with mrcfile.open(sim.stacks[0]) as mrc:
        clean = np.array(mrc.data)
    true = starfile.read(sim.particles_true_star)
    truth = model_volume(BOX, PIXEL, chains=["A"], center_A="chains")
    return root, clean, true, sim.signal_variance, truth


def write_sets(folder: Path, images: np.ndarray, true: dict, groups) -> tuple[Path, Path]:
    """uniform.star (all particles at 64 px / 1.25 Å) and mixed.star (particle i in
    group i % len(groups), each group its own stack, box and pixel size)."""
    folder.mkdir()
    optics, particles = true["optics"], true["particles"]
    write_stack(folder / "uniform.mrcs", cut(images, BOX), PIXEL)
    uniform = particles.copy()
    uniform["rlnImageName"] = [f"{i + 1:06d}@uniform.mrcs" for i in range(N)]
    one = optics.copy()
    one["rlnImageSize"] = BOX
    write_relion_star(folder / "uniform.star", one, uniform)

    group = np.arange(N) % len(groups)
    names = np.empty(N, dtype=object)
    for g, (px, box) in enumerate(groups):
        rows = np.flatnonzero(group == g)
        size = int(round(BASE_BOX * PIXEL / px))
        assert abs(size * px - BASE_BOX * PIXEL) < 1e-9          # exactly px Å per pixel
        # the stack header says 1 Å/px, as headers often do: the metadata must win
        write_stack(folder / f"group{g + 1}.mrcs", cut(resample(images[rows], size), box), 1.0)
        names[rows] = [f"{k + 1:06d}@group{g + 1}.mrcs" for k in range(rows.size)]
    mixed = particles.copy()
    mixed["rlnImageName"] = names
    mixed["rlnOpticsGroup"] = group + 1
    table = pd.concat([optics] * len(groups), ignore_index=True)
    table["rlnOpticsGroup"] = np.arange(1, len(groups) + 1)
    table["rlnOpticsGroupName"] = [f"opticsGroup{g + 1}" for g in range(len(groups))]
    table["rlnImagePixelSize"] = [px for px, _ in groups]
    table["rlnImageSize"] = [box for _, box in groups]
    write_relion_star(folder / "mixed.star", table, mixed)
    return folder / "uniform.star", folder / "mixed.star"


def reconstruct(particles: Path, out: Path, *extra) -> Path:
    proc = subprocess.run([sys.executable, "-m", "mpirefine", "reconstruct", str(particles),
                           "--out", str(out), "--cpu", *map(str, extra)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"reconstruct failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return out


def unfiltered(out: Path) -> np.ndarray:
    return read_volume(out / "map_unfil.mrc")[0]


def describe(curve) -> str:
    res = shell_resolution_A(BOX, PIXEL)
    return ", ".join(f"{s}:{c:.4f}({r:.1f}Å)" for s, (c, r) in enumerate(zip(curve, res)) if s)


def test_mixed_groups_give_the_uniform_map(simulated):
    """Noise-free, nothing cut away (1.25 Å at 64 px, 1.24 Å at 124 px, 1.25 Å at 96 px):
    the map of the mixed set is the uniform set's to Nyquist.  Measured (N = 1200):
    FSC >= 0.9997 to shell 31, 0.9989 at Nyquist (the 1.24 Å group's 124 px go to 123
    px of 1.25008 Å, a scale 0.007 % off)."""
    root, clean, true, _, _ = simulated
    uniform, mixed = write_sets(root / "exact", clean, true, EXACT_GROUPS)
    a = unfiltered(reconstruct(uniform, root / "exact_uniform"))
    out = reconstruct(mixed, root / "exact_mixed")
    b = unfiltered(out)
    f = fsc_curve(a, b)
    assert np.all(f[:BOX // 2] >= 0.999) and f[BOX // 2] >= 0.995, describe(f)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["box"] == BOX and summary["pixel_size_A"] == PIXEL


def test_realistic_groups_match_the_uniform_map(simulated):
    """With noise, and every group cut to about the same 80 Å field of view: 1.25 Å at
    64 px, 1.24 Å at 64 px (padded to 105, Fourier cropped to 104 px of 1.2515 Å), 1.25 Å
    at 96 px and 1.55 Å at 52 px (Fourier padded; its CTF ends at its Nyquist, 3.1 Å).

    Both maps are equally close to the truth: measured (N = 1200, SNR 0.3) their FSCs
    against it differ by at most 0.0035 where they exceed 0.143 (to shell 15) and 0.013
    beyond (noise), and cross 0.5 at shells 12.234 and 12.228.  The maps themselves
    differ a little more (FSC 0.9948 to shell 15, 0.972 at shell 24, 0.75 × Nyquist):
    resampling an image that was cut from a wider field cannot bring back what was cut
    away, so the noise and the fine detail near the box edge come back slightly
    changed, and the 1.55 Å group has nothing beyond 3.1 Å.  Bounds: 0.01 against the
    truth where it has signal (0.03 elsewhere); 0.1 shell for the 0.5 and 0.143
    crossings; FSC(mixed, uniform) >= 0.99 where the maps have signal, 0.95 to
    0.75 × Nyquist."""
    root, clean, true, signal_variance, truth = simulated
    noise = np.random.default_rng(5).standard_normal(clean.shape, dtype=np.float32)
    noisy = clean + np.sqrt(signal_variance / NOISY_SNR).astype(np.float32) * noise
    uniform, mixed = write_sets(root / "cut", noisy, true, CUT_GROUPS)
    a = unfiltered(reconstruct(uniform, root / "cut_uniform"))
    b = unfiltered(reconstruct(mixed, root / "cut_mixed"))
    fa, fb = fsc_curve(a, truth), fsc_curve(b, truth)
    signal = fa >= 0.143
    report = f"uniform vs truth: {describe(fa)}\nmixed vs truth: {describe(fb)}"
    assert signal[:12].all() and np.all(np.abs(fa - fb)[signal] <= 0.01), report
    assert np.all(np.abs(fa - fb) <= 0.03), report
    for level in (0.5, 0.143):
        assert abs(crossing_shell(fa, level) - crossing_shell(fb, level)) <= 0.1, report
    f = fsc_curve(a, b)
    assert np.all(f[signal] >= 0.99), describe(f)
    assert np.all(f[:int(0.75 * (BOX // 2)) + 1] >= 0.95), describe(f)


def test_reference_grid_options(simulated, tmp_path):
    """--pixel-size / --box choose another reference grid: the map comes out on it."""
    root, clean, true, _, _ = simulated
    folder = root / "exact"
    if not folder.exists():
        write_sets(folder, clean, true, EXACT_GROUPS)
    out = reconstruct(folder / "mixed.star", tmp_path / "grid", "--pixel-size", 2.5, "--box", 32)
    volume, px = read_volume(out / "map_unfil.mrc")
    assert volume.shape == (32, 32, 32) and px == pytest.approx(2.5)


def test_info_and_outputs_keep_each_groups_grid(simulated, tmp_path):
    """info has a line per group; particles.star keeps each group's rlnImagePixelSize and
    rlnImageSize, particles.cs each particle's blob/psize_A and blob/shape, and shifts
    in Å survive both."""
    root, clean, true, _, _ = simulated
    folder = root / "exact"
    if not folder.exists():
        write_sets(folder, clean, true, EXACT_GROUPS)
    proc = subprocess.run([sys.executable, "-m", "mpirefine", "info", str(folder / "mixed.star"),
                           "--json"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["mixed_grids"] and info["problems"] == []
    assert [(g["pixel_size_A"], g["box_px"]) for g in info["optics_groups"]] == EXACT_GROUPS
    assert info["optics_groups"][1]["resampled_to"]["box_px"] == 123
    assert any("says 1 Å/px" in note for note in info["notes"])      # headers overridden

    ps = read_particles(folder / "mixed.star")
    star, cs = write_particles(tmp_path, ps, ps.rotations, ps.shifts_A, ps.split, ps.scale)
    optics = starfile.read(star)["optics"]
    assert optics["rlnImagePixelSize"].tolist() == [px for px, _ in EXACT_GROUPS]
    assert optics["rlnImageSize"].tolist() == [box for _, box in EXACT_GROUPS]
    table = np.load(cs)
    np.testing.assert_allclose(table["blob/psize_A"], ps.image_pixel_size_A, rtol=1e-6)
    np.testing.assert_array_equal(table["blob/shape"][:, 0], ps.image_box)
    for back in (read_particles(star), read_particles(cs)):
        np.testing.assert_allclose(back.shifts_A, ps.shifts_A, atol=1e-4)
        np.testing.assert_allclose(back.image_pixel_size_A, ps.image_pixel_size_A, rtol=1e-6)
        np.testing.assert_array_equal(back.image_box, ps.image_box)
        assert back.pixel_size_A == pytest.approx(PIXEL) and back.box == BOX


# ------------------------------------------------------------------ image preparation

@pytest.mark.parametrize("box, px", [(64, 1.24), (124, 1.24), (96, 1.25), (52, 1.55), (80, 1.0)])
def test_resampling_plan(box, px):
    """n' = round(m·p / p_ref), m = n unless rounding would scale the image by more than
    0.1 / reference box (then the smallest m up to 2n that rounds well)."""
    m, n_res = resampling_plan(box, px, PIXEL, BOX)
    exact = m * px / PIXEL
    assert n_res == round(exact) and abs(exact - n_res) / exact <= 0.1 / BOX
    assert box <= m <= 2 * box
    if abs(box * px / PIXEL - round(box * px / PIXEL)) / (box * px / PIXEL) <= 0.1 / BOX:
        assert m == box


def test_prepared_images_and_ctf_on_the_reference_grid(xp):
    """A band-limited image drawn at 1.55 Å and at 1.25 Å prepares to the same transform
    (on NumPy, and on CuPy where there is a GPU); the CTF is the group's at its
    effective pixel size, zero beyond its Nyquist."""
    from mpirefine.backend import to_numpy
    from mpirefine.fourier.transforms import radius_2d
    from mpirefine.physics.ctf import CTFParams

    rng = np.random.default_rng(0)
    fine = resample(rng.standard_normal((3, 40, 40)).astype(np.float32), BASE_BOX)  # smooth
    coarse = resample(fine, 100)                               # the same at 1.55 Å
    prep = ImagePrep(BASE_BOX, PIXEL, window=False)
    grid = ImageGrid(BASE_BOX, PIXEL, np.full(3, 100), np.full(3, 1.55), np.zeros(3, bool))
    assert grid.resampled_box().tolist() == [124] * 3 and grid.padded_box().tolist() == [100] * 3
    a = to_numpy(prepare_images(xp.asarray(fine), prep, xp))
    b = to_numpy(prepare_images(xp.asarray(coarse), prep, xp, grid))
    np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max())
    np.testing.assert_allclose(to_numpy(fourier_resample(xp.asarray(coarse), 124)), fine, atol=1e-4)

    params = CTFParams(np.full(3, 15000.0), np.full(3, 14000.0), np.full(3, 30.0), 300.0, 2.7, 0.1)
    c_ref = to_numpy(ctf_grid(params, prep, xp))
    c = to_numpy(ctf_grid(params, prep, xp, grid))
    r = to_numpy(radius_2d(BASE_BOX, np))
    inside = r <= 50.0           # 100 px of 1.55 Å: Nyquist at shell 124 / 2 · 100 / 124
    np.testing.assert_allclose(c[:, inside], c_ref[:, inside], atol=1e-5)
    assert np.all(c[:, r > 50.0] == 0)


def test_mixed_batch_matches_one_group_at_a_time(xp):
    """A batch mixing particles on the grid, 1.24 Å ones (padded 64 -> 105, cropped to
    104 px) and 1.55 Å ones prepares as each group alone, and particles on the grid as
    they would without any grid."""
    from mpirefine.backend import to_numpy

    rng = np.random.default_rng(1)
    images = rng.standard_normal((6, BOX, BOX)).astype(np.float32)
    px = np.array([1.25, 1.24, 1.55, 1.25, 1.24, 1.55])
    grid = ImageGrid(BOX, PIXEL, np.full(6, BOX), px, px == PIXEL)
    assert grid.padded_box().tolist() == [64, 105, 67, 64, 105, 67]
    prep = ImagePrep(BOX, PIXEL)
    together = to_numpy(prepare_images(xp.asarray(images), prep, xp, grid))
    for p in (1.24, 1.55):
        rows = np.flatnonzero(px == p)
        sub = ImageGrid(BOX, PIXEL, np.full(rows.size, BOX), px[rows], np.zeros(rows.size, bool))
        alone = to_numpy(prepare_images(xp.asarray(images[rows]), prep, xp, sub))
        np.testing.assert_allclose(together[rows], alone, rtol=1e-5, atol=1e-3)
    on = np.flatnonzero(px == PIXEL)
    np.testing.assert_array_equal(together[on], to_numpy(prepare_images(xp.asarray(images[on]),
                                                                        prep, xp)))
