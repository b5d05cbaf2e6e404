"""RELION particle STAR files (3.0, 3.1, 4 and 5) through the ``starfile`` library.

RELION 3.0 files have one particle table: optics values (voltage, Cs, ...) sit on every
row, origins are in pixels (rlnOriginX/Y) and the pixel size is rlnImagePixelSize or
rlnDetectorPixelSize [µm] * 1e4 / rlnMagnification.  RELION 3.1 and later add a
data_optics table keyed by rlnOpticsGroup and store origins in Å (rlnOriginXAngst/Y).
A value present on a particle row overrides its optics group's.  Optics groups may
differ in pixel size and box: each particle keeps its own, and the first optics group
(the first row of data_optics) sets the reference grid, as in RELION.

We always write the 3.1+ layout (data_optics + data_particles), keeping every input
column and row order and replacing only what refinement changes: angles, origins,
half-set and per-particle scale.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import starfile

from mpirefine.errors import InputError
from mpirefine.geometry.rotations import euler_to_matrix, matrix_to_euler
from mpirefine.io.atomic import atomic_path
from mpirefine.io.particles import (
    ParticleSet,
    check_numeric_finite,
    group_rows,
    header_pixel_size_A,
    portable_name,
    resolve_stacks,
)
from mpirefine.physics.ctf import CTFParams

ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGINS_A = ("rlnOriginXAngst", "rlnOriginYAngst")
ORIGINS_PX = ("rlnOriginX", "rlnOriginY")
_REQUIRED = ("rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
             "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
# Reproduces every value read from text with <= 12 significant digits (RELION writes
# 6 decimals), while hiding the last-bit noise of angles recomputed from matrices.
_FLOAT_FORMAT = "%.12g"


def _load(path: str) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """(optics or None for RELION 3.0, particles) tables of a STAR file."""
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted parser errors
        raise InputError(f"cannot parse STAR file {path!r} ({exc}); check that it is a "
                         "RELION particle STAR file") from exc

    def table(block):
        return pd.DataFrame([block]) if isinstance(block, dict) else block

    blocks = {name: table(b) for name, b in blocks.items()}
    particles = blocks.get("particles")
    if particles is None:
        particles = next((b for b in blocks.values() if "rlnImageName" in b.columns), None)
    if particles is None or len(particles) == 0:
        if particles is None and any(len(b) for b in blocks.values()):
            raise InputError(f"STAR file {path!r} has no particle table (no block with "
                             "rlnImageName); give a RELION particles STAR file")
        raise InputError(f"STAR file {path!r} holds no particles")
    optics = blocks.get("optics")
    return optics, particles.reset_index(drop=True)


class _Columns:
    """Per-particle values, from the particle row if present, else from its optics group."""

    def __init__(self, path: str, optics: pd.DataFrame | None, particles: pd.DataFrame):
        self.path, self.optics, self.particles = path, optics, particles
        n = len(particles)
        if "rlnOpticsGroup" in particles.columns:
            self.group = particles["rlnOpticsGroup"].to_numpy(dtype=np.int64)
        else:
            self.group = np.ones(n, dtype=np.int64)
        if optics is not None and len(optics) > 1 and "rlnOpticsGroup" not in particles.columns:
            raise InputError(f"{path}: data_optics has {len(optics)} groups but particles have "
                             "no rlnOpticsGroup column; add it")

    def has(self, label: str) -> bool:
        return label in self.particles.columns or (
            self.optics is not None and label in self.optics.columns)

    def get(self, label: str, default=None) -> np.ndarray | None:
        if label in self.particles.columns:
            return self.particles[label].to_numpy()
        if self.optics is None or label not in self.optics.columns:
            return None if default is None else np.full(len(self.particles), default)
        if len(self.optics) == 1 or "rlnOpticsGroup" not in self.optics.columns:
            return np.repeat(self.optics[label].to_numpy()[:1], len(self.particles))
        lookup = self.optics.set_index("rlnOpticsGroup")[label]
        missing = np.setdiff1d(self.group, lookup.index.to_numpy())
        if missing.size:
            raise InputError(f"{self.path}: particles use optics group {int(missing[0])}, "
                             "which data_optics does not define")
        return lookup.loc[self.group].to_numpy()


def _reference_row(optics: pd.DataFrame | None, group: np.ndarray) -> int:
    """A particle of the first optics group (data_optics order) that has particles."""
    if optics is not None and "rlnOpticsGroup" in optics.columns:
        for g in optics["rlnOpticsGroup"].to_numpy():
            hit = np.flatnonzero(group == g)
            if hit.size:
                return int(hit[0])
    return 0


def split_image_names(names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """RELION rlnImageName 'NNN@path' -> (paths (n,) object, 0-based indices (n,) int)."""
    parts = names.astype(str).str.strip().str.partition("@")
    has_at = (parts[1] == "@").to_numpy()
    paths = np.where(has_at, parts[2].to_numpy(dtype=object), parts[0].to_numpy(dtype=object))
    numbers = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy(dtype=float)
    return paths, numbers


def read_star(path: str | os.PathLike, project_dir: str | None = None,
              require_stacks: bool = True) -> ParticleSet:
    """Read a RELION particle STAR file into a :class:`ParticleSet` (box 0 if the file has none).

    A stack that cannot be found is an InputError, unless ``require_stacks`` is False:
    then it is kept under the path it would have next to the STAR file.
    """
    path = os.path.abspath(os.fspath(path))
    optics, particles = _load(path)
    legacy = optics is None
    for table, what in ((optics, "data_optics"), (particles, "data_particles")):
        if table is not None:
            check_numeric_finite(table, f"{path} ({what})")
    cols = _Columns(path, optics, particles)
    missing = [label for label in _REQUIRED if not cols.has(label)]
    if missing:
        raise InputError(f"{path} lacks the column(s) {', '.join(missing)}; refinement needs "
                         "image names and CTF parameters (run CTF estimation and re-extract)")
    n = len(particles)

    raw_paths, numbers = split_image_names(particles["rlnImageName"])
    bad = ~np.isfinite(numbers) | (numbers < 1) | (numbers != np.round(numbers))
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: row {row + 1} has rlnImageName "
                         f"{particles['rlnImageName'].iloc[row]!r}; expected 'N@stack.mrcs' "
                         "with N >= 1")
    codes, uniques = pd.factorize(pd.Series(raw_paths))
    folders = [os.path.dirname(path), os.getcwd(), project_dir]
    stack_paths, code_to_sid = resolve_stacks(
        uniques, folders, folders[0], require_stacks,
        lambda name, tried: (f"{path}: stack {name!r} not found; looked in {tried}. "
                             "Run from the RELION project folder or pass --project-dir"))
    stack_id = code_to_sid[codes]

    # Each particle's pixel size and box come from the metadata; stack headers only
    # stand in when the metadata has no pixel size at all (check_stacks compares them).
    fix = "add rlnImagePixelSize (Å per pixel) to data_optics"
    notes = []
    pixel = cols.get("rlnImagePixelSize")
    if pixel is None and cols.has("rlnDetectorPixelSize") and cols.has("rlnMagnification"):
        pixel = (cols.get("rlnDetectorPixelSize").astype(float) * 1e4
                 / cols.get("rlnMagnification").astype(float))
    if pixel is None:
        header = header_pixel_size_A(stack_paths, path, fix)
        if header > 0:
            notes.append(f"{path} gives no pixel size; using {header:g} Å/px from the stack "
                         f"header ({fix} to be sure)")
        pixel = np.full(n, header)
    pixel = np.asarray(pixel, dtype=np.float64)
    if np.any(pixel <= 0):
        message = (f"{path} gives no pixel size (rlnImagePixelSize) for some particles and "
                   f"their stack headers have none; {fix}")
        if require_stacks:
            raise InputError(message)
        notes.append(message)
    size = cols.get("rlnImageSize")
    image_box = (np.zeros(n, dtype=np.int64) if size is None
                 else np.round(np.asarray(size, dtype=np.float64)).astype(np.int64))
    ref = _reference_row(optics, cols.group)

    def floats(label, default=None):
        v = cols.get(label, default)
        return None if v is None else np.asarray(v, dtype=np.float64)

    try:
        ctf = CTFParams(
            defocus_u_A=floats("rlnDefocusU"), defocus_v_A=floats("rlnDefocusV"),
            defocus_angle_deg=floats("rlnDefocusAngle"), voltage_kV=floats("rlnVoltage"),
            cs_mm=floats("rlnSphericalAberration"),
            amplitude_contrast=floats("rlnAmplitudeContrast"),
            phase_shift_deg=floats("rlnPhaseShift", 0.0), bfactor_A2=floats("rlnCtfBfactor", 0.0))
    except ValueError as exc:
        raise InputError(f"{path}: bad CTF values ({exc})") from exc

    rotations = None
    if all(a in particles.columns for a in ANGLES):
        rotations = euler_to_matrix(*(particles[a].to_numpy(dtype=float) for a in ANGLES))
    shifts = np.zeros((n, 2))
    for axis in range(2):
        if ORIGINS_A[axis] in particles.columns:
            shifts[:, axis] = particles[ORIGINS_A[axis]].to_numpy(dtype=float)
        elif ORIGINS_PX[axis] in particles.columns:
            shifts[:, axis] = particles[ORIGINS_PX[axis]].to_numpy(dtype=float) * pixel
    split = np.full(n, -1, dtype=np.int8)
    if "rlnRandomSubset" in particles.columns:
        subset = particles["rlnRandomSubset"].to_numpy(dtype=float)
        split[subset == 1] = 0
        split[subset == 2] = 1
    ps = ParticleSet(
        box=int(image_box[ref]), pixel_size_A=float(pixel[ref]), stack_paths=stack_paths,
        stack_id=stack_id, stack_index=numbers.astype(np.int64) - 1, ctf=ctf,
        rotations=rotations, shifts_A=shifts, split=split,
        scale=floats("rlnCtfScalefactor", 1.0), optics_group=cols.group, source_path=path,
        source_format="star", image_box=image_box, image_pixel_size_A=pixel,
        _star_optics=optics, _star_particles=particles, _star_legacy=legacy,
        _project_dir=project_dir, _reference_row=ref)
    for message in notes:
        ps.note(message)
    return ps


# -------------------------------------------------------------------------- writing

def _optics_from_arrays(ps: ParticleSet) -> tuple[pd.DataFrame, np.ndarray]:
    """One optics group per distinct (input group, voltage, Cs, amplitude contrast, pixel
    size, box), numbered in order of first appearance, so that the first particle's
    group stays first (it sets RELION's reference grid); (table, group per row)."""
    n = len(ps)
    ctf = ps.ctf
    keys = np.stack([np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for v in
                     (ps.optics_group, ctf.voltage_kV, ctf.cs_mm, ctf.amplitude_contrast,
                      ps.image_pixel_size_A, ps.image_box)], axis=1)
    uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)                     # group k+1 = k-th key to appear
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    uniq = uniq[order]
    m = len(uniq)
    optics = pd.DataFrame({
        "rlnOpticsGroup": np.arange(1, m + 1),
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, m + 1)],
        "rlnAmplitudeContrast": uniq[:, 3], "rlnSphericalAberration": uniq[:, 2],
        "rlnVoltage": uniq[:, 1], "rlnImagePixelSize": uniq[:, 4],
        "rlnImageSize": uniq[:, 5].astype(np.int64),
        "rlnImageDimensionality": np.full(m, 2, dtype=np.int64)})
    return optics, rank[inverse.reshape(-1)] + 1


