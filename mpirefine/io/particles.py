"""The particle set: metadata read from RELION STAR or CryoSPARC .cs, and lazy image access.

A :class:`ParticleSet` holds per-particle arrays in our conventions (RELION matrices,
origins in Å, split 0/1/-1) plus the original table so that writing back keeps every
column the user had.  :class:`ImageSource` reads only the images asked for, through
memory maps, one open handle per stack.

Optics groups may differ in box and pixel size.  Each particle keeps its own
(``image_box``, ``image_pixel_size_A``); ``box`` and ``pixel_size_A`` are the reference
grid that maps and the search use: the first optics group's, as in RELION, unless the
user chose another (``--box``, ``--pixel-size``).  Image preparation brings every
particle onto it (:mod:`mpirefine.refinement.images`).  The metadata's pixel size wins
over a stack header's (headers often say 1 or 0); a disagreement is warned about once.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from mpirefine.errors import InputError
from mpirefine.io.mrc import MrcStack, StackInfo, stack_info
from mpirefine.physics.ctf import CTFParams

# A stack header pixel size may differ from the metadata by rounding, not by more.
PIXEL_SIZE_TOLERANCE = 0.01
# Relative difference below which two optics groups' pixel sizes count as one.
SAME_PIXEL_SIZE = 1e-4
# A stack header's pixel size is used (when the metadata has none) only in this range
# and not when it is exactly 1, the value writers leave when they know none.
PLAUSIBLE_HEADER_PIXEL_A = (0.2, 50.0)

#: Data warnings (header vs metadata, ...): the CLI silences it on all ranks but 0.
LOG = logging.getLogger("mpirefine.io")
_WARNED: set[str] = set()


@dataclass
class ParticleSet:
    """Metadata of n particles; all arrays have length n along their first axis."""

    box: int                       # reference grid: image side, px (0: not known yet)
    pixel_size_A: float            # reference grid: Å per pixel
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
    # Each particle's own grid (its optics group's); None: the reference grid.
    image_box: np.ndarray | None = None           # (n,) int, px (0: from the stack header)
    image_pixel_size_A: np.ndarray | None = None  # (n,) float, Å
    notes: list[str] = field(default_factory=list)  # warnings about the input, once each
    # Original tables, row-aligned with the arrays above, for writing back.
    _star_optics: pd.DataFrame | None = field(default=None, repr=False)
    _star_particles: pd.DataFrame | None = field(default=None, repr=False)
    _star_legacy: bool = field(default=False, repr=False)     # input was RELION 3.0
    _cs_table: np.ndarray | None = field(default=None, repr=False)
    _project_dir: str | None = field(default=None, repr=False)
    _reference_row: int = field(default=0, repr=False)   # a particle of the first group

    def __post_init__(self):
        n = len(self.stack_id)
        if self.image_box is None:
            self.image_box = np.full(n, int(self.box), dtype=np.int64)
        if self.image_pixel_size_A is None:
            self.image_pixel_size_A = np.full(n, float(self.pixel_size_A))
        self.image_box = np.asarray(self.image_box, dtype=np.int64).reshape(n)
        self.image_pixel_size_A = np.asarray(self.image_pixel_size_A, dtype=np.float64).reshape(n)
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
            optics_group=self.optics_group[idx], image_box=self.image_box[idx],
            image_pixel_size_A=self.image_pixel_size_A[idx], notes=list(self.notes),
            _star_particles=(None if self._star_particles is None
                             else self._star_particles.iloc[idx].reset_index(drop=True)),
            _cs_table=None if self._cs_table is None else self._cs_table[idx],
            _reference_row=int(next(iter(np.flatnonzero(idx == self._reference_row)), 0)),
        )

    # ------------------------------------------------------------- optics groups' grids

    def on_reference_grid(self, indices=None) -> np.ndarray:
        """(m,) bool: the particles (all, or ``indices``) whose own box and pixel size
        are the reference grid's, so that their images need no resampling."""
        idx = slice(None) if indices is None else np.asarray(indices, dtype=np.int64)
        same_px = (np.abs(self.image_pixel_size_A[idx] - self.pixel_size_A)
                   <= SAME_PIXEL_SIZE * self.pixel_size_A)
        return (self.image_box[idx] == self.box) & same_px

    @property
    def uniform(self) -> bool:
        """Every particle is on the reference grid (one box, one pixel size)."""
        return bool(np.all(self.on_reference_grid()))

    def image_grid(self, indices) -> ImageGrid | None:
        """The own grids of particles ``indices`` for image preparation; None when they
        are all on the reference grid (then images are used as they are)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        on = self.on_reference_grid(idx)
        if np.all(on):
            return None
        return ImageGrid(self.box, self.pixel_size_A, self.image_box[idx],
                         self.image_pixel_size_A[idx], on)

    def set_reference_grid(self, box: int | None = None,
                           pixel_size_A: float | None = None) -> None:
        """Make (``box``, ``pixel_size_A``) the reference grid; each None keeps the
        first optics group's.  The particles keep their own grids."""
        ref = self._reference_row
        self.box = int(box) if box else int(self.image_box[ref])
        self.pixel_size_A = float(pixel_size_A) if pixel_size_A else float(
            self.image_pixel_size_A[ref])

    def groups(self) -> list[dict]:
        """One dict per (optics group, box, pixel size), in order of first appearance:
        group, rows (int array), box, pixel_size_A, on_reference_grid, and how image
        preparation brings the group onto the reference grid (:class:`ImageGrid`):
        padded_box (m), resampled_box (n') and effective_pixel_size_A (m·p / n')."""
        keys = np.stack([self.optics_group.astype(np.float64), self.image_box.astype(np.float64),
                         self.image_pixel_size_A], axis=1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        grid = ImageGrid(self.box, self.pixel_size_A, self.image_box[first],
                         self.image_pixel_size_A[first], self.on_reference_grid(first))
        padded, resampled = grid.padded_box(), grid.resampled_box()
        pixel = grid.effective_pixel_size_A()
        out = []
        for k in np.argsort(first):
            r = int(first[k])
            out.append({"group": int(self.optics_group[r]),
                        "rows": np.flatnonzero(inverse.reshape(-1) == k),
                        "box": int(self.image_box[r]), "pixel_size_A": float(self.image_pixel_size_A[r]),
                        "on_reference_grid": bool(grid.on_reference_grid[k]),
                        "padded_box": int(padded[k]), "resampled_box": int(resampled[k]),
                        "effective_pixel_size_A": float(pixel[k])})
        return out

    def note(self, message: str) -> None:
        """Record a warning about the input and log it, once per process."""
        if message not in self.notes:
            self.notes.append(message)
        if message not in _WARNED:
            _WARNED.add(message)
            LOG.warning(f"warning: {message}")


@dataclass(frozen=True)
class ImageGrid:
    """Own grids of a batch of particles, for bringing their images onto the reference
    grid (``box``, ``pixel_size_A``).  Arrays have one value per particle."""

    box: int
    pixel_size_A: float
    image_box: np.ndarray          # (B,) int
    image_pixel_size_A: np.ndarray  # (B,) float
    on_reference_grid: np.ndarray  # (B,) bool

    def subset(self, rows) -> "ImageGrid":
        """The grids of the particles at ``rows`` of the batch."""
        return replace(self, image_box=self.image_box[rows],
                       image_pixel_size_A=self.image_pixel_size_A[rows],
                       on_reference_grid=self.on_reference_grid[rows])

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(B,) m and (B,) n' of :func:`resampling_plan` (m = n' = n on the grid)."""
        pairs, which = np.unique(np.stack([self.image_box.astype(np.float64),
                                           self.image_pixel_size_A], axis=1),
                                 axis=0, return_inverse=True)
        plans = np.array([resampling_plan(int(b), float(p), self.pixel_size_A, self.box)
                          if min(b, p) > 0 else (int(b), int(b)) for b, p in pairs],
                         dtype=np.int64).reshape(-1, 2)
        plan = plans[which.reshape(-1)]
        own = np.asarray(self.image_box, dtype=np.int64)
        return (np.where(self.on_reference_grid, own, plan[:, 0]),
                np.where(self.on_reference_grid, own, plan[:, 1]))

    def padded_box(self) -> np.ndarray:
        """(B,) m >= n: the box each image is padded to in real space before resampling."""
        return self._plan()[0]

    def resampled_box(self) -> np.ndarray:
        """(B,) n': the box Fourier cropping or padding gives each (padded) image."""
        return self._plan()[1]

    def effective_pixel_size_A(self) -> np.ndarray:
        """(B,) m·p / n': each resampled image's pixel size, which its CTF is evaluated
        with (the reference pixel size for particles on the grid)."""
        m, n_res = self._plan()
        return np.where(self.on_reference_grid, self.pixel_size_A,
                        m * self.image_pixel_size_A / np.maximum(n_res, 1))


