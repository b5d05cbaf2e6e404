"""The report's figures, drawn from the files a refinement writes (PNG, Agg backend).

Each ``plot_*`` function reads what it needs, writes ``<plots_dir>/<name>.png`` and
returns its path, or returns None when its input is absent (an older run, a
``reconstruct`` folder).  Frequencies are in 1/Å, resolutions in Å.
"""

from __future__ import annotations

import os

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

FSC_THRESHOLD = 0.143
DPI = 110
WIDE = (7.5, 4.2)


def _save(fig, plots_dir: str, name: str) -> str:
    os.makedirs(plots_dir, exist_ok=True)
    path = os.path.join(plots_dir, f"{name}.png")
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


RESOLUTION_TICKS_A = (100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.8, 1.6, 1.5,
                      1.4, 1.3, 1.2, 1.1, 1.0)


def _resolution_axis(ax, power: int = 1) -> None:
    """A top axis labelled in Å over a bottom axis in 1/Å (power 1) or 1/Å² (power 2);
    call after the x limits are final."""
    lo, hi = ax.get_xlim()
    ticks = [r for r in RESOLUTION_TICKS_A if lo < r ** -power <= hi]
    # keep the labels apart: drop a tick closer than 6 % of the axis to the one kept before
    kept = []
    for r in ticks:
        if not kept or (r ** -power - kept[-1] ** -power) > 0.06 * (hi - lo):
            kept.append(r)
    top = ax.twiny()
    top.set_xlim(lo, hi)
    top.set_xticks([r ** -power for r in kept], [f"{r:g}" for r in kept])
    top.set_xlabel("resolution (Å)")


def read_fsc_csv(path: str) -> tuple[np.ndarray, dict]:
    """fsc.csv → (frequency_per_A (S,), {curve name: values (S,)}), curves in file order."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    table = np.atleast_2d(np.loadtxt(path, delimiter=",", skiprows=1))
    return table[:, 1], {name: table[:, k] for k, name in enumerate(header) if k >= 3}


def crossing_frequency(freq: np.ndarray, curve: np.ndarray, threshold: float = FSC_THRESHOLD):
    """Frequency (1/Å) where ``curve`` first falls below ``threshold`` (linear
    interpolation); the last frequency when it never does, and the first shell's (one
    over the box) when the curve is below it from the first shell on (no signal: the
    DC term alone always correlates), so its inverse is always a finite resolution."""
    if len(curve) > 1 and curve[1] < threshold:
        return float(freq[1])
    for s in range(2, len(curve)):
        if curve[s] < threshold:
            c0, c1 = curve[s - 1], curve[s]
            t = (c0 - threshold) / (c0 - c1) if c0 != c1 else 1.0
            return float(freq[s - 1] + t * (freq[s] - freq[s - 1]))
    return float(freq[-1])


def plot_fsc(fsc_csv: str, plots_dir: str) -> str | None:
    """Every FSC curve of fsc.csv, the 0.143 line and each curve's crossing marked."""
    if not os.path.isfile(fsc_csv):
        return None
    freq, curves = read_fsc_csv(fsc_csv)
    fig, ax = plt.subplots(figsize=WIDE)
    for name, curve in curves.items():
        f = crossing_frequency(freq, curve)
        line, = ax.plot(freq, curve, lw=1.6, label=f"{name.replace('_', ' ')}: {1 / f:.2f} Å")
        ax.axvline(f, color=line.get_color(), ls=":", lw=1)
    ax.axhline(FSC_THRESHOLD, color="0.3", ls="--", lw=1)
    ax.text(freq[-1], FSC_THRESHOLD + 0.02, "0.143", ha="right", va="bottom", color="0.3")
    ax.set(xlabel="spatial frequency (1/Å)", ylabel="FSC", ylim=(-0.1, 1.05),
           xlim=(0, freq[-1]))
    ax.grid(alpha=0.3)
    _resolution_axis(ax)
    ax.legend(loc="lower left", fontsize=9)
    return _save(fig, plots_dir, "fsc")


