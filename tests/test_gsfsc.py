"""The GSFSC that steers each iteration (refinement/gsfsc.py): masked, corrected by
phase randomisation, under the particle's extent before the dynamic mask starts and
under the dynamic mask once it has (and for good); the unmasked curve stays in the
outputs."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from mpirefine.fourier.filters import lowpass
from mpirefine.geometry.spheres import radial_distance
from mpirefine.postprocess.fsc import fsc_curve, resolution_A
from mpirefine.refinement.gsfsc import extent_mask, fsc_mask, steering_fsc

N, PX = 48, 2.0


def blob(radius_px: float, n: int = N) -> np.ndarray:
    """A soft ball of radius ``radius_px`` at the box centre."""
    r = radial_distance(n, np).astype(np.float64)
    return np.clip(radius_px + 0.5 - r, 0.0, 1.0)


def test_extent_mask_is_a_soft_sphere_around_the_particle():
    mask = extent_mask(blob(8.0), PX, resolution_A=10.0, threshold=0.2, near=0.5, far=1.2)
    r = radial_distance(N, np)
    # 1 out to the core (r < 8.3) plus near x resolution (2.5 px), 0 from far (+ 3.5 px) on
    assert np.all(mask[r <= 10.4] == 1.0)
    assert np.all(mask[r >= 14.4] == 0.0)
    assert mask.dtype == np.float32 and 0.0 < mask[(r > 11) & (r < 13.5)].min() < 1.0
    # an empty map (nothing above the threshold) gets the window's outer sphere
    empty = extent_mask(np.zeros((N, N, N)), PX, 10.0, 0.2, 0.5, 1.2)
    assert empty[N // 2, N // 2, N // 2] == 1.0 and empty[0, 0, 0] == 0.0
    # never beyond the window, whatever the particle's size
    big = extent_mask(blob(30.0), PX, 20.0, 0.2, 0.5, 1.2, outer_fraction=0.99)
    assert np.all(big[r >= 0.99 * N / 2] == 0.0)


def job_like(static_mask=None, masks=None, extent=None, seed=0):
    return SimpleNamespace(xp=np, prep=SimpleNamespace(box=N, pixel_size_A=PX),
                           cfg=SimpleNamespace(seed=seed, symmetry_relaxation="none"),
                           static_mask=static_mask,
                           masks=masks or {}, extent_mask=extent)


def test_fsc_mask_prefers_static_then_dynamic_then_extent():
    ones, half = np.ones((N, N, N), np.float32), np.full((N, N, N), 0.5, np.float32)
    extent = extent_mask(blob(8.0), PX, 10.0, 0.2, 0.5, 1.2)
    assert fsc_mask(job_like(static_mask=half, masks={0: ones, 1: ones}, extent=extent))[1] == "static"
    mask, kind = fsc_mask(job_like(masks={0: ones, 1: half}, extent=extent))
    assert kind == "dynamic" and np.allclose(mask, 0.75)
    assert fsc_mask(job_like(extent=extent))[1] == "extent"


@pytest.fixture(scope="module")
def small_particle_half_maps():
    """A small particle (radius 7 px) in a 48 px box: two half maps of signal plus
    independent white noise, whose unmasked FSC is dominated by the solvent's noise."""
    rng = np.random.default_rng(3)
    signal = lowpass(blob(7.0) * (1 + 0.5 * rng.normal(size=(N, N, N))), 5.0, PX)
    signal *= 1.0 / signal.std()
    return {h: signal + 3.0 * rng.normal(size=(N, N, N)) for h in (0, 1)}