def resampling_plan(box: int, pixel_size_A: float, reference_pixel_size_A: float,
                    reference_box: int) -> tuple[int, int]:
    """How an image of ``box`` px of ``pixel_size_A`` comes to the reference pixel size:
    (m, n').  It is padded in real space to m px, then Fourier cropped (p < p_ref) or
    padded (p > p_ref) to n' = round(m·p / p_ref) px, whose pixels are m·p / n' Å.

    m = n (RELION's rule, n' = round(n·p / p_ref)) unless rounding n' would scale the
    image by more than 0.1 / reference_box (0.05 px at the edge of the reference box):
    a 64 px image of 1.24 Å goes to 63 px of 1.2597 Å, 0.8 % off 1.25 Å, which blurs
    high resolution.  Then m is the smallest larger box (up to 2n) that rounds well
    enough (105 px of 1.24 Å -> 104 px of 1.2515 Å), or the best one up to 2n.
    """
    tolerance = 0.1 / max(int(reference_box), 1)
    best = None
    for m in range(int(box), 2 * int(box) + 1):
        exact = m * pixel_size_A / reference_pixel_size_A
        n_res = max(int(np.floor(exact + 0.5)), 2)
        error = abs(exact - n_res) / exact
        if best is None or error < best[0]:
            best = (error, m, n_res)
        if error <= tolerance:
            break
    return best[1], best[2]


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


