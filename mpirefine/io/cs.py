"""CryoSPARC particle files (.cs): NumPy structured arrays written with ``np.save``.

Conventions (docs/architecture.md §3): ``alignments3D/pose`` is a rotation vector in
radians and the RELION matrix is ``rotvec_to_matrix(pose)``; ``alignments3D/shift`` is
in pixels of the alignment (``alignments3D/psize_A``; we write the particle image's,
``blob/psize_A``) with the sign of rlnOriginX; ``alignments3D/split`` is the half set
(0/1) and ``alignments3D/alpha`` the per-particle scale.  ``blob/path`` is relative to
the CryoSPARC project folder (a leading '>' says so explicitly).  Each particle has its
own ``blob/shape`` and ``blob/psize_A``: exposure groups may differ in both.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from mpirefine.errors import InputError
from mpirefine.geometry.rotations import matrix_to_rotvec, rotvec_to_matrix
from mpirefine.io.atomic import atomic_path
from mpirefine.io.particles import ParticleSet, group_rows, header_pixel_size_A, portable_name, resolve_stacks
from mpirefine.physics.ctf import CTFParams

_REQUIRED_BLOB = ("blob/path", "blob/idx")
_REQUIRED_CTF = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm",
                 "ctf/amp_contrast")
# Field types as CryoSPARC writes them (and cryosparc-tools' Dataset reads them), so
# that CryoSPARC can import our output.  What refinement sets:
_ALIGN_FIELDS = [("alignments3D/split", "<u4"), ("alignments3D/shift", "<f4", (2,)),
                 ("alignments3D/pose", "<f4", (3,)), ("alignments3D/psize_A", "<f4"),
                 ("alignments3D/alpha", "<f4")]
# The rest of a CryoSPARC refinement's alignments3D slot, with neutral values (what
# CryoSPARC's own refinement of one class leaves when a statistic is not computed).
_ALIGN_EXTRA = [("alignments3D/error", "<f4", 0.0), ("alignments3D/error_min", "<f4", 0.0),
                ("alignments3D/resid_pow", "<f4", 0.0), ("alignments3D/slice_pow", "<f4", 0.0),
                ("alignments3D/image_pow", "<f4", 0.0), ("alignments3D/cross_cor", "<f4", 0.0),
                ("alignments3D/alpha_min", "<f4", 0.0), ("alignments3D/weight", "<f4", 1.0),
                ("alignments3D/pose_ess", "<f4", 1.0), ("alignments3D/shift_ess", "<f4", 1.0),
                ("alignments3D/class_posterior", "<f4", 1.0), ("alignments3D/class", "<u4", 0),
                ("alignments3D/class_ess", "<f4", 1.0)]
# ctf/type of particles whose CTF came from elsewhere (RELION), as imports mark them.
_CTF_TYPE = b"imported"
# alignments3D/split is unsigned: a particle in neither half is stored as 2 (read back as -1).
_UNASSIGNED = 2


def _search_folders(cs_path: str, project_dir: str | None) -> list[str | None]:
    """project_dir, then the .cs file's folder and each parent, then the working folder."""
    folders: list[str | None] = [project_dir]
    folder = os.path.dirname(os.path.abspath(cs_path))
    while True:
        folders.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    folders.append(os.getcwd())
    return folders


def _blob_paths(table: np.ndarray) -> np.ndarray:
    """blob/path as str, without CryoSPARC's leading '>' (project-relative marker)."""
    raw = table["blob/path"]
    text = np.char.decode(raw, "utf-8") if raw.dtype.kind == "S" else raw.astype(str)
    return np.char.lstrip(np.char.strip(text), ">")


