"""report.html: one self-contained page describing a refinement's output folder.

The page embeds its figures as base64 PNG data URIs and carries its own CSS, so it
reads offline, mailed or copied anywhere.  It shows the resolution, the figures of
:mod:`mpirefine.report.plots` (slices and projections of the map, the conical FSCs and
their cFAR, the views and their SCF among them), the iterations, the time each rank
spent on each task and every parameter (those changed from their defaults in bold).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import logging
import os

import numpy as np

from mpirefine.io.atomic import write_text_atomic

log = logging.getLogger("mpirefine")

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 4px; } h2 { font-size: 1.15em; margin-top: 2em;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; margin: 0 0 16px; font-size: 0.9em; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #dde; border-radius: 6px; padding: 10px 14px; min-width: 130px;
        background: #fafbff; }
.card .v { font-size: 1.35em; font-weight: 600; } .card .k { color: #666; font-size: 0.8em; }
.figs { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid #eee; border-radius: 6px; padding: 8px; }
figure img { width: 100%; height: auto; }
figure.wide { grid-column: 1 / -1; }
figure.wide img { max-width: 1000px; display: block; margin: 0 auto; }
figcaption { font-size: 0.85em; color: #555; margin-top: 4px; }
table { border-collapse: collapse; font-size: 0.88em; margin: 6px 0; }
th, td { border-bottom: 1px solid #eee; padding: 3px 10px; text-align: right; }
th { background: #f3f4f7; } td.l, th.l { text-align: left; }
.params { columns: 2 360px; font-size: 0.88em; }
.params div { break-inside: avoid; padding: 1px 0; } .params .changed { font-weight: 600; }
.warn { color: #a94442; font-weight: 600; }
.note { color: #8a6d3b; background: #fcf8e3; padding: 6px 10px; border-radius: 4px; }
footer { color: #888; font-size: 0.8em; margin-top: 32px; }
"""

# name → (title, caption); the order of the figures on the page
FIGURES = {
    "map_slices": ("The map by eye", "Central slices (top) and projections (sums, bottom) of "
                   "the sharpened map (map_sharp.mrc, else map.mrc) along Z, Y and X, grey "
                   "levels from the 1st to the 99.9th percentile of each panel; orange: the "
                   "FSC mask's outline at 0.5 (mask_fsc.mrc; over a projection, the outline "
                   "of its shadow)."),
    "fsc": ("Fourier shell correlation", "Half-map FSC per mask; dotted lines mark where "
            "each curve crosses 0.143 (the gold-standard resolution)."),
    "guinier": ("Guinier plot", "ln of the mean |F|² per shell against 1/d², of map.mrc and "
                "of the FSC-weighted average of the half maps that the B-factor is fitted on "
                "(as relion_postprocess does); the line is the fit over the shaded range."),
    "viewing_directions": ("Viewing directions", "Where the beam points in the map's frame, "
                           "per particle; empty regions are views the data lack."),
    "conical_fsc_map": ("Resolution by direction (conical FSC)", "FSC between the half maps "
                        "(times mask_fsc.mrc where present) within a ±20° double cone around each Fourier "
                        "direction; colour: the area under that cone's FSC relative to the "
                        "largest, on the viewing directions' axes. A Fourier direction is "
                        "measured by the views whose beam is perpendicular to it, so a dark "
                        "spot means few views on the great circle 90° away from it."),
    "conical_fsc": ("Conical FSC curves", "The spread of the conical FSCs, the cones of lowest "
                    "and highest area and the FSC over all directions of the same masked half "
                    "maps; areas are taken from the origin to where that FSC crosses 0.143."),
    "iterations": ("Resolution per iteration", "GSFSC resolution after each iteration; "
                   "below, the minibatch size and the iteration's wall time."),
    "scale": ("Per-particle scale", "Distribution of the per-particle scale factors."),
    "noise_model": ("Noise model", "Final noise variance σ² per frequency shell."),
    "ctf_odd_phase": ("Odd aberrations per optics group", "Left: the phase of Σ c·conj(P)·X "
                      "per frequency pixel over the group's particles at their poses (c the "
                      "CTF, P the reference projection, X the image; what beam tilt and "
                      "trefoil shift), where the last --optimize-ctf-global fit weighted it; "
                      "right: the fitted model's phase. Both wrapped to ±π."),
    "ctf_even_phase": ("Even aberrations per optics group", "Left: the even phase δ per "
                       "frequency pixel measured by the even fit (arg of A⁻¹b over the "
                       "group's particles at their poses, as relion_ctf_refine measures it) "
                       "where the fit weighted it; right: the fitted Zernike model (Cs error, "
                       "tetrafoil and the lower terms). Both wrapped to ±π."),
    "defocus_changes": ("Per-particle defocus changes", "How far --optimize-defocus moved each "
                        "particle's defocus (U and V together), over the whole run."),
}
#: figures drawn across the page's whole width
WIDE_FIGURES = ("map_slices",)
# name → what the figure is drawn from (said when it is missing)
SOURCES = {"map_slices": "map_sharp.mrc or map.mrc", "fsc": "fsc.csv", "guinier": "map.mrc",
           "iterations": "iterations in summary.json",
           "viewing_directions": "angles in particles.star or particles.cs",
           "conical_fsc_map": "map_half_A.mrc and map_half_B.mrc",
           "conical_fsc": "map_half_A.mrc and map_half_B.mrc",
           "scale": "scales in particles.star or particles.cs",
           "noise_model": "noise_sigma2 in summary.json",
           "ctf_odd_phase": "ctf_global_sums.npz", "ctf_even_phase": "ctf_even_sums.npz",
           "defocus_changes":
               "defocus_refinement in summary.json"}