def stack_rows(ps: ParticleSet) -> list[np.ndarray]:
    """Rows (ascending) of each stack id 0 .. len(stack_paths) - 1; empty for unused stacks."""
    order = np.argsort(ps.stack_id, kind="stable")
    bounds = np.searchsorted(ps.stack_id[order], np.arange(len(ps.stack_paths) + 1))
    return [order[bounds[k]:bounds[k + 1]] for k in range(len(ps.stack_paths))]


def check_stack(ps: ParticleSet, sid: int, box: int, max_index: int) -> StackInfo:
    """Check stack ``sid``'s header against the metadata and return it.

    box: the box in px the metadata gives this stack's particles (0: take the stack's);
    max_index: the largest 0-based image index the particles ask of this stack.  The
    pixel size is not checked here: the metadata's wins (:func:`check_stacks`).
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
    return info


def check_stacks(ps: ParticleSet, problems: dict | None = None) -> dict[int, StackInfo]:
    """Check every used stack's header against the metadata; return the headers by stack id.

    Particles whose metadata gives no box (0) take their stack's, and a reference box
    of 0 becomes the first optics group's.  Where a header's pixel size disagrees with
    the metadata's, the metadata's is used and one warning names the first such stack
    and both values (:meth:`ParticleSet.note`).

    problems: when given (diagnostics, ``mpirefine info``), a stack that fails a check
    is recorded there (stack id -> message) instead of raising, and stacks that do not
    exist are skipped.
    """
    headers: dict[int, StackInfo] = {}
    disagree = []
    _, max_index = stack_usage(ps)
    for sid, rows in enumerate(stack_rows(ps)):
        if not rows.size:
            continue
        path = ps.stack_paths[sid]
        if problems is not None and not os.path.isfile(path):
            continue
        try:
            boxes = np.unique(ps.image_box[rows])
            if boxes.size > 1:
                raise InputError(f"{ps.source_path}: the particles of stack {path} have "
                                 f"different boxes ({', '.join(str(int(b)) for b in boxes)} "
                                 "px); one stack holds images of one size: fix the optics "
                                 "groups (rlnImageSize / blob/shape)")
            info = check_stack(ps, sid, int(boxes[0]), int(max_index[sid]))
        except InputError as exc:
            if problems is None:
                raise
            problems[sid] = str(exc)
            continue
        headers[sid] = info
        if boxes[0] == 0:
            ps.image_box[rows] = info.nx
        meta = float(ps.image_pixel_size_A[rows[0]])
        if info.pixel_size_A > 0 and meta > 0 and (
                abs(info.pixel_size_A - meta) > PIXEL_SIZE_TOLERANCE * meta):
            disagree.append((path, info.pixel_size_A, meta))
    if disagree:
        path, header, meta = disagree[0]
        others = (f" (and {len(disagree) - 1} more of the {len(headers)} stacks)"
                  if len(disagree) > 1 else "")
        ps.note(f"the header of {path} says {header:g} Å/px but {ps.source_path} says "
                f"{meta:g} Å/px{others}; using {meta:g} Å/px from the metadata (stack "
                "headers are often 1 or 0; relion_image_handler --angpix fixes them)")
    if not ps.box:
        ps.box = int(ps.image_box[ps._reference_row])
    return headers


def header_pixel_size_A(stack_paths: Sequence[str], source_path: str, fix: str) -> float:
    """For a particle file whose metadata gives no pixel size: the header pixel size
    of its first stack that exists, 0.0 when none does.

    An implausible header value (0, exactly 1 — what writers leave when they know
    none — or outside PLAUSIBLE_HEADER_PIXEL_A) is a one-line InputError naming the
    file and ``fix``.
    """
    for path in stack_paths:
        if os.path.isfile(path):
            px = stack_info(path).pixel_size_A
            lo, hi = PLAUSIBLE_HEADER_PIXEL_A
            if px == 1.0 or not lo <= px <= hi:
                raise InputError(f"{source_path} gives no pixel size, and the header of "
                                 f"{path} says {px:g} Å/px, which is no real pixel size "
                                 f"(writers leave 0 or 1); {fix}")
            return px
    return 0.0


# --------------------------------------------------------------------------- images

class ImageSource:
    """Lazy, memory-mapped access to a particle set's images.

    At most ``max_open`` stacks are mapped at once (least recently used closed first):
    RELION projects often have one stack per micrograph, thousands in all, and each map
    costs file descriptors.

    Memory does not grow with the stacks: a read copies the images asked for out of the
    map, then hands the map's resident pages back (``madvise(MADV_DONTNEED)``; the
    kernel's page cache keeps the file, so nothing is read twice from disk for it).
    Without that, a pass over a memory-mapped stack would leave every page it touched
    in the rank's resident set: the whole stack, 26 GB for 100,000 images of 256 px.

    :meth:`batches` reads one batch ahead on a background thread (``prefetch``), so the
    next batch comes off the disk while the caller works on the current one.  The reads
    are the ones a plain loop makes, in the same order, so results do not change.
    :meth:`read_ahead` starts reading a batch that a later :meth:`batches` call will
    ask for first (the refinement reads the next iteration's first batch while the
    maps are reconstructed); a batch asked for that was not read ahead is read then.

    Counters (for benchmarks and timings): ``read_seconds``, time spent reading on
    whichever thread; ``wait_seconds``, time :meth:`batches`' caller waited for images;
    ``images_read``.
    """

    def __init__(self, particle_set: ParticleSet, max_open: int = 64, prefetch: bool = True):
        self.particles = particle_set
        self.max_open = max(1, int(max_open))
        self.prefetch = bool(prefetch)
        self._open: OrderedDict[int, MrcStack] = OrderedDict()
        self._lock = threading.Lock()        # one read at a time: the open maps are shared
        self._pending: set[Future] = set()   # prefetches submitted and not finished
        self._ahead: tuple[bytes, Future] | None = None   # read_ahead's batch
        self._ahead_pool: ThreadPoolExecutor | None = None
        self.ahead_used = 0                  # batches that read_ahead had read
        self.read_seconds = 0.0
        self.wait_seconds = 0.0
        self.images_read = 0

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

    @staticmethod
    def _drop_resident_pages(stack: MrcStack) -> None:
        """Unmap the pages a read faulted into ``stack``'s read-only map (they stay in
        the page cache); a no-op where the map or madvise is not available."""
        data = getattr(stack, "_data", None)
        mapped = getattr(data, "_mmap", None)
        if mapped is None or getattr(data, "mode", None) != "r" or not hasattr(mmap, "MADV_DONTNEED"):
            return
        try:
            mapped.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass

    def images(self, indices) -> np.ndarray:
        """Images of particles ``indices`` (rows of the set), float32 (m, box, box), in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        with self._lock:
            start = time.perf_counter()
            out = self._read(idx)
            self.read_seconds += time.perf_counter() - start
            self.images_read += idx.size
        return out

    def _read(self, idx: np.ndarray) -> np.ndarray:
        ps = self.particles
        box = ps.box
        sid = ps.stack_id[idx]
        order = np.argsort(sid, kind="stable")       # one pass per stack, stacks in order
        groups = [g for g in np.split(order, np.flatnonzero(np.diff(sid[order])) + 1) if g.size]
        out = None if len(groups) == 1 else np.empty((idx.size, box, box), dtype=np.float32)
        for group in groups:
            stack = self._stack(int(sid[group[0]]))
            within = ps.stack_index[idx[group]]
            block = stack.read(within)
            self._drop_resident_pages(stack)
            finite = np.isfinite(block).all(axis=(1, 2))
            if not finite.all():
                k = int(np.flatnonzero(~finite)[0])
                raise InputError(f"image {within[k] + 1} of stack {stack.path} (particle row "
                                 f"{idx[group[k]] + 1} of {ps.source_path}) contains NaN/Inf "
                                 "pixels; remove these particles or re-extract them")
            if out is None:      # one stack: the block is already in the caller's order
                return block
            out[group] = block
        return out

    def batches(self, indices, size: int,
                prefetch: bool | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices, images) for consecutive image batches of at most ``size``
        particles (``--image-batch-size``), in order.

        With ``prefetch`` (default: the source's setting) batch k + 1 is read on a
        background thread while the caller works on batch k, so up to three batches of
        images are alive at once.  A read error is raised when its batch is due, as
        without prefetching."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        size = max(1, int(size))
        blocks = [idx[start:start + size] for start in range(0, idx.size, size)]
        ahead = self._take_ahead(blocks[0]) if blocks else None
        self.ahead_used += ahead is not None
        if not (self.prefetch if prefetch is None else prefetch) or len(blocks) < 2:
            for k, block in enumerate(blocks):
                start = time.perf_counter()
                images = ahead.result() if k == 0 and ahead is not None else self.images(block)
                self.wait_seconds += time.perf_counter() - start
                yield block, images
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpirefine-images")
        pending = ahead if ahead is not None else self._submit(pool, blocks[0])
        try:
            for k, block in enumerate(blocks):
                start = time.perf_counter()
                images = pending.result()
                self.wait_seconds += time.perf_counter() - start
                pending = self._submit(pool, blocks[k + 1]) if k + 1 < len(blocks) else None
                yield block, images
        finally:
            if pending is not None:
                pending.cancel()
            pool.shutdown(wait=True)

    def _submit(self, pool: ThreadPoolExecutor, block: np.ndarray) -> Future:
        future = pool.submit(self.images, block)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def read_ahead(self, indices) -> None:
        """Start reading the images of ``indices`` on a background thread, for the next
        :meth:`batches` call whose first batch they are; replaces an earlier read-ahead."""
        block = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._drop_ahead()
        if block.size == 0:
            return
        if self._ahead_pool is None:
            self._ahead_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpirefine-ahead")
        self._ahead = (block.tobytes(), self._submit(self._ahead_pool, block))

    def _take_ahead(self, block: np.ndarray) -> Future | None:
        """The read-ahead of exactly ``block``, if there is one; any other is dropped."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if ahead[0] == np.asarray(block, np.int64).tobytes():
            return ahead[1]
        ahead[1].cancel()
        return None

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None

    def close(self) -> None:
        """Close every map, after a read in progress on the prefetch thread has ended."""
        self._drop_ahead()
        for future in list(self._pending):
            future.cancel()
        wait(list(self._pending))
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True)
            self._ahead_pool = None
        with self._lock:
            while self._open:
                self._open.popitem()[1].close()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
