"""Coarse-to-fine pose search (rotation and shift) by dense likelihood products.

The scheme follows cryoDRGN's ``pose_search``:

- level 0 scores every particle against a global SO(3) grid (step ``coarse_step_deg``)
  times a shift grid (step ``coarse_shift_step_px`` within ``shift_range_px``), using
  frequencies up to ``coarse_radius_px``; rotations and shifts are shared by all
  particles, so this is one large GEMM per chunk of particles
  (:func:`mpirefine.search.likelihood.score_shared`);
- each particle keeps its ``n_keep`` best distinct rotations (each with its best shift);
- every further level splits each kept rotation into half-size cells (8; 18 for the
  first split of the irregular global grid's cells, see :mod:`mpirefine.geometry.grids`)
  and each kept shift into 4, raises the cut-off geometrically towards
  ``final_radius_px``, and scores every particle's children rotations against its
  children shifts with a batched GEMM (:func:`mpirefine.search.likelihood.score_batched`);
- the last level gives the best pose, its log-likelihood and the optimal scale, and
  (``marginalize``) posterior weights over the best ``n_posterior`` poses.

Each level scores block by block, and each block takes its projection tables from
the level's table source (an object with ``rows(blk)``): level 0 the global grid's
tables, shared by every particle (:class:`_SharedTables`); level 1 rows of a cache,
since the first level's children form a fixed set (18 per grid point) that many
particles draw from, so each is extracted once per search (:class:`_CachedRows`);
deeper levels each block's own children, extracted where they are scored, since two
particles almost never keep the same cell (:class:`_ProjectedRows`).  Blocks are
sized so that their scoring temporaries stay near 32 MB.  Poses come back as NumPy
arrays on the host; the arithmetic runs in the namespace of ``vft.data`` (NumPy or
CuPy), the projections through :func:`~mpirefine.fourier.project.projection_tables`.

Sampling: level 0 only ranks the right cell among the top n_keep if its grids are fine
enough for its cut-off r0: a shift error δ costs a phase 2π r0 δ / n and a rotation
error θ moves frequencies by r0 θ Fourier pixels.  A shift step of about n / (3 r0)
pixels (1 px for n = 32, r0 = 8) and a step of 15–20° at r0 ≈ 6–8 work in the tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier.project import VolumeFT, projection_tables
from mpirefine.geometry import grids
from mpirefine.geometry.symmetry import asymmetric_unit_mask
from mpirefine.search.likelihood import (
    count_within,
    log_likelihood,
    noise_weights,
    profile_log_likelihood,
    score_batched,
    score_shared,
    search_frequencies,
    shift_ramps,
    weighted_data,
)

# The memory model (bytes): what the search sizes its chunks, blocks and cache by, and
# what working_bytes reports (mpirefine.report.memory).
_MiB = 2 ** 20
_BLOCK_BYTES = 32 << 20  # CPU: scoring temporaries per block: reused by the allocator, near cache
# A GPU sizes its blocks by its free memory instead (each block is some 20 kernel
# launches, so cache-sized blocks of a few particles would be launch-bound):
_DEVICE_BLOCK_FRACTION = 0.04   # of the free device memory per block (_LIVE_BLOCKS live)
_DEVICE_MAX_BLOCK_BYTES = 4 << 30
_LIVE_BLOCKS = 3  # block-sized arrays held at once: a block's scores, likelihoods and tables
_CHUNK_BYTES_PER_FREQ = 24  # a chunk's X, C, w C X and w C² at each search frequency
_CHUNK_BYTES_PER_PARTICLE = 4096  # kept poses, children, shifts
_TABLE_BYTES_PER_ENTRY = 12  # projection tables: float32 Re P, Im P and |P|² per rotation and frequency
_SCORE_BYTES = 4  # a float32 score G per particle, shift and rotation
_SHIFTED_BYTES_PER_FREQ = 24  # per particle, shift and frequency: the ramp S, w C X S, its stacked copy
_CACHE_SHARE = 0.5  # the first level's projection cache is kept when it fits in this share of max_chunk_MB


@dataclass(frozen=True)
class SearchParams:
    """Settings of :func:`search_poses`.  Steps halve at each level after the first.

    coarse_step_deg / final_step_deg: angular step of the global grid and of the last
    level (n_levels = ceil(log2(coarse / final)) subdivisions).
    coarse_radius_px / final_radius_px: frequency cut-off (Fourier pixels, cycles per
    box) of the first and last level; the last is the current alignment resolution.
    shift_range_px, coarse_shift_step_px: the level-0 shift grid.
    n_keep: distinct rotations kept per particle between levels.
    fit_scale: rank poses by the likelihood maximised over each pose's scale,
    max(G, 0)² / 2H, instead of using the given scale: robust when the particles'
    scales are unknown (a 30% error in a biases the ranking towards projections of
    low power); the result's log_likelihood is then this profile likelihood.
    marginalize, n_posterior: also return posterior weights over the best n_posterior
    poses of the last level.
    chunk_size, max_chunk_MB: particles per chunk, reduced so that a chunk's working
    arrays stay within about max_chunk_MB.
    """

    coarse_step_deg: float = 20.0
    final_step_deg: float = 5.0
    coarse_radius_px: float = 8.0
    final_radius_px: float = 16.0
    shift_range_px: float = 6.0
    coarse_shift_step_px: float = 1.0
    n_keep: int = 8
    fit_scale: bool = False
    marginalize: bool = False
    n_posterior: int = 16
    chunk_size: int = 1024
    max_chunk_MB: float = 1024.0

    def __post_init__(self):
        positive = ("coarse_step_deg", "final_step_deg", "coarse_radius_px", "final_radius_px",
                    "coarse_shift_step_px", "max_chunk_MB")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"SearchParams.{name} must be positive, got {getattr(self, name)}")
        if self.shift_range_px < 0:
            raise ValueError(f"SearchParams.shift_range_px must be >= 0, got {self.shift_range_px}")
        for name in ("n_keep", "n_posterior", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SearchParams.{name} must be >= 1, got {getattr(self, name)}")
        if self.final_step_deg > self.coarse_step_deg:
            raise ValueError("final_step_deg must not exceed coarse_step_deg")
        if self.n_levels > 12:
            raise ValueError("more than 12 subdivisions: raise final_step_deg")

    @property
    def n_levels(self) -> int:
        """Subdivision levels after the global one."""
        return max(0, math.ceil(math.log2(self.coarse_step_deg / self.final_step_deg) - 1e-9))

    def level_radii_px(self) -> list[float]:
        """Frequency cut-off of each level (n_levels + 1 values), geometric progression."""
        last = self.final_radius_px
        if self.n_levels == 0:
            return [last]
        first = min(self.coarse_radius_px, last)
        return [first * (last / first) ** (i / self.n_levels) for i in range(self.n_levels + 1)]


@dataclass
class SearchStats:
    """Work done by one search: poses scored, GEMM FLOPs, projection samples, seconds."""

    poses_scored: int = 0
    gemm_flops: float = 0.0
    projection_samples: int = 0
    seconds: dict = field(default_factory=lambda: {"project": 0.0, "score": 0.0,
                                                   "select": 0.0, "total": 0.0})
    # poses counted on the device (blocks with padded shifts), read once at the end
    _device_poses: object = field(default=None, repr=False, compare=False)

    def count_poses(self, n) -> None:
        """Add n poses: a Python int, or a device scalar (no synchronising read)."""
        if isinstance(n, int):
            self.poses_scored += n
        else:
            self._device_poses = n if self._device_poses is None else self._device_poses + n

    def settle(self) -> None:
        """Fold the device's count into poses_scored (one read, at the end of a search)."""
        if self._device_poses is not None:
            self.poses_scored += int(self._device_poses)
            self._device_poses = None


