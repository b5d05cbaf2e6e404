"""Symmetry relaxation: after an asymmetric (C1) search, look again around every
symmetry-related copy of each particle's pose and pick among them.

For a point group {g_1 … g_N} (operators on volume coordinates, V(g x) = V(x) for a
symmetric map) the poses A·g_j all give the same projection of a symmetric map.  A
pseudo-symmetric particle (one subunit differs) is best explained by one of them, but
a global search on a grid can settle on the wrong copy.  So, for each particle's best
pose A and shift t, every A·g_j is refined locally: rotations exp(u)·A·g_j over a
7-point stencil (u = 0 and ± one final angular step about each axis) and shifts
t + (0, ±d) with d the final shift step, scored by the same likelihood as the search.
Then (CryoSPARC's two relaxation methods, docs/architecture.md §4):

- maximization: the particle takes the single best of all candidates;
- marginalization: each g_j keeps its best local candidate, and the particle is
  inserted at all N of them with weights given by their posterior probabilities.

Either way each image counts once, so the map is not forced to be symmetric.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier.project import projection_tables
from mpirefine.search.likelihood import (
    log_likelihood,
    noise_weights,
    profile_log_likelihood,
    score_batched,
    search_frequencies,
    shift_ramps,
    weighted_data,
)
from mpirefine.search.poses import SearchParams, SearchResult, scoring_bytes_per_particle

_STENCIL = np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                    float)
_SHIFT_STENCIL = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], float)
_RELAX_BLOCK_BYTES = 64 << 20  # scoring temporaries per block of particles


def relax_symmetry(vft, images_ft, ctf, noise_var_shell, scale, result: SearchResult, group,
                   params: SearchParams, marginalize: bool) -> SearchResult:
    """Re-choose each particle's pose among the symmetry-related copies of ``result``'s.

    images_ft (B, n, n//2+1), ctf (B, n, n//2+1), noise_var_shell (n//2+1,), scale (B,)
    as for :func:`mpirefine.search.poses.search_poses`; group (N, 3, 3).  Returns a new
    SearchResult (host arrays); with ``marginalize`` its posterior (B, N) and candidate
    poses (B, N, ...) are filled, best first.
    """
    xp = array_namespace(vft.data)
    n, B, N = vft.n, images_ft.shape[0], len(group)
    kx, ky, index, _ = search_frequencies(n, params.final_radius_px, xp)
    weights = noise_weights(noise_var_shell, n, index)
    step = math.radians(params.final_step_deg)
    local = Rotation.from_rotvec(_STENCIL * step).as_matrix()                   # (S, 3, 3)
    shift_step = params.coarse_shift_step_px / 2 ** max(params.n_levels, 1)
    S, T, K = len(local), len(_SHIFT_STENCIL), kx.shape[0]
    scale = np.asarray(scale, float).reshape(B)
    out = _empty(B, N, marginalize)
    per_particle = scoring_bytes_per_particle(T, N * S, K, own_tables=True)
    block = max(1, _RELAX_BLOCK_BYTES // per_particle)
    for start in range(0, B, block):
        sl = slice(start, min(B, start + block))
        b = sl.stop - sl.start
        # candidates (b, N, S): exp(u_s)·A·g_j
        rot = np.einsum("sij,bjk,gkl->bgsil", local, result.rotations[sl], np.asarray(group))
        shifts = result.shifts_px[sl, None, :] + shift_step * _SHIFT_STENCIL          # (b, T, 2)
        X = xp.asarray(images_ft[sl]).reshape(b, -1)[:, index]
        C = xp.asarray(ctf[sl]).reshape(b, -1)[:, index]
        wcx, wc2 = weighted_data(X, C, weights)
        stacked, power = projection_tables(vft, rot.reshape(-1, 3, 3), kx, ky)
        stacked, power = stacked.reshape(b, N * S, 2 * K), power.reshape(b, N * S, K)
        g, h = score_batched(wcx, wc2, shift_ramps(kx, ky, shifts, n), stacked, power)
        a = xp.asarray(scale[sl], dtype=xp.float32)
        L = profile_log_likelihood(g, h[:, None, :]) if params.fit_scale else log_likelihood(g, h, a)
        L = to_numpy(L).reshape(b, T, N, S)
        g = to_numpy(g).reshape(b, T, N, S)
        h = to_numpy(h).reshape(b, N, S)
        _choose(L, g, h, rot, shifts, out, sl, marginalize)
    return SearchResult(out["rotations"], out["shifts"], out["loglik"], out["optimal_scale"],
                        out.get("posterior"), out.get("cand_rot"), out.get("cand_shift"),
                        result.stats)


def _empty(B, N, marginalize):
    out = {"rotations": np.zeros((B, 3, 3)), "shifts": np.zeros((B, 2)), "loglik": np.zeros(B),
           "optimal_scale": np.zeros(B)}
    if marginalize:
        out.update(posterior=np.zeros((B, N)), cand_rot=np.zeros((B, N, 3, 3)),
                   cand_shift=np.zeros((B, N, 2)))
    return out


def _choose(L, g, h, rot, shifts, out, sl, marginalize):
    """Best candidate per particle, and per symmetry copy when marginalizing."""
    b, T, N, S = L.shape
    rows = np.arange(b)
    # best (shift, local rotation) of each symmetry copy j
    flat = L.transpose(0, 2, 1, 3).reshape(b, N, T * S)
    best_ts = flat.argmax(axis=2)                                     # (b, N)
    best_t, best_s = best_ts // S, best_ts % S
    L_copy = np.take_along_axis(flat, best_ts[:, :, None], axis=2)[:, :, 0]   # (b, N)
    j = L_copy.argmax(axis=1)
    t, s = best_t[rows, j], best_s[rows, j]
    out["rotations"][sl] = rot[rows, j, s]
    out["shifts"][sl] = shifts[rows, t]
    out["loglik"][sl] = L_copy[rows, j]
    out["optimal_scale"][sl] = g[rows, t, j, s] / np.maximum(h[rows, j, s], np.finfo(float).tiny)
    if marginalize:
        order = np.argsort(-L_copy, axis=1)
        L_sorted = np.take_along_axis(L_copy, order, axis=1)
        w = np.exp(L_sorted - L_sorted[:, :1])
        out["posterior"][sl] = w / w.sum(axis=1, keepdims=True)
        jj = order
        out["cand_rot"][sl] = rot[rows[:, None], jj, best_s[rows[:, None], jj]]
        out["cand_shift"][sl] = shifts[rows[:, None], best_t[rows[:, None], jj]]
