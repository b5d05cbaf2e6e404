"""Memory a refinement needs on each rank, from the box, the particle count and the layout.

The model follows what the code allocates (sizes in bytes, n = box in px, padding 2):

- per half a rank serves: an Accumulator, complex128 data + float64 weights on the
  padded half-space grid (2n, 2n, n+1) (fourier/backproject.py); and the reference:
  its complex64 transform on that grid, the zero-framed complex64 gather table
  (2n+4, 2n+4, n+3) (fourier/project.py), the real reference and mask (n³ float32);
- per rank: one batch of ``image_batch_size`` images (real images, transforms and
  CTFs, twice for temporaries) and the pose search's working arrays with alignment
  at Nyquist, as :func:`mpirefine.search.poses.working_bytes` counts them (a chunk's data
  at the search frequencies, the first level's projection cache when it fits in
  half of the search's max_chunk_MB, the global grid's tables, the scoring blocks);
- per rank, on the host: the images read ahead, two more batches of raw images
  (ImageSource's prefetch reads the next batch while the current one is searched).
  The stacks themselves are not held: they are memory-mapped and a read hands the
  mapped pages back, so nothing here grows with the number of particles except the
  per-particle metadata and results below (measured: benchmarks/bench_stream.py);
- half roots (world ranks 0 and 1; rank 0 alone on one rank): reconstruction
  temporaries, about three accumulators (Hermitian copies, regulariser, quotient),
  one half at a time, and both half maps on the host;
- world rank 0: the per-particle results (rotation, shift, scale, likelihood) and
  the gather of every rank's results;
- every rank: the particle metadata (it reads the whole particle file) and about
  200 MiB for the interpreter and its libraries;
- GPU ranks in a half group of more than one rank: a host copy of the accumulator's
  data for the reduction.

"device" is GPU memory on a GPU rank and host RAM on a NumPy rank; "host" is host
RAM in both cases.  Estimates, not bounds: allocator caches and library workspaces
(cuFFT, cuBLAS) come on top.
"""

from __future__ import annotations

import math

import numpy as np

MiB = 2 ** 20
TYPICAL_LEVELS = 4                      # subdivisions from 15° to the 1–2° of high resolution
RESULT_BYTES_PER_PARTICLE = 9 * 8 + 2 * 8 + 8 + 8 + 1
BASELINE_HOST_BYTES = 200 * MiB         # a rank's interpreter, NumPy/SciPy and MPI (measured)


def _half_plane_pixels(radius_px: float) -> int:
    return int(math.pi * radius_px ** 2 / 2) + 1


def search_bytes(box: int, image_batch_size: int) -> int:
    """Pose-search working arrays with alignment at Nyquist (the search's own count)."""
    from mpirefine.geometry.grids import so3_grid
    from mpirefine.search.plan import COARSE_RADIUS_FRACTION, COARSE_STEP_DEG, MIN_COARSE_RADIUS_PX
    from mpirefine.search.poses import SearchParams, working_bytes

    radius = box // 2 - 1
    coarse = min(radius, max(MIN_COARSE_RADIUS_PX, COARSE_RADIUS_FRACTION * radius))
    params = SearchParams(coarse_step_deg=COARSE_STEP_DEG,
                          final_step_deg=COARSE_STEP_DEG / 2 ** TYPICAL_LEVELS,
                          coarse_radius_px=coarse, final_radius_px=radius,
                          chunk_size=image_batch_size)
    n_freq = [_half_plane_pixels(r) for r in params.level_radii_px()]
    return sum(working_bytes(params, len(so3_grid(COARSE_STEP_DEG)), n_freq).values())


