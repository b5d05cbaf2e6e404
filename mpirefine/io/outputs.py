"""Writing a job's results: an output folder that is never silently reused, atomic
JSON and CSV files, and the FSC table."""

from __future__ import annotations

import json
import os

import numpy as np

from mpirefine.errors import InputError
from mpirefine.fourier.filters import shell_resolution_A
from mpirefine.io.atomic import write_text_atomic

#: files whose presence marks a folder as holding a previous job's results
RESULT_FILES = ("summary.json", "map.mrc", "map_half_A.mrc", "particles.star", "checkpoint.h5")


def prepare_out_dir(path: str, overwrite: bool) -> str:
    """Create ``path`` (and parents); refuse a folder holding earlier results unless
    ``overwrite``.  Returns the absolute path."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--out {path} exists and is not a folder; choose another name")
    existing = [f for f in RESULT_FILES if os.path.exists(os.path.join(path, f))]
    if existing and not overwrite:
        raise InputError(
            f"--out {path} already holds results ({', '.join(existing)}); choose a new "
            "folder or pass --overwrite to replace them")
    os.makedirs(path, exist_ok=True)
    return path


def write_json(path: str, obj) -> None:
    """Atomic JSON (NumPy scalars and arrays converted)."""

    def convert(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    write_text_atomic(path, json.dumps(obj, indent=2, default=convert) + "\n")


def write_fsc_csv(path: str, curves: dict, n: int, pixel_size_A: float) -> None:
    """fsc.csv: shell, 1/Å, resolution (Å), then one column per named curve."""
    res = shell_resolution_A(n, pixel_size_A)
    names = list(curves)
    lines = ["shell,frequency_per_A,resolution_A," + ",".join(names)]
    for s in range(n // 2 + 1):
        vals = ",".join(f"{float(curves[k][s]):.5f}" for k in names)
        lines.append(f"{s},{s / (n * pixel_size_A):.6f},{res[s]:.3f},{vals}")
    write_text_atomic(path, "\n".join(lines) + "\n")


def fsc_table(curve, n: int, pixel_size_A: float) -> str:
    """A human-readable FSC table."""
    res = shell_resolution_A(n, pixel_size_A)
    rows = [f"{'shell':>5} {'res (Å)':>9} {'FSC':>7}"]
    for s in range(1, n // 2 + 1):
        rows.append(f"{s:5d} {res[s]:9.2f} {float(curve[s]):7.3f}")
    return "\n".join(rows)
