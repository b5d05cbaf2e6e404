"""Hostile input, end to end through the CLI: every bad file or parameter ends the job
with status 2, one line on stderr naming the file or option and the fix, and no
result in --out.  (tests/test_io_errors.py checks the readers themselves.)"""

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from mpirefine.io import write_mrc, write_relion_star, write_stack

REPO = Path(__file__).resolve().parents[1]
BOX, N_PARTICLES, PIXEL_A = 16, 20, 1.5
# Files that would pass for results of a finished job.
RESULT_NAMES = ("map.mrc", "map_half_A.mrc", "map_half_B.mrc", "map_sharp.mrc", "summary.json",
                "particles.star", "particles.cs", "fsc.csv", "report.html")


def noise_images(n=N_PARTICLES, box=BOX, dtype=np.float32):
    return np.random.default_rng(0).normal(size=(n, box, box)).astype(dtype)


def blob_volume(box=BOX):
    z, y, x = np.mgrid[:box, :box, :box] - box / 2
    return np.exp(-(x * x + y * y + z * z) / 8.0).astype(np.float32)


def make_dataset(root: Path, images=None, names=None, drop=(), poses=False) -> Path:
    """root/stack.mrcs, root/p.star (RELION 3.1, CTF, optional poses) and root/v.mrc."""
    root.mkdir(parents=True, exist_ok=True)
    write_stack(root / "stack.mrcs", noise_images() if images is None else images, PIXEL_A)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7],
                           "rlnVoltage": [300.0], "rlnImagePixelSize": [PIXEL_A],
                           "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
    names = [f"{i + 1:06d}@stack.mrcs" for i in range(N_PARTICLES)] if names is None else names
    m = len(names)
    particles = pd.DataFrame({"rlnImageName": names, "rlnDefocusU": np.full(m, 15000.0),
                              "rlnDefocusV": np.full(m, 14000.0),
                              "rlnDefocusAngle": np.full(m, 10.0),
                              "rlnOpticsGroup": np.ones(m, dtype=np.int64)})
    if poses:
        rng = np.random.default_rng(1)
        particles["rlnAngleRot"] = rng.uniform(-180, 180, m)
        particles["rlnAngleTilt"] = rng.uniform(0, 180, m)
        particles["rlnAnglePsi"] = rng.uniform(-180, 180, m)
    optics = optics.drop(columns=[c for c in drop if c in optics.columns])
    particles = particles.drop(columns=[c for c in drop if c in particles.columns])
    write_relion_star(root / "p.star", optics, particles)
    write_mrc(root / "v.mrc", blob_volume(), PIXEL_A)
    return root