def read_cs(path: str | os.PathLike, project_dir: str | None = None,
            require_stacks: bool = True) -> ParticleSet:
    """Read a CryoSPARC particle .cs file into a :class:`ParticleSet` (box 0 if no blob/shape).

    A stack that cannot be found is an InputError, unless ``require_stacks`` is False:
    then it is kept under the path it would have in the project folder (or next to the
    .cs file when no project folder is given).
    """
    path = os.path.abspath(os.fspath(path))
    try:
        table = np.load(path, allow_pickle=False)
    except Exception as exc:  # np.load raises ValueError, OSError, EOFError, ...
        raise InputError(f"cannot read CryoSPARC file {path!r} ({exc}); export the particles "
                         "again from CryoSPARC") from exc
    names = table.dtype.names or ()
    if not names:
        raise InputError(f"{path!r} is not a CryoSPARC particle file (no named fields)")
    table = np.atleast_1d(table)
    missing = [f for f in _REQUIRED_BLOB + _REQUIRED_CTF if f not in names]
    if missing:
        raise InputError(f"{path} lacks the field(s) {', '.join(missing)}; refinement needs "
                         "particle blobs and CTF parameters (use a job's particles output)")
    n = len(table)
    if n == 0:
        raise InputError(f"CryoSPARC file {path!r} holds no particles")
    for name in names:
        kind = table.dtype[name].base.kind
        if kind == "f" and not np.all(np.isfinite(table[name])):
            raise InputError(f"{path}: field {name} has NaN/Inf values; fix or remove those "
                             "particles")

    raw = _blob_paths(table)
    uniques, codes = np.unique(raw, return_inverse=True)
    folders = _search_folders(path, project_dir)
    stack_paths, code_to_sid = resolve_stacks(
        uniques, folders, project_dir if project_dir is not None else os.path.dirname(path),
        require_stacks,
        lambda name, tried: (f"{path}: particle stack {name!r} not found; looked in {tried}. "
                             "Pass --project-dir (the CryoSPARC project folder)"))
    stack_id = code_to_sid[codes.reshape(-1)]

    # Each particle's own pixel size (blob/psize_A) and box (blob/shape); the first
    # particle's set the reference grid.  Stack headers stand in only when the file
    # has no pixel size at all (check_stacks compares them with the metadata).
    fix = "export the particles again from CryoSPARC (they carry blob/psize_A)"
    notes = []
    psize_field = next((f for f in ("blob/psize_A", "alignments3D/psize_A") if f in names), None)
    if psize_field is not None:
        psizes = table[psize_field].astype(np.float64)
    else:
        header = header_pixel_size_A(stack_paths, path, fix)
        if header > 0:
            notes.append(f"{path} has no blob/psize_A; using {header:g} Å/px from the stack "
                         "header")
        psizes = np.full(n, header)
    if np.any(psizes <= 0):
        message = f"{path}: no pixel size in blob/psize_A nor in the stack header; {fix}"
        if require_stacks:
            raise InputError(message)
        notes.append(message)
    # ctf/anisomag is applied (physics/anisomag.py); the other aberrations are not
    for name in ("ctf/tilt_A", "ctf/trefoil_A", "ctf/tetra_A", "ctf/shift_A"):
        if name in names and np.any(table[name]):
            notes.append(f"{path}: {name} holds non-zero values, which are not applied (these "
                         "aberrations are read from a RELION optics table: rlnBeamTiltX/Y, "
                         "rlnOddZernike, rlnEvenZernike)")
    image_box = np.zeros(n, dtype=np.int64)
    if "blob/shape" in names:
        shapes = table["blob/shape"].reshape(n, -1).astype(np.int64)
        if np.any(shapes[:, 0] != shapes[:, -1]):
            row = int(np.flatnonzero(shapes[:, 0] != shapes[:, -1])[0])
            raise InputError(f"{path}: particle {row + 1} has blob/shape "
                             f"{shapes[row].tolist()}, not square; re-extract it with a "
                             "square box")
        image_box = shapes[:, 0]

    def field(name, default=None):
        return table[name].astype(np.float64) if name in names else default

    try:
        ctf = CTFParams(
            defocus_u_A=field("ctf/df1_A"), defocus_v_A=field("ctf/df2_A"),
            defocus_angle_deg=np.degrees(field("ctf/df_angle_rad")),
            voltage_kV=field("ctf/accel_kv"), cs_mm=field("ctf/cs_mm"),
            amplitude_contrast=field("ctf/amp_contrast"),
            phase_shift_deg=np.degrees(field("ctf/phase_shift_rad", np.zeros(n))),
            bfactor_A2=field("ctf/bfactor", 0.0))
    except ValueError as exc:
        raise InputError(f"{path}: bad CTF values ({exc})") from exc

    rotations = None
    if "alignments3D/pose" in names:
        rotations = rotvec_to_matrix(table["alignments3D/pose"].astype(np.float64))
    shifts = np.zeros((n, 2))
    if "alignments3D/shift" in names:
        # Shifts are in pixels of the alignment (alignments3D/psize_A, which a binned
        # refinement makes larger than blob/psize_A); 0 there means "the image's".
        align_px = psizes
        if "alignments3D/psize_A" in names:
            given = table["alignments3D/psize_A"].astype(np.float64)
            align_px = np.where(given > 0, given, psizes)
        shifts = table["alignments3D/shift"].astype(np.float64).reshape(n, 2) * align_px[:, None]
    split = np.full(n, -1, dtype=np.int8)
    if "alignments3D/split" in names:
        s = table["alignments3D/split"].astype(np.int64)
        split[s == 0], split[s == 1] = 0, 1
    group = (table["ctf/exp_group_id"].astype(np.int64) if "ctf/exp_group_id" in names
             else np.ones(n, dtype=np.int64))
    ps = ParticleSet(
        box=int(image_box[0]), pixel_size_A=float(psizes[0]), stack_paths=stack_paths,
        stack_id=stack_id, stack_index=table["blob/idx"].astype(np.int64), ctf=ctf,
        rotations=rotations, shifts_A=shifts, split=split,
        scale=field("alignments3D/alpha", np.ones(n)), optics_group=group,
        source_path=path, source_format="cs", image_box=image_box,
        image_pixel_size_A=psizes, _cs_table=table, _project_dir=project_dir)
    for message in notes:
        ps.note(message)
    return ps