def shell_power(volume: np.ndarray) -> np.ndarray:
    """Mean |F|² per Fourier shell 0 .. n // 2 of an (n, n, n) map (shell = radius in
    cycles per box, rounded)."""
    n = volume.shape[0]
    power = np.abs(np.fft.rfftn(volume.astype(np.float64))) ** 2
    k = np.fft.fftfreq(n) * n
    kx = np.fft.rfftfreq(n) * n
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    shell = np.rint(radius).astype(np.int64).ravel()
    keep = shell <= n // 2
    sums = np.bincount(shell[keep], weights=power.ravel()[keep], minlength=n // 2 + 1)
    counts = np.bincount(shell[keep], minlength=n // 2 + 1)
    return sums / np.maximum(counts, 1)


#: a Guinier fit through fewer shells is not drawn (as sharpen.MIN_FIT_SHELLS)
MIN_FIT_SHELLS = 3


def plot_guinier(map_path: str, plots_dir: str, resolution_A: float | None = None,
                 fit: dict | None = None, curve: dict | None = None) -> str | None:
    """ln(shell-mean |F|²) of map.mrc against 1/d² (Å⁻²), with the B-factor's line.

    fit: summary.json's ``guinier_fit`` (bfactor_A2, low_resolution_A,
    high_resolution_A, n_shells) or just {"bfactor_A2": B}.  B is the blurring
    B-factor, F ∝ exp(-B / 4d²), so the line's slope is -B/2; its offset is fitted to
    the points in the fit range (10 Å, or 1.5 × the resolution when that is coarser,
    to the resolution, unless ``fit`` gives the range).  curve: summary.json's
    ``guinier_curve`` (the FSC-weighted average that the B-factor was fitted on,
    {"s2_per_A2": [...], "ln_power": [...]}); when given, it is drawn too and the line
    is placed on it.
    """
    from mpirefine.io import read_volume

    if not os.path.isfile(map_path):
        return None
    volume, px = read_volume(map_path)
    n = volume.shape[0]
    px = px or 1.0
    power = shell_power(volume)
    s2 = (np.arange(n // 2 + 1) / (n * px)) ** 2
    # map.mrc is filtered to zero beyond its resolution: leave those shells out
    good = (np.arange(n // 2 + 1) > 0) & (power > 1e-10 * power.max())
    fig, ax = plt.subplots(figsize=WIDE)
    ax.plot(s2[good], np.log(power[good]), ".-", ms=3, lw=1, label="map.mrc")
    if curve and curve.get("s2_per_A2") and curve.get("ln_power"):
        c_s2 = np.asarray(curve["s2_per_A2"], float)
        c_ln = np.asarray([np.nan if v is None else v for v in curve["ln_power"]], float)
        ok = np.isfinite(c_ln) & (c_s2 > 0)
        ax.plot(c_s2[ok], c_ln[ok], ".-", ms=3, lw=1, color="tab:green",
                label="FSC-weighted average (fitted)")
        s2, power, good = c_s2, np.exp(np.where(ok, c_ln, -np.inf)), ok
    fit = dict(fit or {})
    hi = float(fit.get("high_resolution_A") or resolution_A or 2 * px)
    lo = float(fit.get("low_resolution_A") or max(10.0, 1.5 * hi))
    bfactor = fit.get("bfactor_A2")
    in_range = good & (s2 >= 1 / lo ** 2) & (s2 <= 1 / hi ** 2)
    if isinstance(bfactor, (int, float)) and np.isfinite(bfactor):
        if fit.get("n_shells", MIN_FIT_SHELLS) < MIN_FIT_SHELLS or not in_range.any():
            ax.plot([], [], " ", label=f"no Guinier fit: too few shells in {lo:.1f}–{hi:.1f} Å")
        else:
            slope = -abs(float(bfactor)) / 2.0
            offset = float(np.mean(np.log(power[in_range]) - slope * s2[in_range]))
            x = np.array([1 / lo ** 2, 1 / hi ** 2])
            ax.plot(x, offset + slope * x, "r-", lw=1.6,
                    label=f"B = {abs(float(bfactor)):.0f} Å² (fit {lo:.1f}–{hi:.1f} Å)")
    ax.axvspan(1 / lo ** 2, 1 / hi ** 2, color="0.9", zorder=0)
    ax.set(xlabel="1/d² (1/Å²)", ylabel="ln ⟨|F|²⟩ per shell",
           xlim=(0, 1.05 * max(s2[good].max(initial=0.0), 1 / hi ** 2)))
    if not good.any():
        ax.text(0.5, 0.5, "map.mrc has no signal beyond the origin", transform=ax.transAxes,
                ha="center")
    ax.grid(alpha=0.3)
    _resolution_axis(ax, power=2)
    ax.legend(fontsize=9)
    return _save(fig, plots_dir, "guinier")


def plot_iterations(iterations: list, plots_dir: str) -> str | None:
    """GSFSC resolution per iteration above, batch size (bars) and seconds below."""
    if not iterations:
        return None
    it = np.array([r.get("iteration", k + 1) for k, r in enumerate(iterations)])
    res = np.array([r.get("resolution_A", np.nan) for r in iterations], float)
    batch = np.array([r.get("batch_size", 0) for r in iterations], float)
    secs = np.array([r.get("seconds", np.nan) for r in iterations], float)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.2), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    top.plot(it, res, "o-", lw=1.6)
    for x, y in zip(it, res):
        top.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6),
                     ha="center", fontsize=8)
    top.set(ylabel="GSFSC resolution (Å)")
    top.margins(y=0.2)                       # room for the labels
    top.invert_yaxis()                       # better resolution is up
    top.grid(alpha=0.3)
    bottom.bar(it, batch, color="#9ecae1", label="batch size")
    bottom.set(xlabel="iteration", ylabel="particles in batch")
    twin = bottom.twinx()
    twin.plot(it, secs, "s-", color="#d95f02", ms=4, label="seconds")
    twin.set_ylabel("seconds", color="#d95f02")
    bottom.set_xticks(it)
    return _save(fig, plots_dir, "iterations")


def viewing_directions(rotations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Azimuth and elevation (degrees) of each particle's viewing direction.

    rotations: (N, 3, 3) RELION matrices A; the beam runs along Aᵀ·ẑ in the map's
    frame, i.e. the third row of A.
    """
    d = np.asarray(rotations)[:, 2, :]
    azimuth = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    elevation = np.degrees(np.arcsin(np.clip(d[:, 2], -1.0, 1.0)))
    return azimuth, elevation


def plot_viewing_directions(rotations: np.ndarray | None, plots_dir: str) -> str | None:
    """2-D histogram of the viewing directions (azimuth × elevation)."""
    if rotations is None or len(rotations) == 0:
        return None
    az, el = viewing_directions(rotations)
    # equal-area bins (uniform in sin(elevation)), about 10 particles per bin on average
    n_el = int(np.clip(np.sqrt(len(az) / 20), 6, 36))
    bins = (np.linspace(-180, 180, 2 * n_el + 1), np.linspace(-1, 1, n_el + 1))
    fig, ax = plt.subplots(figsize=WIDE)
    counts, _, _, image = ax.hist2d(az, np.sin(np.radians(el)), bins=bins, cmap="viridis")
    fig.colorbar(image, ax=ax, label="particles per bin (equal areas)")
    el_ticks = np.array([-90, -45, -20, 0, 20, 45, 90])   # evenly spread in sin(elevation)
    ax.set_yticks(np.sin(np.radians(el_ticks)), [f"{t}" for t in el_ticks])
    ax.set(xlabel="azimuth (°)", ylabel="elevation (°)", xticks=np.arange(-180, 181, 60))
    ax.set_title(f"{len(az):,} particles; bins hold {int(counts.min())} to {int(counts.max())}",
                 fontsize=9)
    return _save(fig, plots_dir, "viewing_directions")


def plot_scale_histogram(scale: np.ndarray | None, plots_dir: str) -> str | None:
    """Histogram of the per-particle scale factors."""
    if scale is None or len(scale) == 0:
        return None
    scale = np.asarray(scale, float)
    fig, ax = plt.subplots(figsize=WIDE)
    lo, hi = float(scale.min()), float(scale.max())
    if hi - lo < 1e-6:
        ax.bar([lo], [len(scale)], width=0.02 * max(abs(lo), 1e-3))
        ax.set_xlim(lo - 0.3 * max(abs(lo), 1e-3), lo + 0.3 * max(abs(lo), 1e-3))
        ax.set_title(f"all {len(scale):,} scales equal {lo:.3g} (scales not fitted)", fontsize=9)
    else:
        ax.hist(scale, bins=60, color="#6a51a3")
        ax.axvline(np.median(scale), color="k", ls="--", lw=1,
                   label=f"median {np.median(scale):.3f}")
        ax.legend(fontsize=9)
    ax.set(xlabel="per-particle scale", ylabel="particles")
    return _save(fig, plots_dir, "scale")


def plot_noise_model(sigma2, box: int | None, pixel_size_A: float | None,
                     plots_dir: str) -> str | None:
    """σ² per shell of the final noise model (log scale), against frequency when the
    box and pixel size are known, else against the shell index."""
    if sigma2 is None or len(sigma2) == 0:
        return None
    sigma2 = np.asarray(sigma2, float)
    shells = np.arange(len(sigma2))
    fig, ax = plt.subplots(figsize=WIDE)
    known = bool(box and pixel_size_A)
    x = shells / (box * pixel_size_A) if known else shells
    ax.semilogy(x[sigma2 > 0], sigma2[sigma2 > 0], ".-", ms=3)
    ax.set(ylabel="noise σ² per shell", xlim=(0, x[-1]),
           xlabel="spatial frequency (1/Å)" if known else "shell (Fourier pixels)")
    ax.grid(alpha=0.3, which="both")
    if known:
        _resolution_axis(ax)
    return _save(fig, plots_dir, "noise_model")


# ------------------------------------------------------------------ the map by eye

#: the three views of a map indexed [z, y, x]: (summed / sliced array axis, title,
#: horizontal axis, vertical axis); images are drawn with the origin at the lower left
MAP_VIEWS = ((0, "XY (along Z)", "X", "Y"), (1, "XZ (along Y)", "X", "Z"),
             (2, "YZ (along X)", "Y", "Z"))


def plot_map_slices(map_path: str, mask_path: str | None, plots_dir: str) -> str | None:
    """Central slices (top row) and projections (sums, bottom row) of a map along Z, Y
    and X, with the mask's outline at 0.5 over them (over a projection: the outline of
    the mask's shadow, i.e. its maximum along the axis).  Axes in Å from the box centre."""
    from mpirefine.io import read_volume

    if not os.path.isfile(map_path):
        return None
    volume, px = read_volume(map_path)
    px = px or 1.0
    n = volume.shape[0]
    mask = None
    if mask_path and os.path.isfile(mask_path):
        mask, _ = read_volume(mask_path)
        if mask.shape != volume.shape:
            mask = None
    c = n // 2
    extent = (-c * px, (n - c) * px, -c * px, (n - c) * px)
    fig, axes = plt.subplots(2, 3, figsize=(11.5, 7.6))
    for col, (axis, title, h_label, v_label) in enumerate(MAP_VIEWS):
        panels = ((np.take(volume, c, axis=axis), None if mask is None else np.take(mask, c, axis=axis),
                   f"central slice {title[:2]}"),
                  (volume.sum(axis=axis), None if mask is None else mask.max(axis=axis),
                   f"projection {title}"))
        for row, (image, outline, label) in enumerate(panels):
            ax = axes[row, col]
            lo, hi = np.percentile(image, [1.0, 99.9])
            ax.imshow(image, cmap="gray", origin="lower", extent=extent, vmin=lo,
                      vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            if outline is not None and outline.min() < 0.5 < outline.max():
                centres = (np.arange(n) - c + 0.5) * px
                ax.contour(centres, centres, outline, levels=[0.5], colors="#ff7f0e",
                           linewidths=1.0)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel(f"{h_label} (Å)", fontsize=8)
            ax.set_ylabel(f"{v_label} (Å)", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{os.path.basename(map_path)} ({n} px, {px:g} Å/px)", fontsize=10)
    fig.tight_layout()
    return _save(fig, plots_dir, "map_slices")


# ------------------------------------------------------------------ orientation diagnostics

def _sphere_raster(directions: np.ndarray, values: np.ndarray, width_deg: float = 5.0,
                   n_az: int = 120, n_el: int = 60):
    """Values given at hemisphere directions (a direction stands for ±d) smoothed onto an
    azimuth × sin(elevation) raster of the whole sphere (Gaussian weights in the angle)."""
    az = np.radians(np.linspace(-180, 180, n_az + 1))
    s = np.linspace(-1, 1, n_el + 1)
    azc, sc = 0.5 * (az[1:] + az[:-1]), 0.5 * (s[1:] + s[:-1])
    sc, azc = np.meshgrid(sc, azc, indexing="ij")
    rc = np.sqrt(1 - sc * sc)
    u = np.stack([rc * np.cos(azc), rc * np.sin(azc), sc], axis=-1).reshape(-1, 3)
    angle = np.degrees(np.arccos(np.clip(np.abs(u @ directions.T), 0.0, 1.0)))
    w = np.exp(-(angle / width_deg) ** 2)
    raster = (w @ values) / np.maximum(w.sum(axis=1), 1e-300)
    return np.degrees(az), s, raster.reshape(n_el, n_az)


def plot_conical_map(result, plots_dir: str) -> str | None:
    """Each cone's FSC area relative to the largest (so the minimum is the cFAR) over
    the sphere of Fourier directions, on the viewing-direction plot's axes (azimuth ×
    elevation, equal areas); the lowest and highest cones are marked."""
    if result is None:
        return None
    rel = result.areas / max(float(result.areas.max()), 1e-300)
    az, s, raster = _sphere_raster(result.directions, rel)
    fig, ax = plt.subplots(figsize=WIDE)
    mesh = ax.pcolormesh(az, s, raster, cmap="magma", vmin=0.0, vmax=1.0, shading="flat")
    fig.colorbar(mesh, ax=ax, label="conical FSC area / largest")
    for k, marker, label in ((int(np.argmin(rel)), "v", "lowest"), (int(np.argmax(rel)), "^",
                                                                        "highest")):
        d = result.directions[k]
        for sign in (1, -1):
            x, y, z = sign * d
            ax.plot(np.degrees(np.arctan2(y, x)), z, marker, ms=8, mec="k", mfc="w",
                    label=label if sign == 1 else None, clip_on=False)
    el_ticks = np.array([-90, -45, -20, 0, 20, 45, 90])
    ax.set_yticks(np.sin(np.radians(el_ticks)), [f"{t}" for t in el_ticks])
    ax.set(xlabel="azimuth of the Fourier direction (°)", ylabel="elevation (°)",
           xticks=np.arange(-180, 181, 60), xlim=(-180, 180), ylim=(-1, 1))
    res = result.resolution_A()
    ax.set_title(f"cFAR {result.cfar:.2f}; conical resolution {res.min():.1f}–{res.max():.1f} Å "
                 f"({len(rel)} cones of ±{result.half_angle_deg:g}°)", fontsize=9)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.8)
    return _save(fig, plots_dir, "conical_fsc_map")


def plot_conical_fsc(result, plots_dir: str) -> str | None:
    """The conical FSCs: the spread of all cones (shaded), the cones of the lowest and
    highest area, the full FSC of the same masked half maps and the area's upper limit."""
    if result is None:
        return None
    n_shells = result.curves.shape[1]
    freq = np.arange(n_shells) / (result.box * result.pixel_size_A)
    fig, ax = plt.subplots(figsize=WIDE)
    lo, hi = np.nanpercentile(result.curves, [0, 100], axis=0)
    ax.fill_between(freq, lo, hi, color="#9ecae1", alpha=0.6, lw=0, label="all cones (range)")
    res = result.resolution_A()
    for k, color, label in ((int(np.argmin(result.areas)), "#d62728", "lowest area"),
                            (int(np.argmax(result.areas)), "#2ca02c", "highest area")):
        ax.plot(freq, result.curves[k], color=color, lw=1.4, label=f"{label}: {res[k]:.2f} Å")
    ax.plot(freq, result.full, "k-", lw=1.6, label=f"all directions: {result.cutoff_resolution_A:.2f} Å")
    cut = result.cutoff_shell / (result.box * result.pixel_size_A)
    ax.axvline(cut, color="0.3", ls=":", lw=1)
    ax.axhline(FSC_THRESHOLD, color="0.3", ls="--", lw=1)
    ax.set(xlabel="spatial frequency (1/Å)", ylabel="conical FSC", ylim=(-0.1, 1.05),
           xlim=(0, freq[-1]))
    ax.set_title(f"areas are taken up to the dotted line (cFAR {result.cfar:.2f})", fontsize=9)
    ax.grid(alpha=0.3)
    _resolution_axis(ax)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, plots_dir, "conical_fsc")


def plot_defocus_changes(refinement: dict | None, plots_dir: str) -> str | None:
    """Histogram of the per-particle defocus changes of --optimize-defocus (summary.json's
    "defocus_refinement": counts and bin edges in Å)."""
    hist = (refinement or {}).get("histogram")
    if not hist or not sum(hist["counts"]):
        return None
    counts, edges = np.asarray(hist["counts"]), np.asarray(hist["edges_A"], float)
    fig, ax = plt.subplots(figsize=WIDE)
    ax.bar(0.5 * (edges[:-1] + edges[1:]), counts, width=np.diff(edges), color="#2b8cbe")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set(xlabel="defocus change (Å; U and V together)", ylabel="particles")
    ax.set_title(f"{refinement['n_changed']:,} particles changed; RMS "
                 f"{refinement['rms_A']:.0f} Å, mean {refinement['mean_A']:+.0f} Å", fontsize=9)
    return _save(fig, plots_dir, "defocus_changes")


def _phase_panels(groups, measured, models, weight, kx_A, ky_A, titles, label, plots_dir, name,
                  suptitle) -> str | None:
    """Per optics group, two half-plane images side by side: a measured phase per
    frequency pixel and the fitted model's, both wrapped to [−π, π], where ``weight``
    and the group's own mask (``measured`` is NaN elsewhere) allow.  Grids (n, n//2 + 1)
    with ky centred (row i ↔ ky = (i − n//2) / (n·pixel))."""
    used = weight > 0
    if not used.any():
        return None
    n = weight.shape[0]
    step = float(kx_A[0, 1])
    kmax = float(np.hypot(kx_A, ky_A)[used].max())
    extent = (-0.5 * step, (n // 2 + 0.5) * step, (-(n // 2) - 0.5) * step, (n - n // 2 - 0.5) * step)
    fig, axes = plt.subplots(len(groups), 2, figsize=(7.5, 3.4 * len(groups)), squeeze=False)
    for row, g in enumerate(groups):
        for ax, image, title in ((axes[row, 0], measured[row], "measured"),
                                 (axes[row, 1], np.where(np.isnan(measured[row]), np.nan,
                                                         np.angle(np.exp(1j * models[row]))),
                                  titles)):
            im = ax.imshow(image, origin="lower", extent=extent, cmap="twilight_shifted",
                           vmin=-np.pi, vmax=np.pi, aspect="equal")
            ax.set_xlim(0, kmax)
            ax.set_ylim(-kmax, kmax)
            ax.set_title(f"optics group {int(g)}: {title}", fontsize=9)
            ax.set(xlabel="kx (1/Å)", ylabel="ky (1/Å)")
        fig.colorbar(im, ax=axes[row, :].tolist(), shrink=0.8, label=label)
    fig.suptitle(suptitle, fontsize=10)
    return _save(fig, plots_dir, name)


def plot_ctf_odd_phase(sums_path: str, plots_dir: str) -> str | None:
    """Each optics group's odd phase per frequency pixel, arg Σ c conj(P) X, beside the
    fitted beam tilt and trefoil model φ(k), both wrapped to [−π, π] and shown where the
    fit weighted the pixel (--optimize-ctf-global's last fit: ctf_global_sums.npz)."""
    if not os.path.exists(sums_path):
        return None
    from mpirefine.physics.aberrations import odd_phase

    with np.load(sums_path) as d:
        groups, xy, w, weight = d["groups"], d["xy"], d["w"], d["weight"]
        kx_A, ky_A, coefficients, iteration = d["kx_A"], d["ky_A"], d["coefficients"], int(d["iteration"])
    measured = [np.where((weight > 0) & (w[r] > 0), np.angle(xy[r]), np.nan) for r in range(len(groups))]
    models = [odd_phase(coefficients[r], kx_A, ky_A) for r in range(len(groups))]
    return _phase_panels(groups, measured, models, weight, kx_A, ky_A, "fitted beam tilt + trefoil",
                         "odd phase (rad)", plots_dir, "ctf_odd_phase",
                         f"odd aberrations, fit after iteration {iteration}")


def plot_ctf_even_phase(sums_path: str, plots_dir: str) -> str | None:
    """Each optics group's even phase per frequency pixel, arg u with u = A⁻¹ b ≈
    (cos δ, sin δ) from the even fit's sums, beside the fitted δ(k) (the even fit:
    ctf_even_sums.npz)."""
    if not os.path.exists(sums_path):
        return None
    from mpirefine.physics.aberrations import even_phase

    with np.load(sums_path) as d:
        groups, sums, weight = d["groups"], d["sums"], d["weight"]
        kx_A, ky_A, coefficients, iteration = d["kx_A"], d["ky_A"], d["coefficients"], int(d["iteration"])
    measured, models = [], []
    for r in range(len(groups)):
        axx, axy, ayy, bx, by = sums[r][:5]
        det = axx * ayy - axy * axy
        ok = (weight > 0) & (det > 0)
        safe = np.where(ok, det, 1.0)
        u1, u2 = (ayy * bx - axy * by) / safe, (axx * by - axy * bx) / safe
        measured.append(np.where(ok, np.arctan2(u2, u1), np.nan))
        models.append(even_phase(coefficients[r], kx_A, ky_A))
    return _phase_panels(groups, measured, models, weight, kx_A, ky_A,
                         "fitted Cs, tetrafoil and lower terms", "even phase (rad)", plots_dir,
                         "ctf_even_phase", f"even aberrations, fit after iteration {iteration}")
