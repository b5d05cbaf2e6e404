"""Density maps from atomic models: a PDB reader and Gaussian atoms on a grid.

The shipped model (``mpirefine/data/apoferritin_ca_O.pdb``) is apoferritin, 24 chains,
Cα atoms only (4,080 atoms), octahedral, centred at (88.76, 88.76, 88.76) Å with its
4-fold axes along X, Y and Z.  Maps of the whole model keep that centre on the box
centre, so the symmetry axes lie on the box axes.

Grid convention (docs/architecture.md §3): a map has shape (box, box, box) indexed [z, y, x]; voxel
(iz, iy, ix) sits at position (x, y, z) = ((ix, iy, iz) - box // 2) · pixel_size + centre.
"""

from __future__ import annotations

import os
from importlib import resources

import numpy as np

from mpirefine.errors import InputError

# Default atom width for Cα-only models: one Cα stands for a whole residue (~3.8 Å
# apart along the chain), so a narrow Gaussian would give beads instead of a map.
DEFAULT_SIGMA_A = 2.0
# Pixel size that fits the ~130 Å apoferritin shell in a 64-px box with ~20 Å margin.
DEFAULT_PIXEL_SIZE_A = 2.8
# The stencil reaches this many standard deviations: exp(-4²/2) ≈ 3e-4 of the peak.
_STENCIL_SIGMAS = 4.0

_SHIPPED_PDB = "apoferritin_ca_O.pdb"


def shipped_model_path() -> str:
    """Path of the shipped apoferritin Cα model (PDB)."""
    return str(resources.files("mpirefine") / "data" / _SHIPPED_PDB)