def test_masked_corrected_gsfsc_beats_the_unmasked_one_on_a_small_particle(small_particle_half_maps):
    maps = small_particle_half_maps
    extent = extent_mask(lowpass(0.5 * (maps[0] + maps[1]), 20.0, PX), PX, 20.0, 0.2, 0.5, 1.2)
    got = steering_fsc(job_like(extent=extent), maps, iteration=3)
    assert got.mask == "extent"
    np.testing.assert_allclose(got.unmasked, fsc_curve(maps[0], maps[1]), atol=1e-6)
    assert got.unmasked_resolution_A == pytest.approx(resolution_A(got.unmasked, N, PX))
    assert got.resolution_A < 0.85 * got.unmasked_resolution_A, (got.resolution_A,
                                                                 got.unmasked_resolution_A)
    # reproducible: seeded by --seed and the iteration
    again = steering_fsc(job_like(extent=extent), maps, iteration=3)
    np.testing.assert_array_equal(got.fsc, again.fsc)
    record = got.record()
    assert record["gsfsc_mask"] == "extent" and len(record["fsc_unmasked"]) == N // 2 + 1


def test_the_correction_removes_what_a_tight_mask_adds():
    """Half maps that share only a signal low-passed to 12 Å (shell 8) plus independent
    noise: a tight mask spreads that signal to every shell, so the masked FSC stays high
    far beyond shell 8; the correction removes most of that (measured: masked 0.8, corrected
    0.2 on shells 14-23; one phase-randomisation draw set is noisy for so tight a mask)."""
    rng = np.random.default_rng(5)
    signal = 30.0 * lowpass(blob(6.0), 12.0, PX)
    maps = {h: signal + rng.normal(size=(N, N, N)) for h in (0, 1)}
    tight = extent_mask(blob(5.0), PX, 4.0, 0.2, 0.2, 0.6)
    got = steering_fsc(job_like(static_mask=tight), maps, iteration=1)
    beyond = slice(14, N // 2)
    assert got.masked[beyond].mean() > 0.5, got.masked[beyond]
    assert abs(got.fsc[beyond].mean()) < 0.4 * got.masked[beyond].mean(), got.fsc[beyond]


def test_dynamic_mask_once_started_stays_on():
    from mpirefine.refinement.refine import _use_dynamic_mask

    cfg = SimpleNamespace(dynamic_mask=True, mask=None, dynamic_mask_start_resolution_A=12.0)
    assert not _use_dynamic_mask(SimpleNamespace(cfg=cfg, masks={}), 14.0)
    assert _use_dynamic_mask(SimpleNamespace(cfg=cfg, masks={}), 11.0)
    assert _use_dynamic_mask(SimpleNamespace(cfg=cfg, masks={0: 1, 1: 1}), 14.0)   # started
    static = SimpleNamespace(dynamic_mask=True, mask="m.mrc", dynamic_mask_start_resolution_A=12.0)
    assert not _use_dynamic_mask(SimpleNamespace(cfg=static, masks={}), 5.0)


def test_refinement_records_both_curves_and_never_drops_the_dynamic_mask(refine_dataset, tmp_path):
    """A refinement steered by the masked GSFSC: the extent mask first, the dynamic mask
    from the iteration after the resolution passes its start, then on every iteration;
    each iteration keeps its unmasked curve and resolution too."""
    from refine_data import refine_args
    from test_refine import run_cli

    out = str(tmp_path / "run")
    res = run_cli(refine_args(refine_dataset, out, "--cpu", "--dynamic-mask-start-resolution", "11"))
    assert res.returncode == 0, res.stderr[-3000:]
    its = json.load(open(os.path.join(out, "summary.json")))["iterations"]
    kinds = [it["gsfsc_mask"] for it in its]
    assert kinds[0] == "extent" and "dynamic" in kinds, kinds
    first = kinds.index("dynamic")
    assert all(k == "dynamic" for k in kinds[first:]), kinds
    assert its[first - 1]["resolution_A"] <= 11.0
    for it in its:
        assert len(it["fsc_unmasked"]) == len(it["fsc_corrected"]) > 10
        assert it["resolution_unmasked_A"] >= it["resolution_A"] * 0.9
    assert os.path.exists(os.path.join(out, "mask_refine.mrc"))
