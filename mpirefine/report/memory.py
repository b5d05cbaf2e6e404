"""The memory plan of a refinement: each rank's peak, phase by phase, host and device.

Sizes follow what the code allocates.  With n the box (px), P = 2n the padded grid and
V = P² (P/2 + 1) its half-space voxels (the accumulator's grid; an n³ float32 map is
about 1 byte per V), per rank:

search (each half set a rank serves, one after the other)
    the accumulators of the halves begun so far (24 bytes per voxel: complex128 sums
    and float64 weights, fourier/backproject.py); the reference's transform (complex64
    on the padded grid, 8 per voxel) and its zero-framed gather table (fourier/project.py);
    while it is made, :func:`~mpirefine.fourier.project.volume_ft`'s padded volume,
    shifted copy and FFT steps (peak 8 bytes per voxel + 28.7 per padded-cube voxel, the
    result included), with the previous half's transform and search tables still held
    by a rank that serves both halves; the search's global-grid tables, first-level
    projection cache and chunk arrays (:func:`mpirefine.search.poses.working_bytes`, at
    the alignment resolution that needs the most) and its scoring blocks (32 MB each
    on the CPU, a share of the free memory on a GPU: search/poses.py ``block_bytes``;
    a GPU extracts slices with a fused kernel, fourier/kernels.py, whose only
    temporaries are the rotations); one batch of image transforms,
    windowed and not, and CTFs (20 bytes per half-plane pixel and image); on the host,
    up to three batches of raw images (the one in hand, the one read ahead, and its
    successor being read).
insertion
    the same arrays, plus on a NumPy rank the array path's insertion temporaries
    (:meth:`Accumulator.insert` without the compiled kernel, MPIREFINE_JIT=0): 370 bytes
    per inserted sample (image × pixel inside the Nyquist circle): the trilinear
    stencil's corner indices and weights, coordinates, and the scatter-add's operands;
    on a GPU the fused insertion kernel's float32 operands (12 bytes per sample).
symmetrisation (with a point group of more than one operator)
    the accumulators, a framed float64 table of the folded sums (24 bytes per voxel),
    the two outputs (24 per voxel) and, in the array code, the slab being summed
    (tens of MB: :func:`mpirefine.geometry.symmetry.symmetrize_accumulator`; NumPy's
    compiled loop holds none, so the forecast is an upper bound there).  On one or two ranks
    after the pass; on more, in the pass, as each half's sums are complete.
reconstruction (half maps, the map from all particles, the outputs)
    one or two ranks: each half root holds its half's accumulator and reconstructs it
    (:func:`mpirefine.fourier.reconstruct.reconstruct`: 92 bytes per voxel of
    temporaries, measured with tracemalloc at boxes 32 to 96: the Hermitian copies,
    radii, shells, regulariser, quotient and inverse FFT).  Then world rank 0 makes
    the map from all particles (refinement/halfmaps.py ``full_map``): with two ranks it
    receives half B's sums (24 per voxel) and adds them to its own into a third
    accumulator-sized array before reconstructing: 164 bytes per voxel at once, the
    job's peak on one or two ranks (half B's root holds 48 while it sends its sums).
    With more ranks each half's sums are packed (12 bytes per sphere voxel), summed
    over its group by a reduce-scatter (MPI may hold a copy) and reconstructed in
    slabs of 1/parts of the grid; whole maps are gathered on the half roots.  World
    rank 0 then writes the outputs: the FSC suite holds about 172 bytes per map voxel
    (phase-randomised copies, masks).

Held throughout: the interpreter and libraries (measured), the particle metadata
(every rank reads the whole file; :func:`metadata_bytes`), the per-particle results and
their gather (world rank 0), the two references (on the device), and on the half roots
and world rank 0 the half maps, regularised maps, next references, masks and the extent
mask (n³ float32 each).

"device" is the rank's array memory: GPU memory on a GPU rank, host RAM on a NumPy
rank; "host" is host RAM in both cases; "staging" is host RAM that only a GPU rank
needs (copies for an MPI without CUDA support).  On a NumPy rank the RAM peak is the
most device + host held at once.  Counted are allocations (a zeroed accumulator counts
in RAM once it is written: the kernel maps its pages then), so the forecast is an
estimate: allocator caches, MPI's own buffers, cuFFT and cuBLAS workspaces come on top
(a GPU plan keeps a margin of free memory for them).  The coefficients are the code's
array sizes, or were measured with tracemalloc (tests/test_memory_plan.py checks them);
benchmarks/bench_memory.py compares the forecast with the measured peak RSS.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from mpirefine.errors import InputError

MiB = 2 ** 20
GiB = 2 ** 30
RESULT_BYTES_PER_PARTICLE = 9 * 8 + 2 * 8 + 8 + 8 + 1
#: a rank's interpreter and libraries, resident: the peak RSS of a process that has
#: imported what a refinement imports (NumPy, SciPy, mpi4py, h5py, Numba, Matplotlib
#: and the package), 240 MiB as benchmarks/bench_memory.py measures it
BASELINE_HOST_BYTES = 240 * MiB

# bytes per voxel of the padded half-space grid V (see the module docstring)
ACCUMULATOR_PER_VOXEL = 24
RECONSTRUCT_PER_VOXEL = 92
FULL_SUM_PER_VOXEL = 24
VFT_PER_VOXEL = 8
GATHER_TABLE_PER_ENTRY = 8              # complex64, (P + 4)² (P/2 + 3) entries
VOLUME_FT_PER_VOXEL = 8                 # volume_ft's peak: its result ...
VOLUME_FT_PER_CUBE_VOXEL = 28.7         # ... plus the padded P³ volume's steps
SYMMETRY_TABLE_PER_ENTRY = 24           # float64 (re, im, w), (P + 3)² (P/2 + 3) entries
SYMMETRY_OUTPUT_PER_VOXEL = 24
SYMMETRY_BYTES_PER_SLAB_POINT = 32      # a slab's output indices and coordinates
SYMMETRY_BYTES_PER_CHUNK_POINT = 260    # rotated coordinates, corners, interpolated rows
PACKED_PER_SPHERE_VOXEL = 12            # float32 (re, im, w) of the voxels reconstruction uses
SLAB_RECONSTRUCT_PER_VOXEL = 64         # a slab's division and FFT steps, per voxel / parts
# per inserted sample (image × pixel inside the Nyquist circle): the array path's
# stencil and scatter-add operands; the GPU's fused kernel reads float32 copies of the
# values' real and imaginary parts and of the weights
INSERT_STENCIL_PER_SAMPLE = 370
INSERT_KERNEL_PER_SAMPLE = 12
# per image and half-plane pixel: the windowed transform the search scores and the
# unwindowed one insertion uses (complex64 each), and the CTF (float32)
BATCH_PER_PIXEL = 20
PREPARE_PER_IMAGE_PIXEL = 37            # prepare_images' peak per image pixel, results included
RAW_BATCHES = 3
MAPS_PER_ROOT = 8                       # half, regularised maps, next references, masks
FSC_SUITE_PER_MAP_VOXEL = 172

PHASES = ("search", "insertion", "symmetrisation", "reconstruction")
GPU_SAFETY = 0.8                        # share of free GPU memory a plan may use
GPU_MAX_IMAGE_BATCH = 1024
CPU_IMAGE_BATCH = 256


@lru_cache(maxsize=None)
def grid_sizes(box: int) -> dict:
    """Voxel and pixel counts of the grids a refinement at ``box`` px allocates."""
    n = int(box)
    P = 2 * n
    nx = P // 2 + 1
    ky = np.arange(n) - n // 2
    kx = np.arange(n // 2 + 1)
    radius = np.sqrt((kx[None, :] ** 2 + ky[:, None] ** 2).astype(np.float32))
    sym_radius = P / 2 + 6
    return {
        "n": n, "P": P, "V": P * P * nx, "cube": P ** 3, "map": n ** 3,
        "gather_table": (P + 4) ** 2 * (nx + 2), "symmetry_table": (P + 3) ** 2 * (nx + 2),
        "half_plane": n * (n // 2 + 1), "image": n * n,
        "inserted": int((radius <= n // 2).sum()),
        # shells below n/2 + 1 (what reconstruction keeps) and the symmetrised sphere
        "sphere": int(min(P * P * nx, 2 * math.pi / 3 * (P / 2 + 1) ** 3)),
        "symmetry_points": int(min(P * P * nx, 2 * math.pi / 3 * sym_radius ** 3)),
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


# ------------------------------------------------------------------------- the search

@lru_cache(maxsize=None)
def _grid_rotations() -> int:
    from mpirefine.geometry.grids import so3_grid
    from mpirefine.search.plan import COARSE_STEP_DEG

    return len(so3_grid(COARSE_STEP_DEG))


def _search_params(box: int, image_batch_size: int, radius_px: float):
    """The search plan the refinement makes at an alignment radius (Fourier px)."""
    from types import SimpleNamespace

    from mpirefine.search.plan import plan_search

    # the plan depends on the radius in Fourier px, not on the pixel size; the window's
    # inner radius is refine's default (0.85)
    prep = SimpleNamespace(box=box, pixel_size_A=1.0, window_inner=0.85)
    plan = plan_search(box / radius_px, prep, SimpleNamespace(image_batch_size=image_batch_size),
                       marginalize=False)
    return plan.params


def _half_plane_pixels(radius_px: float) -> int:
    return int(math.pi * radius_px ** 2 / 2) + 1


@lru_cache(maxsize=4096)
def search_bytes(box: int, image_batch_size: int, radius_px: float | None = None,
                 symmetry_order: int = 1) -> dict:
    """The pose search's working arrays (:func:`mpirefine.search.poses.working_bytes`)
    at alignment radius ``radius_px`` (Fourier px; the last level's cut-off), or at the
    radius that needs the most (None).  With enforced symmetry the global grid is one
    asymmetric unit (1/order of the poses; symmetry relaxation searches them all)."""
    from mpirefine.search.poses import working_bytes

    if radius_px is None:
        radii = range(2, box // 2)
        return max((search_bytes(box, image_batch_size, float(r), symmetry_order)
                    for r in radii), key=lambda d: sum(d.values()), default={})
    params = _search_params(box, image_batch_size, min(radius_px, box // 2 - 1))
    n_freq = [_half_plane_pixels(r) for r in params.level_radii_px()]
    return working_bytes(params, math.ceil(_grid_rotations() / max(1, symmetry_order)), n_freq)


# ------------------------------------------------------------------------ the roles

def _roles(n_ranks: int) -> list[dict]:
    """The kinds of rank in a job of ``n_ranks`` (parallel.Parallel's layout)."""
    if n_ranks == 1:
        return [dict(label="rank 0 (both halves)", halves=2, half_root=True, world_root=True)]
    roles = [dict(label="rank 0 (half A root)", halves=1, half_root=True, world_root=True),
             dict(label="rank 1 (half B root)", halves=1, half_root=True, world_root=False)]
    shared = n_ranks % 2 == 1 and n_ranks > 2
    last_single = n_ranks - 1 - shared
    if last_single >= 2:
        roles.append(dict(label=f"ranks 2–{last_single}" if last_single > 2 else "rank 2",
                          halves=1, half_root=False, world_root=False))
    if shared:
        roles.append(dict(label=f"rank {n_ranks - 1} (both halves)", halves=2,
                          half_root=False, world_root=False))
    return roles


def _moment(device=None, host=None, staging=None, batch: bool = False) -> dict:
    """Arrays alive at once; ``batch``: a moment whose arrays grow with the image batch."""
    return {"device": {k: int(v) for k, v in (device or {}).items() if v},
            "host": {k: int(v) for k, v in (host or {}).items() if v},
            "staging": {k: int(v) for k, v in (staging or {}).items() if v}, "batch": batch}


# Not in a NumPy rank's resident memory: zeroed arrays not written yet (on a GPU they
# are allocated; in host RAM the kernel maps their pages when they are first written:
# np.zeros is calloc), and what only a GPU rank holds: its scoring blocks, sized by its
# free memory (search/poses.py block_bytes), and the fused insertion kernel's operands.
_UNWRITTEN = ("new accumulator (zeroed)", "scoring blocks (GPU)", "insertion operands (GPU)")
# What only a NumPy rank holds: cache-sized scoring blocks and the array path's stencil
# (a GPU inserts with a fused kernel, fourier/kernels.py).
_CPU_ONLY = ("scoring blocks (CPU)", "insertion temporaries")


@lru_cache(maxsize=4096)
def search_scoring_bytes_per_particle(box: int, image_batch_size: int,
                                      radius_px: float | None = None,
                                      symmetry_order: int = 1) -> int:
    """The most scoring temporaries a particle needs at any level of the search
    (:func:`mpirefine.search.poses.largest_scoring_bytes_per_particle`), at alignment
    radius ``radius_px`` or the radius that needs the most (None)."""
    from mpirefine.search.poses import largest_scoring_bytes_per_particle

    if radius_px is None:
        return max(search_scoring_bytes_per_particle(box, image_batch_size, float(r),
                                                     symmetry_order)
                   for r in range(2, max(3, box // 2)))
    params = _search_params(box, image_batch_size, min(radius_px, box // 2 - 1))
    n_freq = [_half_plane_pixels(r) for r in params.level_radii_px()]
    return largest_scoring_bytes_per_particle(
        params, math.ceil(_grid_rotations() / max(1, symmetry_order)), n_freq)


def gpu_scoring_bytes(per_particle: int, batch: int, gpu_free_bytes: float | None) -> int:
    """Device bytes of a GPU rank's live scoring blocks: _LIVE_BLOCKS blocks, each a
    share of the free memory (search/poses.py ``block_bytes``; as large as they get
    when it is not known), but no more than the batch's particles need."""
    from mpirefine.search import poses

    free = (poses._DEVICE_MAX_BLOCK_BYTES / poses._DEVICE_BLOCK_FRACTION
            if gpu_free_bytes is None else gpu_free_bytes)
    block = min(poses.block_bytes(None, free), max(per_particle, per_particle * int(batch)))
    return poses._LIVE_BLOCKS * block


def _gpu(m: dict) -> int:
    return sum(v for k, v in m["device"].items() if k not in _CPU_ONLY)


def _ram(m: dict) -> int:
    return (sum(v for k, v in m["device"].items() if k not in _UNWRITTEN)
            + sum(m["host"].values()))


def _peak(moments: list[dict], key) -> dict:
    return max(moments, key=key)


def _role_phases(role: dict, g: dict, n_ranks: int, batch: int, order: int, search: dict,
                 held_host: dict, gpu_scoring: int = 0) -> dict:
    """{phase: moment} for one role: each phase's moment of most RAM on a NumPy rank,
    with "gpu" (the moment of most device memory) and "gpu_host" (most host RAM on a
    GPU rank) beside it."""
    V, halves = g["V"], role["halves"]
    distributed = n_ranks > 2
    parts = (n_ranks + 1) // 2
    acc = ACCUMULATOR_PER_VOXEL * V
    map_bytes = 4 * g["map"]
    vft = VFT_PER_VOXEL * V + GATHER_TABLE_PER_ENTRY * g["gather_table"]
    search_tables = search.get("global grid tables", 0) + search.get("level-1 cache", 0)
    batch_arrays = BATCH_PER_PIXEL * batch * g["half_plane"]
    raw = {"raw images (read ahead)": RAW_BATCHES * 4 * batch * g["image"]}
    samples = batch * g["inserted"]
    refs = {"references": 2 * map_bytes, "masked reference": map_bytes}
    packed = PACKED_PER_SPHERE_VOXEL * g["sphere"]
    # a rank serving both halves of a distributed job: the first half's sums in flight
    in_flight = ({"packed sums in flight": packed} if distributed and halves == 2 else {})
    in_flight_host = ({"reduce-scatter buffer (MPI)": packed} if distributed and halves == 2
                      else {})
    sym_temps = (SYMMETRY_BYTES_PER_SLAB_POINT * min(g["symmetry_points"], _slab_points())
                 + SYMMETRY_BYTES_PER_CHUNK_POINT * min(g["symmetry_points"], _chunk_points()))
    symmetrise = {"symmetrisation table": SYMMETRY_TABLE_PER_ENTRY * g["symmetry_table"],
                  "symmetrised sums": SYMMETRY_OUTPUT_PER_VOXEL * V,
                  "symmetrisation slab": sym_temps}

    def host(**extra):
        return {**held_host, **raw, **in_flight_host, **extra}

    pass_device = {"accumulators": halves * acc, **refs, "reference transform": vft,
                   "search tables": search_tables, "image batch": batch_arrays, **in_flight}
    phases = {}
    # the next half's reference transform is made after its accumulator was zeroed
    making = dict(pass_device, **{"reference transform": 0, "image batch": 0,
                                  "search tables": 0, "accumulators": (halves - 1) * acc,
                                  "new accumulator (zeroed)": acc})
    making["making the reference transform"] = (VOLUME_FT_PER_VOXEL * V
                                                + VOLUME_FT_PER_CUBE_VOXEL * g["cube"])
    if halves == 2:
        making["previous half's transform and tables"] = vft + search_tables
    phases["search"] = [
        _moment(making, host()),
        # a batch's preparation (before its search), then the search: its chunk and
        # its scoring blocks (cache-sized on the CPU, a share of free memory on a GPU)
        _moment(dict(pass_device, **{"image preparation": PREPARE_PER_IMAGE_PIXEL * batch
                                     * g["image"]}), host(), batch=True),
        _moment(dict(pass_device, **{"search chunk": search.get("chunk data", 0),
                                     "scoring blocks (CPU)": search.get("scoring blocks", 0),
                                     "scoring blocks (GPU)": gpu_scoring}), host(), batch=True)]
    phases["insertion"] = [_moment(dict(pass_device, **{
        "insertion temporaries": INSERT_STENCIL_PER_SAMPLE * samples,
        "insertion operands (GPU)": INSERT_KERNEL_PER_SAMPLE * samples}), host(), batch=True)]
    roots = halves if not distributed else 0
    if order > 1:
        if distributed:   # in the pass, as soon as a half's sums are complete
            phases["symmetrisation"] = [_moment(dict(pass_device, **symmetrise), host())]
        else:
            phases["symmetrisation"] = [_moment({"accumulators": roots * acc, **refs, **symmetrise},
                                                host())]
    recon = []
    if not distributed:
        recon.append(_moment({"accumulators": halves * acc, **refs,
                              "reconstruction temporaries": RECONSTRUCT_PER_VOXEL * V},
                             host()))
        if role["world_root"]:
            other = {} if n_ranks == 1 else {"half B's sums (received)": acc}
            recon.append(_moment({"accumulators": halves * acc, **refs, **other,
                                  "sums of both halves": FULL_SUM_PER_VOXEL * V,
                                  "reconstruction temporaries": RECONSTRUCT_PER_VOXEL * V},
                                 host(), {"sums staged for MPI": 32 * V} if n_ranks == 2 else {}))
        elif n_ranks == 2:   # half B's root sends its sums to rank 0 and receives rank 0's
            recon.append(_moment({"accumulators": acc, **refs, "half A's sums (received)": acc},
                                 host(), {"sums staged for MPI": 32 * V}))
    else:
        # the reduction starts in the pass (fold and pack), then slabs
        recon.append(_moment(dict(pass_device, **{"packed sums": packed}),
                             host(**{"reduce-scatter buffer (MPI)": packed}),
                             {"packed sums staged for MPI": packed}))
        gathered = (2 * map_bytes if role["half_root"] else 0)
        recon.append(_moment({**refs, "slab sums": halves * packed / parts,
                              "slab reconstruction": SLAB_RECONSTRUCT_PER_VOXEL * V / parts},
                             host(**{"gathered maps": gathered + 2 * map_bytes})))
    if role["world_root"]:
        recon.append(_moment({**refs}, host(**{"FSC suite and outputs":
                                                 FSC_SUITE_PER_MAP_VOXEL * g["map"]})))
    phases["reconstruction"] = recon
    out = {}
    for phase, moments in phases.items():
        best = dict(_peak(moments, _ram))
        best["gpu"] = max(_gpu(m) for m in moments)
        best["gpu_host"] = max(sum(m["host"].values()) + sum(m["staging"].values())
                               for m in moments)
        best["gpu_staging"] = max(sum(m["staging"].values()) for m in moments)
        best["gpu_by_batch"] = max([_gpu(m) for m in moments if m["batch"]], default=0)
        best["gpu_fixed"] = max([_gpu(m) for m in moments if not m["batch"]], default=0)
        best["ram"] = _ram(best)
        out[phase] = best
    return out


def _slab_points() -> int:
    from mpirefine.geometry import symmetry

    return symmetry._SLAB_POINTS


def _chunk_points() -> int:
    from mpirefine.geometry import symmetry

    return symmetry._CHUNK


def memory_plan(box: int, n_particles: int, n_ranks: int, image_batch_size: int = CPU_IMAGE_BATCH,
                metadata: int = 0, symmetry_order: int = 1,
                alignment_radius_px: float | None = None,
                gpu_free_bytes: float | None = None) -> dict:
    """Each rank role's peak memory, phase by phase, for a refinement on ``n_ranks`` ranks.

    alignment_radius_px: the search's cut-off (Fourier px) to plan for; None: the one
    that needs the most.  symmetry_order: operators of the enforced point group (1: the
    symmetrisation phase is shown as what it would need, and does not count).
    gpu_free_bytes: a GPU rank's free memory when the job starts, which sizes its slice
    extraction blocks (None: as large as they get).

    Returns {"box_px", "n_ranks", "image_batch_size", "symmetry_order", "roles": [...]},
    each role with "ranks" (a label), "halves", "phases" ({phase: {"device", "host",
    "staging" (component → bytes), "ram", "gpu", "gpu_host"}}), "peak" ({"ram": the
    most RAM a NumPy rank holds, "ram_phase", "gpu": the most GPU memory a GPU rank
    holds, "gpu_phase", "gpu_host": its host RAM}), and, for the phase of the RAM
    peak, "device" and "host" (components), "device_total", "host_total" and
    "gpu_only_host" (staging bytes a GPU rank adds).
    """
    g = grid_sizes(box)
    requested = int(image_batch_size)
    if n_particles:   # a rank's batches hold at most its share of a half set
        share = math.ceil(int(n_particles) / 2 / max(1, (int(n_ranks) + 1) // 2))
        image_batch_size = max(1, min(requested, share))
    radius = None if alignment_radius_px is None else float(alignment_radius_px)
    search = search_bytes(int(box), int(image_batch_size), radius, max(1, int(symmetry_order)))
    gpu_scoring = gpu_scoring_bytes(
        search_scoring_bytes_per_particle(int(box), int(image_batch_size), radius,
                                          max(1, int(symmetry_order))),
        int(image_batch_size), gpu_free_bytes)
    plan_order = max(int(symmetry_order), 2)
    roles = []
    for role in _roles(int(n_ranks)):
        held = {"Python and libraries": BASELINE_HOST_BYTES, "particle metadata": int(metadata)}
        if role["world_root"]:
            held["per-particle results"] = 2 * RESULT_BYTES_PER_PARTICLE * int(n_particles)
        if role["world_root"] or (role["half_root"] and n_ranks <= 2):
            held["maps (half, regularised, references, masks)"] = (
                (MAPS_PER_ROOT + role["world_root"]) * 4 * g["map"])
        else:
            held["masks"] = role["halves"] * 4 * g["map"]
        phases = _role_phases(role, g, int(n_ranks), int(image_batch_size), plan_order, search,
                              held, gpu_scoring)
        counted = [p for p in PHASES if p in phases and (p != "symmetrisation"
                                                         or symmetry_order > 1)]
        ram_phase = max(counted, key=lambda p: phases[p]["ram"])
        gpu_phase = max(counted, key=lambda p: phases[p]["gpu"])
        top = dict(phases[ram_phase])
        top["device"] = {k: v for k, v in top["device"].items() if k not in _UNWRITTEN}
        roles.append({
            "ranks": role["label"], "halves": role["halves"], "phases": phases,
            "peak": {"ram": top["ram"], "ram_phase": ram_phase,
                     "gpu": phases[gpu_phase]["gpu"], "gpu_phase": gpu_phase,
                     "gpu_host": max(phases[p]["gpu_host"] for p in counted)},
            "device": top["device"], "host": top["host"],
            "device_total": sum(top["device"].values()), "host_total": sum(top["host"].values()),
            "gpu_only_host": max(phases[p]["gpu_staging"] for p in counted)})
    return {"box_px": int(box), "n_ranks": int(n_ranks), "image_batch_size": requested,
            "images_per_batch": int(image_batch_size), "symmetry_order": int(symmetry_order),
            "alignment_radius_px": alignment_radius_px, "roles": roles}


def memory_per_rank(box: int, n_particles: int, n_ranks: int, image_batch_size: int = 256,
                    metadata: int = 0, symmetry_order: int = 1,
                    alignment_radius_px: float | None = None) -> dict:
    """:func:`memory_plan` (the name older callers use)."""
    return memory_plan(box, n_particles, n_ranks, image_batch_size, metadata, symmetry_order,
                       alignment_radius_px)


# ------------------------------------------------------------------- the GPU batch

def batch_phase_bytes(box: int, n_ranks: int, image_batch_size: int, symmetry_order: int = 1,
                      alignment_radius_px: float | None = None,
                      gpu_free_bytes: float | None = None) -> tuple[int, int, str]:
    """(most GPU memory any rank needs while its arrays grow with the image batch (the
    search and insertion of a batch), most at the other moments (making a reference
    transform, symmetrisation, reconstruction), the phase of the latter), bytes."""
    plan = memory_plan(box, 0, n_ranks, image_batch_size, 0, symmetry_order, alignment_radius_px,
                       gpu_free_bytes)
    grows, fixed, where = 0, 0, "reconstruction"
    for role in plan["roles"]:
        for name, phase in role["phases"].items():
            if name == "symmetrisation" and symmetry_order <= 1:
                continue
            grows = max(grows, phase["gpu_by_batch"])
            if phase["gpu_fixed"] > fixed:
                fixed, where = phase["gpu_fixed"], name
    return grows, fixed, where


def choose_gpu_image_batch(box: int, n_ranks: int, free_bytes: float, symmetry_order: int = 1,
                           ranks_per_gpu: int = 1, safety: float = GPU_SAFETY,
                           largest: int = GPU_MAX_IMAGE_BATCH) -> dict:
    """The GPU image batch: the largest power of two up to ``largest`` whose forecast
    (search and insertion, at the alignment resolution that needs the most) fits in
    ``safety`` × ``free_bytes`` / ``ranks_per_gpu``; 1 if none does.

    Returns {"image_batch_size", "budget_bytes", "needs_bytes" (at that batch),
    "fixed_bytes" (the phases that do not depend on the batch), "fits" (everything
    fits the budget at that batch)}."""
    free = float(free_bytes) / max(1, int(ranks_per_gpu))
    budget = safety * free

    def needs(b):
        return batch_phase_bytes(box, n_ranks, b, symmetry_order, None, free)

    batch = 1
    while batch * 2 <= largest and needs(batch * 2)[0] <= budget:
        batch *= 2
    grows, fixed, where = needs(batch)
    return {"image_batch_size": batch, "budget_bytes": int(budget), "needs_bytes": int(grows),
            "fixed_bytes": int(fixed), "fixed_phase": where, "fits": max(grows, fixed) <= budget}


# ---------------------------------------------------------------------------- text

def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_memory(memory: dict, gpu: dict | None = None) -> str:
    """The plan as text: per phase and rank role the RAM of a NumPy rank and the GPU
    memory of a GPU rank; the peaks; what makes up each role's RAM peak; and, with
    ``gpu`` (:func:`choose_gpu_image_batch`'s answer), the GPU image batch."""
    roles = memory["roles"]
    order = memory.get("symmetry_order", 1)
    batch = memory["image_batch_size"]
    held = memory.get("images_per_batch", batch)
    head = (f"memory per rank for a refinement on {memory['n_ranks']} rank(s), box "
            f"{memory['box_px']} px, image batch {batch}"
            + (f" ({held} images: a rank's share of a half set)" if held < batch else "")
            + (f", {order} symmetry operators" if order > 1 else "") + " (forecast):")
    width = max(max(len(r["ranks"]) for r in roles) + 2, 14)
    rows = [("", [r["ranks"] for r in roles])]
    for phase in PHASES:
        if not any(phase in r["phases"] for r in roles):
            continue
        note = "" if phase != "symmetrisation" or order > 1 else " (with --symmetry)"
        rows.append((f"{phase}{note}: RAM", [human_bytes(r["phases"][phase]["ram"])
                                              if phase in r["phases"] else "–" for r in roles]))
        rows.append(("    GPU", [human_bytes(r["phases"][phase]["gpu"])
                                 if phase in r["phases"] else "–" for r in roles]))
    rows.append(("peak RAM, NumPy rank", [human_bytes(r["peak"]["ram"]) for r in roles]))
    rows.append(("    in phase", [r["peak"]["ram_phase"] for r in roles]))
    rows.append(("peak GPU memory, GPU rank", [human_bytes(r["peak"]["gpu"]) for r in roles]))
    rows.append(("peak host RAM, GPU rank", [human_bytes(r["peak"]["gpu_host"]) for r in roles]))
    label_w = max(len(label) for label, _ in rows) + 2
    lines = [head] + [f"{label:<{label_w}}" + "".join(f"{c:>{width}}" for c in cells)
                      for label, cells in rows]
    lines.append("")
    lines.append("at the RAM peak (device: GPU memory on a GPU rank, host RAM on a NumPy rank):")
    names = []
    for role in roles:
        for part in ("device", "host"):
            names += [(part, k) for k in role[part] if (part, k) not in names]
    label_w = max(len(f"{p}: {k}") for p, k in names) + 2
    for part, key in names:
        cells = "".join(f"{human_bytes(r[part][key]) if key in r[part] else '–':>{width}}"
                        for r in roles)
        lines.append(f"{part + ': ' + key:<{label_w}}{cells}")
    for part in ("device", "host"):
        cells = "".join(f"{human_bytes(r[part + '_total']):>{width}}" for r in roles)
        lines.append(f"{'total ' + part:<{label_w}}{cells}")
    if gpu is not None:
        lines.append("")
        lines.append(gpu_batch_line(gpu))
    return "\n".join(lines)


def gpu_batch_line(gpu: dict) -> str:
    """One line on the GPU image batch a plan picks (:func:`choose_gpu_image_batch`)."""
    text = (f"GPU image batch: {gpu['image_batch_size']} (the largest power of two up to "
            f"{GPU_MAX_IMAGE_BATCH} whose search and insertion fit {human_bytes(gpu['budget_bytes'])}"
            f" per rank: {GPU_SAFETY:.0%} of the free GPU memory; --image-batch-size overrides)")
    if not gpu["fits"]:
        need = max(gpu["needs_bytes"], gpu["fixed_bytes"])
        phase = (gpu.get("fixed_phase", "reconstruction") if gpu["fixed_bytes"] >= gpu["needs_bytes"]
                 else "search and insertion of one image")
        text += (f"; even so the {phase} needs {human_bytes(need)}, more than that: "
                 "use more ranks per half set, a smaller box or a larger GPU")
    return text


# ------------------------------------------------------------- running out of memory

class OutOfMemory(InputError):
    """A rank ran out of host or GPU memory (one line: what to lower)."""


# Where in the code a phase's arrays are made: the innermost of these functions on the
# stack names the phase that ran out (the memory plan's phases, report/memory.py).
_PHASE_OF_FUNCTION = {
    "symmetrize_accumulator": "symmetrisation",
    "volume_ft": "reference transform", "gather_table": "reference transform",
    "reconstruct": "reconstruction", "reconstruct_root_pair": "reconstruction",
    "reconstruct_slabs": "reconstruction", "full_map": "reconstruction",
    "final_full_map": "reconstruction", "update_references": "reconstruction",
    "next_references": "reconstruction", "steering_fsc": "reconstruction",
    "pack_sphere": "reconstruction", "finish": "reconstruction", "fsc_suite": "reconstruction",
    "insert_particles": "insertion", "insert": "insertion", "trilinear_stencil": "insertion",
    "residual_power_sums": "insertion",
    "run_search": "search", "search_poses": "search", "search_reference": "search",
    "prepare_reference": "search", "projection_tables": "search", "search_defocus": "search",
    "prepare_images": "search", "ctf_grid": "search", "batches": "search",
}
_BATCH_PHASES = ("search", "insertion")


def is_out_of_memory(exc: BaseException) -> bool:
    """A MemoryError (NumPy's allocations), CuPy's OutOfMemoryError (told by its class
    name: cupy is not imported on the CPU), or a cuFFT / cuBLAS allocation failure."""
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    return "ALLOC_FAILED" in str(exc)


def memory_phase(exc: BaseException) -> str | None:
    """The phase that ran out of memory: the innermost function of ``exc``'s traceback
    that :data:`_PHASE_OF_FUNCTION` knows; None if none is on the stack."""
    import traceback

    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.name in _PHASE_OF_FUNCTION:
            return _PHASE_OF_FUNCTION[frame.name]
    return None


def out_of_memory_message(exc: BaseException, cfg, par) -> str:
    """One line: where memory ran out and which option to lower."""
    gpu = not isinstance(exc, MemoryError) or type(exc).__module__.startswith("cupy")
    what = "GPU memory" if gpu else "memory"
    phase = memory_phase(exc)
    where = f" in the {phase}" if phase else ""
    rank = f" on rank {par.rank} of {par.size}" if par.size > 1 else ""
    detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
    plan = (f"`mpirefine info {cfg.particles} --ranks {par.size}` shows the memory plan")
    if phase in _BATCH_PHASES or phase is None:
        smaller = max(1, cfg.image_batch_size // 2)
        fix = (f"lower --image-batch-size (it was {cfg.image_batch_size}; try {smaller})")
        if phase is None:
            fix += ("; if it is the reconstruction, use more ranks per half set or a "
                    "smaller box (--box)")
    elif phase == "symmetrisation":
        fix = ("symmetrising holds three accumulator-sized grids per half set: use a smaller "
               "box (--box with --pixel-size), or a node with more memory")
    else:
        fix = ("it needs whole padded grids of the box: use more ranks per half set (from 3 "
               "ranks on, each half's reconstruction is split among its ranks) or a smaller "
               "box (--box with --pixel-size)")
    return f"out of {what}{where}{rank} ({detail}): {fix}; {plan}"
