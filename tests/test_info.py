"""`mpirefine info`: what it reports about particle files and maps, and a memory model
that matches what the code allocates."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from test_hostile_input import BOX, N_PARTICLES, PIXEL_A, make_dataset

from mpirefine.fourier.backproject import Accumulator
from mpirefine.fourier.project import volume_ft
from mpirefine.io import read_particles, write_mrc, write_particles, write_stack
from mpirefine.report.memory import (
    ACCUMULATOR_PER_VOXEL,
    GATHER_TABLE_PER_ENTRY,
    VFT_PER_VOXEL,
    format_memory,
    grid_sizes,
    memory_per_rank,
)

REPO = Path(__file__).resolve().parents[1]


def info(*args):
    result = subprocess.run([sys.executable, "-m", "mpirefine", "info", *map(str, args)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    return result


def info_json(*args) -> dict:
    result = info(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_particle_file_facts(tmp_path):
    data = make_dataset(tmp_path, poses=True)
    got = info_json(data / "p.star", "--ranks", "3")
    assert got["n_particles"] == N_PARTICLES and got["box_px"] == BOX
    assert got["pixel_size_A"] == pytest.approx(PIXEL_A)
    assert got["nyquist_A"] == pytest.approx(2 * PIXEL_A)
    assert got["format"].startswith("RELION STAR 3.1")
    ctf = got["ctf"]
    assert ctf["defocus_u_um"]["median"] == pytest.approx(1.5)      # 15000 Å
    assert ctf["defocus_v_um"]["max"] == pytest.approx(1.4)
    assert ctf["astigmatism_um"]["min"] == pytest.approx(0.1)
    assert ctf["voltage_kV"]["min"] == 300 and ctf["cs_mm"]["max"] == pytest.approx(2.7)
    assert got["optics_groups"] == [{"group": 1, "n_particles": N_PARTICLES, "voltage_kV": 300.0,
                                     "cs_mm": 2.7, "amplitude_contrast": 0.1, "box_px": BOX,
                                     "pixel_size_A": PIXEL_A}]
    assert not got["mixed_grids"] and got["notes"] == []
    assert got["poses"] and not got["shifts"]
    assert not got["split"]["present"] and not got["scale"]["present"]
    assert got["stacks"]["count"] == got["stacks"]["found"] == 1
    assert got["stacks"]["list"][0]["images_used"] == N_PARTICLES
    assert got["problems"] == []
    assert [r["ranks"] for r in got["memory"]["roles"]] == [
        "rank 0 (half A root)", "rank 1 (half B root)", "rank 2 (both halves)"]
    for role in got["memory"]["roles"]:
        assert set(role["phases"]) == {"search", "insertion", "symmetrisation", "reconstruction"}
        assert role["peak"]["ram"] >= max(p["ram"] for name, p in role["phases"].items()
                                          if name != "symmetrisation")


def test_table_is_readable(tmp_path):
    data = make_dataset(tmp_path)
    result = info(data / "p.star", "--ranks", "1")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for part in ("particles      20", "16 px, 1.5000 Å/px", "defocus U      1.500 µm",
                 "none (refine searches globally)", "1 referenced, 1 found, 0 missing",
                 "problems       none found", "memory per rank for a refinement on 1 rank(s)",
                 "rank 0 (both halves)", "device: accumulators", "search: RAM",
                 "insertion: RAM", "symmetrisation (with --symmetry): RAM",
                 "reconstruction: RAM", "peak RAM, NumPy rank", "peak GPU memory, GPU rank",
                 "--gpu-memory GiB"):
        assert part in text, (part, text)


def test_plan_for_a_gpu(tmp_path):
    """--gpu-memory: the batch a GPU with that much free memory would take, and the
    plan at that batch; --image-batch-size still sets the plan's batch."""
    data = make_dataset(tmp_path)
    got = info_json(data / "p.star", "--ranks", "4", "--gpu-memory", "16", "--symmetry", "O")
    gpu = got["memory"]["gpu"]
    assert gpu["image_batch_size"] == got["memory"]["image_batch_size"] == 1024
    assert gpu["fits"] and gpu["free_GiB"] == 16 and got["memory"]["symmetry_order"] == 24
    text = info(data / "p.star", "--gpu-memory", "16").stdout
    assert "GPU image batch: 1024" in text and "--image-batch-size overrides" in text
    fixed = info_json(data / "p.star", "--gpu-memory", "16", "--image-batch-size", "8")
    assert fixed["memory"]["image_batch_size"] == 8


def test_cryosparc_file_with_split_and_scale(tmp_path):
    data = make_dataset(tmp_path, poses=True)
    ps = read_particles(data / "p.star")
    split = np.arange(N_PARTICLES) % 2
    scale = np.linspace(0.8, 1.2, N_PARTICLES)
    write_particles(data / "out", ps, ps.rotations, np.ones((N_PARTICLES, 2)), split, scale)
    got = info_json(data / "out" / "particles.cs")
    assert got["format"] == "CryoSPARC .cs"
    assert got["poses"] and got["shifts"]
    assert got["split"] == {"present": True, "half_A": 10, "half_B": 10, "unassigned": 0}
    assert got["scale"]["present"]
    assert got["scale"]["min"] == pytest.approx(0.8, abs=1e-6)
    assert got["scale"]["max"] == pytest.approx(1.2, abs=1e-6)


def test_problems_are_listed_not_fatal(tmp_path):
    names = ([f"{i + 1:06d}@stack.mrcs" for i in range(5)] + ["000002@stack.mrcs"]
             + [f"{i + 1:06d}@Extract/job9/gone.mrcs" for i in range(4)])
    data = make_dataset(tmp_path, names=names)
    got = info_json(data / "p.star")
    assert got["stacks"]["count"] == 2 and got["stacks"]["missing"] == 1
    assert not got["stacks"]["list"][1]["exists"]
    assert got["stacks"]["list"][1]["path"].endswith("Extract/job9/gone.mrcs")
    problems = " | ".join(got["problems"])
    assert "1 of 2 stacks not found" in problems and "--project-dir" in problems
    assert "rows 2 and 6" in problems