def run(*args):
    return subprocess.run([sys.executable, "-m", "mpirefine", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def refine(data: Path, *extra, particles=None, volume=None):
    return run("refine", particles or data / "p.star", volume or data / "v.mrc",
               "--out", data / "out", "--max-iterations", "1", "--cpu", *extra)


def assert_refused(result, data: Path, *must_contain: str, command: str = "refine") -> str:
    """Status 2, one stderr line naming what is wrong, no results written; returns the line."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"mpirefine {command}: error: "), line
    for part in must_contain:
        assert part in line, (part, line)
    out = data / "out"
    written = [name for name in RESULT_NAMES if (out / name).exists()]
    assert not written, written
    return line


def set_mrc_mode(path: Path, mode: int) -> None:
    """Overwrite the mode word (bytes 12-15) of an MRC header."""
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(np.int32(mode).tobytes())


def test_truncated_stack(tmp_path):
    data = make_dataset(tmp_path)
    stack = data / "stack.mrcs"
    with open(stack, "r+b") as f:
        f.truncate(os.path.getsize(stack) - 100)
    assert_refused(refine(data), data, "stack.mrcs", "truncated", "re-extract")


@pytest.mark.parametrize("mode, words", [(4, ("complex", "mode 4")), (3, ("complex", "mode 3")),
                                         (9, ("unsupported MRC mode 9",))])
def test_complex_or_unknown_mode_stack_is_refused(tmp_path, mode, words):
    data = make_dataset(tmp_path)
    set_mrc_mode(data / "stack.mrcs", mode)
    assert_refused(refine(data), data, "stack.mrcs", *words)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16])
def test_integer_and_half_float_stacks_are_accepted(tmp_path, dtype):
    # Counting-mode and compressed exports store stacks as int8/int16/uint16/float16.
    images = np.clip(noise_images() * 20 + 50, 0, 120).astype(dtype)
    data = make_dataset(tmp_path)
    with mrcfile.new(data / "stack.mrcs", overwrite=True) as mrc:
        mrc.set_data(images)
        mrc.voxel_size = PIXEL_A
    result = refine(data)
    assert result.returncode == 0, result.stderr
    assert (data / "out" / "map.mrc").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_pixels(tmp_path, bad):
    images = noise_images()
    images[7, 3, 4] = bad
    data = make_dataset(tmp_path, images=images)
    assert_refused(refine(data), data, "image 8 of stack", "stack.mrcs", "NaN/Inf",
                   "row 8 of", "p.star")


def test_star_without_ctf_columns(tmp_path):
    data = make_dataset(tmp_path, drop=("rlnDefocusV", "rlnSphericalAberration"))
    assert_refused(refine(data), data, "p.star", "rlnDefocusV, rlnSphericalAberration",
                   "CTF")


def test_volume_box_differs_from_particles(tmp_path):
    data = make_dataset(tmp_path)
    write_mrc(data / "v24.mrc", blob_volume(24), PIXEL_A)
    line = assert_refused(refine(data, volume=data / "v24.mrc"), data, "v24.mrc", "box 24",
                          "box 16", "resample")
    assert "p.star" in line


def test_volume_pixel_size_differs_from_particles(tmp_path):
    data = make_dataset(tmp_path)
    write_mrc(data / "v2A.mrc", blob_volume(), 2.0)
    assert_refused(refine(data, volume=data / "v2A.mrc"), data, "v2A.mrc", "2.0000 Å",
                   "1.5000 Å", "resample")


@pytest.mark.parametrize("fmt", ["star", "cs"])
def test_empty_particle_set(tmp_path, fmt):
    data = make_dataset(tmp_path, names=[])
    particles = data / "p.star"
    if fmt == "cs":
        particles = data / "p.cs"
        empty = np.zeros(0, dtype=[("blob/path", "S12"), ("blob/idx", "<u4"),
                                   ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
                                   ("ctf/df_angle_rad", "<f4"), ("ctf/accel_kv", "<f4"),
                                   ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4")])
        with open(particles, "wb") as f:
            np.save(f, empty)
    assert_refused(refine(data, particles=particles), data, particles.name, "no particles")


def test_duplicate_particles(tmp_path):
    names = [f"{i + 1:06d}@stack.mrcs" for i in range(N_PARTICLES - 1)] + ["000003@stack.mrcs"]
    data = make_dataset(tmp_path, names=names)
    assert_refused(refine(data), data, "rows 3 and 20", "image 3", "stack.mrcs",
                   "remove duplicate")


def test_stack_that_does_not_exist(tmp_path):
    names = [f"{i + 1:06d}@Extract/job012/gone.mrcs" for i in range(N_PARTICLES)]
    data = make_dataset(tmp_path, names=names)
    assert_refused(refine(data), data, "p.star", "Extract/job012/gone.mrcs", "not found",
                   "--project-dir")


def test_mask_of_the_wrong_size(tmp_path):
    data = make_dataset(tmp_path)
    write_mrc(data / "mask20.mrc", np.ones((20, 20, 20), np.float32), PIXEL_A)
    assert_refused(refine(data, "--mask", data / "mask20.mrc"), data, "mask20.mrc", "box 20",
                   "16")


def test_empty_mask(tmp_path):
    data = make_dataset(tmp_path)
    write_mrc(data / "mask0.mrc", np.zeros((BOX, BOX, BOX), np.float32), PIXEL_A)
    assert_refused(refine(data, "--mask", data / "mask0.mrc"), data, "mask0.mrc", "empty")


@pytest.mark.parametrize("args, words", [
    (["--max-align-resolution", "-3"], ["--max-align-resolution ", "positive", "-3"]),
    (["--gsfsc-split-resolution", "0"], ["--gsfsc-split-resolution ", "positive"]),
    (["--initial-lowpass", "nan"], ["--initial-lowpass ", "nan"]),
    (["--window-inner", "0.99", "--window-outer", "0.5"], ["--window-inner (0.99)",
                                                            "--window-outer (0.5)"]),
    (["--dynamic-mask-threshold", "1.5"], ["--dynamic-mask-threshold", "1.5"]),
    (["--max-iterations", "0"], ["--max-iterations must be >= 1"]),
    (["--seed", "-1"], ["--seed", "non-negative"]),
])
def test_out_of_range_parameters(tmp_path, args, words):
    data = make_dataset(tmp_path)
    result = run("refine", data / "p.star", data / "v.mrc", "--out", data / "out", *args)
    assert_refused(result, data, *words)


def test_reconstruct_needs_poses(tmp_path):
    data = make_dataset(tmp_path)
    result = run("reconstruct", data / "p.star", "--out", data / "out", "--cpu")
    assert_refused(result, data, "p.star", "no poses", "mpirefine refine",
                   command="reconstruct")


def test_reconstruct_truncated_stack(tmp_path):
    data = make_dataset(tmp_path, poses=True)
    stack = data / "stack.mrcs"
    with open(stack, "r+b") as f:
        f.truncate(os.path.getsize(stack) - 1000)
    result = run("reconstruct", data / "p.star", "--out", data / "out", "--cpu")
    assert_refused(result, data, "stack.mrcs", "truncated", command="reconstruct")