def _with_fields(table: np.ndarray, fields: list[tuple]) -> np.ndarray:
    """Copy of ``table`` with ``fields`` retyped in place or, when new, appended."""
    new = {f[0]: f for f in fields}
    descr = [new.pop(d[0], d) for d in table.dtype.descr] + list(new.values())
    out = np.zeros(len(table), dtype=np.dtype(descr))
    for name in table.dtype.names:
        out[name] = table[name]
    return out


def _fresh_table(ps: ParticleSet) -> np.ndarray:
    """A new CryoSPARC particle array from metadata read elsewhere (STAR): the blob/,
    ctf/ and alignments3D/ slots with CryoSPARC's field names and types.  Higher-order
    aberrations are zero and ctf/scale 1, CryoSPARC's defaults; blob/sign is 1 because
    the stacks hold RELION-convention images (protein white)."""
    n, ctf = len(ps), ps.ctf
    width = max(len(p.encode()) for p in ps.stack_paths)
    dtype = ([("uid", "<u8"), ("blob/path", f"S{width}"), ("blob/idx", "<u4"),
              ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"), ("blob/sign", "<f4"),
              ("blob/import_sig", "<u8"), ("ctf/type", f"S{len(_CTF_TYPE)}"),
              ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
              ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
              ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
              ("ctf/scale", "<f4"), ("ctf/scale_const", "<f4"), ("ctf/shift_A", "<f4", (2,)),
              ("ctf/tilt_A", "<f4", (2,)), ("ctf/trefoil_A", "<f4", (2,)),
              ("ctf/tetra_A", "<f4", (4,)), ("ctf/anisomag", "<f4", (4,)),
              ("ctf/bfactor", "<f4")]
             + _ALIGN_FIELDS + [f[:2] for f in _ALIGN_EXTRA])
    out = np.zeros(n, dtype=dtype)
    # CryoSPARC wants unique 64-bit uids; derive them from the source so reruns agree.
    rng = np.random.default_rng(zlib.crc32(ps.source_path.encode()))
    uid = rng.integers(1, 2 ** 63 - 1, size=n, dtype=np.int64, endpoint=True)
    while len(np.unique(uid)) < n:  # practically never; keep uids unique regardless
        uid = rng.integers(1, 2 ** 63 - 1, size=n, dtype=np.int64, endpoint=True)
    out["uid"] = uid.astype(np.uint64)
    out["blob/path"] = np.array([p.encode() for p in ps.stack_paths])[ps.stack_id]
    out["blob/idx"] = ps.stack_index
    out["blob/shape"] = ps.image_box[:, None]
    out["blob/psize_A"] = ps.image_pixel_size_A
    out["blob/sign"] = 1.0
    out["ctf/type"] = _CTF_TYPE
    out["ctf/exp_group_id"] = np.clip(ps.optics_group, 0, None)
    for name, value in (("ctf/accel_kv", ctf.voltage_kV), ("ctf/cs_mm", ctf.cs_mm),
                        ("ctf/amp_contrast", ctf.amplitude_contrast),
                        ("ctf/df1_A", ctf.defocus_u_A), ("ctf/df2_A", ctf.defocus_v_A),
                        ("ctf/df_angle_rad", np.radians(ctf.defocus_angle_deg)),
                        ("ctf/phase_shift_rad", np.radians(ctf.phase_shift_deg)),
                        ("ctf/bfactor", ctf.bfactor_A2)):
        out[name] = np.broadcast_to(value, (n,))
    out["ctf/scale"] = 1.0
    _set_optics_aberrations(out, ps)
    for name, _, value in _ALIGN_EXTRA:
        out[name] = value
    return out


