"""Images stream from memory-mapped stacks: ImageSource's one-batch-ahead prefetch
changes neither the images, nor their order, nor the refinement's sums; a read
touches only the images asked for; and a pass over a stack does not leave the stack
in the process's resident memory."""

import functools
import mmap
import os
import threading
import time

import mrcfile
import numpy as np
import pandas as pd
import pytest

from mpirefine.errors import InputError
from mpirefine.io import ImageSource, read_particles, write_relion_star, write_stack
from mpirefine.io.mrc import MrcStack

BOX = 16
PREFETCH_THREAD = "mpirefine-images"


def write_star(folder, stacks: dict, box: int = BOX) -> str:
    """folder/p.star listing every image of ``stacks`` (file name -> number of images),
    in that order; returns its path."""
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7],
                           "rlnVoltage": [300.0], "rlnImagePixelSize": [1.0],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    names = [f"{i + 1:06d}@{name}" for name, count in stacks.items() for i in range(count)]
    m = len(names)
    particles = pd.DataFrame({"rlnImageName": names, "rlnDefocusU": np.full(m, 15000.0),
                              "rlnDefocusV": np.full(m, 14000.0), "rlnDefocusAngle": np.full(m, 10.0),
                              "rlnOpticsGroup": np.ones(m, dtype=np.int64)})
    path = os.path.join(folder, "p.star")
    write_relion_star(path, optics, particles)
    return path


@pytest.fixture
def three_stacks(tmp_path):
    """Three stacks of 37, 5 and 58 distinct images; (particle set, every image in row order)."""
    rng = np.random.default_rng(4)
    sizes = {"a.mrcs": 37, "b.mrcs": 5, "c.mrcs": 58}
    images = []
    for name, count in sizes.items():
        block = rng.normal(size=(count, BOX, BOX)).astype(np.float32)
        write_stack(tmp_path / name, block, 1.0)
        images.append(block)
    return read_particles(write_star(tmp_path, sizes)), np.concatenate(images)


@pytest.fixture
def read_threads(monkeypatch):
    """The name of the thread of every MrcStack.read, and the indices it read."""
    calls = []
    original = MrcStack.read

    def spy(self, indices):
        calls.append((threading.current_thread().name, np.asarray(indices).copy()))
        return original(self, indices)

    monkeypatch.setattr(MrcStack, "read", spy)
    return calls


def _no_prefetch_thread_left():
    return not any(t.name.startswith(PREFETCH_THREAD) for t in threading.enumerate())


