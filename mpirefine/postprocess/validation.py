"""The final gold-standard FSC suite of two half maps (host NumPy, root rank, once a job).

Curves (each per shell 0 .. n // 2, cycles per box):

  no_mask            the half maps as they are
  spherical          both maps times a soft sphere (the particle window: 1 inside
                     ``window_inner`` × half the box, a raised cosine to 0 at ``window_outer``)
  loose, tight       both maps times a solvent mask derived from the half maps (below)
  tight_randomized   the tight-masked FSC of the half maps whose phases were randomised
                     beyond the shell where the unmasked FSC first drops below 0.8
  corrected          the tight curve corrected for the mask (Chen et al. 2013)
  auto_corrected     the corrected curve of the auto-tightened mask: the reported GSFSC

FSC masks (always from the half maps, never from a user's mask): the average of the
half maps is low-passed to the refinement's GSFSC resolution and thresholded at
``mask_threshold`` (0.5) × its maximum; the mask is 1 within ``near`` Å of that core and
falls to 0 with a raised cosine at ``far`` Å.  Defaults follow what CryoSPARC documents
for its FSC masks: tight 6 → 12 Å, loose 25 → 40 Å.

Auto-tightening: the tight mask and successively tighter copies of it (``near`` and
``far`` both scaled by ``auto_scales``) are each corrected by phase randomisation.  A
mask is accepted when the randomised-phase masked FSC, averaged from the first
corrected shell to the mask's own 0.143 shell, is at most ``max_randomized_fsc`` (0.1):
above that, the mask itself correlates the maps and the correction is no longer
small.  Of the accepted masks the one with the best corrected resolution wins (ties go
to the tighter); if none is accepted, the loose mask is tried, then the sphere.
docs/validation.md explains the choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mpirefine.backend import to_numpy
from mpirefine.fourier.filters import lowpass, shell_resolution_A
from mpirefine.geometry.spheres import radial_distance, soft_sphere
from mpirefine.postprocess.fsc import (
    corrected_fsc,
    crossing_shell,
    fsc_curve,
    randomization_shell,
    randomize_phases_beyond,
    resolution_A,
)
from mpirefine.postprocess.masks import soft_edge, threshold_core

TIGHT_A = (6.0, 12.0)               # (near, far) Å: CryoSPARC's documented tight FSC mask
LOOSE_A = (25.0, 40.0)              # and its loose one
AUTO_SCALES = (1.0, 0.8, 0.6, 0.4, 0.2)
RANDOMIZE_AT_FSC = 0.8              # relion_postprocess --randomize_at_fsc default
MAX_RANDOMIZED_FSC = 0.1            # relion_postprocess warns above this at the resolution
CORRECTION_MARGIN_SHELLS = 2        # relion_postprocess starts correcting 2 shells later
#: phase-randomised copies of each half map, averaged (RELION uses one)
RANDOM_DRAWS = 4


@dataclass
class MaskTrial:
    """One candidate of the auto-tightening series."""

    name: str
    near_A: float
    far_A: float
    resolution_A: float
    randomized_fsc_mean: float      # mean FSC_n over the corrected shells up to the resolution
    accepted: bool


@dataclass
class FSCSuite:
    """Every curve (name → (n // 2 + 1,) float64), the masks (name → (n, n, n) float32:
    spherical, loose, tight, auto), the 0.143 resolution of each curve in Å (keyed by
    the curve name without "fsc_"), the randomisation shell and the auto mask's name."""

    curves: dict
    masks: dict
    resolution_A: dict
    randomize_shell: int
    randomize_from_A: float
    auto_mask_name: str
    trials: list = field(default_factory=list)

    @property
    def final_curve(self) -> np.ndarray:
        """The reported GSFSC curve: the auto-tightened mask's corrected curve."""
        return self.curves["fsc_auto_corrected"]

    @property
    def final_resolution_A(self) -> float:
        return self.resolution_A["auto_corrected"]


def mask_distance_A(map_a, map_b, pixel_size_A: float, lowpass_A: float,
                    threshold: float = 0.5) -> np.ndarray:
    """Distance in Å of every voxel from the thresholded core of the half-map average.

    The average is low-passed to ``lowpass_A`` first so that the core follows the
    molecule rather than noise peaks.  An average with nothing above the threshold
    (a blank map) gets the distance from the box centre, i.e. spherical masks.
    Returns (n, n, n) float64.
    """
    from scipy.ndimage import distance_transform_edt

    avg = 0.5 * (np.asarray(map_a, np.float64) + np.asarray(map_b, np.float64))
    n = avg.shape[0]
    nyquist_A = 2.0 * pixel_size_A
    smooth = lowpass(avg, max(lowpass_A, nyquist_A), pixel_size_A)
    core = threshold_core(smooth, threshold)
    if not core.any():
        return radial_distance(n, np).astype(np.float64) * pixel_size_A
    return distance_transform_edt(~core) * pixel_size_A


def masked_corrected(map_a, map_b, random_a, random_b, mask, shell: int,
                     margin_shells: int = CORRECTION_MARGIN_SHELLS):
    """(FSC_t, FSC_n, FSC_true) of one mask: the masked FSC of the half maps, of their
    phase-randomised copies, and the corrected curve (see fsc.corrected_fsc).
    random_a, random_b: one phase-randomised copy of each map, or lists of several
    (FSC_n is then their mean: one draw's noise moved the corrected curve's 0.143
    crossing by a shell on a 64 px map)."""
    fsc_t = fsc_curve(map_a, map_b, mask)
    pairs = zip(random_a, random_b) if isinstance(random_a, list) else [(random_a, random_b)]
    fsc_n = np.mean([fsc_curve(ra, rb, mask) for ra, rb in pairs], axis=0)
    return fsc_t, fsc_n, corrected_fsc(fsc_t, fsc_n, shell, margin_shells)


def mask_induced_correlation(fsc_n, shell: int, resolution_shell: float,
                             margin_shells: int = CORRECTION_MARGIN_SHELLS) -> float:
    """Mean randomised-phase masked FSC over the corrected shells up to (and including)
    ``resolution_shell``: how much of the FSC there the mask alone creates."""
    lo = shell + margin_shells
    hi = max(lo, int(round(resolution_shell)))
    window = np.asarray(fsc_n, float)[lo: hi + 1]
    return float(window.mean()) if len(window) else 0.0


def fsc_suite(map_a, map_b, pixel_size_A: float, resolution_A_hint: float | None = None,
              window_inner: float = 0.85, window_outer: float = 0.99, seed: int = 0,
              mask_threshold: float = 0.5, tight_A=TIGHT_A, loose_A=LOOSE_A,
              auto_scales=AUTO_SCALES, randomize_at_fsc: float = RANDOMIZE_AT_FSC,
              max_randomized_fsc: float = MAX_RANDOMIZED_FSC) -> FSCSuite:
    """The full FSC suite of half maps ``map_a``, ``map_b`` ((n, n, n), NumPy or CuPy).

    resolution_A_hint: the refinement's GSFSC resolution (Å), used only to low-pass the
    average before thresholding it for the masks; the unmasked 0.143 resolution when
    None.  window_inner/outer: the spherical mask's radii as fractions of half the box.
    seed: seeds the phase randomisation, so the result is reproducible.
    """
    a = np.asarray(to_numpy(map_a), np.float64)
    b = np.asarray(to_numpy(map_b), np.float64)
    n = a.shape[0]
    px = pixel_size_A
    curves, masks, res = {}, {}, {}

    def record(name, curve):
        curves["fsc_" + name] = np.asarray(curve, float)
        res[name] = resolution_A(curve, n, px)

    record("no_mask", fsc_curve(a, b))
    half = n / 2.0
    masks["spherical"] = soft_sphere(n, window_inner * half, (window_outer - window_inner) * half, np)
    record("spherical", fsc_curve(a, b, masks["spherical"]))

    hint = resolution_A_hint if resolution_A_hint else res["no_mask"]
    dist = mask_distance_A(a, b, px, hint, mask_threshold)
    masks["loose"] = soft_edge(dist, *loose_A)
    masks["tight"] = soft_edge(dist, *tight_A)
    record("loose", fsc_curve(a, b, masks["loose"]))

    shell = randomization_shell(curves["fsc_no_mask"], randomize_at_fsc)
    rng = np.random.default_rng([seed, 143])
    ra = [randomize_phases_beyond(a, shell, rng) for _ in range(RANDOM_DRAWS)]
    rb = [randomize_phases_beyond(b, shell, rng) for _ in range(RANDOM_DRAWS)]

    trials, outcomes = [], {}
    for k, scale in enumerate(auto_scales):
        near, far = scale * tight_A[0], scale * tight_A[1]
        name = "tight" if k == 0 else f"tight_x{scale:g}"
        mask = masks["tight"] if k == 0 else soft_edge(dist, near, far)
        fsc_t, fsc_n, fsc_true = masked_corrected(a, b, ra, rb, mask, shell)
        s143 = crossing_shell(fsc_true)
        leak = mask_induced_correlation(fsc_n, shell, s143)
        trials.append(MaskTrial(name, near, far, n * px / max(s143, 1e-6), leak,
                                leak <= max_randomized_fsc))
        outcomes[name] = (mask, fsc_t, fsc_n, fsc_true, s143)
        if k == 0:
            record("tight", fsc_t)
            record("tight_randomized", fsc_n)
            record("corrected", fsc_true)

    accepted = [(round(outcomes[t.name][4], 2), i) for i, t in enumerate(trials) if t.accepted]
    if accepted:
        auto_name = trials[max(accepted)[1]].name   # best resolution, ties to the tighter
        auto_mask, auto_curve = outcomes[auto_name][0], outcomes[auto_name][3]
    else:
        # even the tight mask correlates the maps: fall back to the loose mask (corrected
        # the same way), and to the window sphere if that correlates them too
        auto_name, auto_mask, auto_curve = _fallback(a, b, ra, rb, masks, shell, max_randomized_fsc)
    masks["auto"] = np.asarray(auto_mask, np.float32)
    record("auto_corrected", auto_curve)
    return FSCSuite(curves=curves, masks=masks, resolution_A=res, randomize_shell=shell,
                    randomize_from_A=float(shell_resolution_A(n, px)[min(shell, n // 2)]),
                    auto_mask_name=auto_name, trials=trials)


@dataclass
class IterationFSC:
    """The FSC that steers one iteration (per shell 0 .. n // 2).

    unmasked: the half maps as they are; masked: under the iteration's mask;
    corrected: the masked curve corrected by phase randomisation beyond
    ``randomize_shell`` (the GSFSC of the iteration); also_corrected: the corrected
    curves under the other masks asked for (name → curve)."""

    unmasked: np.ndarray
    masked: np.ndarray
    corrected: np.ndarray
    randomize_shell: int
    also_corrected: dict = field(default_factory=dict)


def iteration_fsc(map_a, map_b, mask, seed: int, draws: int = 1,
                  randomize_at_fsc: float = RANDOMIZE_AT_FSC, others: dict | None = None,
                  xp=None) -> IterationFSC:
    """The per-iteration GSFSC of half maps ``map_a``, ``map_b`` under ``mask`` (all
    (n, n, n)), corrected for the mask by phase randomisation; ``seed`` seeds the
    randomisation (the refinement passes one made of --seed and the iteration).
    others: {name: mask}, further masks corrected with the same randomised copies.

    The same curves as :func:`fsc_curve` and :func:`masked_corrected` give, computed
    for speed, since the root runs this every iteration: in single precision, in the
    namespace ``xp`` (NumPy, or CuPy on a GPU rank; the maps are moved there), each
    transform taken once (2 + 2·draws + (2 + 2·draws) per mask), shells summed with one
    precomputed index. The random phases come from NumPy's generator on the host, so a
    GPU and a CPU rank draw the same ones."""
    xp = np if xp is None else xp
    a = xp.asarray(map_a, dtype=xp.float32)
    b = xp.asarray(map_b, dtype=xp.float32)
    n = a.shape[0]
    shells, mult = _rfft_shells(n, xp)
    n_shells = n // 2 + 1

    def curve(fa, fb):
        def sums(z):
            return xp.bincount(shells, weights=(z * mult).ravel(), minlength=n_shells + 1)[:n_shells]

        num = sums((fa * xp.conj(fb)).real)
        den = xp.sqrt(xp.maximum(sums((fa * xp.conj(fa)).real) * sums((fb * xp.conj(fb)).real),
                                 1e-30))
        c = np.asarray(to_numpy(num / den), float)
        c[0] = 1.0 if c[0] > 0 else c[0]
        return c

    fa, fb = xp.fft.rfftn(a), xp.fft.rfftn(b)
    unmasked = curve(fa, fb)
    shell = randomization_shell(unmasked, randomize_at_fsc)
    beyond = shells.reshape(fa.shape) >= shell   # (shells beyond Nyquist too: as fsc_curve's map)
    rng = np.random.default_rng([seed, 144])
    randomized = []
    for _ in range(draws):
        pair = []
        for f in (fa, fb):
            # a phase for every voxel, used where beyond: no data-dependent sizes, so a
            # GPU rank never waits for a count
            phases = xp.asarray(rng.uniform(0.0, 2.0 * np.pi, size=f.shape).astype(np.float32))
            g = xp.where(beyond, xp.abs(f) * (xp.cos(phases) + 1j * xp.sin(phases)), f)
            pair.append(xp.fft.irfftn(g.astype(xp.complex64), s=(n, n, n), axes=(0, 1, 2)))
        randomized.append(pair)

    def corrected(m):
        m = xp.asarray(m, dtype=xp.float32)
        fsc_t = curve(xp.fft.rfftn(a * m), xp.fft.rfftn(b * m))
        fsc_n = np.mean([curve(xp.fft.rfftn(ra * m), xp.fft.rfftn(rb * m)) for ra, rb in randomized],
                        axis=0)
        return fsc_t, corrected_fsc(fsc_t, fsc_n, shell, CORRECTION_MARGIN_SHELLS)

    masked, main = corrected(mask)
    also = {name: corrected(m)[1] for name, m in (others or {}).items()}
    return IterationFSC(unmasked, masked, main, shell, also)


def _rfft_shells(n: int, xp):
    """Shell index round(|k|) of every voxel of an unshifted rfftn grid, flattened (int),
    with n // 2 + 1 for voxels beyond Nyquist, and the half-space multiplicity per kx
    column (1 for kx = 0 and, n even, kx = n / 2; 2 otherwise) as float32."""
    k = np.fft.fftfreq(n, 1.0 / n)
    kx = np.arange(n // 2 + 1)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    idx = np.minimum(np.rint(r).astype(np.int64), n // 2 + 1).ravel()
    mult = np.full(n // 2 + 1, 2.0, np.float32)
    mult[0] = 1.0
    if n % 2 == 0:
        mult[-1] = 1.0
    return xp.asarray(idx), xp.asarray(mult)


def _fallback(a, b, ra, rb, masks, shell, max_randomized_fsc):
    _, fsc_n, fsc_true = masked_corrected(a, b, ra, rb, masks["loose"], shell)
    if mask_induced_correlation(fsc_n, shell, crossing_shell(fsc_true)) <= max_randomized_fsc:
        return "loose", masks["loose"], fsc_true
    _, _, fsc_true = masked_corrected(a, b, ra, rb, masks["spherical"], shell)
    return "spherical", masks["spherical"], fsc_true


__all__ = ["FSCSuite", "MaskTrial", "fsc_suite", "mask_distance_A", "masked_corrected",
           "mask_induced_correlation", "TIGHT_A", "LOOSE_A", "AUTO_SCALES"]