def component_bytes(box: int, image_batch_size: int) -> dict:
    """Sizes in bytes of each kind of allocation for a box of ``box`` px."""
    n = int(box)
    padded = (2 * n) * (2 * n) * (n + 1)
    half_plane = n * (n // 2 + 1)
    return {
        "accumulator": 24 * padded,
        "reference": 8 * padded + 8 * (2 * n + 4) ** 2 * (n + 3) + 2 * 4 * n ** 3,
        "image_batch": 2 * image_batch_size * (4 * n * n + 8 * half_plane + 4 * half_plane),
        "image_prefetch": 2 * image_batch_size * 4 * n * n,
        "search": search_bytes(n, image_batch_size),
        "reconstruction": 3 * 24 * padded,
        "half_maps": 2 * 2 * 4 * n ** 3,        # both half maps and the next references
        "reduction_staging": 16 * padded,
    }


def metadata_bytes(particle_set) -> int:
    """Host bytes of a ParticleSet's arrays and original table (what every rank holds)."""
    total = 0
    for value in vars(particle_set).values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
    for value in vars(particle_set.ctf).values():
        total += np.asarray(value).nbytes
    table = particle_set._star_particles
    if table is not None:
        total += int(table.memory_usage(deep=True).sum())
    return total


def memory_per_rank(box: int, n_particles: int, n_ranks: int, image_batch_size: int = 256,
                    metadata: int = 0) -> dict:
    """Estimated bytes per rank role for a refinement on ``n_ranks`` ranks.

    Returns {"box_px", "n_ranks", "image_batch_size", "roles": [...]}, each role with
    "ranks" (a label), "halves", "device" and "host" ({component: bytes}),
    "device_total", "host_total", and "gpu_only_host" (bytes a GPU rank adds on the host).
    """
    c = component_bytes(box, image_batch_size)
    roles = []
    specs = ([("rank 0 (both halves)", 2, True, True)] if n_ranks == 1 else
             [("rank 0 (half A root)", 1, True, True), ("rank 1 (half B root)", 1, True, False)]
             + ([(f"ranks 2–{n_ranks - 1}" if n_ranks > 3 else "rank 2", 1, False, False)]
                if n_ranks > 2 else []))
    for label, halves, is_root, is_world_root in specs:
        device = {"accumulators": halves * c["accumulator"], "references": halves * c["reference"],
                  "image batch": c["image_batch"], "pose search (at Nyquist)": c["search"]}
        host = {"Python and libraries": BASELINE_HOST_BYTES, "particle metadata": int(metadata),
                "images read ahead": c["image_prefetch"]}
        if is_root:
            device["reconstruction"] = c["reconstruction"]
            host["half maps"] = c["half_maps"]
        if is_world_root:
            host["per-particle results"] = 2 * RESULT_BYTES_PER_PARTICLE * int(n_particles)
        group_size = 1 if n_ranks == 1 else (n_ranks + 1) // 2
        roles.append({"ranks": label, "halves": halves, "device": device, "host": host,
                      "device_total": sum(device.values()), "host_total": sum(host.values()),
                      "gpu_only_host": c["reduction_staging"] if group_size > 1 else 0})
    return {"box_px": int(box), "n_ranks": int(n_ranks), "image_batch_size": int(image_batch_size),
            "roles": roles}


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_memory(memory: dict) -> str:
    """A table: one column per rank role, one row per component, then totals."""
    roles = memory["roles"]
    names = []
    for role in roles:
        for part in ("device", "host"):
            names += [(part, k) for k in role[part] if (part, k) not in names]
    head = (f"memory per rank for a refinement on {memory['n_ranks']} rank(s), box "
            f"{memory['box_px']} px, image batch {memory['image_batch_size']} (estimate):")
    width = max(len(r["ranks"]) for r in roles) + 2
    label_w = max(len(f"{p}: {k}") for p, k in names) + 2
    lines = [head, " " * label_w + "".join(f"{r['ranks']:>{width}}" for r in roles)]
    for part, key in names:
        cells = "".join(f"{human_bytes(r[part][key]) if key in r[part] else '–':>{width}}"
                        for r in roles)
        lines.append(f"{part + ': ' + key:<{label_w}}{cells}")
    for part in ("device", "host"):
        cells = "".join(f"{human_bytes(r[part + '_total']):>{width}}" for r in roles)
        lines.append(f"{'total ' + part:<{label_w}}{cells}")
    cells = "".join(f"{human_bytes(r['device_total'] + r['host_total']):>{width}}" for r in roles)
    lines.append(f"{'total on a NumPy rank':<{label_w}}{cells}")
    staging = max(r["gpu_only_host"] for r in roles)
    lines.append("device = GPU memory on a GPU rank, host RAM on a NumPy rank"
                 + (f"; GPU ranks also stage {human_bytes(staging)} on the host for reductions"
                    if staging else ""))
    return "\n".join(lines)
