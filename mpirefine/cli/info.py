"""Describe a particle file or a map before refining it.

`mpirefine info particles.star [--ranks N]` (RELION .star 3.0–5 or CryoSPARC .cs)
prints the particle count, the reference box and pixel size, the optics groups (each
with its own box and pixel size, and what refinement resamples it to), CTF ranges,
whether poses, a half-set split and per-particle scales are present, the stacks the
file refers to (missing ones included), notes (e.g. a stack header whose pixel size
the metadata overrides), any problem a refinement would stop on, and the memory plan of
a refinement on N ranks: each rank's peak in the search, insertion, symmetrisation and
reconstruction, as RAM on a NumPy rank and as GPU memory on a GPU rank, what makes up
the peak, and with --gpu-memory the image batch a GPU of that much free memory would
take (docs/performance.md, "Memory").  `mpirefine info map.mrc` prints a map's or
stack's box, pixel size and min/max/mean.  --json prints JSON.
"""

from __future__ import annotations

import json
import math
import os

MAP_EXTENSIONS = (".mrc", ".mrcs", ".map", ".st", ".rec")
#: images read for the statistics of an image stack (volumes are always read whole)
STACK_STATS_IMAGES = 1000
#: stacks listed in the table (--json lists all)
STACKS_SHOWN = 8


def add_args(parser):
    parser.add_argument("path", metavar="FILE",
                        help="particles (.star, .cs) or a map / stack (.mrc, .mrcs, .map)")
    parser.add_argument("--ranks", type=int, default=2, metavar="N",
                        help="MPI ranks of the planned refinement, for the memory plan [2]")
    parser.add_argument("--image-batch-size", type=int, default=None, metavar="N",
                        help="images per rank at once, as in `refine` [256; with "
                             "--gpu-memory the batch such a GPU would take]")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                        help="plan for GPU ranks with this much free GPU memory each (GiB): "
                             "the image batch `refine` would pick there")
    parser.add_argument("--symmetry", default="C1",
                        help="point group the refinement enforces, as in `refine` [C1]")
    parser.add_argument("--project-dir", default=None,
                        help="folder that relative stack paths are resolved against")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args) -> int:
    import logging

    from mpirefine.errors import InputError

    # notes about the input are printed in the table, not logged as well
    logging.getLogger("mpirefine.io").setLevel(logging.ERROR)
    if args.ranks < 1:
        raise InputError(f"--ranks must be >= 1, got {args.ranks}")
    if args.image_batch_size is not None and args.image_batch_size < 1:
        raise InputError(f"--image-batch-size must be >= 1, got {args.image_batch_size}")
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise InputError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory}")
    from mpirefine.geometry.symmetry import group_order

    try:
        order = group_order(args.symmetry)
    except ValueError as exc:
        raise InputError(f"--symmetry {args.symmetry}: {exc}") from exc
    ext = os.path.splitext(args.path)[1].lower()
    if ext in (".star", ".cs"):
        info = describe_particles(args.path, args.project_dir, args.ranks, args.image_batch_size,
                                  symmetry_order=order, gpu_memory_GiB=args.gpu_memory)
        text = format_particles(info)
    elif ext in MAP_EXTENSIONS:
        info = describe_map(args.path)
        text = format_map(info)
    else:
        raise InputError(f"{args.path!r}: unknown extension {ext or '(none)'!r}; give particles "
                         "(.star, .cs) or a map (.mrc, .mrcs, .map)")
    print(json.dumps(info, indent=2) if args.json else text)
    return 0


# ----------------------------------------------------------------------------- maps