def _complete_optics(ps: ParticleSet, optics: pd.DataFrame,
                     particles: pd.DataFrame) -> pd.DataFrame:
    """The input's data_optics with what RELION 3.1+ needs of each group filled in where
    the input left it to the stack headers: each group's own pixel size and box."""
    groups = (optics["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in optics.columns
              else np.ones(len(optics), dtype=np.int64))

    def per_group(values):
        out = []
        for g in groups:
            rows = np.flatnonzero(ps.optics_group == g)
            out.append(values[rows[0]] if rows.size else values[ps._reference_row])
        return np.asarray(out)

    for label, values in (("rlnImagePixelSize", ps.image_pixel_size_A),
                          ("rlnImageSize", ps.image_box),
                          ("rlnImageDimensionality", np.full(len(ps), 2, dtype=np.int64))):
        if label not in optics.columns and label not in particles.columns:
            optics[label] = per_group(values)
    return optics


def _portable_image_names(ps: ParticleSet, names: pd.Series, out_path: str) -> pd.Series:
    """rlnImageName with stack paths that still resolve from the output file's location."""
    raw_paths, _ = split_image_names(names)
    codes, uniques = pd.factorize(pd.Series(raw_paths))
    folders = [os.path.dirname(os.path.abspath(out_path)), os.getcwd(), ps._project_dir]
    names = names.astype(str).copy()
    for raw, rows in zip(uniques, group_rows(codes)):
        resolved = ps.stack_paths[ps.stack_id[rows[0]]]
        new = portable_name(raw, resolved, folders)
        if new != raw:
            names.iloc[rows] = [f"{i + 1:06d}@{new}" for i in ps.stack_index[rows]]
    return names


def write_star(path: str | os.PathLike, particle_set: ParticleSet,
               rotations: np.ndarray | None, shifts_A: np.ndarray, split: np.ndarray,
               scale: np.ndarray) -> None:
    """Write particles as RELION 3.1+ STAR with updated poses, origins (Å), halves and scales.

    rotations: (n, 3, 3) RELION matrices or None (keep the input angles); shifts_A: (n, 2);
    split: (n,) 0/1/-1 (written as rlnRandomSubset 1/2/0); scale: (n,) rlnCtfScalefactor.

    A STAR input keeps every column and row; pixel origins (rlnOriginX/Y) are dropped
    because rlnOriginXAngst/YAngst replace them, and a RELION 3.0 input gets an optics
    table.  Stack names stay as written unless they no longer resolve from the output's
    folder, the working folder or the project folder; then they become absolute.
    A .cs input gets a fresh particle table built from its arrays.
    """
    ps, path = particle_set, os.fspath(path)
    n = len(ps)
    if ps._star_particles is not None:
        particles = ps._star_particles.copy()
        particles["rlnImageName"] = _portable_image_names(ps, particles["rlnImageName"], path)
        particles = particles.drop(columns=[c for c in ORIGINS_PX if c in particles.columns])
        for column, values in (("rlnDefocusU", ps.ctf.defocus_u_A), ("rlnDefocusV", ps.ctf.defocus_v_A)):
            values = np.broadcast_to(values, (n,))
            if np.any(np.abs(particles[column].to_numpy(float) - values) > 1e-3):
                particles[column] = values   # refined (refine --optimize-defocus)
        if ps._star_legacy or ps._star_optics is None:
            optics, group = _optics_from_arrays(ps)
            particles["rlnOpticsGroup"] = group
        else:
            optics = _complete_optics(ps, ps._star_optics.copy(), particles)
    else:
        optics, group = _optics_from_arrays(ps)
        ctf = ps.ctf

        def col(v):
            return np.broadcast_to(v, (n,)).copy()

        particles = pd.DataFrame({
            "rlnImageName": [f"{i + 1:06d}@{ps.stack_paths[s]}"
                             for s, i in zip(ps.stack_id, ps.stack_index)],
            "rlnDefocusU": col(ctf.defocus_u_A), "rlnDefocusV": col(ctf.defocus_v_A),
            "rlnDefocusAngle": col(ctf.defocus_angle_deg),
            "rlnPhaseShift": col(ctf.phase_shift_deg), "rlnCtfBfactor": col(ctf.bfactor_A2),
            "rlnOpticsGroup": group})
    if rotations is None and ps._star_particles is None:
        rotations = ps.rotations      # no angle columns to keep: write the input poses
    if rotations is not None:
        angles = matrix_to_euler(np.asarray(rotations).reshape(n, 3, 3))
        for k, label in enumerate(ANGLES):
            particles[label] = angles[:, k]
    shifts_A = np.asarray(shifts_A, dtype=np.float64).reshape(n, 2)
    particles[ORIGINS_A[0]] = shifts_A[:, 0]
    particles[ORIGINS_A[1]] = shifts_A[:, 1]
    split = np.asarray(split).reshape(n)
    # RELION knows only halves 1 and 2; 0 marks a particle we never assigned.
    particles["rlnRandomSubset"] = np.where(split >= 0, split + 1, 0).astype(np.int64)
    particles["rlnCtfScalefactor"] = np.asarray(scale, dtype=np.float64).reshape(n)
    write_relion_star(path, optics, particles)


def write_relion_star(path: str | os.PathLike, optics: pd.DataFrame,
                      particles: pd.DataFrame) -> None:
    """Atomically write a RELION 3.1+ STAR file with data_optics and data_particles."""
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp,
                       float_format=_FLOAT_FORMAT, sep=" ")
        with open(tmp, "r", encoding="utf-8") as f:
            text = f.read()
        # starfile opens with its own banner; RELION tools look for a version line.
        if text.startswith("#"):
            text = text.split("\n", 1)[1]
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n# version 30001\n" + text)