def test_stack_header_disagreement_is_a_note(tmp_path):
    """A header pixel size that disagrees with the metadata is no problem (the metadata
    wins) but a note naming both values; a wrong image size stays a problem."""
    data = make_dataset(tmp_path)
    write_stack(data / "stack.mrcs", np.zeros((N_PARTICLES, BOX, BOX), np.float32), 2.0)
    got = info_json(data / "p.star")
    assert got["problems"] == [] and got["pixel_size_A"] == pytest.approx(PIXEL_A)
    assert len(got["notes"]) == 1 and "says 2 Å/px" in got["notes"][0]
    assert "says 1.5 Å/px; using 1.5 Å/px" in got["notes"][0]
    write_stack(data / "stack.mrcs", np.zeros((N_PARTICLES, BOX + 2, BOX + 2), np.float32), 1.5)
    got = info_json(data / "p.star")
    assert len(got["problems"]) == 1 and f"box is {BOX} px" in got["problems"][0]
    assert "problem" in got["stacks"]["list"][0]


def test_map_statistics(tmp_path):
    volume = np.zeros((BOX, BOX, BOX), np.float32)
    volume[3, 4, 5], volume[6, 7, 8] = 2.0, -1.0
    write_mrc(tmp_path / "m.mrc", volume, 1.25)
    got = info_json(tmp_path / "m.mrc")
    assert got["kind"] == "volume" and got["shape_zyx"] == [BOX, BOX, BOX]
    assert got["pixel_size_A"] == pytest.approx(1.25)
    assert got["min"] == -1.0 and got["max"] == 2.0
    assert got["mean"] == pytest.approx(1.0 / BOX ** 3)
    stack = info_json(tmp_path.joinpath("m.mrc").rename(tmp_path / "m.mrcs"))
    assert stack["kind"] == "image stack"
    text = info(tmp_path / "m.mrcs").stdout
    assert "16 of 16 x 16 px" in text and "1.2500 Å" in text


def test_bad_arguments_are_one_line_errors(tmp_path):
    data = make_dataset(tmp_path)
    for args, words in ((["--ranks", "0"], "--ranks"), ([], "unknown extension"),
                        (["--gpu-memory", "0"], "--gpu-memory"),
                        (["--symmetry", "Q7"], "--symmetry")):
        target = data / "p.star" if args else data / "notes.txt"
        result = info(target, *args)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and words in result.stderr


def test_memory_model_matches_the_allocations():
    n = BOX
    g = grid_sizes(n)
    acc = Accumulator.zeros(n, 2, np)
    assert ACCUMULATOR_PER_VOXEL * g["V"] == acc.data.nbytes + acc.weight.nbytes
    vft = volume_ft(np.zeros((n, n, n), np.float32), pad=2)
    assert VFT_PER_VOXEL * g["V"] == vft.data.nbytes
    assert GATHER_TABLE_PER_ENTRY * g["gather_table"] == vft.gather_table().nbytes
    role = memory_per_rank(n, 20, 1, 32)["roles"][0]
    search = role["phases"]["search"]["device"]
    assert search["accumulators"] == 2 * ACCUMULATOR_PER_VOXEL * g["V"]


def test_memory_layout_follows_the_ranks():
    one = memory_per_rank(64, 1000, 1)["roles"]
    two = memory_per_rank(64, 1000, 2)["roles"]
    many = memory_per_rank(64, 1000, 6)["roles"]
    assert len(one) == 1 and len(two) == 2 and len(many) == 3
    # one rank serves both halves; with more, each rank serves one
    insertion = [r[0]["phases"]["insertion"]["device"]["accumulators"] for r in (one, two)]
    assert insertion[0] == 2 * insertion[1]
    assert "per-particle results" in two[0]["host"] and "per-particle results" not in two[1]["host"]
    # the half roots of one or two ranks reconstruct whole grids; more ranks, in slabs
    assert "reconstruction temporaries" in two[1]["phases"]["reconstruction"]["device"]
    assert "reconstruction temporaries" not in many[2]["phases"]["reconstruction"]["device"]
    assert many[2]["ranks"] == "ranks 2–5"
    assert all(r["gpu_only_host"] > 0 for r in two + many)   # MPI staging on GPU ranks
    # doubling the box multiplies the grids by about 8
    small = two[1]["phases"]["reconstruction"]["device"]["accumulators"]
    big = memory_per_rank(128, 1000, 2)["roles"][1]["phases"]["reconstruction"]["device"]
    assert 7.5 < big["accumulators"] / small < 8.5
    assert "total device" in format_memory(memory_per_rank(64, 1000, 6))


def test_relion30_file(tmp_path):
    data = make_dataset(tmp_path)
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(4)],
                              "rlnDefocusU": 20000.0, "rlnDefocusV": 19000.0,
                              "rlnDefocusAngle": 0.0, "rlnVoltage": 200.0,
                              "rlnSphericalAberration": 1.4, "rlnAmplitudeContrast": 0.07,
                              "rlnDetectorPixelSize": 15.0, "rlnMagnification": 100000.0})
    starfile.write({"": particles}, data / "old.star")
    got = info_json(data / "old.star")
    assert got["format"] == "RELION STAR 3.0 (one table)"
    assert got["pixel_size_A"] == pytest.approx(1.5) and got["n_particles"] == 4
    assert got["optics_groups"][0]["voltage_kV"] == 200.0