def describe_map(path: str) -> dict:
    """Box, pixel size and value statistics of an MRC map, image or stack."""
    import numpy as np

    from mpirefine.io import open_stack, stack_info

    header = stack_info(path)
    ext = os.path.splitext(path)[1].lower()
    cubic = header.n == header.ny == header.nx
    kind = "image stack" if ext == ".mrcs" or not cubic else "volume"
    kind = "image" if header.n == 1 else kind
    count = header.n if kind == "volume" else min(header.n, STACK_STATS_IMAGES)
    lo, hi, total, total2, bad = math.inf, -math.inf, 0.0, 0.0, 0
    with open_stack(path) as stack:
        for start in range(0, count, 64):
            block = stack.read(np.arange(start, min(count, start + 64))).astype(np.float64)
            finite = np.isfinite(block)
            bad += int(block.size - finite.sum())
            values = block[finite]
            if values.size:
                lo, hi = min(lo, values.min()), max(hi, values.max())
                total, total2 = total + values.sum(), total2 + (values * values).sum()
    voxels = count * header.ny * header.nx - bad
    mean = total / max(voxels, 1)
    px = header.pixel_size_A
    return {
        "kind": kind, "path": os.path.abspath(path), "mode": header.mode,
        "shape_zyx": [header.n, header.ny, header.nx], "box_px": header.nx,
        "pixel_size_A": px or None, "box_A": header.nx * px if px else None,
        "statistics_over": f"first {count} images" if count < header.n else "all",
        "min": float(lo), "max": float(hi), "mean": float(mean),
        "std": float(math.sqrt(max(total2 / max(voxels, 1) - mean * mean, 0.0))),
        "non_finite_values": bad,
    }


def format_map(info: dict) -> str:
    px = info["pixel_size_A"]
    z, y, x = info["shape_zyx"]
    shape = f"{z} x {y} x {x} (z, y, x)" if info["kind"] == "volume" else f"{z} of {y} x {x} px"
    rows = [("file", info["path"]), ("kind", f"{info['kind']} (MRC mode {info['mode']})"),
            ("shape", shape),
            ("pixel size", f"{px:.4f} Å (box {info['box_A']:.1f} Å, Nyquist {2 * px:.2f} Å)"
             if px else "none in the header"),
            ("values", f"min {info['min']:.4g}  max {info['max']:.4g}  mean {info['mean']:.4g}  "
                       f"std {info['std']:.4g}  ({info['statistics_over']})")]
    if info["non_finite_values"]:
        rows.append(("problem", f"{info['non_finite_values']} NaN/Inf values"))
    return _table(rows)


# ------------------------------------------------------------------------ particles

def _spread(values, scale: float = 1.0) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=np.float64) * scale
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def _stack_rows(ps) -> tuple[list[dict], list[str]]:
    """One dict per stack (path, exists, images, header facts) and the problems found.

    Also fills what the stack headers tell (boxes the metadata left out) and records a
    header pixel size that disagrees with the metadata as a note (the metadata wins)."""
    from mpirefine.io.particles import check_stacks, stack_usage

    counts, _ = stack_usage(ps)
    failed: dict[int, str] = {}
    headers = check_stacks(ps, failed)
    rows, problems = [], []
    for sid, path in enumerate(ps.stack_paths):
        row = {"path": path, "exists": os.path.isfile(path), "images_used": int(counts[sid])}
        if sid in headers:
            header = headers[sid]
            row.update(images_in_file=header.n, shape=[header.ny, header.nx],
                       pixel_size_A=header.pixel_size_A or None, mode=header.mode)
        if sid in failed:
            row["problem"] = failed[sid]
            problems.append(failed[sid])
        rows.append(row)
    missing = [r["path"] for r in rows if not r["exists"]]
    if missing:
        problems.insert(0, f"{len(missing)} of {len(rows)} stacks not found (first: "
                           f"{missing[0]}); run from the project folder or pass --project-dir")
    return rows, problems


def _present(ps, star_labels, cs_fields) -> bool:
    if ps._star_particles is not None:
        return any(label in ps._star_particles.columns for label in star_labels)
    names = ps._cs_table.dtype.names if ps._cs_table is not None else ()
    return any(name in names for name in cs_fields)