@pytest.mark.parametrize("size", [1, 7, 40, 1000])
def test_prefetch_gives_the_same_batches_in_the_same_order(three_stacks, read_threads, size):
    ps, truth = three_stacks
    order = np.random.default_rng(size).permutation(len(ps))[:83]   # across the stacks
    for indices in (np.arange(len(ps)), order):
        with ImageSource(ps, prefetch=False) as source:
            plain = list(source.batches(indices, size))
        assert all(name == threading.main_thread().name for name, _ in read_threads)
        read_threads.clear()
        with ImageSource(ps) as source:
            ahead = []
            for idx, images in source.batches(indices, size):
                time.sleep(0.002)           # a slow consumer: the reader runs ahead
                ahead.append((idx, images))
            assert source.images_read == indices.size
        if len(plain) > 1:                  # a single batch is read when it is due
            assert {name for name, _ in read_threads} == {f"{PREFETCH_THREAD}_0"}
        read_threads.clear()
        assert len(ahead) == len(plain) == -(-indices.size // size)
        np.testing.assert_array_equal(np.concatenate([i for i, _ in ahead]), indices)
        for (i1, im1), (i2, im2) in zip(plain, ahead):
            np.testing.assert_array_equal(i1, i2)
            assert im1.dtype == im2.dtype == np.float32
            np.testing.assert_array_equal(im1, im2)
            np.testing.assert_array_equal(im2, truth[i2])
    assert _no_prefetch_thread_left()


def test_prefetch_raises_a_read_error_when_its_batch_is_due(tmp_path):
    images = np.random.default_rng(1).normal(size=(40, BOX, BOX)).astype(np.float32)
    images[27, 3, 3] = np.nan
    write_stack(tmp_path / "s.mrcs", images, 1.0)
    ps = read_particles(write_star(tmp_path, {"s.mrcs": 40}))
    for prefetch in (False, True):
        seen = []
        with ImageSource(ps, prefetch=prefetch) as source:
            with pytest.raises(InputError, match=r"image 28 of stack .*s\.mrcs.*NaN"):
                for idx, _ in source.batches(np.arange(40), 10):
                    seen.append(idx[0])
        assert seen == [0, 10]              # the batches before the bad one, no more
    assert _no_prefetch_thread_left()


def test_leaving_a_prefetching_loop_early_closes_cleanly(three_stacks):
    ps, truth = three_stacks
    with ImageSource(ps) as source:
        for k, (idx, images) in enumerate(source.batches(np.arange(len(ps)), 8)):
            np.testing.assert_array_equal(images, truth[idx])
            if k == 2:
                break
        # the maps stay usable after an abandoned loop, and close() waits for the reader
        np.testing.assert_array_equal(source.images([99, 0]), truth[[99, 0]])
    assert not source._open and not source._pending
    assert _no_prefetch_thread_left()


def test_read_ahead_serves_the_next_batches_call(three_stacks, read_threads):
    """read_ahead(block) reads on its own thread; a batches() call that starts with that
    block gets those images (no second read); one that starts elsewhere drops it."""
    ps, truth = three_stacks
    order = np.random.default_rng(2).permutation(len(ps))[:30]
    with ImageSource(ps) as source:
        source.read_ahead(order[:8])
        time.sleep(0.05)
        assert {name for name, _ in read_threads} == {"mpirefine-ahead_0"}
        batches = list(source.batches(order, 8))
        assert source.ahead_used == 1 and source.images_read == order.size
        for idx, images in batches:
            np.testing.assert_array_equal(images, truth[idx])
        source.read_ahead(order[8:16])      # not what the next call asks for first
        batches = list(source.batches(order, 8))
        assert source.ahead_used == 1
        for idx, images in batches:
            np.testing.assert_array_equal(images, truth[idx])
    assert not source._pending and source._ahead is None
    assert not any(t.name.startswith("mpirefine-ahead") for t in threading.enumerate())


def test_refinement_pass_is_identical_with_and_without_prefetch(tmp_path, monkeypatch, read_threads):
    """align_and_backproject's sums, noise power and per-particle results, bit for bit."""
    from mpi4py import MPI

    from mpirefine.config import RefineConfig
    from mpirefine.logs import get_logger
    from mpirefine.parallel import Parallel
    from mpirefine.refinement import refine
    from mpirefine.synthetic.models import asymmetric_chains, model_volume
    from mpirefine.synthetic.simulate import simulate_dataset

    box, px, n = 32, 3.0, 150
    volume = model_volume(box=box, pixel_size_A=px, chains=asymmetric_chains(), center_A="chains")
    simulate_dataset(volume, px, n, tmp_path / "data", snr=0.1, seed=5, stack_size=40)
    par = Parallel(MPI.COMM_SELF)
    cfg = RefineConfig(particles=str(tmp_path / "data" / "particles.star"),
                       volume=str(tmp_path / "data" / "start_20A.mrc"), out_dir=str(tmp_path / "out"),
                       image_batch_size=16, reestimate_greyscale=False, device="cpu", seed=2)

    def one_pass():
        job = refine.build_job(cfg, par, get_logger("test_streaming", rank=0, level=40))
        job.noise = refine.initial_noise_model(job)
        accs, power, counts = refine.align_and_backproject(job, np.arange(n), 1, par.timer)
        return accs, power, counts, job.state

    with_prefetch = one_pass()
    assert any(name.startswith(PREFETCH_THREAD) for name, _ in read_threads)
    read_threads.clear()
    monkeypatch.setattr(ImageSource, "__init__",
                        functools.partialmethod(ImageSource.__init__, prefetch=False))
    without = one_pass()
    assert read_threads and not any(name.startswith(PREFETCH_THREAD) for name, _ in read_threads)
    for half in (0, 1):
        for name in ("data", "weight"):
            a, b = (getattr(r[0][half], name) for r in (with_prefetch, without))
            assert np.any(a != 0)
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(with_prefetch[1], without[1])
    np.testing.assert_array_equal(with_prefetch[2], without[2])
    for name in ("rotations", "shifts_px", "scale", "log_likelihood", "aligned"):
        np.testing.assert_array_equal(getattr(with_prefetch[3], name), getattr(without[3], name))
    assert with_prefetch[3].aligned.all()


# ----------------------------------------------------------------------------- laziness

def _mapped_kib(path) -> int:
    """Resident KiB of this process's maps of ``path`` (from /proc/self/smaps)."""
    target = os.path.realpath(path)
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split(None, 5)
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:   # a mapping's header
                inside = len(head) == 6 and head[5].strip() == target
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


needs_smaps = pytest.mark.skipif(
    not os.path.exists("/proc/self/smaps") or not hasattr(mmap, "MADV_DONTNEED"),
    reason="resident memory per map needs Linux's /proc/self/smaps and madvise")


@needs_smaps
def test_reading_touches_only_the_images_asked_for(tmp_path, read_threads):
    """A 1 GiB stack (sparse on disk): reading 3 images reads those 3 from the map and
    leaves neither the map nor the process holding the stack."""
    n, box = 16384, 128
    path = tmp_path / "big.mrcs"
    wanted = [9000, 3, 16000]
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2) as mrc:
        for k in wanted:
            mrc.data[k] = k
        mrc.set_image_stack()
        mrc.voxel_size = 1.0
    ps = read_particles(write_star(tmp_path, {"big.mrcs": n}, box=box))
    with ImageSource(ps) as source:
        images = source.images(wanted)
        assert _mapped_kib(path) <= 64          # the 3 images' pages were handed back
    assert [list(indices) for _, indices in read_threads] == [wanted]
    np.testing.assert_array_equal(images[:, 0, 0], wanted)
    assert images.shape == (3, box, box)


@needs_smaps
def test_a_pass_leaves_no_stack_pages_resident(tmp_path, monkeypatch):
    """Over a whole pass of a 64 MiB stack, the map never holds more than a few batches;
    without handing the pages back it would hold the whole stack (the control)."""
    n, box, size = 4000, 64, 100
    write_stack(tmp_path / "s.mrcs", np.random.default_rng(0).normal(size=(n, box, box))
                .astype(np.float32), 1.0)
    ps = read_particles(write_star(tmp_path, {"s.mrcs": n}, box=box))
    batch_kib = size * box * box * 4 // 1024

    def largest_resident(source):
        most = 0
        for _ in source.batches(np.arange(n), size):
            most = max(most, _mapped_kib(tmp_path / "s.mrcs"))
        return most, _mapped_kib(tmp_path / "s.mrcs")

    with ImageSource(ps) as source:
        most, after = largest_resident(source)
    assert most <= 3 * batch_kib and after <= batch_kib
    monkeypatch.setattr(ImageSource, "_drop_resident_pages", staticmethod(lambda _stack: None))
    with ImageSource(ps) as source:
        _, kept = largest_resident(source)
    assert kept >= 0.5 * n * box * box * 4 / 1024