def _set_optics_aberrations(table: np.ndarray, ps: ParticleSet) -> None:
    """A STAR input's per-optics-group beam tilt and magnification matrix (as read, or as
    refined) into the fresh table's CryoSPARC fields: ctf/tilt_A = Cs · sin(tilt) in Å
    (x, y), and ctf/anisomag = M − I, row-major (CryoSPARC keeps the matrix less the
    identity).  Trefoil and the even terms stay in rlnOddZernike / rlnEvenZernike only:
    ctf/trefoil_A and ctf/tetra_A are left at zero."""
    optics = ps._star_optics
    if optics is None:
        return
    from mpirefine.physics.anisomag import MAG_COLUMNS

    groups = np.asarray(ps.optics_group)
    for _, row in optics.iterrows():
        rows = groups == int(row["rlnOpticsGroup"])
        if not rows.any():
            continue
        if "rlnBeamTiltX" in optics.columns and "rlnBeamTiltY" in optics.columns:
            cs_A = np.broadcast_to(ps.ctf.cs_mm, groups.shape)[rows, None] * 1e7
            tilt = 1e-3 * np.array([float(row["rlnBeamTiltX"]), float(row["rlnBeamTiltY"])])
            table["ctf/tilt_A"][rows] = cs_A * np.sin(tilt)[None]
        if all(c in optics.columns for c in MAG_COLUMNS):
            m = np.array([float(row[c]) for c in MAG_COLUMNS])
            table["ctf/anisomag"][rows] = m - np.array([1.0, 0.0, 0.0, 1.0])


def _set_defocus(table: np.ndarray, ctf) -> None:
    """The particles' defocus (U, V, angle: refined by --optimize-defocus, or as read)
    into a kept table's ctf/df1_A, ctf/df2_A and ctf/df_angle_rad."""
    n = len(table)
    for name, value in (("ctf/df1_A", ctf.defocus_u_A), ("ctf/df2_A", ctf.defocus_v_A),
                        ("ctf/df_angle_rad", np.radians(ctf.defocus_angle_deg))):
        if name in table.dtype.names:
            table[name] = np.broadcast_to(value, (n,))


def _portable_blob_paths(ps: ParticleSet, table: np.ndarray, out_path: str) -> np.ndarray:
    """blob/path bytes: kept where they still resolve from the output's location, else absolute."""
    raw = _blob_paths(table)
    original = table["blob/path"]
    if original.dtype.kind != "S":
        original = np.char.encode(original.astype(str), "utf-8")
    out = original.astype(object)
    folders = _search_folders(out_path, ps._project_dir)
    uniques, codes = np.unique(raw, return_inverse=True)
    for name, rows in zip(uniques, group_rows(codes)):
        resolved = ps.stack_paths[ps.stack_id[rows[0]]]
        if portable_name(str(name), resolved, folders) != name:
            out[rows] = resolved.encode()
    return np.array(list(out), dtype=bytes)


def write_cs(path: str | os.PathLike, particle_set: ParticleSet,
             rotations: np.ndarray | None, shifts_A: np.ndarray, split: np.ndarray,
             scale: np.ndarray) -> None:
    """Write a CryoSPARC .cs file with updated poses, shifts (px), halves and scales.

    A .cs input keeps all its fields (alignments3D/* added where missing), its defocus
    taken from ``particle_set.ctf`` (which holds refined values); a STAR input
    gets a fresh array (uid, blob/*, ctf/*, alignments3D/*, see :func:`_fresh_table`),
    each particle with its own blob/shape and blob/psize_A.  Shifts are written in
    pixels of the particle's image, alignments3D/psize_A.  rotations: (n, 3, 3) RELION
    matrices or None (keep input poses).
    """
    ps, path = particle_set, os.fspath(path)
    n = len(ps)
    if ps._cs_table is not None:
        # A table with an alignments3D slot keeps its fields (and gets ours where
        # missing); one without (an extraction's) gets the whole slot CryoSPARC writes.
        have = ps._cs_table.dtype.names
        extra = ([] if any(f.startswith("alignments3D/") for f in have)
                 else [f for f in _ALIGN_EXTRA if f[0] not in have])
        table = _with_fields(ps._cs_table, [f for f in _ALIGN_FIELDS if f[0] not in have]
                             + [f[:2] for f in extra])
        for name, _, value in extra:
            table[name] = value
        paths = _portable_blob_paths(ps, table, path)
        if paths.dtype.itemsize > table.dtype["blob/path"].itemsize:
            table = _with_fields(table, [("blob/path", paths.dtype.str)])
        table["blob/path"] = paths
        _set_defocus(table, ps.ctf)
    else:
        table = _fresh_table(ps)
    rotations = ps.rotations if rotations is None else rotations
    if rotations is not None:
        table["alignments3D/pose"] = matrix_to_rotvec(np.asarray(rotations).reshape(n, 3, 3))
    # shifts in pixels of each particle's own image, which alignments3D/psize_A states
    psize = ps.image_pixel_size_A
    table["alignments3D/shift"] = np.asarray(shifts_A, dtype=np.float64).reshape(n, 2) / psize[:, None]
    table["alignments3D/psize_A"] = psize
    split = np.asarray(split).reshape(n)
    table["alignments3D/split"] = np.where(split >= 0, split, _UNASSIGNED)
    table["alignments3D/alpha"] = np.asarray(scale, dtype=np.float64).reshape(n)

    # A file object stops np.save from appending '.npy' to the name.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, table, allow_pickle=False)
