"""The particle set: metadata read from RELION STAR or CryoSPARC .cs, and lazy image access.

A :class:`ParticleSet` holds per-particle arrays in our conventions (RELION matrices,
origins in Å, split 0/1/-1) plus the original table so that writing back keeps every
column the user had.  :class:`ImageSource` reads only the images asked for, through
memory maps, one open handle per stack.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from mpirefine.errors import InputError
from mpirefine.io.mrc import MrcStack, StackInfo, stack_info
from mpirefine.physics.ctf import CTFParams

# A stack header pixel size may differ from the metadata by rounding, not by more.
PIXEL_SIZE_TOLERANCE = 0.01


@dataclass
class ParticleSet:
    """Metadata of n particles; all arrays have length n along their first axis."""

    box: int                       # image side, px
    pixel_size_A: float
    stack_paths: list[str]         # unique resolved absolute stack paths
    stack_id: np.ndarray           # (n,) int, index into stack_paths
    stack_index: np.ndarray        # (n,) int, 0-based image index within its stack
    ctf: CTFParams                 # length n; ctf.scale stays 1 (see ``scale``)
    rotations: np.ndarray | None   # (n, 3, 3) RELION matrices A, None without poses
    shifts_A: np.ndarray           # (n, 2) RELION origin (x, y) in Å
    split: np.ndarray              # (n,) int8: 0 = half A, 1 = half B, -1 = unassigned
    scale: np.ndarray              # (n,) per-particle scale, 1.0 if absent
    optics_group: np.ndarray       # (n,) int
    source_path: str
    source_format: str             # "star" | "cs"
    # Original tables, row-aligned with the arrays above, for writing back.
    _star_optics: pd.DataFrame | None = field(default=None, repr=False)
    _star_particles: pd.DataFrame | None = field(default=None, repr=False)
    _star_legacy: bool = field(default=False, repr=False)     # input was RELION 3.0
    _cs_table: np.ndarray | None = field(default=None, repr=False)
    _project_dir: str | None = field(default=None, repr=False)

    def __post_init__(self):
        n = len(self.stack_id)
        self.stack_id = np.asarray(self.stack_id, dtype=np.int64)
        self.stack_index = np.asarray(self.stack_index, dtype=np.int64)
        self.shifts_A = np.asarray(self.shifts_A, dtype=np.float64).reshape(n, 2)
        self.split = np.asarray(self.split, dtype=np.int8)
        self.scale = np.asarray(self.scale, dtype=np.float64)
        self.optics_group = np.asarray(self.optics_group, dtype=np.int64)
        if self.rotations is not None:
            self.rotations = np.asarray(self.rotations, dtype=np.float64).reshape(n, 3, 3)
        for name in ("stack_index", "split", "scale", "optics_group"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"ParticleSet.{name} has shape {getattr(self, name).shape}, "
                                 f"expected ({n},)")

    def __len__(self) -> int:
        return len(self.stack_id)

    def subset(self, indices) -> "ParticleSet":
        """The particles at ``indices`` (int array or boolean mask), original rows kept in step."""
        idx = np.arange(len(self))[np.asarray(indices)]
        return replace(
            self,
            stack_id=self.stack_id[idx], stack_index=self.stack_index[idx],
            ctf=self.ctf.subset(idx),
            rotations=None if self.rotations is None else self.rotations[idx],
            shifts_A=self.shifts_A[idx], split=self.split[idx], scale=self.scale[idx],
            optics_group=self.optics_group[idx],
            _star_particles=(None if self._star_particles is None
                             else self._star_particles.iloc[idx].reset_index(drop=True)),
            _cs_table=None if self._cs_table is None else self._cs_table[idx],
        )


# ----------------------------------------------------------------------------- paths

def resolve_path(raw: str, folders: Sequence[str | None]) -> str | None:
    """Absolute path of ``raw``: as is when absolute, else under the first folder that has it."""
    if os.path.isabs(raw):
        return os.path.normpath(raw) if os.path.exists(raw) else None
    for folder in folders:
        if folder is None:
            continue
        candidate = os.path.normpath(os.path.join(os.path.abspath(folder), raw))
        if os.path.exists(candidate):
            return candidate
    return None


def resolve_stacks(names, folders: Sequence[str | None], fallback_folder: str,
                   require_stacks: bool, not_found) -> tuple[list[str], np.ndarray]:
    """Resolve each distinct stack name of a particle file.

    names: the file's distinct stack names, in order of their codes.  Returns (the
    distinct resolved paths, the index into them of each name): two names that lead
    to one file share a stack.  A name found in none of ``folders`` is an InputError
    whose text ``not_found(name, tried_folders)`` gives, unless ``require_stacks`` is
    False: it is then kept as ``fallback_folder/name``.
    """
    stack_paths: list[str] = []
    where: dict[str, int] = {}
    code_to_sid = np.empty(len(names), dtype=np.int64)
    for k, name in enumerate(names):
        name = str(name)
        resolved = resolve_path(name, folders)
        if resolved is None and not require_stacks:
            resolved = os.path.normpath(os.path.join(os.path.abspath(fallback_folder), name))
        if resolved is None:
            tried = ", ".join(os.path.abspath(f) for f in folders if f is not None)
            raise InputError(not_found(name, tried))
        code_to_sid[k] = where.setdefault(resolved, len(stack_paths))
        if code_to_sid[k] == len(stack_paths):
            stack_paths.append(resolved)
    return stack_paths, code_to_sid


def portable_name(raw: str, resolved: str, folders: Sequence[str | None]) -> str:
    """``raw`` when it still leads to ``resolved`` from ``folders``, else the absolute path.

    Keeps project-relative names (what RELION and CryoSPARC users expect to see) when the
    output is read from the same project, and never writes a name that no longer resolves.
    """
    found = resolve_path(raw, folders)
    if found is not None and os.path.exists(resolved) and os.path.samefile(found, resolved):
        return raw
    return resolved


def group_rows(codes: np.ndarray) -> list[np.ndarray]:
    """Row numbers of each code 0..k-1 (ascending within a group), in O(n log n)."""
    codes = np.asarray(codes).reshape(-1)
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(codes[order])) + 1) if codes.size else []


# ----------------------------------------------------------------------- validation

def check_numeric_finite(table: pd.DataFrame, what: str) -> None:
    """InputError naming the first numeric column holding NaN/Inf (or an empty cell)."""
    for col in table.columns:
        values = table[col]
        if not pd.api.types.is_numeric_dtype(values):
            continue
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
        if np.any(bad):
            row = int(np.flatnonzero(bad)[0])
            raise InputError(f"{what}: column {col} has {int(bad.sum())} NaN/Inf or empty "
                             f"values (first at row {row + 1}); fix or remove those rows")


def check_duplicates(ps: ParticleSet) -> None:
    """InputError when two rows point to the same image of the same stack."""
    key = ps.stack_id * (int(ps.stack_index.max()) + 1) + ps.stack_index
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    if np.all(counts == 1):
        return
    # Report the duplicate met first in file order: the second row of the earliest pair.
    dup_rows = np.setdiff1d(np.arange(len(ps)), first)
    row = int(dup_rows.min())
    earlier = int(np.flatnonzero(key == key[row])[0])
    raise InputError(f"{ps.source_path}: rows {earlier + 1} and {row + 1} both point to image "
                     f"{ps.stack_index[row] + 1} of {ps.stack_paths[ps.stack_id[row]]} "
                     f"({int((counts - 1).sum())} duplicate rows in all); remove duplicate "
                     "particles before refining (they would bias the half-set FSC)")


def stack_usage(ps: ParticleSet) -> tuple[np.ndarray, np.ndarray]:
    """(rows per stack, largest 0-based image index per stack or -1), both (n_stacks,)."""
    counts = np.bincount(ps.stack_id, minlength=len(ps.stack_paths))
    max_index = np.full(len(ps.stack_paths), -1, dtype=np.int64)
    np.maximum.at(max_index, ps.stack_id, ps.stack_index)
    return counts, max_index


def check_stack(ps: ParticleSet, sid: int, box: int, max_index: int) -> StackInfo:
    """Check stack ``sid``'s header against the metadata and return it.

    box: the metadata's box in px (0: take the stack's); max_index: the largest 0-based
    image index the particles ask of this stack.
    """
    path = ps.stack_paths[sid]
    info = stack_info(path)
    box = box or info.nx
    if info.nx != box or info.ny != box:
        raise InputError(f"stack {path} holds {info.ny}x{info.nx} images but "
                         f"{ps.source_path} says the box is {box} px; re-extract the "
                         "particles or fix rlnImageSize / blob/shape")
    if max_index >= info.n:
        raise InputError(f"{ps.source_path} asks for image {max_index + 1} of stack "
                         f"{path}, which holds only {info.n} images; the stack is "
                         "incomplete or the particle file points to the wrong stack")
    if info.pixel_size_A > 0 and ps.pixel_size_A > 0 and (
            abs(info.pixel_size_A - ps.pixel_size_A) > PIXEL_SIZE_TOLERANCE * ps.pixel_size_A):
        raise InputError(f"pixel size {ps.pixel_size_A:g} Å in {ps.source_path} differs from "
                         f"{info.pixel_size_A:g} Å in the header of {path}; fix the metadata "
                         "or the stack header (e.g. relion_image_handler --angpix)")
    return info


def check_stacks(ps: ParticleSet) -> int:
    """Check every stack's header against the metadata; return the box (px).

    A box of 0 in ``ps`` means the metadata gave none: the first stack's image size is used.
    """
    box = int(ps.box)
    counts, max_index = stack_usage(ps)
    for sid in range(len(ps.stack_paths)):
        if counts[sid]:
            info = check_stack(ps, sid, box, int(max_index[sid]))
            box = box or info.nx
    return box


def header_pixel_size_A(stack_paths: Sequence[str]) -> float:
    """Pixel size (Å) in the header of the first stack that exists; 0.0 when none does."""
    for path in stack_paths:
        if os.path.isfile(path):
            return stack_info(path).pixel_size_A
    return 0.0


# --------------------------------------------------------------------------- images

class ImageSource:
    """Lazy, memory-mapped access to a particle set's images.

    At most ``max_open`` stacks are mapped at once (least recently used closed first):
    RELION projects often have one stack per micrograph, thousands in all, and each map
    costs file descriptors.
    """

    def __init__(self, particle_set: ParticleSet, max_open: int = 64):
        self.particles = particle_set
        self.max_open = max(1, int(max_open))
        self._open: OrderedDict[int, MrcStack] = OrderedDict()

    def _stack(self, sid: int) -> MrcStack:
        stack = self._open.pop(sid, None)
        if stack is None:
            stack = MrcStack(self.particles.stack_paths[sid])
            box = self.particles.box
            if stack.shape[1:] != (box, box):
                stack.close()
                raise InputError(f"stack {stack.path} holds {stack.shape[1]}x{stack.shape[2]} "
                                 f"images, expected {box}x{box}; re-extract the particles")
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open[sid] = stack
        return stack

    def images(self, indices) -> np.ndarray:
        """Images of particles ``indices`` (rows of the set), float32 (m, box, box), in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        ps = self.particles
        box = ps.box
        out = np.empty((idx.size, box, box), dtype=np.float32)
        sid = ps.stack_id[idx]
        order = np.argsort(sid, kind="stable")       # one pass per stack, stacks in order
        bounds = np.flatnonzero(np.diff(sid[order])) + 1
        for group in np.split(order, bounds):
            if group.size == 0:
                continue
            stack = self._stack(int(sid[group[0]]))
            within = ps.stack_index[idx[group]]
            block = stack.read(within)
            finite = np.isfinite(block).all(axis=(1, 2))
            if not finite.all():
                k = int(np.flatnonzero(~finite)[0])
                raise InputError(f"image {within[k] + 1} of stack {stack.path} (particle row "
                                 f"{idx[group[k]] + 1} of {ps.source_path}) contains NaN/Inf "
                                 "pixels; remove these particles or re-extract them")
            out[group] = block
        return out

    def batches(self, indices, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices, images) for consecutive image batches of at most ``size``
        particles (``--image-batch-size``)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        size = max(1, int(size))
        for start in range(0, idx.size, size):
            block = idx[start:start + size]
            yield block, self.images(block)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
