"""Files that travel between mpirefine, RELION and CryoSPARC.

One small simulated data set (40 px of 2.806 Å, the package's simulator) whose stack
headers say 1 Å/px, as headers written by other programs often do, while the optics
table says 2.806 Å; `mpirefine refine` runs one iteration on it.  Then:

- the metadata's pixel size wins in `info`, `reconstruct` and `refine`, with one
  warning naming both values (once, not once per rank);
- RELION's own relion_reconstruct (Debian's RELION 3.1; skipped with a reason where it
  is not installed) makes our map from our particles.star;
- particles.cs has the fields and types CryoSPARC writes, and reads back as it was
  written; converted to STAR it gives RELION the same map.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from mpirefine.fourier.filters import shell_resolution_A
from mpirefine.io import read_particles, read_volume, write_particles
from mpirefine.postprocess.fsc import fsc_curve
from mpirefine.synthetic.models import asymmetric_chains, model_volume
from mpirefine.synthetic.simulate import simulate_dataset

REPO = Path(__file__).resolve().parents[1]
BOX, PIXEL, N, SNR = 40, 2.806, 300, 0.5
RELION = shutil.which("relion_reconstruct")
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
WARNING = "Å/px but"          # the header-vs-metadata warning


def mpirefine(*args, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mpirefine", *map(str, args)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def relion_reconstruct(star: Path, out: Path) -> np.ndarray:
    """relion_reconstruct --i STAR --o OUT --ctf (run in STAR's folder); the map."""
    proc = subprocess.run([RELION, "--i", star.name, "--o", str(out), "--ctf"], cwd=star.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"relion_reconstruct failed:\n{proc.stdout[-2000:]}\n{proc.stderr}"
    return read_volume(out)[0]


def describe(curve) -> str:
    res = shell_resolution_A(BOX, PIXEL)
    return ", ".join(f"{s}:{c:.4f}({r:.1f}Å)" for s, (c, r) in enumerate(zip(curve, res)) if s)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("interchange") / "data"
    volume = model_volume(box=BOX, pixel_size_A=PIXEL, chains=asymmetric_chains(), center_A="chains")
    sim = simulate_dataset(volume, PIXEL, N, folder, snr=SNR, seed=4, stack_size=200)
    for stack in sim.stacks:                    # headers say 1 Å/px, the metadata 2.806
        with mrcfile.open(stack, "r+") as mrc:
            mrc.voxel_size = 1.0
    return folder


@pytest.fixture(scope="module")
def refined(data) -> tuple[Path, subprocess.CompletedProcess]:
    out = data.parent / "refine"
    proc = mpirefine("refine", data / "particles.star", data / "start_20A.mrc", "--out", out,
                     "--max-iterations", 1, "--no-reestimate-greyscale", "--cpu")
    return out, proc


# ------------------------------------------------------------- stack headers vs metadata

def test_metadata_pixel_size_wins_over_stack_headers(data, refined, tmp_path):
    info = json.loads(mpirefine("info", data / "particles.star", "--json").stdout)
    assert info["pixel_size_A"] == pytest.approx(PIXEL) and info["problems"] == []
    assert len(info["notes"]) == 1
    assert "says 1 Å/px" in info["notes"][0] and f"says {PIXEL:g} Å/px" in info["notes"][0]

    ranks = 2 if MPIEXEC else 1
    proc = mpirefine("reconstruct", data / "particles_true.star", "--out", tmp_path / "rec",
                     "--cpu", ranks=ranks)
    assert (proc.stdout + proc.stderr).count(WARNING) == 1, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "rec" / "summary.json").read_text())
    assert summary["pixel_size_A"] == pytest.approx(PIXEL) and summary["resolution_A_0143"] < 15

    out, proc = refined
    assert (proc.stdout + proc.stderr).count(WARNING) == 1, proc.stdout + proc.stderr
    assert json.loads((out / "summary.json").read_text())["pixel_size_A"] == pytest.approx(PIXEL)
    assert read_volume(out / "map.mrc")[1] == pytest.approx(PIXEL, rel=1e-6)


# ----------------------------------------------------------------------------- RELION

