"""The memory plan (mpirefine/report/memory.py): its terms against what the code
allocates (tracemalloc at small boxes), its phases and rank roles, the GPU image batch
it picks, and the one-line message when a rank runs out of memory.  The peak resident
memory of whole refinements is measured by benchmarks/bench_memory.py."""

import tracemalloc
import types

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpirefine.fourier.backproject import Accumulator
from mpirefine.fourier.project import volume_ft
from mpirefine.fourier.reconstruct import reconstruct
from mpirefine.geometry.symmetry import symmetrize_accumulator
from mpirefine.refinement.halfmaps import insert_particles
from mpirefine.report import memory
from mpirefine.report.memory import GiB, choose_gpu_image_batch, grid_sizes, memory_plan


def traced_peak(fn, *args, **kwargs):
    """Bytes ``fn`` allocates at its peak beyond what was alive before (NumPy arrays
    report their allocations to tracemalloc)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def filled_accumulator(n):
    acc = Accumulator.zeros(n, 2, np)
    rng = np.random.default_rng(1)
    acc.data[...] = rng.normal(size=acc.data.shape)
    acc.weight[...] = rng.random(size=acc.weight.shape)
    return acc


# ------------------------------------------------------------ terms vs allocations

def test_grids_are_the_arrays_the_code_allocates():
    n = 24
    g = grid_sizes(n)
    acc = Accumulator.zeros(n, 2, np)
    assert acc.data.nbytes + acc.weight.nbytes == memory.ACCUMULATOR_PER_VOXEL * g["V"]
    vft = volume_ft(np.zeros((n, n, n), np.float32), pad=2)
    assert vft.data.nbytes == memory.VFT_PER_VOXEL * g["V"]
    assert vft.gather_table().nbytes == memory.GATHER_TABLE_PER_ENTRY * g["gather_table"]
    from mpirefine.fourier.transforms import insertion_frequencies

    assert g["inserted"] == insertion_frequencies(n, np)[2].size


def test_reconstruction_temporaries():
    n = 32
    acc = filled_accumulator(n)
    got = traced_peak(reconstruct, acc.data, acc.weight, n, 2, mask_corners=False)
    assert got == pytest.approx(memory.RECONSTRUCT_PER_VOXEL * grid_sizes(n)["V"], rel=0.03)


def test_reference_transform():
    n = 32
    g = grid_sizes(n)
    volume = np.random.default_rng(2).normal(size=(n, n, n)).astype(np.float32)
    got = traced_peak(volume_ft, volume, pad=2)
    want = memory.VOLUME_FT_PER_VOXEL * g["V"] + memory.VOLUME_FT_PER_CUBE_VOXEL * g["cube"]
    assert got == pytest.approx(want, rel=0.05)


@pytest.mark.parametrize("n,batch", [(32, 64), (24, 256)])
def test_insertion_temporaries_on_the_array_path(monkeypatch, n, batch):
    """NumPy with MPIREFINE_JIT=0: the stencil's arrays and the scatter-add's operands
    grow with the samples; no full-grid temporary."""
    monkeypatch.setenv("MPIREFINE_JIT", "0")
    g = grid_sizes(n)
    rng = np.random.default_rng(3)
    nh = n // 2 + 1
    images = (rng.normal(size=(batch, n, nh)) + 1j * rng.normal(size=(batch, n, nh))).astype(
        np.complex64)
    ctf = rng.normal(size=(batch, n, nh)).astype(np.float32)
    acc = Accumulator.zeros(n, 2, np)
    got = traced_peak(insert_particles, acc, images, ctf, np.ones((n, nh), np.float32),
                      Rotation.random(batch, random_state=4).as_matrix(), np.zeros((batch, 2)),
                      np.ones(batch))
    samples = batch * g["inserted"]
    want = memory.INSERT_STENCIL_PER_SAMPLE * samples
    assert got == pytest.approx(want, rel=0.1)


def test_symmetrisation_holds_no_full_grid_temporaries(monkeypatch):
    """Besides its two outputs, the symmetrisation's array code (CuPy, or NumPy with
    MPIREFINE_JIT=0) holds one framed table of the sums and a slab's worth of points
    (tens of MB), as the plan counts: not the full-grid coordinates, index, mask and
    sums (three times as much at box 48).  The compiled loop holds no slab: less."""
    n = 48
    g = grid_sizes(n)
    acc = filled_accumulator(n)
    compiled_peak = traced_peak(symmetrize_accumulator, acc.data, acc.weight, "C2")
    monkeypatch.setenv("MPIREFINE_JIT", "0")
    got = traced_peak(symmetrize_accumulator, acc.data, acc.weight, "C2")
    plan = memory_plan(n, 0, 1, 16, symmetry_order=2)["roles"][0]["phases"]["symmetrisation"]
    parts = ("symmetrisation table", "symmetrised sums", "symmetrisation slab")
    want = sum(plan["device"][k] for k in parts)
    assert got == pytest.approx(want, rel=0.15)
    assert got < (memory.SYMMETRY_TABLE_PER_ENTRY * g["symmetry_table"]
                  + memory.SYMMETRY_OUTPUT_PER_VOXEL * g["V"] + 64 * 2 ** 20)
    assert compiled_peak <= want * 1.15


# ------------------------------------------------------------------ phases and roles

def roles(n_ranks, box=128, **kw):
    return memory_plan(box, 10_000, n_ranks, 256, **kw)["roles"]


def test_roles_follow_the_rank_layout():
    assert [r["ranks"] for r in roles(1)] == ["rank 0 (both halves)"]
    assert [r["ranks"] for r in roles(2)] == ["rank 0 (half A root)", "rank 1 (half B root)"]
    assert [r["ranks"] for r in roles(3)] == ["rank 0 (half A root)", "rank 1 (half B root)",
                                             "rank 2 (both halves)"]
    assert [r["ranks"] for r in roles(6)][2:] == ["ranks 2–5"]
    assert [r["ranks"] for r in roles(7)][2:] == ["ranks 2–5", "rank 6 (both halves)"]
    assert [r["halves"] for r in roles(7)] == [1, 1, 1, 2]


def test_root_pair_peaks_in_the_map_of_all_particles():
    """One or two ranks peak while world rank 0 makes the map from all particles: its
    own sums, the other half's, their sum and the reconstruction's temporaries."""
    V = grid_sizes(256)["V"]
    one, two = roles(1, 256), roles(2, 256)
    for role in (one[0], two[0]):
        assert role["peak"]["ram_phase"] == "reconstruction"
        device = role["device"]
        assert sum(device.values()) == pytest.approx(164 * V, rel=0.03)
    # half B's root holds its sums and the reconstruction's: 48 bytes per voxel less
    assert two[0]["peak"]["ram"] - two[1]["peak"]["ram"] == pytest.approx(48 * V, rel=0.05)
    # doubling the box multiplies the reconstruction's arrays by about 8
    small = roles(1, 128)[0]["phases"]["reconstruction"]["device"]
    assert 7.5 < sum(one[0]["phases"]["reconstruction"]["device"].values()) / sum(
        small.values()) < 8.5


def test_more_ranks_split_the_reconstruction():
    many = roles(8, 256)
    two = roles(2, 256)
    assert all(r["phases"]["reconstruction"]["ram"] < two[1]["phases"]["reconstruction"]["ram"]
               for r in many)
    assert max(r["peak"]["ram"] for r in many) < two[0]["peak"]["ram"]


def test_symmetrisation_counts_only_with_symmetry():
    c1 = roles(2, 256)
    o = roles(2, 256, symmetry_order=24)
    assert "symmetrisation" in c1[0]["phases"]          # shown, as what it would need
    assert all(r["peak"]["ram_phase"] != "symmetrisation" for r in c1)
    assert o[0]["phases"]["symmetrisation"]["ram"] > 0
    # an enforced group cuts the search's global grid to one asymmetric unit
    assert o[1]["phases"]["insertion"]["device"]["search tables"] < \
        c1[1]["phases"]["insertion"]["device"]["search tables"]


def test_gpu_rank_memory_is_device_and_host_split():
    role = roles(2, 256, gpu_free_bytes=16 * GiB)[0]   # scoring blocks: a share of it
    peak = role["peak"]
    assert peak["gpu"] < peak["ram"]                     # the host part is not on the GPU
    assert peak["gpu_host"] > 0 and role["gpu_only_host"] > 0   # MPI staging of the sums


def test_batch_grows_only_the_batch_phases():
    small = roles(2, 128)
    big = memory_plan(128, 1_000_000, 2, 1024)["roles"]
    grown = [r[0]["phases"]["insertion"]["device"]["insertion temporaries"] for r in (big, small)]
    assert grown[0] > 3 * grown[1]
    assert big[0]["phases"]["insertion"]["gpu"] > small[0]["phases"]["insertion"]["gpu"]
    assert big[0]["phases"]["reconstruction"]["gpu"] == small[0]["phases"]["reconstruction"]["gpu"]


def test_a_small_set_fills_smaller_batches():
    plan = memory_plan(128, 100, 2, 256)
    assert plan["images_per_batch"] == 50 and plan["image_batch_size"] == 256


# ------------------------------------------------------------------- the GPU batch

def test_gpu_batch_is_the_largest_power_of_two_that_fits():
    picks = [choose_gpu_image_batch(256, 2, free * GiB)["image_batch_size"]
             for free in (4, 8, 16, 40, 80, 140)]
    assert picks == sorted(picks) and picks[-1] == memory.GPU_MAX_IMAGE_BATCH
    for free in (8, 16, 40):
        choice = choose_gpu_image_batch(256, 2, free * GiB)
        batch = choice["image_batch_size"]
        assert batch & (batch - 1) == 0
        assert choice["needs_bytes"] <= choice["budget_bytes"] == int(0.8 * free * GiB)
        if batch < memory.GPU_MAX_IMAGE_BATCH:
            more = memory.batch_phase_bytes(256, 2, 2 * batch)[0]
            assert more > choice["budget_bytes"]
    # two ranks on one GPU share it
    assert choose_gpu_image_batch(256, 2, 8 * GiB, ranks_per_gpu=2)["image_batch_size"] < \
        choose_gpu_image_batch(256, 2, 8 * GiB)["image_batch_size"]
    tiny = choose_gpu_image_batch(512, 1, 1 * GiB)
    assert tiny["image_batch_size"] == 1 and not tiny["fits"]
    assert "more ranks per half set" in memory.gpu_batch_line(tiny)


class FakePar:
    size, rank = 2, 0

    def local_rank(self):
        return 0

    def local_size(self):
        return 2

    def allreduce_obj(self, x, **_kwargs):
        return x


def refine_config(tmp_path, *extra):
    from mpirefine.cli import build_parser
    from mpirefine.cli.refine import config_from_args
    from mpirefine.io import write_mrc

    write_mrc(tmp_path / "v.mrc", np.zeros((64, 64, 64), np.float32), 2.0)
    parser, _ = build_parser("refine")
    args = parser.parse_args(["refine", str(tmp_path / "p.star"), str(tmp_path / "v.mrc"),
                              "--out", str(tmp_path / "out"), *extra])
    return config_from_args(args)


def test_refine_picks_the_gpu_batch_from_free_memory(tmp_path, monkeypatch):
    from mpirefine import backend
    from mpirefine.cli.refine import choose_image_batch

    log = types.SimpleNamespace(info=lambda *_args: None)
    cfg = refine_config(tmp_path)
    assert cfg.image_batch_auto and cfg.image_batch_size == 256
    # on the CPU the batch stays 256
    monkeypatch.setattr(backend, "choose_device", lambda *_args: (np, None))
    assert choose_image_batch(cfg, FakePar(), log).image_batch_size == 256
    # on a GPU: the plan's pick for its free memory, both local ranks on one GPU
    monkeypatch.setattr(backend, "choose_device", lambda *_args: (object(), 0))
    monkeypatch.setattr(backend, "device_memory", lambda *_args: (20 * GiB, 24 * GiB))
    monkeypatch.setattr(backend, "gpu_device_count", lambda: 1)
    want = choose_gpu_image_batch(64, 2, 20 * GiB, ranks_per_gpu=2)["image_batch_size"]
    assert choose_image_batch(cfg, FakePar(), log).image_batch_size == want > 256
    # --image-batch-size overrides
    given = refine_config(tmp_path, "--image-batch-size", "32")
    assert not given.image_batch_auto
    assert choose_image_batch(given, FakePar(), log).image_batch_size == 32


# ----------------------------------------------------------------- out of memory

def run_refine_that_fails(tmp_path, monkeypatch, capsys, failure):
    """``mpirefine refine`` in this process, its refinement replaced by ``failure``."""
    from mpirefine import cli
    from mpirefine.refinement import refine

    monkeypatch.setattr(refine, "run", lambda *_args, **_kwargs: failure())
    status = cli.main(["refine", str(tmp_path / "p.star"), str(tmp_path / "v.mrc"), "--out",
                       str(tmp_path / "out"), "--cpu", "--image-batch-size", "64"])
    return status, capsys.readouterr().err


def test_out_of_memory_in_the_insertion_names_the_batch(tmp_path, monkeypatch, capsys):
    def insert_particles():
        raise MemoryError("Unable to allocate 3.1 GiB for an array")

    status, err = run_refine_that_fails(tmp_path, monkeypatch, capsys, insert_particles)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("mpirefine refine: error: out of memory in the insertion")
    assert "lower --image-batch-size (it was 64; try 32)" in err
    assert "Unable to allocate 3.1 GiB" in err and "--ranks 1" in err


def test_out_of_memory_in_the_reconstruction_names_ranks_and_box(tmp_path, monkeypatch, capsys):
    def reconstruct():
        raise MemoryError()

    status, err = run_refine_that_fails(tmp_path, monkeypatch, capsys, reconstruct)
    assert status == 2 and err.count("\n") == 1
    assert "out of memory in the reconstruction" in err
    assert "more ranks per half set" in err and "smaller box" in err
    assert "--image-batch-size" not in err


def test_cupy_out_of_memory_is_told_by_its_class_name(tmp_path, monkeypatch, capsys):
    OutOfMemoryError = type("OutOfMemoryError", (MemoryError,), {"__module__": "cupy.cuda.memory"})

    def run_search():
        raise OutOfMemoryError("Out of memory allocating 1,073,741,824 bytes")

    status, err = run_refine_that_fails(tmp_path, monkeypatch, capsys, run_search)
    assert status == 2 and err.count("\n") == 1
    assert "out of GPU memory in the search" in err and "--image-batch-size" in err


def test_other_errors_pass_through(tmp_path, monkeypatch, capsys):
    def broken():
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        run_refine_that_fails(tmp_path, monkeypatch, capsys, broken)
