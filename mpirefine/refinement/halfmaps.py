"""Gold-standard half maps: insertion of aligned particles, reduction, reconstruction, FSC.

Every rank inserts its particles into the accumulator of each half it serves; the
sums are reduced onto the half roots (world ranks 0 and 1, or rank 0 alone), which
reconstruct, swap maps and compute the FSC.  The half maps are reconstructed twice:
first nearly unregularised, then with the SSNR implied by that first FSC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier.backproject import Accumulator
from mpirefine.fourier.reconstruct import reconstruct, ssnr_from_fsc
from mpirefine.fourier.transforms import insertion_frequencies, phase_shift_2d
from mpirefine.io import ImageSource
from mpirefine.postprocess.fsc import fsc_curve, fsc_weight
from mpirefine.refinement.images import ctf_grid, prepare_images

PAD = 2


def insert_particles(acc: Accumulator, images_ft, ctf, noise_weight, rotations, shifts_px,
                     scale, posterior=None) -> None:
    """Backproject particles at their poses.

    images_ft: (B, n, n//2+1) windowed transforms; ctf: (B, n, n//2+1);
    noise_weight: (n, n//2+1) = 1/σ²; rotations (B, M, 3, 3) or (B, 3, 3);
    shifts_px (B, M, 2) or (B, 2) (RELION origins in px: the image is shifted by +t);
    scale (B,); posterior (B, M) weights summing to 1 per particle, or None.
    Inserts a·C·X·w/σ² and a²·C²·w/σ² for every (particle, candidate).
    """
    xp = array_namespace(images_ft)
    n = acc.n
    kx, ky, inside = insertion_frequencies(n, xp)
    B = images_ft.shape[0]
    rot = xp.asarray(rotations, dtype=xp.float32).reshape(B, -1, 3, 3)
    shifts = xp.asarray(shifts_px, dtype=xp.float32).reshape(B, -1, 2)
    M = rot.shape[1]
    post = xp.ones((B, M), xp.float32) if posterior is None else xp.asarray(posterior, xp.float32)
    a = xp.asarray(scale, dtype=xp.float32).reshape(B, 1, 1)
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


def insert_at_poses(par, ps, split: np.ndarray, prep, xp, image_batch_size: int) -> dict:
    """Each served half's accumulator with this rank's share of the particles inserted
    at the poses, shifts and scales ``ps`` carries (unit noise weights): the sums of
    a reconstruction at known poses.  half → :class:`Accumulator`."""
    n = prep.box
    noise_weight = xp.ones((n, n // 2 + 1), xp.float32)
    accs = {}
    with ImageSource(ps) as source:
        for half, mine in rank_share(par, split):
            acc = Accumulator.zeros(n, PAD, xp)
            for idx, images in source.batches(mine, image_batch_size):
                insert_particles(acc, prepare_images(images, prep, xp),
                                 ctf_grid(ps.ctf.subset(idx), prep, xp), noise_weight,
                                 ps.rotations[idx], ps.shifts_A[idx] / prep.pixel_size_A,
                                 ps.scale[idx])
            accs[half] = acc
    return accs


def reduce_accumulators(par, accs: dict) -> None:
    """Sum each served half's accumulator onto its half root (in place).

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


def reconstruct_half_maps(par, accs: dict, n: int, symmetry=None) -> HalfMaps | None:
    """Reduce, reconstruct both ways and FSC; a :class:`HalfMaps` on the root pair and
    None on other ranks.  Collective over the world communicator.

    symmetry: optional (N, 3, 3) point group to enforce: each root sums its half's
    accumulators over the N rotations (every particle then counts in all N of its
    symmetry-related poses) before reconstructing."""
    reduce_accumulators(par, accs)
    roots = [h for h in accs if par.is_half_root(h)]
    if not roots:
        return None
    if symmetry is not None and len(symmetry) > 1:
        from mpirefine.geometry.symmetry import symmetrize_accumulator

        for h in roots:
            accs[h].data, accs[h].weight = symmetrize_accumulator(accs[h].data, accs[h].weight,
                                                                  symmetry)
    # No corner masking: the same soft sphere multiplied into both halves carries
    # their correlated low-resolution background out to every frequency (it raised
    # the FSC of refined half maps by ~0.1 up to Nyquist, where the truth says 0).
    mine = {h: reconstruct(accs[h].data, accs[h].weight, n, PAD, mask_corners=False)
            for h in roots}
    raw = _pair_maps(par, mine)
    fsc = fsc_curve(raw[0], raw[1])
    mine = {h: reconstruct(accs[h].data, accs[h].weight, n, PAD, ssnr=ssnr_from_fsc(fsc),
                           mask_corners=False)
            for h in roots}
    return HalfMaps(unregularised=raw, regularised=_pair_maps(par, mine), fsc=fsc)


def full_unregularised_map(par, accs: dict, n: int):
    """The map from all particles with no regularisation (what relion_reconstruct
    gives), on world rank 0; None elsewhere.  Call after reduce_accumulators."""
    xp = array_namespace(next(iter(accs.values())).data)
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
    return to_numpy(reconstruct(data, weight, n, PAD))


def fsc_weighted_average(maps: dict, fsc, cutoff_shell: float):
    """The average of the half maps filtered by sqrt(2·FSC / (1 + FSC)) and set to zero
    beyond ``cutoff_shell`` (cycles per box): the GSFSC-filtered map.  NumPy."""
    from mpirefine.fourier.transforms import centered_irfft3, centered_rfft3, radius_3d

    avg = 0.5 * (np.asarray(maps[0], np.float64) + np.asarray(maps[1], np.float64))
    n = avg.shape[0]
    weight = fsc_weight(fsc)
    shells = np.arange(len(weight))
    weight[shells > cutoff_shell] = 0.0
    r = radius_3d(n, np)
    idx = np.minimum(np.rint(r).astype(int), len(weight) - 1)
    per_voxel = np.where(r <= cutoff_shell, weight[idx], 0.0)
    return centered_irfft3(centered_rfft3(avg) * per_voxel, n).astype(np.float32)