def test_particles_star_is_relion_31(refined):
    """data_optics with each group's pixel size and box, angles, origins in Å,
    rlnRandomSubset 1/2 that matches particles.cs, and RELION's version line."""
    out, _ = refined
    text = (out / "particles.star").read_text()
    assert "# version 30001" in text.splitlines()[:3]
    tables = starfile.read(out / "particles.star")
    optics, particles = tables["optics"], tables["particles"]
    assert optics["rlnImagePixelSize"].tolist() == [PIXEL] and optics["rlnImageSize"].tolist() == [BOX]
    assert optics["rlnImageDimensionality"].tolist() == [2]
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                  "rlnOriginYAngst", "rlnCtfScalefactor", "rlnOpticsGroup"):
        assert label in particles.columns, label
    subset = particles["rlnRandomSubset"].to_numpy()
    assert set(subset) == {1, 2} and abs(int((subset == 1).sum()) - N // 2) <= 1
    cs = np.load(out / "particles.cs")
    np.testing.assert_array_equal(cs["alignments3D/split"] + 1, subset)


@pytest.mark.skipif(RELION is None, reason="relion_reconstruct is not installed "
                                           "(Debian: apt-get install relion)")
def test_relion_reconstruct_gives_our_map(refined, tmp_path):
    """relion_reconstruct --ctf on the particles.star that `refine` wrote, against
    `mpirefine reconstruct` of the same file (map_unfil.mrc: all particles,
    unregularised, as RELION's).  Both insert the same noisy images at the same poses,
    so they agree where the two programs' interpolation agrees: RELION grids with a
    blob kernel and iterative gridding correction, we with trilinear weights and a
    sinc² correction, which part ways towards Nyquist.  Measured (300 particles, 40 px
    of 2.806 Å): FSC >= 0.9947 to shell 10 (0.5 × Nyquist, 11.2 Å), 0.946 at shell 16
    (0.8 × Nyquist, 7.0 Å), 0.67 at Nyquist.  Bounds: 0.99 to 0.5 × Nyquist, 0.9 to
    0.8 × Nyquist."""
    out, _ = refined
    mpirefine("reconstruct", out / "particles.star", "--out", tmp_path / "ours", "--cpu")
    ours = read_volume(tmp_path / "ours" / "map_unfil.mrc")[0]
    theirs = relion_reconstruct(out / "particles.star", tmp_path / "relion.mrc")
    f = fsc_curve(ours, theirs)
    half, most = BOX // 4, int(0.8 * BOX // 2)
    assert np.all(f[:half + 1] >= 0.99) and np.all(f[:most + 1] >= 0.9), describe(f)


@pytest.mark.skipif(RELION is None, reason="relion_reconstruct is not installed "
                                           "(Debian: apt-get install relion)")
def test_cryosparc_file_gives_relion_the_same_map(refined, tmp_path):
    """particles.cs read back and written as STAR (CryoSPARC -> RELION through our
    conventions: rotation vectors, shifts in px, radians) reconstructs in RELION to
    the map of refine's particles.star.  The two files differ only by the float32 of
    .cs (1e-5° in angles, 1e-3 Å in defocus): `mpirefine reconstruct` makes maps of
    them that agree to FSC 0.99999 at every shell, RELION's unregularised gridding
    amplifies the rounding in the sparsely sampled outer shells.  Measured: >= 0.9995
    to 0.7 × Nyquist, 0.936 at Nyquist.  Bounds: 0.999 to 0.7 × Nyquist, 0.9 beyond."""
    out, _ = refined
    ps = read_particles(out / "particles.cs")
    star, _ = write_particles(tmp_path / "converted", ps, None, ps.shifts_A, ps.split, ps.scale)
    a = relion_reconstruct(out / "particles.star", tmp_path / "from_star.mrc")
    b = relion_reconstruct(Path(star), tmp_path / "from_cs.mrc")
    f = fsc_curve(a, b)
    assert np.all(f[:int(0.7 * BOX // 2) + 1] >= 0.999) and np.all(f >= 0.9), describe(f)


# -------------------------------------------------------------------------- CryoSPARC

#: Fields and types of a CryoSPARC particle file (what its refinements write and
#: cryosparc-tools' Dataset reads): blob/, ctf/ and alignments3D/ slots.
CRYOSPARC_FIELDS = {
    "uid": "<u8", "blob/idx": "<u4", "blob/shape": "<u4", "blob/psize_A": "<f4",
    "blob/sign": "<f4", "blob/import_sig": "<u8", "ctf/exp_group_id": "<u4",
    "ctf/accel_kv": "<f4", "ctf/cs_mm": "<f4", "ctf/amp_contrast": "<f4", "ctf/df1_A": "<f4",
    "ctf/df2_A": "<f4", "ctf/df_angle_rad": "<f4", "ctf/phase_shift_rad": "<f4",
    "ctf/scale": "<f4", "ctf/scale_const": "<f4", "ctf/shift_A": "<f4", "ctf/tilt_A": "<f4",
    "ctf/trefoil_A": "<f4", "ctf/tetra_A": "<f4", "ctf/anisomag": "<f4", "ctf/bfactor": "<f4",
    "alignments3D/split": "<u4", "alignments3D/shift": "<f4", "alignments3D/pose": "<f4",
    "alignments3D/psize_A": "<f4", "alignments3D/error": "<f4", "alignments3D/error_min": "<f4",
    "alignments3D/resid_pow": "<f4", "alignments3D/slice_pow": "<f4",
    "alignments3D/image_pow": "<f4", "alignments3D/cross_cor": "<f4",
    "alignments3D/alpha": "<f4", "alignments3D/alpha_min": "<f4", "alignments3D/weight": "<f4",
    "alignments3D/pose_ess": "<f4", "alignments3D/shift_ess": "<f4",
    "alignments3D/class_posterior": "<f4", "alignments3D/class": "<u4",
    "alignments3D/class_ess": "<f4"}
SHAPES = {"blob/shape": (2,), "ctf/shift_A": (2,), "ctf/tilt_A": (2,), "ctf/trefoil_A": (2,),
          "ctf/tetra_A": (4,), "ctf/anisomag": (4,), "alignments3D/shift": (2,),
          "alignments3D/pose": (3,)}


def test_particles_cs_has_cryosparc_fields_and_reads_back(refined):
    out, _ = refined
    table = np.load(out / "particles.cs")
    for name, kind in CRYOSPARC_FIELDS.items():
        assert name in table.dtype.names, name
        assert table.dtype[name].base.str == kind, (name, table.dtype[name])
        assert table.dtype[name].shape == SHAPES.get(name, ()), name
    for name in ("blob/path", "ctf/type"):
        assert table.dtype[name].kind == "S", name       # fixed-width bytes, as CryoSPARC
    assert len(np.unique(table["uid"])) == N
    assert np.all(table["blob/shape"] == BOX) and np.allclose(table["blob/psize_A"], PIXEL)
    assert np.all(table["blob/sign"] == 1) and np.all(table["ctf/scale"] == 1)
    np.testing.assert_allclose(table["alignments3D/psize_A"], PIXEL, rtol=1e-6)

    star, cs = read_particles(out / "particles.star"), read_particles(out / "particles.cs")
    assert np.allclose(star.rotations, cs.rotations, atol=1e-5)
    np.testing.assert_allclose(cs.shifts_A, star.shifts_A, atol=1e-4)
    np.testing.assert_allclose(table["alignments3D/shift"] * PIXEL, star.shifts_A, atol=1e-4)
    np.testing.assert_array_equal(cs.split, star.split)
    np.testing.assert_allclose(cs.scale, star.scale, rtol=1e-6)
    for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm",
                 "amplitude_contrast", "phase_shift_deg"):
        np.testing.assert_allclose(np.broadcast_to(getattr(cs.ctf, name), N),
                                   np.broadcast_to(getattr(star.ctf, name), N),
                                   rtol=1e-6, atol=1e-3, err_msg=name)
    assert cs.box == star.box == BOX and cs.pixel_size_A == pytest.approx(PIXEL, rel=1e-6)
    assert cs.stack_paths == star.stack_paths

    # and a .cs written again from the .cs keeps every field and value it had
    again = write_particles(out.parent / "again", cs, cs.rotations, cs.shifts_A, cs.split,
                            cs.scale)[1]
    second = np.load(again)
    assert second.dtype == table.dtype
    for name in table.dtype.names:
        if table.dtype[name].kind == "f":
            np.testing.assert_allclose(second[name], table[name], rtol=1e-6, atol=1e-6,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(second[name], table[name], err_msg=name)