def describe_particles(path: str, project_dir: str | None = None, n_ranks: int = 2,
                       image_batch_size: int | None = None, symmetry_order: int = 1,
                       gpu_memory_GiB: float | None = None) -> dict:
    """Everything ``mpirefine info`` reports about a particle file, as a JSON-ready dict.

    The memory plan (``memory``, :func:`mpirefine.report.memory.memory_plan`) is for
    ``image_batch_size`` images per rank (default 256; with ``gpu_memory_GiB`` the batch
    a GPU with that much free memory would take, ``memory["gpu"]``)."""
    import numpy as np

    from mpirefine.errors import InputError
    from mpirefine.io import read_particles
    from mpirefine.io.formats import resampling_steps
    from mpirefine.io.particles import check_duplicates
    from mpirefine.report.memory import (
        CPU_IMAGE_BATCH,
        GiB,
        choose_gpu_image_batch,
        memory_plan,
        metadata_bytes,
    )

    ps = read_particles(path, project_dir=project_dir, require_stacks=False)
    stacks, problems = _stack_rows(ps)
    if not ps.box:
        ps.box = next((r["shape"][1] for r in stacks if "shape" in r), 0)
    try:
        check_duplicates(ps)
    except InputError as exc:
        problems.append(str(exc))
    n, ctf, px = len(ps), ps.ctf, ps.pixel_size_A
    if not px > 0:
        problems.append(next((note for note in ps.notes if "no pixel size" in note),
                             f"{ps.source_path} gives no pixel size"))

    def per_particle(v):
        return np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))

    from mpirefine.physics.aberrations import (
        SPHERICAL_TERM,
        TETRAFOIL_TERMS,
        input_even_aberrations,
        input_odd_aberrations,
        zernike_to_spherical,
        zernike_to_tilt,
    )
    from mpirefine.physics.anisomag import input_mag_matrices
    from mpirefine.physics.ctf import electron_wavelength_A

    odd = input_odd_aberrations(ps)
    even = input_even_aberrations(ps)
    mags = input_mag_matrices(ps)
    groups = []
    for g in ps.groups():
        rows = g["rows"]
        group = {"group": g["group"], "n_particles": int(rows.size),
                 **{key: float(np.median(per_particle(v)[rows])) for key, v in (
                     ("voltage_kV", ctf.voltage_kV), ("cs_mm", ctf.cs_mm),
                     ("amplitude_contrast", ctf.amplitude_contrast))},
                 "box_px": g["box"] or None, "pixel_size_A": g["pixel_size_A"] or None}
        if not g["on_reference_grid"] and ps.box and px > 0 and g["box"] and g["pixel_size_A"]:
            group["resampled_to"] = {"padded_box_px": g["padded_box"],
                                     "box_px": g["resampled_box"],
                                     "pixel_size_A": g["effective_pixel_size_A"],
                                     "steps": resampling_steps(g, ps.box)}
        if g["group"] in odd:          # beam tilt and trefoil the optics table carries
            tx, ty, rest = zernike_to_tilt(odd[g["group"]], group["cs_mm"],
                                           float(electron_wavelength_A(group["voltage_kV"])))
            group["aberrations"] = {"beam_tilt_mrad": [tx, ty],
                                    "trefoil": [float(rest[2]), float(rest[5])],
                                    "odd_zernike": [float(v) for v in odd[g["group"]]]}
        if g["group"] in even:         # rlnEvenZernike: added to the CTF's γ
            c = even[g["group"]]
            group["even_aberrations"] = {
                "delta_cs_mm": float(zernike_to_spherical(
                    c[SPHERICAL_TERM], float(electron_wavelength_A(group["voltage_kV"])))),
                "tetrafoil": [float(c[t]) for t in TETRAFOIL_TERMS],
                "even_zernike": [float(v) for v in c]}
        if g["group"] in mags:         # rlnMagMat00..11: images undistorted as they are read
            m = mags[g["group"]]
            stretch = np.linalg.svd(m, compute_uv=False)
            group["mag_matrix"] = {"matrix": m.tolist(),
                                   "anisotropy_percent": float(100 * (stretch[0] / stretch[1] - 1))}
        groups.append(group)
    u, v = per_particle(ctf.defocus_u_A), per_particle(ctf.defocus_v_A)
    split = {"present": bool(np.any(ps.split >= 0)), "half_A": int(np.sum(ps.split == 0)),
             "half_B": int(np.sum(ps.split == 1)), "unassigned": int(np.sum(ps.split < 0))}
    scale = {"present": _present(ps, ("rlnCtfScalefactor",), ("alignments3D/alpha",)),
             **_spread(ps.scale)}
    if ps.source_format == "cs":
        fmt = "CryoSPARC .cs"
    else:
        fmt = "RELION STAR 3.0 (one table)" if ps._star_legacy else "RELION STAR 3.1+ (optics table)"
    info = {
        "kind": "particles", "path": ps.source_path, "format": fmt, "n_particles": n,
        "box_px": int(ps.box) or None, "pixel_size_A": px or None,
        "box_A": ps.box * px if ps.box and px > 0 else None,
        "nyquist_A": 2 * px if px > 0 else None,
        "mixed_grids": not ps.uniform, "optics_groups": groups,
        "ctf": {"defocus_u_um": _spread(u, 1e-4), "defocus_v_um": _spread(v, 1e-4),
                "astigmatism_um": _spread(np.abs(u - v), 1e-4),
                "voltage_kV": _spread(per_particle(ctf.voltage_kV)),
                "cs_mm": _spread(per_particle(ctf.cs_mm)),
                "amplitude_contrast": _spread(per_particle(ctf.amplitude_contrast)),
                "phase_shift_deg": _spread(per_particle(ctf.phase_shift_deg))},
        "poses": ps.rotations is not None,
        "shifts": _present(ps, ("rlnOriginXAngst", "rlnOriginX"), ("alignments3D/shift",)),
        "split": split, "scale": scale,
        "stacks": {"count": len(stacks), "found": sum(r["exists"] for r in stacks),
                   "missing": sum(not r["exists"] for r in stacks), "list": stacks},
        "notes": [note for note in ps.notes if note not in problems], "problems": problems,
    }
    if ps.box:
        gpu = None
        if gpu_memory_GiB is not None:
            gpu = choose_gpu_image_batch(ps.box, n_ranks, gpu_memory_GiB * GiB, symmetry_order)
        batch = image_batch_size or (gpu["image_batch_size"] if gpu else CPU_IMAGE_BATCH)
        info["memory"] = memory_plan(ps.box, n, n_ranks, batch, metadata_bytes(ps),
                                     symmetry_order)
        if gpu is not None:
            info["memory"]["gpu"] = dict(gpu, free_GiB=gpu_memory_GiB)
    return info