#: CryoSPARC's readings of the orientation diagnostics
CFAR_ANISOTROPIC, SCF_STAR_ANISOTROPIC = 0.5, 0.81


def _load_summary(out_dir: str) -> dict:
    path = os.path.join(out_dir, "summary.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_poses(out_dir: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(rotations (N, 3, 3) RELION matrices or None, scales (N,) or None) from the
    output's particles.star, else particles.cs; the stacks need not be present."""
    star, cs = os.path.join(out_dir, "particles.star"), os.path.join(out_dir, "particles.cs")
    if os.path.isfile(star):
        import starfile

        from mpirefine.geometry.rotations import euler_to_matrix

        blocks = starfile.read(star, always_dict=True)
        table = blocks.get("particles", next(iter(blocks.values())))
        angles = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
        rotations = (euler_to_matrix(*(table[a].to_numpy(float) for a in angles))
                     if all(a in table.columns for a in angles) else None)
        scale = (table["rlnCtfScalefactor"].to_numpy(float)
                 if "rlnCtfScalefactor" in table.columns else None)
        return rotations, scale
    if os.path.isfile(cs):
        from mpirefine.geometry.rotations import rotvec_to_matrix

        table = np.load(cs, allow_pickle=False)
        names = table.dtype.names or ()
        rotations = (rotvec_to_matrix(table["alignments3D/pose"].astype(float))
                     if "alignments3D/pose" in names else None)
        scale = table["alignments3D/alpha"].astype(float) if "alignments3D/alpha" in names else None
        return rotations, scale
    return None, None


def final_resolution_A(summary: dict, out_dir: str) -> float | None:
    """The run's GSFSC resolution: from summary.json, else from fsc.csv's first curve."""
    for key in ("final_resolution_A", "resolution_A_0143", "resolution_A"):
        if isinstance(summary.get(key), (int, float)):
            return float(summary[key])
    path = os.path.join(out_dir, "fsc.csv")
    if os.path.isfile(path):
        from mpirefine.report.plots import crossing_frequency, read_fsc_csv

        freq, curves = read_fsc_csv(path)
        if curves:
            return 1.0 / crossing_frequency(freq, next(iter(curves.values())))
    return None


def guinier_fit(summary: dict) -> dict | None:
    """summary.json's Guinier fit (``guinier_fit``), else its bare ``bfactor_A2``, else None."""
    fit = summary.get("guinier_fit")
    if isinstance(fit, dict) and "bfactor_A2" in fit:
        return fit
    if isinstance(summary.get("bfactor_A2"), (int, float)):
        return {"bfactor_A2": summary["bfactor_A2"]}
    return None


def _map_for_slices(out_dir: str) -> str:
    for name in ("map_sharp.mrc", "map.mrc"):
        if os.path.isfile(os.path.join(out_dir, name)):
            return os.path.join(out_dir, name)
    return os.path.join(out_dir, "map_sharp.mrc")


def conical_fsc_of(out_dir: str):
    """The conical FSCs of the folder's half maps (masked by mask_fsc.mrc when it is there
    and fits), or None without both half maps; see :mod:`mpirefine.report.orientation`."""
    from mpirefine.io import read_volume
    from mpirefine.report.orientation import conical_fsc

    paths = [os.path.join(out_dir, f"map_half_{h}.mrc") for h in "AB"]
    if not all(os.path.isfile(p) for p in paths):
        return None
    (half_a, px), (half_b, _) = (read_volume(p) for p in paths)
    mask = None
    mask_path = os.path.join(out_dir, "mask_fsc.mrc")
    if os.path.isfile(mask_path):
        mask, _ = read_volume(mask_path)
        mask = mask if mask.shape == half_a.shape else None
    return conical_fsc(half_a, half_b, px or 1.0, mask=mask)


def orientation_metrics(cones, rotations, symmetry) -> dict:
    """cFAR and its cone summary from a ConicalFSC (or None), SCF and SCF* from the
    particles' RELION matrices (or None), as plain numbers for the page and JSON."""
    from mpirefine.report.orientation import (
        SCF_MAX_VIEWS,
        sampling_compensation_factor,
        scf_fourier_radius,
        symmetry_expanded,
    )

    metrics = {}
    if cones is not None:
        res = cones.resolution_A()
        metrics.update(cfar=cones.cfar, cone_half_angle_deg=cones.half_angle_deg,
                       n_cones=int(len(cones.areas)), cfar_limit_A=cones.cutoff_resolution_A,
                       conical_resolution_A=[float(res.min()), float(res.max())])
    if rotations is not None and len(rotations):
        views = symmetry_expanded(np.asarray(rotations)[:, 2, :], symmetry)
        scf, scf_star = sampling_compensation_factor(views)
        metrics.update(scf=scf, scf_star=scf_star, n_views=int(len(rotations)),
                       symmetry=symmetry or "C1",
                       scf_fourier_radius=scf_fourier_radius(min(len(views), SCF_MAX_VIEWS)))
    return metrics


def make_plots(out_dir: str, summary: dict, metrics: dict | None = None) -> tuple[dict, dict]:
    """Draw every figure the folder has data for into out_dir/plots/.

    Returns ({name: png path}, {name: why it is missing}).  A figure that fails is
    reported, never fatal: the report is written at the very end of a long job.
    ``metrics``, when given, receives the orientation diagnostics (cFAR, SCF, SCF*; see
    :func:`orientation_metrics`), which are also written to plots/orientation.json.
    """
    from mpirefine.report import plots

    plots_dir = os.path.join(out_dir, "plots")
    resolution = final_resolution_A(summary, out_dir)
    poses, cones = {}, {}
    metrics = {} if metrics is None else metrics

    def rotations_and_scale():
        if not poses:
            poses["r"], poses["s"] = read_poses(out_dir)
        return poses["r"], poses["s"]

    def conical():
        if not cones:
            cones["c"] = None                      # a failure is not retried
            cones["c"] = conical_fsc_of(out_dir)
        return cones["c"]

    makers = {
        "map_slices": lambda: plots.plot_map_slices(_map_for_slices(out_dir),
                                                    os.path.join(out_dir, "mask_fsc.mrc"),
                                                    plots_dir),
        "fsc": lambda: plots.plot_fsc(os.path.join(out_dir, "fsc.csv"), plots_dir),
        "guinier": lambda: plots.plot_guinier(os.path.join(out_dir, "map.mrc"), plots_dir,
                                              resolution, guinier_fit(summary),
                                              summary.get("guinier_curve")),
        "iterations": lambda: plots.plot_iterations(summary.get("iterations") or [], plots_dir),
        "viewing_directions": lambda: plots.plot_viewing_directions(rotations_and_scale()[0],
                                                                    plots_dir),
        "conical_fsc_map": lambda: plots.plot_conical_map(conical(), plots_dir),
        "conical_fsc": lambda: plots.plot_conical_fsc(conical(), plots_dir),
        "scale": lambda: plots.plot_scale_histogram(rotations_and_scale()[1], plots_dir),
        "noise_model": lambda: plots.plot_noise_model(summary.get("noise_sigma2"),
                                                      summary.get("box"),
                                                      summary.get("pixel_size_A"), plots_dir),
    }
    if summary.get("ctf_global"):      # figures of options that were on
        makers["ctf_odd_phase"] = lambda: plots.plot_ctf_odd_phase(
            os.path.join(out_dir, "ctf_global_sums.npz"), plots_dir)
    if summary.get("ctf_even"):
        makers["ctf_even_phase"] = lambda: plots.plot_ctf_even_phase(
            os.path.join(out_dir, "ctf_even_sums.npz"), plots_dir)
    if summary.get("defocus_refinement"):
        makers["defocus_changes"] = lambda: plots.plot_defocus_changes(
            summary["defocus_refinement"], plots_dir)
    made, missing = {}, {}
    for name, make in makers.items():
        try:
            path = make()
        except Exception as exc:  # noqa: BLE001 — one bad figure must not lose the report
            log.warning(f"report: the {name} figure failed: {type(exc).__name__}: {exc}")
            missing[name] = f"could not be drawn ({type(exc).__name__}: {exc})"
            continue
        if path is None:
            missing[name] = f"needs {SOURCES[name]}"
        else:
            made[name] = path
    try:
        symmetry = summary.get("symmetry") or (summary.get("config") or {}).get("symmetry")
        metrics.update(orientation_metrics(cones.get("c"), poses.get("r"), symmetry))
        if metrics:
            os.makedirs(plots_dir, exist_ok=True)
            write_text_atomic(os.path.join(plots_dir, "orientation.json"),
                              json.dumps(metrics, indent=1) + "\n")
    except Exception as exc:  # noqa: BLE001 — as for a figure
        log.warning(f"report: the orientation diagnostics failed: {type(exc).__name__}: {exc}")
    return made, missing


def _png_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _num(value, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    def cell(tag, k, v):
        return f"<{tag}{' class=l' if k < left else ''}>{v}</{tag}>"

    head = "".join(cell("th", k, html.escape(h)) for k, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", k, v) for k, v in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cards(summary: dict, resolution, metrics: dict | None = None) -> str:
    cards = [("GSFSC resolution (0.143)", f"{resolution:.2f} Å" if resolution else "–"),
             ("particles", _num(summary.get("n_particles", "–"))),
             ("box", f"{summary['box']} px" if "box" in summary else "–"),
             ("pixel size", f"{summary['pixel_size_A']:.3f} Å" if "pixel_size_A" in summary else "–"),
             ("iterations", str(len(summary.get("iterations") or [])) or "–"),
             ("ranks · backend", f"{summary.get('n_ranks', '–')} · {summary.get('backend', '–')}"),
             ("wall time", _duration(summary.get("wall_seconds")))]
    if isinstance(summary.get("bfactor_A2"), (int, float)):
        cards.insert(1, ("B-factor", f"{summary['bfactor_A2']:.0f} Å²"))
    if summary.get("ewald"):
        ewald = summary["ewald"]
        cards.append(("Ewald sphere correction",
                      f"{ewald['curvature']} · {ewald['particle_diameter_A']:.0f} Å disc"))
    metrics = metrics or {}
    if "cfar" in metrics:
        cards.append(("cFAR (orientation)", f"{metrics['cfar']:.2f}"))
    if "scf_star" in metrics:
        cards.append(("SCF* (views)", f"{metrics['scf_star']:.2f}"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{html.escape(v)}</div><div class="k">'
        f'{html.escape(k)}</div></div>' for k, v in cards) + "</div>"


def _fsc_table(out_dir: str) -> str:
    """Each fsc.csv curve's resolution at 0.143 and 0.5 (empty without fsc.csv)."""
    from mpirefine.report.plots import crossing_frequency, read_fsc_csv

    path = os.path.join(out_dir, "fsc.csv")
    if not os.path.isfile(path):
        return ""
    freq, curves = read_fsc_csv(path)
    rows = [[html.escape(name.replace("_", " ")),
             *(f"{1 / crossing_frequency(freq, c, t):.2f}" for t in (0.143, 0.5))]
            for name, c in curves.items()]
    return _table(["FSC curve (fsc.csv)", "at 0.143 (Å)", "at 0.5 (Å)"], rows)


def _aberrations_table(summary: dict) -> str:
    """Each optics group's fitted aberrations (--optimize-ctf-global), empty without any:
    beam tilt and trefoil (the last fit), Cs error and tetrafoil (the even fit), and the
    magnification matrix (--fit-anisomag)."""
    odd = summary.get("ctf_global") or {}
    even = summary.get("ctf_even") or {}
    mag = summary.get("ctf_anisomag") or {}
    groups = sorted({*odd, *even, *mag}, key=lambda g: int(g))
    if not groups:
        return ""
    rows = []
    for g in groups:
        o, e, m = odd.get(g), even.get(g), mag.get(g)
        rows.append([
            html.escape(str(g)),
            f"{o['beam_tilt_x_mrad']:+.3f}, {o['beam_tilt_y_mrad']:+.3f}" if o else "–",
            "{:+.1f}, {:+.1f}".format(*o["trefoil"]) if o else "–",
            f"{e['delta_cs_mm']:+.3f}" if e else "–",
            "{:+.1f}, {:+.1f}".format(*e["tetrafoil"]) if e else "–",
            (f"{m['anisotropy_percent']:+.3f} % at {m['anisotropy_angle_deg']:.0f}°; isotropic "
             f"{m['isotropic_percent']:+.3f} %") if m else "–",
            " ".join(f"{v:.5f}" for row in m["matrix"] for v in row) if m else "–"])
    return ("<h2>Aberrations per optics group</h2>"
            + _table(["optics group", "beam tilt x, y (mrad)", "trefoil (rad·Å³)",
                      "Cs error (mm)", "tetrafoil (rad·Å⁴)", "magnification anisotropy",
                      "rlnMagMat00 01 10 11"], rows, left=0))


def _iterations_table(iterations: list) -> str:
    rows = [[_num(r.get("iteration", k + 1)), _num(r.get("batch_size", "–")),
             "yes" if r.get("full_pass") else "no", _num(r.get("resolution_A", "–")),
             _num(r.get("alignment_resolution_A", "–")), _num(r.get("seconds", "–"), 1)]
            for k, r in enumerate(iterations)]
    return _table(["iteration", "batch", "all particles", "GSFSC (Å)", "alignment (Å)",
                   "seconds"], rows, left=0)


def _timings_table(timings: list) -> str:
    categories = []
    for t in timings:
        categories += [c for c in (t.get("seconds") or {}) if c not in categories]
    rows = []
    for t in timings:
        secs = t.get("seconds") or {}
        rows.append([_num(t.get("rank", "–"))] + [_num(secs.get(c, "–"), 1) for c in categories]
                    + [_num(round(t.get("bytes_communicated", 0) / 2 ** 20, 1), 1)])
    return _table(["rank"] + [f"{c} (s)" for c in categories] + ["sent (MiB)"], rows)


def _parameters(config: dict) -> str:
    from dataclasses import MISSING, fields

    from mpirefine.config import RefineConfig

    defaults = {f.name: f.default for f in fields(RefineConfig) if f.default is not MISSING}
    items = []
    for key, value in config.items():
        changed = key in defaults and value != defaults[key]
        items.append(f'<div class="{"changed" if changed else ""}">{html.escape(key)} = '
                     f'{html.escape(repr(value))}</div>')
    return ('<p class="sub">Bold: changed from the default.</p><div class="params">'
            + "".join(items) + "</div>")


def _orientation_notes(metrics: dict) -> dict:
    """Extra caption HTML for the orientation figures: the cFAR and SCF values and how to
    read them (CryoSPARC's thresholds)."""
    notes = {}
    if "cfar" in metrics:
        cfar = metrics["cfar"]
        lo, hi = metrics["conical_resolution_A"]
        verdict = (f'<span class="warn">below {CFAR_ANISOTROPIC}: the resolution is '
                   "anisotropic (CryoSPARC's reading), most often from preferred orientation"
                   "</span>" if cfar < CFAR_ANISOTROPIC else
                   f"at or above {CFAR_ANISOTROPIC}, where CryoSPARC sees no marked anisotropy")
        notes["conical_fsc_map"] = (
            f"<br><b>cFAR = {cfar:.2f}</b> (conical FSC area ratio: the smallest cone's area "
            f"is {100 * cfar:.0f} % of the largest; areas up to "
            f"{metrics['cfar_limit_A']:.2f} Å; {metrics['n_cones']} cones of "
            f"±{metrics['cone_half_angle_deg']:g}°, conical resolutions {lo:.2f}–{hi:.2f} Å). "
            f"About 1 means the same resolution in every direction; this value is {verdict}.")
    if "scf_star" in metrics:
        star = metrics["scf_star"]
        verdict = (f'<span class="warn">below {SCF_STAR_ANISOTROPIC}: the views sample Fourier '
                   "space unevenly</span>" if star < SCF_STAR_ANISOTROPIC else
                   f"at or above {SCF_STAR_ANISOTROPIC}, CryoSPARC's bound for even sampling")
        sym = metrics.get("symmetry") or "C1"
        notes["viewing_directions"] = (
            f"<br><b>SCF* = {star:.2f}</b> (SCF {metrics['scf']:.2f}; sampling compensation "
            f"factor of Baldwin &amp; Lyumkis 2020 from the {metrics['n_views']:,} views"
            f"{'' if sym.upper() == 'C1' else f', expanded by {html.escape(sym)}'}, on the "
            f"shell of radius {metrics['scf_fourier_radius']:g} Fourier pixels): 1 for "
            f"uniform views, lower when the views fill Fourier space unevenly; this value is "
            f"{verdict}.")
    return notes


def build_html(out_dir: str, summary: dict, made: dict, missing: dict,
               metrics: dict | None = None) -> str:
    """The page as a string (figures embedded); ``metrics``: make_plots's orientation
    diagnostics (cFAR, SCF) for the cards and captions."""
    from mpirefine import __version__
    from mpirefine.report.memory import human_bytes

    resolution = final_resolution_A(summary, out_dir)
    title = f"mpirefine {summary.get('command', 'refine')} — {os.path.basename(out_dir)}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="sub">{html.escape(os.path.abspath(out_dir))}</p>',
             _cards(summary, resolution, metrics), _fsc_table(out_dir), _aberrations_table(summary),
             "<h2>Figures</h2>",
             '<div class="figs">']
    notes = _orientation_notes(metrics or {})
    for name, (fig_title, caption) in FIGURES.items():
        if name in made:
            wide = ' class="wide"' if name in WIDE_FIGURES else ""
            parts.append(f'<figure id="{name}"{wide}><img alt="{html.escape(fig_title)}" '
                         f'src="{_png_uri(made[name])}"><figcaption><b>{html.escape(fig_title)}'
                         f"</b>. {html.escape(caption)}{notes.get(name, '')}</figcaption>"
                         "</figure>")
    parts.append("</div>")
    if missing:
        parts.append('<p class="note">Not shown: ' + "; ".join(
            f"{html.escape(FIGURES[k][0])} ({html.escape(v)})" for k, v in missing.items())
            + ".</p>")
    if summary.get("iterations"):
        parts += ["<h2>Iterations</h2>", _iterations_table(summary["iterations"])]
    if summary.get("timings_per_rank"):
        parts += ["<h2>Time per rank</h2>", _timings_table(summary["timings_per_rank"])]
    if summary.get("config"):
        parts += ["<h2>Parameters</h2>", _parameters(summary["config"])]
    files = sorted(f for f in os.listdir(out_dir)
                   if os.path.isfile(os.path.join(out_dir, f)) and not f.startswith("."))
    parts += ["<h2>Files</h2>", _table(["file", "size"], [
        [f'<a href="{html.escape(f)}">{html.escape(f)}</a>',
         human_bytes(os.path.getsize(os.path.join(out_dir, f)))] for f in files])]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts.append(f"<footer>Written by mpirefine {__version__} on {stamp}; regenerate with "
                 f"<code>mpirefine report {html.escape(out_dir)}</code>.</footer>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def write_report(out_dir: str) -> str:
    """Draw the figures into out_dir/plots/ and write out_dir/report.html; returns its path."""
    out_dir = os.path.abspath(out_dir)
    summary = _load_summary(out_dir)
    metrics = {}
    made, missing = make_plots(out_dir, summary, metrics)
    page = build_html(out_dir, summary, made, missing, metrics)
    path = os.path.join(out_dir, "report.html")
    write_text_atomic(path, page)
    return path
