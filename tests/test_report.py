"""The report: every figure drawn from a refinement's files, a self-contained page
that embeds them, graceful gaps, the conventions behind the figures, and the orientation
diagnostics (conical FSC area ratio, sampling compensation factor)."""

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_hostile_input import make_dataset

from mpirefine.config import RefineConfig
from mpirefine.geometry.rotations import euler_to_matrix
from mpirefine.io import write_mrc, write_relion_star
from mpirefine.io.outputs import write_fsc_csv
from mpirefine.postprocess.fsc import fsc_curve, resolution_A
from mpirefine.report import write_report
from mpirefine.report.orientation import (
    conical_fsc,
    fibonacci_hemisphere,
    sampling_compensation_factor,
    symmetry_expanded,
)
from mpirefine.report.plots import crossing_frequency, read_fsc_csv, shell_power, viewing_directions

REPO = Path(__file__).resolve().parents[1]
BOX, PIXEL_A, N = 24, 2.0, 300
ALL_FIGURES = ("map_slices", "fsc", "guinier", "iterations", "viewing_directions",
               "conical_fsc_map", "conical_fsc", "scale", "noise_model")
ORIENTATION_FIGURES = ("conical_fsc_map", "conical_fsc")


def half_maps(n, seed=0, anisotropic=False, cone_deg=30.0, from_shell=4):
    """Two half maps of one random signal (power falling as a Gaussian, FSC 0.143 near
    shell n / 3) with independent white noise.  anisotropic: half B holds only noise in
    Fourier directions within cone_deg of the z axis (array axis 0) from from_shell on, as
    if no view were perpendicular to z."""
    rng = np.random.default_rng(seed)
    k = np.fft.fftfreq(n) * n
    kz = k[:, None, None]
    radius = np.sqrt(kz ** 2 + k[None, :, None] ** 2 + np.arange(n // 2 + 1)[None, None, :] ** 2)

    def white():
        return rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)

    signal = 6.0 * np.exp(-(radius / (0.2 * n)) ** 2) * white()
    halves = []
    for h in range(2):
        f = signal + white()
        if anisotropic and h == 1:
            f = np.where((np.abs(kz) >= np.cos(np.radians(cone_deg)) * radius)
                         & (radius >= from_shell), white(), f)
        halves.append(np.fft.irfftn(f, s=(n, n, n), axes=(0, 1, 2)).astype(np.float32))
    return halves


def fsc_like(n, cutoff_shell):
    s = np.arange(n // 2 + 1)
    return 1.0 / (1.0 + np.exp((s - cutoff_shell) / 1.2))


def fake_output(folder: Path, optional=True) -> Path:
    """A refinement's output folder in miniature (no stacks: the report needs none)."""
    folder.mkdir(parents=True, exist_ok=True)
    z, y, x = np.mgrid[:BOX, :BOX, :BOX] - BOX / 2
    blob = np.exp(-(x * x + y * y + z * z) / 10.0).astype(np.float32)
    write_mrc(folder / "map.mrc", blob, PIXEL_A)
    if optional:
        write_mrc(folder / "map_sharp.mrc", blob, PIXEL_A)
        write_mrc(folder / "mask_fsc.mrc", (x * x + y * y + z * z < 64).astype(np.float32),
                  PIXEL_A)
        for name, half in zip("AB", half_maps(BOX)):
            write_mrc(folder / f"map_half_{name}.mrc", half, PIXEL_A)
    write_fsc_csv(folder / "fsc.csv", {"fsc_no_mask": fsc_like(BOX, 5), "fsc_loose": fsc_like(BOX, 6),
                                      "fsc_tight": fsc_like(BOX, 7), "fsc_corrected": fsc_like(BOX, 6.5)},
                  BOX, PIXEL_A)
    rng = np.random.default_rng(0)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/gone.mrcs" for i in range(N)],
        "rlnAngleRot": rng.uniform(-180, 180, N),
        "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, N))),
        "rlnAnglePsi": rng.uniform(-180, 180, N), "rlnCtfScalefactor": rng.normal(1, 0.1, N)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [PIXEL_A], "rlnImageSize": [BOX]})
    write_relion_star(folder / "particles.star", optics, particles)
    summary = {
        "command": "refine", "final_resolution_A": 9.6, "n_particles": N, "box": BOX,
        "pixel_size_A": PIXEL_A, "n_ranks": 2, "backend": "numpy", "wall_seconds": 4000.0,
        "iterations": [{"iteration": k, "batch_size": b, "full_pass": b == N, "resolution_A": r,
                        "seconds": 2.0 * k, "alignment_resolution_A": r}
                       for k, b, r in ((1, 120, 14.0), (2, 200, 11.0), (3, N, 9.8), (4, N, 9.6))],
        "timings_per_rank": [{"rank": r, "seconds": {"search": 5.0, "idle": 0.1},
                              "bytes_communicated": 2 ** 21} for r in (0, 1)],
        "config": RefineConfig(particles="p.star", volume="v.mrc", out_dir=str(folder),
                               max_iterations=4).to_dict(),
    }
    if optional:
        summary["bfactor_A2"] = 120.0
        summary["guinier_fit"] = {"bfactor_A2": 120.0, "slope_A2": -60.0, "intercept": 5.0,
                                  "correlation": -0.99, "n_shells": 4, "low_resolution_A": 10.0,
                                  "high_resolution_A": 6.7}
        summary["noise_sigma2"] = list(np.linspace(2.0, 1.0, BOX // 2 + 1))
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_every_figure_is_drawn_and_embedded(tmp_path):
    out = fake_output(tmp_path / "run")
    path = write_report(str(out))
    assert path == str(out / "report.html")
    page = Path(path).read_text(encoding="utf-8")
    for name in ALL_FIGURES:
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        assert uri in page, name
    assert "Not shown" not in page
    # self-contained: no scripts, stylesheets or images fetched from anywhere
    assert not re.search(r"<script|<link|src=\"(?!data:)|url\(", page)
    for text in ("9.60 Å", "120 Å²", "1 h 06 min", "max_iterations = 4", "fsc loose"):
        assert text in page or text.replace(" ", "_") in page, text
    assert '<div class="changed">max_iterations = 4</div>' in page


def test_missing_optional_inputs_are_named_not_fatal(tmp_path):
    out = fake_output(tmp_path / "run", optional=False)
    (out / "particles.star").unlink()
    page = Path(write_report(str(out))).read_text(encoding="utf-8")
    for name in ("fsc", "guinier", "iterations"):
        assert (out / "plots" / f"{name}.png").exists()
    for name in ("viewing_directions", "scale", "noise_model", *ORIENTATION_FIGURES):
        assert not (out / "plots" / f"{name}.png").exists()
    assert "Not shown" in page and "noise_sigma2 in summary.json" in page
    assert "angles in particles.star or particles.cs" in page
    assert "map_half_A.mrc and map_half_B.mrc" in page
    assert (out / "plots" / "map_slices.png").exists()      # map.mrc stands in for map_sharp.mrc
    assert "cFAR" not in page and "SCF*" not in page
    assert "B-factor" not in page.split("<h2>")[0]        # no B-factor card without the key


@pytest.mark.parametrize("fit", [{"bfactor_A2": 80.0},
                                 {"bfactor_A2": 0.0, "n_shells": 1, "low_resolution_A": 10.0,
                                  "high_resolution_A": 9.6}])
def test_guinier_figure_with_a_bare_or_a_failed_fit(tmp_path, fit):
    out = fake_output(tmp_path / "run", optional=False)
    summary = json.loads((out / "summary.json").read_text())
    summary["bfactor_A2"] = fit["bfactor_A2"]
    if "n_shells" in fit:
        summary["guinier_fit"] = fit
    (out / "summary.json").write_text(json.dumps(summary))
    page = Path(write_report(str(out))).read_text(encoding="utf-8")
    assert (out / "plots" / "guinier.png").exists() and "could not be drawn" not in page


def test_fsc_columns_and_crossings_agree_with_fsc_module(tmp_path):
    out = fake_output(tmp_path / "run")
    freq, curves = read_fsc_csv(str(out / "fsc.csv"))
    assert list(curves) == ["fsc_no_mask", "fsc_loose", "fsc_tight", "fsc_corrected"]
    for curve in curves.values():
        expected = resolution_A(curve, BOX, PIXEL_A)
        assert 1 / crossing_frequency(freq, curve) == pytest.approx(expected, rel=1e-3)


def test_guinier_slope_is_minus_half_the_bfactor():
    # a map whose amplitudes fall as exp(-B / 4d²): ln<|F|²> falls with slope -B/2 in 1/d²
    n, px, bfactor = 64, 1.0, 200.0
    k = np.fft.fftfreq(n) / px
    kx = np.fft.rfftfreq(n) / px
    s2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
    phases = np.exp(2j * np.pi * np.random.default_rng(1).random(s2.shape))
    volume = np.fft.irfftn(np.exp(-bfactor * s2 / 4) * phases, s=(n, n, n), axes=(0, 1, 2))
    power = shell_power(volume)
    shells = np.arange(n // 2 + 1)
    fit = (shells >= 6) & (shells <= 20)
    slope = np.polyfit((shells[fit] / (n * px)) ** 2, np.log(power[fit]), 1)[0]
    assert slope == pytest.approx(-bfactor / 2, rel=0.05)


@pytest.mark.parametrize("rot, tilt", [(0.0, 0.0), (30.0, 90.0), (-120.0, 45.0), (75.0, 150.0)])
def test_viewing_direction_follows_relion(rot, tilt):
    # RELION's Euler_angles2direction: (cos rot sin tilt, sin rot sin tilt, cos tilt)
    az, el = viewing_directions(euler_to_matrix(np.array([rot]), np.array([tilt]), np.array([17.0])))
    assert el[0] == pytest.approx(90.0 - tilt, abs=1e-9)
    if 0 < tilt < 180:
        assert az[0] == pytest.approx(rot, abs=1e-9)


def test_report_command_on_a_real_reconstruction(tmp_path):
    data = make_dataset(tmp_path, poses=True)
    run = [sys.executable, "-m", "mpirefine"]
    result = subprocess.run(run + ["reconstruct", str(data / "p.star"), "--out", str(data / "rec"),
                                   "--cpu"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(run + ["report", str(data / "rec")], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "report.html" in result.stdout
    page = (data / "rec" / "report.html").read_text(encoding="utf-8")
    assert "mpirefine reconstruct" in page and 'id="fsc"' in page and 'id="guinier"' in page
    bad = subprocess.run(run + ["report", str(data / "nothere")], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nothere" in bad.stderr


# --------------------------------------------------------------- orientation diagnostics


def test_report_shows_slices_and_orientation_diagnostics(tmp_path):
    out = fake_output(tmp_path / "run")
    page = Path(write_report(str(out))).read_text(encoding="utf-8")
    metrics = json.loads((out / "plots" / "orientation.json").read_text())
    assert 0.0 <= metrics["cfar"] <= 1.0 and metrics["n_cones"] >= 100
    assert metrics["cone_half_angle_deg"] == 20.0 and metrics["n_views"] == N
    for name in ("map_slices", *ORIENTATION_FIGURES):
        assert f'id="{name}"' in page, name
    assert '<figure id="map_slices" class="wide">' in page
    assert f"<b>cFAR = {metrics['cfar']:.2f}</b>" in page
    assert f"<b>SCF* = {metrics['scf_star']:.2f}</b>" in page
    assert f'<div class="v">{metrics["cfar"]:.2f}</div><div class="k">cFAR' in page
    # the conical map sits right after the viewing directions: side by side in the grid
    assert page.index('id="viewing_directions"') < page.index('id="conical_fsc_map"')
    assert re.search(r'id="viewing_directions".*?</figure><figure id="conical_fsc_map"', page)


def test_conical_fsc_over_the_whole_sphere_is_the_fsc():
    a, b = half_maps(32)
    mask = np.ones_like(a)
    cones = conical_fsc(a, b, 1.0, mask=mask, half_angle_deg=90.0)
    np.testing.assert_allclose(cones.full, fsc_curve(a, b, mask), atol=1e-6)
    np.testing.assert_allclose(cones.curves, np.broadcast_to(cones.full, cones.curves.shape),
                               atol=1e-9)
    assert cones.cfar == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_cfar_is_near_one_for_isotropic_half_maps(seed):
    cones = conical_fsc(*half_maps(48, seed), PIXEL_A)
    assert 12 < cones.cutoff_shell < 20                    # the FSC falls mid-way
    assert cones.cfar > 0.8, cones.cfar                    # measured 0.85, 0.87
    assert len(cones.directions) >= 100


@pytest.mark.parametrize("seed", [0, 1])
def test_cfar_is_low_when_a_cone_of_directions_is_noise(seed):
    cones = conical_fsc(*half_maps(48, seed, anisotropic=True), PIXEL_A)
    assert cones.cfar < 0.5, cones.cfar                    # measured 0.30, 0.28
    worst = cones.directions[np.argmin(cones.areas)]        # (x, y, z): along the map's z axis
    assert abs(worst[2]) > 0.9, worst
    res = cones.resolution_A()
    assert res[np.argmin(cones.areas)] > 2 * res.min()


def test_sampling_compensation_factor():
    rng = np.random.default_rng(0)
    uniform = rng.normal(size=(20000, 3))
    scf, star = sampling_compensation_factor(uniform)
    assert scf > 0.95 and star == pytest.approx(scf)        # every direction sampled
    few = sampling_compensation_factor(uniform[:300])         # a thinner shell: still ~1
    assert few[1] > 0.85, few
    near_z = fibonacci_hemisphere(20000)
    near_z = near_z[near_z[:, 2] > np.cos(np.radians(30))]  # top views only: a missing cone
    assert sampling_compensation_factor(near_z)[1] < 0.2
    # C4: four copies of every view, turned about z
    one = np.array([[1.0, 0.0, 0.0]])
    expanded = symmetry_expanded(one, "C4")
    assert expanded.shape == (4, 3)
    assert {tuple(np.round(v, 9) + 0.0) for v in expanded} == {
        (1, 0, 0), (0, 1, 0), (-1, 0, 0), (0, -1, 0)}
    assert symmetry_expanded(one, "C1") is one


@pytest.mark.parametrize("kind", ["odd", "even"])
def test_aberration_phase_figures_show_the_measured_phase(tmp_path, kind):
    """The measured and model panels are drawn where the fit weighted the pixels (a
    half-plane grid with ky centred): most of each panel is coloured, not blank."""
    import matplotlib.image

    from mpirefine.fourier.transforms import freq_grid_2d
    from mpirefine.physics.aberrations import even_phase, odd_phase
    from mpirefine.report import plots

    n = 64
    ky, kx = freq_grid_2d(n, np)
    kx_A, ky_A = kx / n, ky / n
    weight = (np.hypot(kx_A, ky_A) < 0.4).astype(float)
    path = tmp_path / f"{kind}.npz"
    if kind == "odd":
        c = np.array([0.0, 30.0, 200.0, 0.0, 0.0, 0.0])
        xy = np.exp(1j * odd_phase(c, kx_A, ky_A))[None]
        np.savez(path, iteration=3, groups=np.array([1]), xy=xy, w=np.ones((1, n, n // 2 + 1)),
                 weight=weight, kx_A=kx_A, ky_A=ky_A, coefficients=c[None])
        png = plots.plot_ctf_odd_phase(str(path), str(tmp_path))
    else:
        c = np.zeros(9)
        c[6], c[4] = 300.0, 200.0
        d = even_phase(c, kx_A, ky_A)
        one, zero = np.ones_like(d), np.zeros_like(d)
        sums = np.stack([one, zero, one, np.cos(d), np.sin(d), one, zero, one, one])[None]
        np.savez(path, iteration=3, groups=np.array([1]), sums=sums, weight=weight,
                 kx_A=kx_A, ky_A=ky_A, coefficients=c[None])
        png = plots.plot_ctf_even_phase(str(path), str(tmp_path))
    image = matplotlib.image.imread(png)[..., :3]
    height, width = image.shape[:2]
    left = image[int(0.15 * height):int(0.8 * height), int(0.14 * width):int(0.36 * width)]
    coloured = np.mean(np.abs(left - 1.0).sum(axis=-1) > 0.1)
    assert coloured > 0.4, coloured


def test_aberrations_table_lists_each_groups_fits():
    """report.html's table of fitted aberrations: one row per optics group, a dash where
    an option was off, nothing at all when none was on."""
    from mpirefine.report.html import _aberrations_table

    assert _aberrations_table({"ctf_global": None, "ctf_even": None, "ctf_anisomag": None}) == ""
    table = _aberrations_table({
        "ctf_global": {"1": {"beam_tilt_x_mrad": 0.5, "beam_tilt_y_mrad": -0.25,
                             "trefoil": [40.0, -30.0]}},
        "ctf_anisomag": {"2": {"anisotropy_percent": 1.5, "anisotropy_angle_deg": 30.0,
                               "isotropic_percent": 0.2,
                               "matrix": [[1.01, 0.006], [0.006, 1.004]]}}})
    assert table.count("<tr>") == 3
    assert "+0.500, -0.250" in table and "+40.0, -30.0" in table
    assert "+1.500 % at 30°" in table and "1.01000 0.00600 0.00600 1.00400" in table
