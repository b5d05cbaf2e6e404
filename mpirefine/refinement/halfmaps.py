"""Gold-standard half maps: insertion of aligned particles, reduction, reconstruction, FSC.

Every rank inserts its particles into the accumulator of each half it serves.  With
one rank per half, each half root (world ranks 0 and 1, or rank 0 alone)
reconstructs its own sums, the roots swap maps and compute the FSC
(:func:`reconstruct_root_pair`).  With more ranks, each half's sums are
reduce-scattered over its group in slabs and every rank reconstructs its slab
(:class:`HalfMapReduction`, :func:`reconstruct_slabs`, docs/parallel.md
"Distributed reconstruction").  Either way the half maps are reconstructed twice:
first nearly unregularised, then with the SSNR implied by that first FSC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier.backproject import Accumulator
from mpirefine.fourier.reconstruct import (
    SlabLayout,
    divide_sphere,
    fold_kx0,
    forward_columns,
    forward_rows,
    inverse_columns,
    inverse_rows,
    pack_sphere,
    padded_inverse_columns,
    padded_inverse_rows,
    reconstruct,
    shell_weight_sums,
    slab_radius,
    slab_regulariser,
    sphere_shells,
    ssnr_from_fsc,
)
from mpirefine.fourier.transforms import (
    half_space_multiplicity,
    insertion_frequencies,
    phase_shift_2d,
    shell_sums,
)
from mpirefine.postprocess.fsc import fsc_curve, fsc_weight
from mpirefine.postprocess.masks import dynamic_mask_rows, mask_halo_rows
from mpirefine.refinement.images import ctf_grid, ewald_sidebands, open_images, prepare_images
from mpirefine.refinement.references import filter_reference_planes, split_shell

PAD = 2


def insert_particles(acc: Accumulator, images_ft, ctf, noise_weight, rotations, shifts_px,
                     scale, posterior=None, ewald=None) -> None:
    """Backproject particles at their poses.

    images_ft: (B, n, n//2+1) windowed transforms; ctf: (B, n, n//2+1);
    noise_weight: (n, n//2+1) = 1/σ²; rotations (B, M, 3, 3) or (B, 3, 3);
    shifts_px (B, M, 2) or (B, 2) (RELION origins in px: the image is shifted by +t);
    scale (B,); posterior (B, M) weights summing to 1 per particle, or None.
    Inserts a·C·X·w/σ² and a²·C²·w/σ² for every (particle, candidate).
    ewald: the batch's EwaldSidebands (physics/ewald.py) or None; with them each
    (particle, candidate) inserts its masked side band ḡ·P·a·w/σ² with weight
    |g|²·a²·w/σ² over the whole plane, on the curved sphere, instead.
    """
    xp = array_namespace(images_ft)
    n = acc.n
    B = images_ft.shape[0]
    rot = xp.asarray(rotations, dtype=xp.float32).reshape(B, -1, 3, 3)
    shifts = xp.asarray(shifts_px, dtype=xp.float32).reshape(B, -1, 2)
    M = rot.shape[1]
    post = xp.ones((B, M), xp.float32) if posterior is None else xp.asarray(posterior, xp.float32)
    a = xp.asarray(scale, dtype=xp.float32).reshape(B, 1, 1)
    if ewald is not None:
        from mpirefine.physics.ewald import full_plane_even

        nw = full_plane_even(noise_weight, n).reshape(-1)[ewald.index][None]
        gw = xp.conj(ewald.gain) * nw                                      # ḡ/σ²
        g2w = (ewald.gain.real ** 2 + ewald.gain.imag ** 2) * nw           # |g|²/σ²
        for m in range(M):
            x = phase_shift_2d(images_ft, shifts[:, m], n)
            p = post[:, m, None]
            acc.insert(rot[:, m], (a[:, :, 0] * p) * gw * ewald.sideband(x),
                       (a[:, :, 0] ** 2 * p) * g2w, ewald.kx, ewald.ky, ewald.kz)
        return
    kx, ky, inside = insertion_frequencies(n, xp)
    cw = (ctf * noise_weight[None]).reshape(B, -1)[:, inside]          # C/σ²
    c2w = (ctf * ctf * noise_weight[None]).reshape(B, -1)[:, inside]   # C²/σ²
    for m in range(M):
        x = phase_shift_2d(images_ft, shifts[:, m], n).reshape(B, -1)[:, inside]
        p = post[:, m, None]
        values = (a[:, :, 0] * p) * cw * x
        weights = (a[:, :, 0] ** 2 * p) * c2w
        acc.insert(rot[:, m], values, weights, kx, ky)


def rank_share(par, split: np.ndarray, members: np.ndarray | None = None):
    """Yield (half, indices): this rank's share of each half set it serves, among
    ``members`` (default every particle), in ascending order."""
    members = np.arange(len(split)) if members is None else members
    for half in par.halves_here:
        in_half = members[split[members] == half]
        yield half, in_half[par.shard(len(in_half), half)]


def insert_at_poses(par, ps, split: np.ndarray, prep, xp, image_batch_size: int,
                    ewald=None) -> dict:
    """Each served half's accumulator with this rank's share of the particles inserted
    at the poses, shifts and scales ``ps`` carries (unit noise weights): the sums of
    a reconstruction at known poses.  half → :class:`Accumulator`.  Odd aberrations in
    the optics table (rlnBeamTiltX/Y, rlnOddZernike) are taken out of the images first;
    even ones (rlnEvenZernike) go into the CTF.  ewald: an EwaldCorrection
    (physics/ewald.py) or None."""
    from mpirefine.physics.aberrations import (
        GroupDemodulation,
        GroupEvenPhase,
        input_even_aberrations,
        input_odd_aberrations,
    )

    n = prep.box
    noise_weight = xp.ones((n, n // 2 + 1), xp.float32)
    odd = input_odd_aberrations(ps)
    demodulate = GroupDemodulation(odd, n, prep.pixel_size_A, xp) if odd else None
    even = input_even_aberrations(ps)
    even_phase = GroupEvenPhase(even, n, prep.pixel_size_A, xp) if even else None
    accs = {}
    with open_images(ps) as source:
        for half, mine in rank_share(par, split):
            acc = Accumulator.zeros(n, PAD, xp)
            for idx, images in source.batches(mine, image_batch_size):
                grid = ps.image_grid(idx)
                f = prepare_images(images, prep, xp, grid)
                if demodulate is not None:
                    f, = demodulate(ps.optics_group[idx], f)
                offset = None if even_phase is None else even_phase(ps.optics_group[idx])
                params = ps.ctf.subset(idx)
                sidebands = (None if ewald is None
                             else ewald_sidebands(ewald, params, prep, xp, grid, offset))
                insert_particles(acc, f, ctf_grid(params, prep, xp, grid, offset), noise_weight,
                                 ps.rotations[idx], ps.shifts_A[idx] / prep.pixel_size_A,
                                 ps.scale[idx], ewald=sidebands)
            accs[half] = acc
    return accs


def reduce_accumulators(par, accs: dict) -> None:
    """Sum each served half's accumulator onto its half root (in place), whole: what
    ``mpirefine reconstruct`` did before the reduction was distributed, kept for tests
    and comparisons (reconstruct_half_maps no longer uses it).

    The sums travel in single precision (complex64 data, float32 weights): half the
    bytes of the double-precision accumulators, which matter for summing 10⁵ particles
    within a rank, not for adding a few hundred ranks' totals (relative error ~1e-7
    per addition)."""
    for half, acc in accs.items():
        if par.half_size(half) == 1:
            continue
        xp = array_namespace(acc.data)
        for array, single in ((acc.data, xp.complex64), (acc.weight, xp.float32)):
            buf = xp.ascontiguousarray(array.astype(single))
            par.reduce_half(buf, half)
            if par.is_half_root(half):
                array[...] = buf


def _pair_maps(par, mine: dict) -> dict:
    """Both half maps on the root pair: {0: map_A, 1: map_B} (host NumPy)."""
    if par.size == 1:
        return {h: to_numpy(v) for h, v in mine.items()}
    (half, vol), = mine.items()
    other = par.exchange_roots(np.ascontiguousarray(to_numpy(vol)))
    return {half: to_numpy(vol), 1 - half: to_numpy(other)}


@dataclass
class HalfMaps:
    """The root pair's half maps after one reduction (host NumPy float32, {0: A, 1: B}).

    unregularised: D / W (a tiny regulariser only guards empty voxels): the honest
    gold-standard pair.  fsc: their FSC, the resolution measure.  regularised: the
    same sums reconstructed with the SSNR that FSC implies (D / (W + 1/τ²)), the
    better estimate of each half's map, used for the next references.  The FSC is
    not taken from the regularised pair: dividing by W + 1/τ² weights each voxel by
    its coverage, and on refined data that raised the half-map FSC by about 0.07 at
    every shell beyond the resolution while neither half correlated with the truth.
    """

    unregularised: dict
    regularised: dict
    fsc: np.ndarray


# ------------------------------------------------------------------ the reduction

@dataclass
class SlabSums:
    """This rank's slab of one half's summed accumulator: its sphere voxels as (V, 3)
    float32 [Σ Re D, Σ Im D, Σ W], kx = 0 plane folded (fourier/reconstruct.py)."""

    layout: SlabLayout
    index: int
    packed: object
    shells: object = None


class HalfMapReduction:
    """One iteration's half-set sums on their way from the ranks that inserted them to
    the reconstruction (docs/parallel.md).

    With one rank per half (one or two ranks in all) nothing moves: each half root
    reconstructs from its own accumulator (:func:`reconstruct_root_pair`). With more,
    every rank folds (and, with enforced symmetry, symmetrises) its own accumulator,
    packs the voxels that reconstruction uses into single precision and starts a
    non-blocking reduce-scatter over its half's group: each rank receives the summed
    slab it will divide and transform (:func:`reconstruct_slabs`).

    ``begin(half, acc)`` is the hook that the insertion loop calls as soon as one
    half's accumulator is complete, so that half's sums move while this rank, or the
    other half's ranks, still search; when every half this rank serves has begun, it
    waits at a barrier (timed as idle: the wait for slower ranks), during which MPI
    moves the sums. ``finish(accs)`` begins what was not begun and returns {half:
    SlabSums}, or ``accs`` itself with one rank per half.
    """

    def __init__(self, par, n: int, symmetry=None, wait_for_all: bool = True):
        self.par, self.n = par, n
        self.symmetry = symmetry if symmetry is not None and len(symmetry) > 1 else None
        self.distributed = par.size > 2
        self.layout = SlabLayout(n, PAD, par.half_size(0)) if self.distributed else None
        self.wait_for_all = wait_for_all
        self.pending: dict = {}

    def begin(self, half: int, acc: Accumulator) -> None:
        par = self.par
        if half in self.pending:
            return
        if self.distributed:
            with par.timer("reconstruction"):
                data, weight = acc.data, acc.weight
                if self.symmetry is not None:
                    from mpirefine.geometry.symmetry import symmetrize_accumulator

                    data, weight = symmetrize_accumulator(data, weight, self.symmetry)
                fold_kx0(data, weight)
                packed = pack_sphere(data, weight, self.layout).reshape(-1)
            self.pending[half] = par.ireduce_scatter_half(packed, 3 * self.layout.voxels, half)
        else:
            self.pending[half] = None
        if self.wait_for_all and all(h in self.pending for h in par.halves_here):
            par.barrier()

    def finish(self, accs: dict) -> dict:
        for half in self.par.halves_here:
            if half not in self.pending:
                self.begin(half, accs[half])
        if not self.distributed:
            return accs
        index = self.par.slab_layout()
        return {h: SlabSums(self.layout, index[h], self.pending.pop(h).wait().reshape(-1, 3))
                for h in self.par.halves_here}


# --------------------------------------------------------- root pair: one rank per half

def reconstruct_root_pair(par, accs: dict, n: int, symmetry=None, steer=None) -> HalfMaps:
    """Reconstruct both ways and FSC on the root pair, each root from its own half's
    accumulator (one rank per half: nothing to reduce).

    steer: optional ``steer(pair)`` → the FSC curve that sets the regularisation
    (default: the unmasked FSC of the unregularised pair); called on every rank (all
    are half roots here) with the whole unregularised pair on world rank 0 and None
    elsewhere, and collective (the refinement's masked GSFSC, refinement/gsfsc.py)."""
    roots = [h for h in accs if par.is_half_root(h)]
    if symmetry is not None and len(symmetry) > 1:
        from mpirefine.geometry.symmetry import symmetrize_accumulator

        for h in roots:
            accs[h].data, accs[h].weight = symmetrize_accumulator(accs[h].data, accs[h].weight,
                                                                  symmetry)
    # No corner masking: the same soft sphere multiplied into both halves carries
    # their correlated low-resolution background out to every frequency (it raised
    # the FSC of refined half maps by ~0.1 up to Nyquist, where the truth says 0).
    with par.timer("reconstruction"):
        mine = {h: reconstruct(accs[h].data, accs[h].weight, n, PAD, mask_corners=False)
                for h in roots}
    raw = _pair_maps(par, mine)
    with par.timer("reconstruction"):
        fsc = fsc_curve(raw[0], raw[1])
    curve = fsc if steer is None else steer(raw if par.is_root else None)
    with par.timer("reconstruction"):
        mine = {h: reconstruct(accs[h].data, accs[h].weight, n, PAD, ssnr=ssnr_from_fsc(curve),
                               mask_corners=False)
                for h in roots}
    return HalfMaps(unregularised=raw, regularised=_pair_maps(par, mine), fsc=fsc)


# ------------------------------------------------------ distributed: one slab per rank

@dataclass
class SlabHalfMaps:
    """Every rank's part of both reconstructions of the halves it serves: rows of the
    unregularised and regularised maps ({half: (ny, n, n) float32 [y, z, x]}, rows
    ``layout.rows(index[half])``), the FSC (the same on every rank), and the sums."""

    layout: SlabLayout
    index: dict
    unregularised: dict
    regularised: dict
    fsc: np.ndarray
    sums: dict
    unregularised_pair: dict | None = None   # whole maps on world rank 0, when steered


def _transpose(par, half: int, array, send_sizes, recv_sizes):
    return par.alltoallv_half(array.reshape(-1), send_sizes, recv_sizes, half)


def _padded_inverse(par, half: int, sums: SlabSums, regulariser):
    """Divide slab ``sums`` by W + 1/τ² and inverse-transform: this rank's map rows."""
    L, s = sums.layout, sums.index
    with par.timer("reconstruction"):
        rows = padded_inverse_rows(divide_sphere(sums.packed, sums.shells, regulariser), L, s)
    nz = L.planes(s)[1] - L.planes(s)[0]
    ny = L.rows(s)[1] - L.rows(s)[0]
    blocks = _transpose(par, half, rows,
                        [(L.rows(t)[1] - L.rows(t)[0]) * nz * L.nx for t in range(L.parts)],
                        [ny * (L.planes(t)[1] - L.planes(t)[0]) * L.nx for t in range(L.parts)])
    with par.timer("reconstruction"):
        return padded_inverse_columns(blocks, L, s)


def _forward(par, half: int, L: SlabLayout, s: int, rows):
    """centered_rfft3 of the map whose rows ``rows`` this rank holds: its planes."""
    nxn = L.n // 2 + 1
    with par.timer("reconstruction"):
        f = forward_rows(rows)
    nk = L.kplanes(s)[1] - L.kplanes(s)[0]
    ny = L.rows(s)[1] - L.rows(s)[0]
    blocks = _transpose(par, half, f,
                        [(L.kplanes(t)[1] - L.kplanes(t)[0]) * ny * nxn for t in range(L.parts)],
                        [nk * (L.rows(t)[1] - L.rows(t)[0]) * nxn for t in range(L.parts)])
    with par.timer("reconstruction"):
        return forward_columns(blocks, L, s)


def _inverse(par, half: int, L: SlabLayout, s: int, planes):
    """centered_irfft3 (float64) of the transform whose planes this rank holds: its rows."""
    nxn = L.n // 2 + 1
    with par.timer("reconstruction"):
        rows = inverse_rows(planes, L.n)
    nk = L.kplanes(s)[1] - L.kplanes(s)[0]
    ny = L.rows(s)[1] - L.rows(s)[0]
    blocks = _transpose(par, half, rows,
                        [(L.rows(t)[1] - L.rows(t)[0]) * nk * nxn for t in range(L.parts)],
                        [ny * (L.kplanes(t)[1] - L.kplanes(t)[0]) * nxn for t in range(L.parts)])
    with par.timer("reconstruction"):
        return inverse_columns(blocks, L, s)


def _from_partner(par, half: int, mine, other_half: dict | None = None):
    """The other half's array that matches ``mine`` (same slab): from this rank itself
    when it serves both halves (``other_half``), else swapped with the partner."""
    if other_half is not None:
        return other_half
    return par.partner_sendrecv(mine, half)


def fsc_shell_sums(fa, fb, radius, n: int):
    """(3, n // 2 + 1) float64: Σ Re(A·B*), Σ |A|², Σ |B|² per shell over some planes of
    two n-grid half-space transforms (fsc_curve's sums; add the planes' together)."""
    xp = array_namespace(fa)
    mult = half_space_multiplicity(n, xp)
    n_shells = n // 2 + 1
    return xp.stack([shell_sums((fa * xp.conj(fb)).real, radius, n_shells, weights=mult),
                     shell_sums((fa * xp.conj(fa)).real, radius, n_shells, weights=mult),
                     shell_sums((fb * xp.conj(fb)).real, radius, n_shells, weights=mult)])


def fsc_from_shell_sums(sums) -> np.ndarray:
    """The FSC curve from the whole grid's :func:`fsc_shell_sums` (as fsc_curve)."""
    num, pa, pb = np.asarray(sums, float)
    curve = num / np.sqrt(np.maximum(pa * pb, 1e-300))
    curve[0] = 1.0 if curve[0] > 0 else curve[0]
    return curve


def _slab_fsc(par, L: SlabLayout, index: dict, spectra: dict) -> np.ndarray:
    """The FSC of the two unregularised maps from their transform planes: the owner of
    half A's planes takes half B's matching planes from its partner, every rank adds
    its planes' per-shell sums, rank 0 totals them and sends the curve to all."""
    partial = np.zeros((3, L.n_shells))
    if 0 in spectra:
        s = index[0]
        fb = spectra.get(1)
        if fb is None:
            fb = par.recv_array(spectra[0].shape, spectra[0].dtype, par.slab_partner(0))
        with par.timer("reconstruction"):
            fa = spectra[0]
            fb = array_namespace(fa).asarray(fb)
            radius = slab_radius(L.n, *L.kplanes(s), array_namespace(fa))
            partial = to_numpy(fsc_shell_sums(fa, fb, radius, L.n))
    elif 1 in spectra:
        par.send_array(spectra[1], par.slab_partner(1))
    total = par.reduce_sum(np.ascontiguousarray(partial), root=0)
    return par.bcast_obj(fsc_from_shell_sums(total) if par.is_root else None, root=0)


def reconstruct_slabs(par, sums: dict, steer=None) -> SlabHalfMaps:
    """Both reconstructions of every served half, distributed over the half groups,
    from this rank's slabs (:meth:`HalfMapReduction.finish`); the FSC between the
    unregularised pair sets the regularisation of the second. Collective over all
    ranks. Equal to :func:`reconstruct_root_pair` up to the order of floating-point
    sums (float32 rounding in the maps).

    steer: as for :func:`reconstruct_root_pair`; the unregularised pair is then
    gathered on world rank 0 first (kept as ``unregularised_pair``)."""
    L = next(iter(sums.values())).layout
    index = {h: s.index for h, s in sums.items()}
    weight_sums, unregularised, spectra = {}, {}, {}
    for h, s in sums.items():
        xp = array_namespace(s.packed)
        with par.timer("reconstruction"):
            s.shells = sphere_shells(L, s.index, xp)
            partial = np.ascontiguousarray(to_numpy(shell_weight_sums(s.packed, s.shells,
                                                                      L.n_shells)))
        weight_sums[h] = par.allreduce_half(partial, h)
        unregularised[h] = _padded_inverse(par, h, s, slab_regulariser(weight_sums[h]))
        spectra[h] = _forward(par, h, L, s.index, unregularised[h])
    fsc = _slab_fsc(par, L, index, spectra)
    del spectra
    curve, pair = fsc, None
    if steer is not None:
        whole = {h: (gather_rows(par, h, L, unregularised[h]),) for h in par.halves_here}
        pair = gather_to_rank0(par, {h: whole[h] for h in par.halves_here if par.is_half_root(h)})
        pair = {h: v[0] for h, v in pair.items()} if par.is_root else None
        curve = steer(pair)
    ssnr = ssnr_from_fsc(curve)
    regularised = {h: _padded_inverse(par, h, s, slab_regulariser(weight_sums[h], ssnr))
                   for h, s in sums.items()}
    return SlabHalfMaps(L, index, unregularised, regularised, fsc, sums, pair)


def slab_references(par, maps: SlabHalfMaps, split_resolution_A: float,
                    pixel_size_A: float) -> dict:
    """{half: (n, n, n) float32} next reference of every served half on every rank of
    its group (on the rows' device): references.next_references, each rank filtering its
    transform planes; partners swap the planes' voxels below the split shell for the
    shared average."""
    L, n = maps.layout, maps.layout.n
    spectra, low, radius = {}, {}, {}
    for h, rows in maps.regularised.items():
        s = maps.index[h]
        spectra[h] = _forward(par, h, L, s, rows)
        with par.timer("reconstruction"):
            radius[h] = slab_radius(n, *L.kplanes(s), array_namespace(rows))
            low[h] = radius[h] < split_shell(n, split_resolution_A, pixel_size_A)
    out = {}
    for h in maps.regularised:
        s = maps.index[h]
        own = spectra[h][low[h]]
        other = _from_partner(par, h, own, spectra[1 - h][low[h]] if 1 - h in spectra else None)
        with par.timer("reconstruction"):
            a, b = (own, other) if h == 0 else (other, own)
            planes = filter_reference_planes(spectra[h], radius[h], low[h], 0.5 * (a + b),
                                             maps.fsc, n)
        rows = _inverse(par, h, L, s, planes)
        with par.timer("reconstruction"):
            rows = rows.astype(array_namespace(rows).float32)
        out[h] = _allgather_rows(par, h, L, rows)
    return out


def _row_counts(L: SlabLayout) -> list:
    return [(L.rows(t)[1] - L.rows(t)[0]) * L.n * L.n for t in range(L.parts)]


def _as_volume(flat, n: int):
    """A whole map from rows [y, z, x] concatenated in slab order: (n, n, n) [z, y, x],
    in ``flat``'s array namespace."""
    xp = array_namespace(flat)
    return xp.ascontiguousarray(flat.reshape(n, n, n).transpose(1, 0, 2))


def _allgather_rows(par, half: int, L: SlabLayout, rows):
    """The whole map of ``half``'s rows on every rank of its group, in ``rows``' array
    namespace (a GPU rank keeps it on the device)."""
    flat = par.allgatherv_half(array_namespace(rows).ascontiguousarray(rows).reshape(-1),
                               _row_counts(L), half)
    with par.timer("reconstruction"):
        return _as_volume(flat, L.n)


def gather_rows(par, half: int, L: SlabLayout, rows) -> np.ndarray | None:
    """The whole map (host NumPy (n, n, n)) of ``half``'s rows on its half root; None on
    the group's other ranks."""
    flat = par.gatherv_half(array_namespace(rows).ascontiguousarray(rows).reshape(-1),
                            _row_counts(L), half)
    if flat is None:
        return None
    with par.timer("root"):
        return to_numpy(_as_volume(flat, L.n))


def slab_masks(par, maps: SlabHalfMaps, resolution_A: float, pixel_size_A: float,
               threshold: float, near: float, far: float, absolute: bool = False) -> dict:
    """{half: (n, n, n) float32} the dynamic mask of every served half's regularised map
    on every rank of its group (host NumPy), each rank making its rows (with the rows
    within the mask's reach from its neighbours): postprocess.masks.dynamic_mask,
    voxel for voxel."""
    L, n = maps.layout, maps.layout.n
    halo = mask_halo_rows(resolution_A, pixel_size_A, near, far)
    out = {}
    for h, rows in maps.regularised.items():
        xp = array_namespace(rows)
        s = maps.index[h]
        y0, y1 = L.rows(s)
        peak = par.allreduce_half(np.array([float(rows.max()) if rows.size else -np.inf]), h,
                                  op="max")[0]
        level = threshold * peak
        with par.timer("reconstruction"):
            v = rows.astype(xp.float64)
            cores = float(((xp.abs(v) if absolute else v) > level).sum()) if peak > 0 else 0.0
        if par.allreduce_half(np.array([cores]), h)[0] == 0:
            out[h] = np.ones((n, n, n), np.float32)   # dynamic_mask's rule for an empty core
            continue
        # rows within reach: mine to every slab t that needs them, theirs to me
        need = [(max(0, L.rows(t)[0] - halo), min(n, L.rows(t)[1] + halo)) for t in range(L.parts)]
        send = [max(0, min(y1, b) - max(y0, a)) for a, b in need]
        pieces = [rows[max(y0, a) - y0:max(y0, a) - y0 + c] for (a, _b), c in zip(need, send)]
        lo, hi = need[s]
        recv = [max(0, min(L.rows(t)[1], hi) - max(L.rows(t)[0], lo)) for t in range(L.parts)]
        flat = par.alltoallv_half(xp.concatenate([p.reshape(-1) for p in pieces]),
                                  [c * n * n for c in send], [c * n * n for c in recv], h)
        with par.timer("reconstruction"):
            near_rows = xp.asarray(flat).reshape(hi - lo, n, n)
            mask = dynamic_mask_rows(near_rows, y0 - lo, y1 - y0, peak, resolution_A,
                                     pixel_size_A, threshold, near, far, absolute)
        out[h] = to_numpy(_allgather_rows(par, h, L, mask))
    return out


def reconstruct_half_maps(par, accs: dict, n: int, symmetry=None) -> HalfMaps | None:
    """Reduce, reconstruct both ways and FSC; a :class:`HalfMaps` on the root pair and
    None on other ranks.  Collective over the world communicator.

    symmetry: optional (N, 3, 3) point group to enforce: each half's accumulators are
    summed over the N rotations (every particle then counts in all N of its
    symmetry-related poses) before reconstructing. Afterwards ``accs`` holds what
    :func:`full_map` needs: each half's accumulator on its root (one
    rank per half) or this rank's :class:`SlabSums`."""
    reduction = HalfMapReduction(par, n, symmetry, wait_for_all=False)
    sums = reduction.finish(accs)
    if not reduction.distributed:
        if not any(par.is_half_root(h) for h in accs):
            return None
        return reconstruct_root_pair(par, accs, n, symmetry)
    accs.update(sums)
    maps = reconstruct_slabs(par, sums)
    full = {h: (gather_rows(par, h, maps.layout, maps.unregularised[h]),
                gather_rows(par, h, maps.layout, maps.regularised[h])) for h in par.halves_here}
    pair = gather_to_rank0(par, {h: v for h, v in full.items() if par.is_half_root(h)})
    if pair is None:
        return None
    return HalfMaps(unregularised={h: v[0] for h, v in pair.items()},
                    regularised={h: v[1] for h, v in pair.items()}, fsc=maps.fsc)


def gather_to_rank0(par, mine: dict) -> dict | None:
    """{half: tuple of (n, n, n) float32 volumes} of both halves on world rank 0, from
    the half roots' ``mine`` (half B's root sends its own; the others call with {});
    on half B's root its own tuple ({1: ...}); None on other ranks."""
    if par.size == 1:
        return mine
    if par.rank == 1 and 1 in mine:
        volumes = mine[1]
        par.send_array(np.ascontiguousarray(np.stack([np.asarray(v, np.float32) for v in volumes])),
                       0)
        return mine
    if par.rank == 0:
        count = len(mine[0])
        n = mine[0][0].shape[0]
        stack = par.recv_array((count, n, n, n), np.float32, 1)
        return {0: mine[0], 1: tuple(stack[i] for i in range(count))}
    return None


def full_map(par, accs: dict, n: int, half_fsc=None):
    """The map from all particles, D_A + D_B over W_A + W_B, on world rank 0 (None
    elsewhere); collective.  Call after the half maps were reconstructed from ``accs``
    (:func:`reconstruct_half_maps`, or the refinement's reduction: symmetry is then in
    the sums).  half_fsc: the half maps' FSC per shell, for a map regularised by the
    SSNR of all particles (twice the half maps', which that FSC implies; refine's
    map.mrc); None for none (relion_reconstruct's map, map_unfil.mrc).

    Dividing the summed sums, not averaging the halves' quotients, matters: a voxel
    that few images reach in one half is divided by a small weight there, and the
    average of the two noisy quotients is worse than one quotient of the sums (at the
    true poses of the apoferritin benchmark: FSC 0.5 vs truth at 6.28 Å for the
    average of the halves, 5.79 Å for this, as relion_reconstruct's 5.80 Å)."""
    ssnr = None if half_fsc is None else 2.0 * ssnr_from_fsc(half_fsc)
    first = next(iter(accs.values()))
    if isinstance(first, SlabSums):
        return _slab_full_map(par, accs, ssnr)
    xp = array_namespace(first.data)
    if par.size == 1:
        data = accs[0].data + accs[1].data
        weight = accs[0].weight + accs[1].weight
    elif par.rank in (0, 1):
        acc = accs[par.rank]
        other_d = par.exchange_roots(acc.data)
        other_w = par.exchange_roots(acc.weight)
        if par.rank == 1:
            return None
        data = acc.data + xp.asarray(other_d)
        weight = acc.weight + xp.asarray(other_w)
    else:
        return None
    return to_numpy(reconstruct(data, weight, n, PAD, ssnr=ssnr))


def _slab_full_map(par, accs: dict, ssnr=None):
    """full_map from slab sums: half A's group divides A + B (each owner of an A slab
    takes the matching B slab from its partner) and inverts."""
    from mpirefine.geometry.spheres import mask_outside_sphere

    if 0 not in accs:
        par.send_array(accs[1].packed, par.slab_partner(1))
        return None
    mine = accs[0]
    other = accs[1].packed if 1 in accs else par.recv_array(
        mine.packed.shape, mine.packed.dtype, par.slab_partner(0))
    xp = array_namespace(mine.packed)
    L = mine.layout
    with par.timer("reconstruction"):
        both = SlabSums(L, mine.index, mine.packed + xp.asarray(other),
                        sphere_shells(L, mine.index, xp))
        partial = np.ascontiguousarray(to_numpy(shell_weight_sums(both.packed, both.shells,
                                                                  L.n_shells)))
    weight_sums = par.allreduce_half(partial, 0)
    rows = _padded_inverse(par, 0, both, slab_regulariser(weight_sums, ssnr))
    full = gather_rows(par, 0, L, rows)
    return None if full is None else mask_outside_sphere(full)


def fsc_weighted_average(maps: dict, fsc, cutoff_shell: float):
    """The average of the half maps, :func:`fsc_filter` ed.  NumPy."""
    return fsc_filter(0.5 * (np.asarray(maps[0], np.float64) + np.asarray(maps[1], np.float64)),
                      fsc, cutoff_shell)


def fsc_filter(volume, fsc, cutoff_shell: float):
    """``volume`` filtered by sqrt(2·FSC / (1 + FSC)) and set to zero beyond
    ``cutoff_shell`` (cycles per box): the GSFSC-filtered map.  NumPy float32."""
    from mpirefine.fourier.transforms import centered_irfft3, centered_rfft3, radius_3d

    v = np.asarray(volume, np.float64)
    n = v.shape[0]
    weight = fsc_weight(fsc)
    shells = np.arange(len(weight))
    weight[shells > cutoff_shell] = 0.0
    r = radius_3d(n, np)
    idx = np.minimum(np.rint(r).astype(int), len(weight) - 1)
    per_voxel = np.where(r <= cutoff_shell, weight[idx], 0.0)
    return centered_irfft3(centered_rfft3(v) * per_voxel, n).astype(np.float32)