@dataclass
class SearchResult:
    """Best pose per particle (host NumPy arrays).

    rotations (B, 3, 3) RELION matrices; shifts_px (B, 2) origins (rlnOriginX/Y in
    pixels); log_likelihood (B,) at the best pose with the given scale (the profile
    likelihood with fit_scale); optimal_scale (B,) the optimal scale a* = G / H at the
    best pose.  With marginalization: posterior (B, M)
    weights (sum 1), candidate_rotations (B, M, 3, 3), candidate_shifts_px (B, M, 2),
    best first.
    """

    rotations: np.ndarray
    shifts_px: np.ndarray
    log_likelihood: np.ndarray
    optimal_scale: np.ndarray
    posterior: np.ndarray | None = None
    candidate_rotations: np.ndarray | None = None
    candidate_shifts_px: np.ndarray | None = None
    stats: SearchStats = field(default_factory=SearchStats)


@dataclass
class _Poses:
    """One level's pose sets for a chunk, on the search's device; a leading 1 means shared.

    rotations (1|b, C, 3, 3) float64; keys (1|b, C) int64 (equal keys ⇔ equal
    rotations); shifts (1|b, T, 2) float64; valid (b, T) bool or None (all valid).
    """

    rotations: object
    keys: object
    shifts: object
    valid: object = None

    def rows(self, blk: slice) -> "_Poses":
        def cut(a):
            return a if a is None or a.shape[0] == 1 else a[blk]

        return _Poses(cut(self.rotations), cut(self.keys), cut(self.shifts), cut(self.valid))


