"""MRC maps and image stacks through the ``mrcfile`` library.

Volumes come back as float32 arrays indexed [z, y, x]; stacks as (n, ny, nx).  Pixel
sizes are in Å (the header's voxel_size.x).  Every failure a user can cause (a missing,
corrupt, truncated, complex or non-finite file) becomes an :class:`InputError` that
names the file and says how to fix it.  Writes are atomic: a temporary file in the
destination folder is renamed over the target, so a crash never leaves half a map.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import mrcfile
import numpy as np

from mpirefine.errors import InputError
from mpirefine.io.atomic import atomic_path

# MRC modes 3 and 4 hold complex numbers (Fourier transforms), never real-space images.
_COMPLEX_MODES = (3, 4)
_MODE_ITEMSIZE = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}
_REEXPORT = "re-export or re-extract it (e.g. relion_image_handler or CryoSPARC export)"


def _require_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"MRC file {path!r} does not exist; check the path")
    return path


@dataclass(frozen=True)
class StackInfo:
    """Header facts about an MRC file read without touching its data."""

    path: str
    n: int            # images (nz), 1 for a 2-D file
    ny: int
    nx: int
    pixel_size_A: float
    mode: int


def stack_info(path: str | os.PathLike) -> StackInfo:
    """Read and check an MRC header: real mode, and a file long enough for its data.

    Cheap (reads 1024 bytes plus the extended-header length), so it can be called for
    thousands of stacks when a particle set is opened.
    """
    path = _require_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                h = mrc.header
                nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                mode, nsymbt = int(h.mode), int(h.nsymbt)
                pixel = float(mrc.voxel_size.x)
                map_ok = bytes(h.map).startswith(b"MAP")
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path!r} is not a readable MRC file ({exc}); {_REEXPORT}") from exc
    if not map_ok and mode not in _MODE_ITEMSIZE and mode not in _COMPLEX_MODES:
        raise InputError(f"{path!r} is not an MRC file (no 'MAP ' tag, mode {mode}); {_REEXPORT}")
    if mode in _COMPLEX_MODES:
        raise InputError(f"{path!r} holds complex data (MRC mode {mode}); "
                         "give a real-space map or stack (mode 2, float32)")
    if mode not in _MODE_ITEMSIZE or min(nx, ny, nz) <= 0:
        raise InputError(f"{path!r} has an unsupported MRC mode {mode} or shape "
                         f"({nz}, {ny}, {nx}); {_REEXPORT}")
    expected = 1024 + nsymbt + nx * ny * nz * _MODE_ITEMSIZE[mode]
    size = os.path.getsize(path)
    if size < expected:
        raise InputError(f"MRC file {path!r} is truncated: {size} bytes, header promises "
                         f"{expected} ({nz} images of {ny}x{nx}); {_REEXPORT}")
    return StackInfo(path, nz, ny, nx, pixel if pixel > 0 else 0.0, mode)


def _open_checked(opener, info: StackInfo):
    """Open strictly; on failure retry permissively but insist on a complete data block.

    Old writers leave small header defects (no 'MAP ' tag, odd machine stamp) that
    are harmless; a short data block never is.
    """
    try:
        return opener(info.path, mode="r", permissive=False)
    except (ValueError, OSError, EOFError) as exc:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mrc = opener(info.path, mode="r", permissive=True)
        except (ValueError, OSError, EOFError):
            mrc = None
        if mrc is None or mrc.data is None or mrc.data.size != info.n * info.ny * info.nx:
            if mrc is not None:
                mrc.close()
            raise InputError(f"MRC file {info.path!r} is truncated or corrupt ({exc}); "
                             f"{_REEXPORT}") from exc
        return mrc


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a cubic map.

    Returns (volume, pixel_size_A): float32 array of shape (n, n, n) indexed [z, y, x]
    and the voxel size in Å, 0.0 when the header carries none (the caller decides).
    """
    info = stack_info(path)
    path = info.path
    mrc = _open_checked(mrcfile.open, info)
    with mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(f"map {path!r} has shape {data.shape} (z, y, x); a cubic 3-D volume "
                         "is needed (pad or resample it, e.g. relion_image_handler --new_box)")
    if not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(f"map {path!r} has {bad} NaN/Inf voxels; {_REEXPORT}")
    return np.ascontiguousarray(data), info.pixel_size_A


def _atomic_mrc(path: str | os.PathLike, data: np.ndarray, pixel_size_A: float,
                image_stack: bool) -> None:
    with atomic_path(path) as tmp:
        # mrcfile warns when header statistics meet NaN/Inf; callers validate data.
        with warnings.catch_warnings(), mrcfile.new(tmp, overwrite=True) as mrc:
            warnings.simplefilter("ignore", RuntimeWarning)
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            if image_stack:
                mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size_A)
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.update_header_stats()


def write_mrc(path: str | os.PathLike, data: np.ndarray, pixel_size_A: float) -> None:
    """Write a 2-D image or 3-D volume (float32, mode 2) atomically, origin 0."""
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise ValueError(f"write_mrc needs 2-D or 3-D data, got shape {data.shape}")
    _atomic_mrc(path, data, pixel_size_A, image_stack=False)


def write_stack(path: str | os.PathLike, images: np.ndarray, pixel_size_A: float) -> None:
    """Write images of shape (n, ny, nx) as an MRC image stack (mode 2, ispg 0)."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"write_stack needs (n, ny, nx) images, got shape {images.shape}")
    _atomic_mrc(path, images, pixel_size_A, image_stack=True)


class MrcStack:
    """Read-only memory-mapped view of an MRC stack; a 2-D file is a stack of one.

    Attributes: ``path``, ``shape`` (n, ny, nx), ``pixel_size_A`` (0.0 if unset).
    Only the images asked for are paged in from disk.
    """

    def __init__(self, path: str | os.PathLike):
        info = stack_info(path)   # clear errors for complex / truncated files first
        self.path = info.path
        self.pixel_size_A = info.pixel_size_A
        self._mrc = _open_checked(mrcfile.mmap, info)
        data = self._mrc.data
        self._data = data[None] if data.ndim == 2 else data
        self.shape: tuple[int, int, int] = tuple(int(s) for s in self._data.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, indices) -> np.ndarray:
        """Images at 0-based ``indices`` (any order), float32 array (m, ny, nx)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (idx < 0) | (idx >= self.shape[0])
        if np.any(bad):
            first = int(idx[bad][0])
            raise InputError(f"image {first + 1} (1-based) requested from {self.path!r}, "
                             f"which holds only {self.shape[0]} images; check the particle "
                             "file's image names against the stack")
        # Gather in ascending file order (sequential I/O), then restore the caller's order.
        order = np.argsort(idx, kind="stable")
        out = np.empty((idx.size,) + self.shape[1:], dtype=np.float32)
        out[order] = self._data[idx[order]]
        return out

    def close(self) -> None:
        self._mrc.close()

    def __enter__(self) -> "MrcStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stack(path: str | os.PathLike) -> MrcStack:
    """Memory-map an MRC stack (or single image) read-only; see :class:`MrcStack`."""
    return MrcStack(path)


__all__ = ["StackInfo", "stack_info", "read_volume", "write_mrc", "write_stack",
           "MrcStack", "open_stack"]