def _fmt_spread(s: dict, digits: int = 2, unit: str = "") -> str:
    if abs(s["max"] - s["min"]) <= 1e-9 * max(abs(s["max"]), 1.0):
        return f"{s['min']:.{digits}f}{unit}"
    return (f"{s['min']:.{digits}f} / {s['median']:.{digits}f} / {s['max']:.{digits}f}{unit}"
            "  (min / median / max)")


def format_particles(info: dict) -> str:
    from mpirefine.report.memory import format_memory

    ctf, split, scale, stacks = info["ctf"], info["split"], info["scale"], info["stacks"]
    px, box = info["pixel_size_A"], info["box_px"]
    pixel = f"{px:.4f} Å/px" if px else "no pixel size"
    if box and px:
        size = f"{box} px, {pixel} (box {info['box_A']:.1f} Å, Nyquist {info['nyquist_A']:.2f} Å)"
    else:
        size = f"{box} px, {pixel}" if box else f"unknown (no stack found), {pixel}"
    if info["mixed_grids"]:
        size += "  reference grid: the first optics group's; the others are resampled to it"
    rows = [("file", info["path"]), ("format", info["format"]),
            ("particles", f"{info['n_particles']:,}"), ("box", size)]
    for i, g in enumerate(info["optics_groups"]):
        grid = (f"{g['box_px'] or '?'} px, "
                + (f"{g['pixel_size_A']:.4f} Å/px" if g["pixel_size_A"] else "? Å/px"))
        if "resampled_to" in g:
            grid += f" ({g['resampled_to']['steps']})"
        rows.append(("optics groups" if i == 0 else "",
                     f"group {g['group']}: {g['n_particles']:,} particles, {grid}, "
                     f"{g['voltage_kV']:g} kV, Cs {g['cs_mm']:g} mm, amplitude contrast "
                     f"{g['amplitude_contrast']:g}"))
        if "aberrations" in g:
            a = g["aberrations"]
            rows.append(("", f"  beam tilt ({a['beam_tilt_mrad'][0]:+.3f}, "
                             f"{a['beam_tilt_mrad'][1]:+.3f}) mrad, trefoil ({a['trefoil'][0]:+.1f}, "
                             f"{a['trefoil'][1]:+.1f}) rad·Å³ (applied by refine and reconstruct)"))
        if "even_aberrations" in g:
            e = g["even_aberrations"]
            rows.append(("", f"  even aberrations: Cs change {e['delta_cs_mm']:+.3f} mm, tetrafoil "
                             f"({e['tetrafoil'][0]:+.1f}, {e['tetrafoil'][1]:+.1f}) rad·Å⁴ "
                             "(rlnEvenZernike, applied to the CTF by refine and reconstruct)"))
        if "mag_matrix" in g:
            m = g["mag_matrix"]
            matrix = ", ".join(f"{v:.4f}" for row in m["matrix"] for v in row)
            rows.append(("", f"  magnification matrix ({matrix}), "
                             f"anisotropy {m['anisotropy_percent']:.2f} % (rlnMagMat00..11, "
                             "applied to the images by refine and reconstruct)"))
    rows += [("defocus U", _fmt_spread(ctf["defocus_u_um"], 3, " µm")),
             ("defocus V", _fmt_spread(ctf["defocus_v_um"], 3, " µm")),
             ("astigmatism", _fmt_spread(ctf["astigmatism_um"], 3, " µm") + "  |U − V|"),
             ("voltage", _fmt_spread(ctf["voltage_kV"], 0, " kV")),
             ("Cs", _fmt_spread(ctf["cs_mm"], 2, " mm")),
             ("amp. contrast", _fmt_spread(ctf["amplitude_contrast"], 3)),
             ("phase shift", _fmt_spread(ctf["phase_shift_deg"], 1, "°")),
             ("poses", ("angles present" if info["poses"] else "none (refine searches globally)")
              + ("; shifts present" if info["shifts"] else "")),
             ("half sets", f"A {split['half_A']:,}, B {split['half_B']:,}"
              + (f", unassigned {split['unassigned']:,}" if split["unassigned"] else "")
              if split["present"] else "none (refine splits at random, seeded)"),
             ("scale", f"present: {_fmt_spread(scale, 3)}" if scale["present"]
              else "none (all 1)")]
    rows.append(("stacks", f"{stacks['count']} referenced, {stacks['found']} found, "
                           f"{stacks['missing']} missing"))
    for r in stacks["list"][:STACKS_SHOWN]:
        if not r["exists"]:
            state = "MISSING"
        elif "problem" in r:
            state = "PROBLEM (below)"
        elif "images_in_file" in r:
            state = (f"{r['images_used']:,} of {r['images_in_file']:,} images used, "
                     f"mode {r['mode']}")
        else:
            state = "not used"
        rows.append(("", f"{r['path']}  {state}"))
    if stacks["count"] > STACKS_SHOWN:
        rows.append(("", f"... and {stacks['count'] - STACKS_SHOWN} more (--json lists all)"))
    for i, note in enumerate(info["notes"]):
        rows.append(("notes" if i == 0 else "", note))
    rows.append(("problems", "none found" if not info["problems"] else info["problems"][0]))
    rows += [("", p) for p in info["problems"][1:]]
    text = _table(rows)
    if "memory" in info:
        text += "\n\n" + format_memory(info["memory"], info["memory"].get("gpu"))
        if "gpu" not in info["memory"]:
            text += ("\n(--gpu-memory GiB: the plan and image batch of GPU ranks with that "
                     "much free memory)")
    return text


def _table(rows) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