def search_poses(vft: VolumeFT, images_ft, ctf, noise_var_shell, scale=None,
                 params: SearchParams = SearchParams(), shift_center_px=None,
                 grid_rotation=None, shift_offset_px=None, symmetry=None,
                 reference: "SearchReference | None" = None) -> SearchResult:
    """Find each particle's rotation and shift by coarse-to-fine likelihood search.

    vft: the reference (:func:`~mpirefine.fourier.project.volume_ft`), device of the search.
    images_ft: (B, n, n // 2 + 1) complex particle transforms (centered_rfft2), host or device.
    ctf: (B, n, n // 2 + 1) float CTF values, or None for no CTF.
    noise_var_shell: (n // 2 + 1,) noise power E|N_k|² per shell.
    scale: (B,) positive per-particle scale a (default 1).
    shift_center_px: optional (B, 2) centre of each particle's shift grid (e.g. the
    previous origin); default 0.
    grid_rotation: optional (3, 3) rotation Q; every grid pose A becomes A·Q, which
    turns the whole coarse-to-fine hierarchy.  shift_offset_px: optional (2,) offset of
    the shift lattice.  A refinement draws both at random per half set and iteration,
    so the two halves' poses are not rounded to the same lattice: rounding errors that
    both halves shared would correlate their maps beyond the true resolution.
    symmetry: optional (N, 3, 3) point group of the reference; the global grid is cut
    to one asymmetric unit (1/N of the poses, see geometry.symmetry), and the finer
    levels follow the kept cells wherever they lead.
    reference: a :class:`SearchReference` made by :func:`prepare_reference` for this
    vft, params and lattice, to share the global grid's projections and the first
    level's projection cache between calls (the EM loop searches chunk by chunk);
    grid_rotation, shift_offset_px and symmetry are then taken from it.

    The particles are searched chunk by chunk (:func:`_chunk_size`), each chunk through
    every level (:func:`_search_chunk`).
    """
    t_start = time.perf_counter()
    _check_inputs(vft, images_ft, ctf, params)
    B = images_ft.shape[0]
    scale = _particle_scales(scale, B)
    stats = SearchStats()
    reference = _reference_for(vft, params, reference, grid_rotation, shift_offset_px, symmetry)
    weights = noise_weights(noise_var_shell, vft.n, reference.index)
    out = _Outputs.empty(B, params.n_posterior if params.marginalize else 0)
    step = _chunk_size(params, reference.n_freq[-1])
    for start in range(0, B, step):
        sl = slice(start, min(B, start + step))
        chunk = _load_chunk(reference, images_ft, ctf, weights, scale, shift_center_px, sl)
        _search_chunk(reference, chunk, params, out, start, stats)
    stats.settle()
    stats.seconds["total"] = time.perf_counter() - t_start
    return out.result(stats)


