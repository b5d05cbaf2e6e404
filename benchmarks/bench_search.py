"""Benchmark the coarse-to-fine pose search against the machine's GEMM rate.

Simulates CTF-modulated, shifted, noisy particles of a blob volume, runs
:func:`mpirefine.search.poses.search_poses` ``--repeats`` times, measures in the same
process the single-precision GEMM rate (square float32 matmul, median of several),
and writes JSON: poses scored per second, GEMM FLOP/s achieved over the whole search
and as a fraction of the machine rate, seconds per 1,000 particles, the time split
(projection / scoring / selection / other), accuracy against the truth, backend and
threads.

    python benchmarks/bench_search.py --particles 1000 --threads 1 --out bench_search.json

``--backend gpu`` runs on CuPy.  Without a GPU, MPIREFINE_CUPY_STANDIN=1 runs it on the
CuPy stand-in of tests/gpu_standin (NumPy underneath; never in place of an installed
CuPy), sizing the work for a device of CUPY_STANDIN_DEVICE_MEMORY bytes (default 80 GB,
an H100), and adds ``standin_counts``: kernel launches, host/device copies and
synchronising reads per particle and search, and the lines that launch the most.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--particles", type=int, default=1000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size-A", type=float, default=3.0)
    p.add_argument("--noise", type=float, default=1.0,
                   help="noise σ relative to the clean images' standard deviation")
    p.add_argument("--max-shift-px", type=float, default=3.0)
    p.add_argument("--coarse-step-deg", type=float, default=20.0)
    p.add_argument("--final-step-deg", type=float, default=10.0)
    p.add_argument("--coarse-radius-px", type=float, default=8.0)
    p.add_argument("--final-radius-px", type=float, default=16.0)
    p.add_argument("--shift-range-px", type=float, default=5.0)
    p.add_argument("--shift-step-px", type=float, default=1.0)
    p.add_argument("--n-keep", type=int, default=8)
    p.add_argument("--marginalize", action="store_true")
    p.add_argument("--plan-resolution-A", type=float, default=None,
                   help="take every search setting from the refinement's own plan at this "
                        "alignment resolution (search_plan.plan_search) instead of the "
                        "step/radius/shift options above")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (CPU)")
    p.add_argument("--backend", choices=["auto", "cpu", "gpu"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output path (default: stdout only)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before NumPy loads its BLAS

    import numpy as np

    from mpirefine.backend import backend_name, choose_backend
    from mpirefine.fourier import compiled
    from mpirefine.geometry.rotations import angular_distance_deg
    from mpirefine.search.poses import SearchParams, search_poses

    standin = _cupy_standin() if args.backend == "gpu" else None
    xp = choose_backend(args.backend)
    sync = _synchronizer(xp)
    vft, images, ctf, noise_var, rotations, shifts = _simulate(args, xp)
    if args.plan_resolution_A:
        from types import SimpleNamespace

        from mpirefine.refinement.images import ImagePrep
        from mpirefine.search.plan import plan_search

        prep = ImagePrep(box=args.box, pixel_size_A=args.pixel_size_A)
        params = plan_search(args.plan_resolution_A, prep,
                             SimpleNamespace(image_batch_size=args.chunk_size),
                             marginalize=args.marginalize).params
    else:
        params = SearchParams(
            coarse_step_deg=args.coarse_step_deg, final_step_deg=args.final_step_deg,
            coarse_radius_px=args.coarse_radius_px, final_radius_px=args.final_radius_px,
            shift_range_px=args.shift_range_px, coarse_shift_step_px=args.shift_step_px,
            n_keep=args.n_keep, marginalize=args.marginalize, chunk_size=args.chunk_size)

    gemm_rate = _gemm_rate(xp, sync)
    t0 = time.perf_counter()  # compiles (or loads) the projection kernel, warms the caches
    search_poses(vft, images[:16], None if ctf is None else ctf[:16], noise_var, params=params)
    sync()
    warmup = time.perf_counter() - t0
    times, result = [], None
    counted = standin.counts() if standin else None
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        result = search_poses(vft, images, ctf, noise_var, params=params)
        sync()
        times.append(time.perf_counter() - t0)
    wall = float(np.median(times))
    st = result.stats
    err = angular_distance_deg(result.rotations, rotations)
    shift_err = np.abs(result.shifts_px - shifts).max(axis=1)
    flops_per_s = st.gemm_flops / wall
    parts = {k: v for k, v in st.seconds.items() if k != "total"}
    parts["other"] = max(0.0, st.seconds["total"] - sum(parts.values()))
    report = {
        "backend": backend_name(xp),
        "projection_kernel": compiled.kernel_name(xp),
        "threads": args.threads,
        "particles": args.particles,
        "box": args.box,
        "params": {k: getattr(params, k) for k in params.__dataclass_fields__},
        "n_levels": params.n_levels,
        "level_radii_px": params.level_radii_px(),
        "repeats": args.repeats,
        "search_seconds_median": wall,
        "search_seconds_all": times,
        "warmup_seconds": warmup,
        "seconds_per_1000_particles": wall * 1000.0 / args.particles,
        "poses_scored": st.poses_scored,
        "poses_scored_per_s": st.poses_scored / wall,
        "gemm_flops": st.gemm_flops,
        "gemm_flops_per_s": flops_per_s,
        "machine_gemm_flops_per_s": gemm_rate,
        "fraction_of_machine_gemm": flops_per_s / gemm_rate,
        "gemm_flops_per_s_inside_scoring": st.gemm_flops / max(st.seconds["score"], 1e-12),
        "projection_samples": st.projection_samples,
        "projection_samples_per_s": st.projection_samples / max(st.seconds["project"], 1e-12),
        "seconds_breakdown_last_run": parts,
        "accuracy": {
            "median_angle_error_deg": float(np.median(err)),
            "fraction_angle_error_below_2_steps": float(np.mean(err < 2 * params.final_step_deg)),
            "fraction_shift_within_1px": float(np.mean(shift_err < 1.0)),
        },
        "python": sys.version.split()[0],
        "numpy": np.__version__,
    }
    if backend_name(xp) == "cupy":
        pool = xp.get_default_memory_pool()   # a pool keeps what it was given: its peak
        report["device_pool_total_bytes"] = int(pool.total_bytes())
        report["cupy"] = xp.__version__
    if standin:
        report["standin_device_memory_bytes"] = int(float(os.environ["CUPY_STANDIN_DEVICE_MEMORY"]))
        report["standin_counts"] = _per_particle(counted, standin.counts(),
                                                 args.repeats * args.particles)
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


def _cupy_standin():
    """The counters of the CuPy stand-in (tests/gpu_standin) when MPIREFINE_CUPY_STANDIN=1
    and no real CuPy is installed; None otherwise (a real CuPy is always used)."""
    import importlib.util

    if os.environ.get("MPIREFINE_CUPY_STANDIN", "0") != "1":
        return None
    standin = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "tests", "gpu_standin")
    spec = importlib.util.find_spec("cupy")
    if spec is not None and not os.path.abspath(spec.origin or "").startswith(standin + os.sep):
        print(f"MPIREFINE_CUPY_STANDIN=1 ignored: a real CuPy is installed ({spec.origin})",
              file=sys.stderr)
        return None
    if spec is None:
        sys.path.insert(0, standin)
    # size the work as on an 80 GB GPU (H100) unless told otherwise
    os.environ.setdefault("CUPY_STANDIN_DEVICE_MEMORY", str(80 * 10 ** 9))
    import cupy

    return cupy._standin


def _per_particle(before: dict, after: dict, particles: int) -> dict:
    """Stand-in counters between two snapshots, per particle and search, with the
    calling lines that launch the most."""
    def diff(key):
        old = before[key]
        return {k: v - old.get(k, 0) for k, v in after[key].items() if v != old.get(k, 0)}

    out = {f"{key}_per_particle": (after[key] - before[key]) / particles
           for key in ("launches", "h2d", "d2h", "copies", "syncs", "h2d_bytes", "d2h_bytes")}
    out["particles_counted"] = particles
    out["peak_device_bytes"] = after["peak_bytes"]
    for key in ("by_site", "by_op", "sync_sites", "copy_sites"):
        top = sorted(diff(key).items(), key=lambda kv: -kv[1])[:12]
        out[f"top_{key}_per_particle"] = {k: v / particles for k, v in top}
    return out


def _synchronizer(xp):
    """A callable that waits for queued device work (no-op on NumPy)."""
    cuda = getattr(xp, "cuda", None)
    if cuda is None:
        return lambda: None
    return lambda: cuda.Device().synchronize()


def _gemm_rate(xp, sync, size: int = 2048, repeats: int = 7) -> float:
    """Median FLOP/s of a float32 (size × size) @ (size × size) product."""
    import numpy as np

    rng = np.random.default_rng(1)
    a = xp.asarray(rng.standard_normal((size, size), dtype=np.float32))
    b = xp.asarray(rng.standard_normal((size, size), dtype=np.float32))
    a @ b
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / float(np.median(times))


def _simulate(args, xp):
    """Blob volume, particles with random poses, shifts, CTFs and white noise."""
    import numpy as np
    from scipy.spatial.transform import Rotation

    from mpirefine.backend import to_numpy
    from mpirefine.fourier.project import project_transforms, volume_ft
    from mpirefine.fourier.transforms import centered_irfft2, centered_rfft2, freq_grid_2d, phase_shift_2d
    from mpirefine.physics.ctf import CTFParams, evaluate_ctf

    n, B = args.box, args.particles
    rng = np.random.default_rng(args.seed)
    vft = volume_ft(xp.asarray(_blob_volume(n, rng)))
    rotations = Rotation.random(B, random_state=args.seed + 1).as_matrix()
    shifts = rng.uniform(-args.max_shift_px, args.max_shift_px, (B, 2))
    ky, kx = freq_grid_2d(n, np)
    defocus = rng.uniform(8000.0, 25000.0, B)
    ctf_params = CTFParams(defocus_u_A=defocus + 300.0, defocus_v_A=defocus - 300.0,
                           defocus_angle_deg=rng.uniform(0, 180, B), voltage_kV=300.0,
                           cs_mm=2.7, amplitude_contrast=0.1)
    ctf = evaluate_ctf(ctf_params, kx / (n * args.pixel_size_A), ky / (n * args.pixel_size_A))
    images = np.empty((B, n, n // 2 + 1), np.complex64)
    for s in range(0, B, 256):  # bounded memory for large --particles
        proj = to_numpy(project_transforms(vft, rotations[s: s + 256]))
        images[s: s + 256] = phase_shift_2d(ctf[s: s + 256] * proj, -shifts[s: s + 256], n)
    sigma = args.noise * float(centered_irfft2(images[:64], n).std())
    noise_var = np.full(n // 2 + 1, max(sigma, 1e-3) ** 2 * n * n)
    for s in range(0, B, 256):
        noise = rng.normal(0.0, sigma, (min(256, B - s), n, n)).astype(np.float32)
        images[s: s + 256] += centered_rfft2(noise).astype(np.complex64)
    return vft, images, ctf, noise_var, rotations, shifts


def _blob_volume(n, rng, n_blobs=60, sigma_px=1.5):
    """Asymmetric test volume: Gaussian blobs (atoms-like) inside a sphere of n/3."""
    import numpy as np

    c = np.arange(n, dtype=np.float32) - n // 2
    vol = np.zeros((n, n, n), np.float32)
    for _ in range(n_blobs):
        p = rng.normal(size=3)
        p = p / np.linalg.norm(p) * rng.uniform(0.0, n / 3.5)
        gx, gy, gz = (np.exp(-(c - p[i]) ** 2 / (2 * sigma_px ** 2)) for i in range(3))
        vol += rng.uniform(0.5, 1.5) * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return vol


if __name__ == "__main__":
    main()