def read_pdb(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ATOM/HETATM records of a PDB file (the first MODEL only).

    Returns (coords_A (m, 3) float64 as x, y, z in Å, chain_ids (m,) str,
    elements (m,) str, upper case; taken from the atom name when columns 77-78 are blank).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"PDB file {path!r} does not exist; check the path")
    coords, chains, elements = [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("ENDMDL"):
                break   # further models are alternatives, not more atoms
            if not line.startswith(("ATOM  ", "HETATM")):
                continue
            try:
                coords.append((float(line[30:38]), float(line[38:46]), float(line[46:54])))
            except ValueError as exc:
                raise InputError(f"{path}:{lineno}: bad coordinates in {line.rstrip()!r} "
                                 "(PDB columns 31-54); is it a PDB (not mmCIF) file?") from exc
            chains.append(line[21:22].strip() or "_")
            element = line[76:78].strip()
            if not element:
                # Columns 13-14 hold the element of a standard atom name (" CA " → C).
                element = line[12:14].strip().lstrip("0123456789") or line[12:16].strip()[:1]
            elements.append(element.upper())
    if not coords:
        raise InputError(f"PDB file {path!r} has no ATOM/HETATM records; give a PDB-format "
                         "model (convert mmCIF with e.g. gemmi convert)")
    return np.asarray(coords, float), np.asarray(chains, dtype=str), np.asarray(elements, dtype=str)


def _axis_weights(pos_px: np.ndarray, half: int, sigma_px: float, box: int):
    """Per-atom 1-D Gaussian weights on the 2·half+1 grid points around each position.

    pos_px: (m,) positions in voxel index units.  Returns (index (m, k) int64,
    weight (m, k) float64 summing to 1 over the full stencil, zero outside the box).
    """
    start = np.floor(pos_px).astype(np.int64) - half
    index = start[:, None] + np.arange(2 * half + 1)[None, :]
    w = np.exp(-0.5 * ((index - pos_px[:, None]) / sigma_px) ** 2)
    # Normalise before clipping: an atom near the edge loses the part outside the box.
    w /= w.sum(axis=1, keepdims=True)
    inside = (index >= 0) & (index < box)
    return np.where(inside, index, 0), np.where(inside, w, 0.0)


def density_from_atoms(coords_A, box: int, pixel_size_A: float, center_A=None,
                       sigma_A: float | None = None, bfactor_A2: float = 0.0,
                       weights=None) -> np.ndarray:
    """Sum of 3-D Gaussians, one per atom, on a (box, box, box) grid indexed [z, y, x].

    coords_A: (m, 3) atom positions (x, y, z) in Å.  center_A: the position of voxel
    (box // 2,) * 3 in Å, default the atoms' centroid.  sigma_A: atom width in Å
    (default 2.0, for Cα-only models); the pixel's own blur (a box of one voxel,
    variance p²/12) and a B-factor (variance B / 8π²) are added in quadrature.
    weights: (m,) per-atom mass (default 1).  Each atom integrates to its weight, so
    the map's total is the (weighted) number of atoms inside the box.
    Returns float32 (box, box, box).
    """
    coords = np.asarray(coords_A, float).reshape(-1, 3)
    if box < 1 or pixel_size_A <= 0:
        raise InputError(f"box ({box}) and pixel size ({pixel_size_A} Å) must be positive")
    center = coords.mean(axis=0) if center_A is None else np.asarray(center_A, float).reshape(3)
    sigma = DEFAULT_SIGMA_A if sigma_A is None else float(sigma_A)
    if sigma < 0 or bfactor_A2 < 0:
        raise InputError(f"atom width ({sigma} Å) and B-factor ({bfactor_A2} Å²) must be >= 0")
    variance = sigma**2 + pixel_size_A**2 / 12.0 + bfactor_A2 / (8.0 * np.pi**2)
    sigma_px = np.sqrt(variance) / pixel_size_A
    half = int(np.ceil(_STENCIL_SIGMAS * sigma_px))
    mass = np.ones(len(coords)) if weights is None else np.asarray(weights, float).reshape(-1)

    pos = (coords - center) / pixel_size_A + box // 2            # (m, 3) as x, y, z voxels
    # Drop atoms whose whole stencil misses the box (they contribute nothing).
    near = np.all((pos > -half - 1) & (pos < box + half), axis=1)
    pos, mass = pos[near], mass[near]
    out = np.zeros(box**3, dtype=np.float64)
    # Separable Gaussians: three (m, k) weight tables combine into (m, k, k, k) blocks.
    # Chunks of atoms bound the temporary memory for wide atoms or big boxes.
    k = 2 * half + 1
    chunk = max(1, 4_000_000 // k**3)
    for s in range(0, len(pos), chunk):
        ix, wx = _axis_weights(pos[s:s + chunk, 0], half, sigma_px, box)
        iy, wy = _axis_weights(pos[s:s + chunk, 1], half, sigma_px, box)
        iz, wz = _axis_weights(pos[s:s + chunk, 2], half, sigma_px, box)
        w = (wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]
             * mass[s:s + chunk, None, None, None])
        flat = (iz[:, :, None, None] * box + iy[:, None, :, None]) * box + ix[:, None, None, :]
        out += np.bincount(flat.ravel(), weights=w.ravel(), minlength=box**3)
    return out.reshape(box, box, box).astype(np.float32)


def chain_centroids(coords_A, chain_ids) -> dict[str, np.ndarray]:
    """Centroid (x, y, z) in Å of each chain, in order of first appearance."""
    chain_ids = np.asarray(chain_ids)
    order = dict.fromkeys(chain_ids.tolist())
    return {c: np.asarray(coords_A)[chain_ids == c].mean(axis=0) for c in order}


def asymmetric_chains(n_chains: int = 3, path: str | os.PathLike | None = None) -> list[str]:
    """A compact set of neighbouring chains (default 3) with no symmetry of its own.

    Grows from the first chain, each time adding the chain whose centroid is nearest
    the centroid of those chosen so far.  Three chains of a point group acting freely
    on its chains are invariant under a group element only if it cycles them, which
    needs equal pairwise distances; we skip candidates that would make a triangle
    with two equal sides (within 0.5 Å) to rule that out.
    """
    coords, chains, _ = read_pdb(path or shipped_model_path())
    cent = chain_centroids(coords, chains)
    names = list(cent)
    if n_chains < 1 or n_chains > len(names):
        raise InputError(f"asked for {n_chains} chains; the model has {len(names)}")
    chosen = [names[0]]
    while len(chosen) < n_chains:
        middle = np.mean([cent[c] for c in chosen], axis=0)
        rest = sorted((c for c in names if c not in chosen),
                      key=lambda c: (round(float(np.linalg.norm(cent[c] - middle)), 3), c))
        pick = rest[0]
        if len(chosen) == 2:
            for c in rest:
                d = sorted(float(np.linalg.norm(cent[a] - cent[b]))
                           for a, b in ((chosen[0], chosen[1]), (chosen[0], c), (chosen[1], c)))
                if min(d[1] - d[0], d[2] - d[1]) > 0.5:
                    pick = c
                    break
        chosen.append(pick)
    return chosen


def model_volume(box: int = 64, pixel_size_A: float = DEFAULT_PIXEL_SIZE_A, chains=None,
                 center_A=None, sigma_A: float | None = None, bfactor_A2: float = 0.0,
                 path: str | os.PathLike | None = None) -> np.ndarray:
    """Density of the shipped model (or the PDB at ``path``), float32 (box, box, box).

    chains: chain ids to keep (default all).  center_A: map centre in Å; default the
    centroid of the whole model, so a full octahedral model keeps its 4-folds on the
    box axes and a chain subset keeps its place in that frame.  Pass "chains" to
    centre on the chosen chains instead (a compact, centred asymmetric particle).
    """
    coords, chain_ids, _ = read_pdb(path or shipped_model_path())
    model_center = coords.mean(axis=0)
    if chains is not None:
        chains = [str(c) for c in chains]
        unknown = sorted(set(chains) - set(chain_ids.tolist()))
        if unknown:
            raise InputError(f"chain(s) {', '.join(unknown)} not in the model; it has "
                             f"{', '.join(dict.fromkeys(chain_ids.tolist()))}")
        keep = np.isin(chain_ids, chains)
        coords = coords[keep]
    if isinstance(center_A, str):
        if center_A != "chains":
            raise InputError(f"center_A must be a position (x, y, z) in Å or 'chains', "
                             f"not {center_A!r}")
        center = coords.mean(axis=0)
    else:
        center = model_center if center_A is None else center_A
    return density_from_atoms(coords, box, pixel_size_A, center_A=center, sigma_A=sigma_A,
                              bfactor_A2=bfactor_A2)


__all__ = ["DEFAULT_PIXEL_SIZE_A", "DEFAULT_SIGMA_A", "shipped_model_path", "read_pdb",
           "density_from_atoms", "chain_centroids", "asymmetric_chains", "model_volume"]