def _check_inputs(vft, images_ft, ctf, params) -> None:
    n = vft.n
    if tuple(images_ft.shape[1:]) != (n, n // 2 + 1):
        raise ValueError(f"images_ft must have shape (B, {n}, {n // 2 + 1}), got {images_ft.shape}")
    if ctf is not None and tuple(ctf.shape) != tuple(images_ft.shape):
        raise ValueError(f"ctf shape {ctf.shape} differs from images_ft shape {images_ft.shape}")
    if params.final_radius_px > n // 2 - 1:
        raise ValueError(f"final_radius_px {params.final_radius_px} exceeds the box's {n // 2 - 1}")


def _particle_scales(scale, B) -> np.ndarray:
    """The particles' scales as (B,) float64 (default 1), checked positive."""
    scale = np.ones(B) if scale is None else to_numpy(scale).astype(np.float64).reshape(B)
    if not np.all(scale > 0):
        raise ValueError("particle scales must be positive")
    return scale


def _reference_for(vft, params, reference, grid_rotation, shift_offset_px, symmetry):
    """The given :class:`SearchReference`, checked against vft and params, or a new one."""
    if reference is None:
        return prepare_reference(vft, params, grid_rotation, shift_offset_px, symmetry)
    if reference.vft is not vft or reference.params != params:
        raise ValueError("the SearchReference was prepared for another reference or plan")
    return reference


@dataclass
class _Chunk:
    """One chunk's particles: w C X (b, K) and w C² (b, K) at the search frequencies,
    the scales a (b,) float32 and the level-0 shifts (1|b, T, 2), on the search's device."""

    wcx: object
    wc2: object
    scale: object
    shifts: object

    @property
    def size(self) -> int:
        return self.wcx.shape[0]


def _load_chunk(reference, images_ft, ctf, weights, scale, shift_center_px, sl) -> _Chunk:
    """The particles ``sl`` at the search frequencies (see :func:`search_poses`)."""
    xp = array_namespace(reference.vft.data)
    b, index = sl.stop - sl.start, reference.index
    X = xp.asarray(images_ft[sl]).reshape(b, -1)[:, index]
    C = xp.ones(X.shape, xp.float32) if ctf is None else xp.asarray(ctf[sl]).reshape(b, -1)[:, index]
    wcx, wc2 = weighted_data(X, C, weights)
    shifts0 = reference.shifts0
    shifts = shifts0[None] if shift_center_px is None else (
        np.asarray(shift_center_px, float)[sl, None, :] + shifts0)
    return _Chunk(wcx, wc2, xp.asarray(scale[sl], dtype=xp.float32), xp.asarray(shifts))


def _search_chunk(reference, chunk: _Chunk, params, out, offset, stats) -> None:
    """Every level for one chunk: level 0 scores the global grid; each level but the
    last keeps every particle's n_keep best rotations, whose children the next level
    scores; the last level's results go into ``out`` from row ``offset`` on."""
    xp = array_namespace(chunk.wcx)
    grid = reference.grid_on_device
    poses = _Poses(grid[None], xp.arange(grid.shape[0], dtype=xp.int64)[None], chunk.shifts)
    for level in range(params.n_levels):
        parts = [_keep_best(g, h, p, score, params.n_keep, stats)
                 for _, p, g, h, score in _scored_blocks(reference, chunk, poses, level, params, stats)]
        kept = tuple(xp.concatenate(v, axis=0) for v in zip(*parts))
        poses = _children(kept, level + 1, params, stats)
    for blk, p, g, h, score in _scored_blocks(reference, chunk, poses, params.n_levels, params, stats):
        _finish(g, h, p, score, out, offset + blk.start, stats)


def _scored_blocks(reference, chunk: _Chunk, poses: _Poses, level, params, stats):
    """Score one level's poses block by block (:func:`_blocks`), each block against the
    tables its level's source gives (:func:`_table_source`); yields (block, the block's
    poses, G (b, T, C), H (b, C), the pose score L(G, H))."""
    K = reference.n_freq[level]
    kx, ky = reference.kx[:K], reference.ky[:K]
    tables = _table_source(reference, level, poses, K, stats)
    for blk in _blocks(chunk.size, poses, K, reference.block_bytes):
        p = poses.rows(blk)
        g, h = _score_block(chunk.wcx[blk, :K], chunk.wc2[blk, :K], p, tables.rows(blk), kx, ky,
                            reference.vft.n, stats)
        yield blk, p, g, h, _pose_score(chunk.scale[blk], params.fit_scale)


def _table_source(reference, level, poses: _Poses, K, stats):
    """Where one level's blocks get their projection tables (at the level's K frequencies)."""
    kx, ky = reference.kx[:K], reference.ky[:K]
    if level == 0:
        return _SharedTables(reference.level0_tables(stats))
    if level == 1 and reference.cache is not None:
        return _CachedRows(reference.vft, reference.cache, poses, kx, ky, stats)
    return _ProjectedRows(reference.vft, poses, kx, ky, stats)


class _SharedTables:
    """Level 0: the global grid's tables ((C, 2K), (C, K)), shared by every particle."""

    def __init__(self, tables):
        self.tables = tables

    def rows(self, _blk: slice):
        return self.tables


class _ProjectedRows:
    """Deeper levels (and level 1 without a cache): each block's own children,
    projected when the block is scored, ((b, C, 2K), (b, C, K)).  Two particles almost
    never keep the same cell, so no table is worth sharing."""

    def __init__(self, vft, poses: _Poses, kx, ky, stats):
        self.vft, self.poses, self.kx, self.ky, self.stats = vft, poses, kx, ky, stats

    def rows(self, blk: slice):
        p = self.poses.rows(blk)
        tables = _project(self.vft, p.rotations.reshape(-1, 3, 3), self.kx, self.ky, self.stats)
        return tuple(t.reshape(p.keys.shape + (-1,)) for t in tables)


class _ProjectionCache:
    """Projections of the first level's children, kept across chunks.

    Their keys (grid index × 18 + child) form a fixed, finite set that every particle
    draws from, so each is extracted once per search however many chunks there are.
    """

    def __init__(self, n_keys: int, n_freq: int, xp):
        self.stacked = xp.zeros((n_keys, 2 * n_freq), dtype=xp.float32)
        self.power = xp.zeros((n_keys, n_freq), dtype=xp.float32)
        self.filled = xp.zeros(n_keys, dtype=bool)


class _CachedRows:
    """Level 1 (when the search keeps a cache): the first level's children tables,
    drawn from the search's projection cache: each key missing from the cache is
    extracted once, then every block gathers its particles' rows ((b, C, 2K), (b, C, K))."""

    def __init__(self, vft, cache: _ProjectionCache, poses: _Poses, kx, ky, stats):
        xp = array_namespace(poses.keys)
        unique, first = xp.unique(poses.keys.ravel(), return_index=True)
        missing = ~cache.filled[unique]
        if bool(missing.any()):
            flat = poses.rotations.reshape(-1, 3, 3)
            _project(vft, flat[first[missing]], kx, ky, stats,
                     out=(cache.stacked, cache.power), rows=unique[missing])
            cache.filled[unique[missing]] = True
        self.cache, self.keys = cache, poses.keys

    def rows(self, blk: slice):
        r = self.keys[blk]
        return self.cache.stacked[r], self.cache.power[r]


def _project(vft, rotations, kx, ky, stats, out=None, rows=None):
    """Scoring tables (stacked (R, 2K), power (R, K)) of the projections at ``rotations``
    (:func:`~mpirefine.fourier.project.projection_tables`; into rows of ``out``)."""
    t0 = time.perf_counter()
    tables = projection_tables(vft, rotations, kx, ky, out, rows)
    stats.projection_samples += len(rotations) * kx.shape[0]
    stats.seconds["project"] += time.perf_counter() - t0
    return tables


def _chunk_size(params, n_freq_last) -> int:
    """Particles per chunk: the chunk's data at the search frequencies fit in
    max_chunk_MB (projections and scores live in blocks, :func:`_blocks`)."""
    return int(max(1, min(params.chunk_size,
                          params.max_chunk_MB * _MiB // _chunk_bytes_per_particle(n_freq_last))))


def _chunk_bytes_per_particle(n_freq_last: int) -> int:
    return _CHUNK_BYTES_PER_FREQ * n_freq_last + _CHUNK_BYTES_PER_PARTICLE


def _table_bytes(n_rotations: int, n_freq: int) -> int:
    """Bytes of the scoring tables of n_rotations projections at n_freq frequencies."""
    return _TABLE_BYTES_PER_ENTRY * n_rotations * n_freq


def scoring_bytes_per_particle(n_shifts: int, n_rotations: int, n_freq: int,
                               own_tables: bool) -> int:
    """Scoring temporaries per particle of a block: its scores (shifts × rotations),
    its shifted data (shifts × frequencies) and, when its rotations are its own rather
    than shared, their projection tables (rotations × frequencies)."""
    return (_SCORE_BYTES * n_shifts * n_rotations + _SHIFTED_BYTES_PER_FREQ * n_shifts * n_freq
            + (_table_bytes(n_rotations, n_freq) if own_tables else 0))


def working_bytes(params: SearchParams, n_grid: int, n_freq: list[int]) -> dict:
    """Bytes a search keeps (the estimate :mod:`mpirefine.report.memory` reports): a
    chunk's data, the first level's projection cache (when kept), the global grid's
    tables and the scoring blocks (a block's scores, likelihoods and projection tables).
    n_grid: rotations of the global grid; n_freq: frequencies of each level."""
    chunk = _chunk_size(params, n_freq[-1])
    n_level1 = len(grids.ROTATION_STENCILS["hopf"]) * n_grid
    return {
        "chunk data": chunk * _chunk_bytes_per_particle(n_freq[-1]),
        "level-1 cache": (_table_bytes(n_level1, n_freq[1])
                          if _keeps_cache(params, n_level1, n_freq) else 0),
        "global grid tables": _table_bytes(n_grid, n_freq[0]),
        "scoring blocks": _LIVE_BLOCKS * _BLOCK_BYTES,
    }


def largest_scoring_bytes_per_particle(params: SearchParams, n_grid: int,
                                       n_freq: list[int]) -> int:
    """The most scoring temporaries one particle of a block needs at any level: level 0
    scores the whole global grid (shared tables) at every lattice shift, the deeper
    levels each kept rotation's children (own tables) at up to 4 shifts per kept one;
    a block holds max_bytes // this many particles or more."""
    n_shifts0 = len(grids.shift_grid(params.shift_range_px, params.coarse_shift_step_px))
    sizes = [scoring_bytes_per_particle(n_shifts0, n_grid, n_freq[0], own_tables=False)]
    for level in range(1, params.n_levels + 1):
        n_child = len(grids.ROTATION_STENCILS["hopf" if level == 1 else "octant"])
        sizes.append(scoring_bytes_per_particle(4 * params.n_keep, params.n_keep * n_child,
                                                n_freq[level], own_tables=True))
    return max(sizes)


def _keeps_cache(params, n_level1: int, n_freq: list[int]) -> bool:
    """The first level's projection cache is kept when it fits in _CACHE_SHARE of max_chunk_MB."""
    return bool(params.n_levels) and (
        _table_bytes(n_level1, n_freq[1]) <= _CACHE_SHARE * params.max_chunk_MB * _MiB)


def block_bytes(xp, gpu_free_bytes: float | None = None) -> int:
    """Scoring temporaries per block: _BLOCK_BYTES on the CPU; on a GPU
    _DEVICE_BLOCK_FRACTION of its free memory (``gpu_free_bytes``, else asked of the
    device), at least _BLOCK_BYTES and at most _DEVICE_MAX_BLOCK_BYTES."""
    if gpu_free_bytes is None:
        if getattr(xp, "cuda", None) is None:   # NumPy
            return _BLOCK_BYTES
        gpu_free_bytes, _total = xp.cuda.runtime.memGetInfo()
    return int(max(_BLOCK_BYTES, min(_DEVICE_MAX_BLOCK_BYTES,
                                     gpu_free_bytes * _DEVICE_BLOCK_FRACTION)))


def _blocks(b, poses: _Poses, K, max_bytes: int):
    """Slices of a chunk's particles whose scoring temporaries stay near ``max_bytes``."""
    T, C = poses.shifts.shape[1], poses.keys.shape[1]
    per_particle = scoring_bytes_per_particle(T, C, K, own_tables=poses.keys.shape[0] > 1)
    step = int(max(1, max_bytes // per_particle))
    return [slice(i, min(b, i + step)) for i in range(0, b, step)]


def _score_block(wcx, wc2, poses: _Poses, tables, kx, ky, n, stats):
    """G (b, T, C), H (b, C) for a block.  tables: (stacked, power) of rotations shared
    by all particles ((C, 2K), (C, K)) or of each particle's own ((b, C, 2K), (b, C, K))."""
    t0 = time.perf_counter()
    b, K = wcx.shape
    T, C = poses.shifts.shape[1], poses.keys.shape[1]
    if tables[0].ndim == 2:
        shifts = poses.shifts[0] if poses.shifts.shape[0] == 1 else poses.shifts
        g, h = score_shared(wcx, wc2, shift_ramps(kx, ky, shifts, n), *tables)
    else:
        g, h = score_batched(wcx, wc2, shift_ramps(kx, ky, poses.shifts, n), *tables)
    stats.count_poses(b * T * C if poses.valid is None else poses.valid.sum() * C)
    stats.gemm_flops += 2.0 * b * T * 2 * K * C + 2.0 * b * K * C
    stats.seconds["score"] += time.perf_counter() - t0
    return g, h


def _children(kept, level, params, stats) -> _Poses:
    """Children rotations (hopf stencil after the global grid, then octants) and shifts."""
    t0 = time.perf_counter()
    rotations, keys, shifts = kept
    b, k = keys.shape
    stencil = "hopf" if level == 1 else "octant"
    n_child = len(grids.ROTATION_STENCILS[stencil])
    step_deg = params.coarse_step_deg / 2 ** (level - 1)
    children = grids.rotation_children(rotations.reshape(-1, 3, 3), step_deg, stencil)
    xp = array_namespace(keys)
    child_keys = (keys[:, :, None] * n_child + xp.arange(n_child)).reshape(b, -1)
    step_px = params.coarse_shift_step_px / 2 ** (level - 1)
    child_shifts, valid = grids.unique_shifts(grids.shift_children(shifts, step_px).reshape(b, -1, 2))
    stats.seconds["select"] += time.perf_counter() - t0
    return _Poses(children.reshape(b, k * n_child, 3, 3), child_keys, child_shifts, valid)


class SearchReference:
    """What a search needs of its reference and lattice, independent of the particles:
    the frequencies, the global grid and shift lattice, the global grid's projections
    and the first level's projection cache (filled on demand, kept across calls)."""

    def __init__(self, vft, params: SearchParams, grid, shifts0):
        xp = array_namespace(vft.data)
        self.vft, self.params, self.grid, self.shifts0 = vft, params, grid, shifts0
        self.grid_on_device = xp.asarray(grid)
        radii = params.level_radii_px()
        self.kx, self.ky, self.index, radius = search_frequencies(vft.n, radii[-1], xp)
        self.n_freq = [count_within(radius, r) for r in radii]
        n_level1 = len(grids.ROTATION_STENCILS["hopf"]) * len(grid)
        self.block_bytes = block_bytes(xp)   # fixed for the search: the same blocks every chunk
        self.cache = None
        if _keeps_cache(params, n_level1, self.n_freq):
            self.cache = _ProjectionCache(n_level1, self.n_freq[1], xp)
        self._tables0 = None

    def level0_tables(self, stats):
        if self._tables0 is None:
            K = self.n_freq[0]
            self._tables0 = _project(self.vft, self.grid, self.kx[:K], self.ky[:K], stats)
        return self._tables0


def prepare_reference(vft, params: SearchParams, grid_rotation=None, shift_offset_px=None,
                      symmetry=None) -> SearchReference:
    """A :class:`SearchReference` (see :func:`search_poses` for the arguments)."""
    grid = grids.so3_grid(params.coarse_step_deg)
    if grid_rotation is not None:
        grid = grid @ np.asarray(grid_rotation, float)
    if symmetry is not None and len(symmetry) > 1:
        grid = grid[asymmetric_unit_mask(grid, symmetry)]
    shifts0 = grids.shift_grid(params.shift_range_px, params.coarse_shift_step_px)
    if shift_offset_px is not None:
        shifts0 = shifts0 + np.asarray(shift_offset_px, float)
    return SearchReference(vft, params, grid, shifts0)


def _pick(table, index):
    """table (1|b, N, ...) indexed per particle by index (b, k) → (b, k, ...)."""
    xp = array_namespace(table)
    rows = xp.arange(index.shape[0])[:, None] if table.shape[0] > 1 else 0
    return table[rows, index]


def _masked(g, valid):
    xp = array_namespace(g)
    return g if valid is None else xp.where(xp.asarray(valid)[:, :, None], g, -xp.inf)


def _pose_score(a, fit_scale: bool):
    """L(g (b, T, C), h (b, C)) → (b, T, C): with the given scales a (b,) or fitted ones."""
    if fit_scale:
        return lambda g, h: profile_log_likelihood(g, h[:, None, :])
    return lambda g, h: log_likelihood(g, h, a)


def _keep_best(g, h, poses: _Poses, score, n_keep, stats):
    """The n_keep best rotations per particle, each with its best shift (on the device).

    Both scores grow with G for fixed H, so the best shift of a rotation maximises G.
    """
    xp = array_namespace(g)
    t0 = time.perf_counter()
    g = _masked(g, poses.valid)
    L = score(g.max(axis=1)[:, None, :], h)[:, 0]
    b, T, C = g.shape
    k = min(n_keep, C)
    top = xp.argpartition(-L, k - 1, axis=1)[:, :k] if k < C else xp.broadcast_to(xp.arange(C), (b, C))
    g_top = xp.take_along_axis(g, xp.broadcast_to(top[:, None, :], (b, T, k)), axis=2)
    top_t = xp.argmax(g_top, axis=1)
    kept = (_pick(poses.rotations, top), _pick(poses.keys, top), _pick(poses.shifts, top_t))
    stats.seconds["select"] += time.perf_counter() - t0
    return kept


@dataclass
class _Outputs:
    """The search's results, filled chunk by chunk; M posterior candidates (0: none)."""

    rotations: np.ndarray
    shifts: np.ndarray
    loglik: np.ndarray
    optimal_scale: np.ndarray
    posterior: np.ndarray
    cand_rot: np.ndarray
    cand_shift: np.ndarray

    @classmethod
    def empty(cls, B, M):
        return cls(np.zeros((B, 3, 3)), np.zeros((B, 2)), np.zeros(B), np.zeros(B),
                   np.zeros((B, M)), np.zeros((B, M, 3, 3)), np.zeros((B, M, 2)))

    @property
    def M(self) -> int:
        return self.posterior.shape[1]

    def result(self, stats: SearchStats) -> SearchResult:
        M = self.M
        return SearchResult(self.rotations, self.shifts, self.loglik, self.optimal_scale,
                            self.posterior if M else None, self.cand_rot if M else None,
                            self.cand_shift if M else None, stats)


def _finish(g, h, poses: _Poses, score, out: _Outputs, offset, stats):
    """Best pose, its log-likelihood and optimal scale; posterior over the top M poses."""
    xp = array_namespace(g)
    t0 = time.perf_counter()
    M = out.M
    g = _masked(g, poses.valid)
    b, T, C = g.shape
    sl = slice(offset, offset + b)
    L = score(g, h).reshape(b, T * C)
    best = xp.argmax(L, axis=1)[:, None]
    out.rotations[sl] = to_numpy(_pick(poses.rotations, best % C)[:, 0])
    out.shifts[sl] = to_numpy(_pick(poses.shifts, best // C)[:, 0])
    out.loglik[sl] = to_numpy(xp.take_along_axis(L, best, axis=1))[:, 0]
    g_best = to_numpy(xp.take_along_axis(g.reshape(b, T * C), best, axis=1))[:, 0]
    h_best = to_numpy(xp.take_along_axis(h, best % C, axis=1))[:, 0]
    out.optimal_scale[sl] = g_best / h_best
    if M:
        m = min(M, T * C)
        top = xp.argpartition(-L, m - 1, axis=1)[:, :m] if m < T * C else xp.broadcast_to(
            xp.arange(T * C), (b, T * C))
        L_top = xp.take_along_axis(L, top, axis=1)
        order = xp.argsort(-L_top, axis=1)
        top, L_top = (xp.take_along_axis(v, order, axis=1) for v in (top, L_top))
        w = xp.exp((L_top - L_top[:, :1]).astype(xp.float64))
        out.posterior[sl, :m] = to_numpy(w / w.sum(axis=1, keepdims=True))
        out.cand_rot[sl, :m] = to_numpy(_pick(poses.rotations, top % C))
        out.cand_shift[sl, :m] = to_numpy(_pick(poses.shifts, top // C))
    stats.seconds["select"] += time.perf_counter() - t0
