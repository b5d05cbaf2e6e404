"""Ewald sphere correction where curvature limits the resolution, side by side with
relion_reconstruct --ewald, and what the correction costs per particle.

Simulates one chain of the shipped apoferritin model (a ~55 Å particle) with
`mpirefine simulate --ewald-curvature negative` at a voltage low enough that d ≈ √(2λD)
falls well inside the box (box 160 at 1.5 Å/px, 0.5 kV: √(2λD) ≈ 7.8 Å), and a defocus
(350–450 Å) that moves the other side band by one to two particle diameters at 3–5 Å
yet keeps it in the box.  Then, at the true poses, on the same particles:

    mpirefine reconstruct particles_true.star [--ewald-correction --ewald-curvature S
        --particle-diameter D]
    relion_reconstruct --i particles_true.star --ctf [--ewald --mask_diameter D
        --width_mask_edge W [--reverse_curvature]]

with W both RELION's default (3 px) and our disc's soft edge.  Scores every map (all
particles) against the truth (FSC 0.5 and 0.143) and ours against RELION's.  The cost:
seconds per particle of `insert_particles` with and without the correction at boxes
128 and 256 (median of --repeats), which is what the option adds to a refinement
iteration.

    python benchmarks/ewald.py --out benchmarks/results/ewald_box160.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--box", type=int, default=160)
    p.add_argument("--pixel-size-A", type=float, default=1.5)
    p.add_argument("--voltage-kV", type=float, default=0.5)
    p.add_argument("--defocus-um", type=float, nargs=2, default=(0.035, 0.045))
    p.add_argument("--particle-diameter-A", type=float, default=60.0)
    p.add_argument("--n-particles", type=int, default=1000)
    p.add_argument("--snr", type=float, nargs="+", default=[math.inf, 0.5],
                   help="one dataset per value (inf: noise-free)")
    p.add_argument("--cost-boxes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--cost-particles", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default="runs/ewald")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


def _run(cmd, log, cwd=None):
    t0 = time.time()
    with open(log, "w") as f:
        res = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {' '.join(map(str, cmd))}; see {log}")
    return round(time.time() - t0, 1)


def _scores(path, truth, px, reference=None):
    from mpirefine.io import read_volume
    from mpirefine.postprocess.fsc import fsc_curve, resolution_A

    vol = np.asarray(read_volume(str(path))[0])
    n = vol.shape[0]
    f = fsc_curve(vol, truth)
    out = {"vs_truth_fsc_0.5_A": round(resolution_A(f, n, px, 0.5), 2),
           "vs_truth_fsc_0.143_A": round(resolution_A(f, n, px, 0.143), 2),
           "vs_truth_fsc": np.round(f, 3).tolist()}
    if reference is not None:
        g = fsc_curve(vol, np.asarray(read_volume(str(reference))[0]))
        above = np.flatnonzero(g[2:] < 0.9)
        last = (above[0] + 1) if above.size else len(g) - 1
        out["vs_relion_same_option_fsc"] = np.round(g, 3).tolist()
        out["vs_relion_fsc_above_0.9_from_shell_2_to_A"] = round(n * px / max(last, 1), 2)
    return out


def dataset(args, snr, work):
    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "particles_true.star")):
        from mpirefine.synthetic.models import read_pdb, shipped_model_path

        _, chains, _ = read_pdb(shipped_model_path())
        _run([sys.executable, "-m", "mpirefine", "simulate", "--model", "--chains", chains[0],
              "--center-on-chains", "--box", args.box, "--pixel-size", args.pixel_size_A,
              "--n-particles", args.n_particles, "--snr", snr, "--voltage-kV", args.voltage_kV,
              "--cs-mm", 0, "--defocus-min-um", args.defocus_um[0], "--defocus-max-um",
              args.defocus_um[1], "--astigmatism-A", 0, "--ewald-curvature", "negative",
              "--seed", args.seed, "--out", data, "--overwrite"], os.path.join(work, "simulate.log"))
    return data


def side_by_side(args, snr, work):
    from mpirefine.io import read_volume
    from mpirefine.physics.ctf import electron_wavelength_A
    from mpirefine.physics.ewald import mask_edge_px

    data = dataset(args, snr, work)
    truth = np.asarray(read_volume(os.path.join(data, "truth.mrc"))[0])
    px, d = args.pixel_size_A, args.particle_diameter_A
    edge = round(mask_edge_px(d, px))
    star = os.path.join(data, "particles_true.star")
    relion = shutil.which("relion_reconstruct")
    runs = {}
    for name, extra in (("flat", []),
                        ("negative", ["--ewald-correction", "--ewald-curvature", "negative",
                                      "--particle-diameter", d]),
                        ("positive", ["--ewald-correction", "--ewald-curvature", "positive",
                                      "--particle-diameter", d])):
        out = os.path.join(work, f"mpirefine_{name}")
        cmd = [sys.executable, "-m", "mpirefine", "reconstruct", star, "--out", out, "--overwrite",
               "--cpu", *extra]
        runs[f"mpirefine_{name}"] = {"command": " ".join(map(str, cmd)),
                                     "wall_seconds": _run(cmd, out + ".log")}
    if relion:
        ewald = ["--ewald", "--mask_diameter", d]
        for name, extra in (("flat", []),
                            ("negative", [*ewald, "--width_mask_edge", edge]),
                            ("positive", [*ewald, "--width_mask_edge", edge, "--reverse_curvature"]),
                            ("negative_edge3", ewald),
                            ("positive_edge3", [*ewald, "--reverse_curvature"])):
            out = os.path.join(work, f"relion_{name}.mrc")
            cmd = [relion, "--i", "particles_true.star", "--o", out, "--ctf", *extra]
            runs[f"relion_{name}"] = {"command": " ".join(map(str, cmd)),
                                      "wall_seconds": _run(cmd, out + ".log", cwd=data)}
    for key, run in runs.items():
        program, name = key.split("_", 1)
        path = (os.path.join(work, key, "map_unfil.mrc") if program == "mpirefine"
                else os.path.join(work, key + ".mrc"))
        reference = os.path.join(work, f"relion_{name}.mrc") if program == "mpirefine" and relion else None
        run.update(_scores(path, truth, px, reference))
    lam = float(electron_wavelength_A(args.voltage_kV))
    return {"snr": snr, "curvature_limit_sqrt_2_lambda_D_A": round(math.sqrt(2 * lam * d), 2),
            "wavelength_A": lam, "mask_edge_px": edge, "runs": runs}


def cost(args):
    """Seconds per particle of insert_particles, flat and with the side bands."""
    from scipy.spatial.transform import Rotation

    from mpirefine.fourier.backproject import Accumulator
    from mpirefine.fourier.transforms import centered_rfft2
    from mpirefine.physics.ctf import CTFParams
    from mpirefine.physics.ewald import EwaldCorrection
    from mpirefine.refinement.halfmaps import insert_particles
    from mpirefine.refinement.images import ImagePrep, ctf_grid, ewald_sidebands

    rng = np.random.default_rng(0)
    out = {}
    for n in args.cost_boxes:
        B, px = args.cost_particles, 1.0
        prep = ImagePrep(box=n, pixel_size_A=px)
        images = centered_rfft2(rng.normal(size=(B, n, n)).astype(np.float32))
        params = CTFParams(defocus_u_A=rng.uniform(8000, 20000, B), defocus_v_A=rng.uniform(8000, 20000, B),
                           defocus_angle_deg=0.0, voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1)
        rot = Rotation.random(B, random_state=1).as_matrix()
        shifts = rng.normal(size=(B, 2))
        weight = np.ones((n, n // 2 + 1), np.float32)
        correction = EwaldCorrection("negative", 0.6 * n * px)
        times = {"flat": [], "ewald": [], "ewald_operands": []}
        for _ in range(args.repeats):
            acc = Accumulator.zeros(n, 2, np)
            t = time.perf_counter()
            insert_particles(acc, images, ctf_grid(params, prep, np), weight, rot, shifts, np.ones(B))
            times["flat"].append((time.perf_counter() - t) / B)
            t = time.perf_counter()
            sb = ewald_sidebands(correction, params, prep, np)
            times["ewald_operands"].append((time.perf_counter() - t) / B)
            insert_particles(acc, images, ctf_grid(params, prep, np), weight, rot, shifts,
                             np.ones(B), ewald=sb)
            times["ewald"].append((time.perf_counter() - t) / B)
        med = {k: float(np.median(v)) for k, v in times.items()}
        out[str(n)] = {"seconds_per_particle": med,
                       "added_seconds_per_particle": med["ewald"] - med["flat"],
                       "ratio": med["ewald"] / med["flat"], "particles": B}
    return out


def main(argv=None):
    args = parse_args(argv)
    from mpirefine.fourier import compiled

    work = os.path.abspath(args.work_dir)
    report = {"params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
              "insertion_kernel": compiled.kernel_name(np), "datasets": []}
    for snr in args.snr:
        sub = os.path.join(work, f"snr_{snr:g}")
        os.makedirs(sub, exist_ok=True)
        report["datasets"].append(side_by_side(args, snr, sub))
    report["cost"] = cost(args)
    text = json.dumps(report, indent=1, default=float)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    for ds in report["datasets"]:
        print(f"SNR {ds['snr']}: limit √(2λD) {ds['curvature_limit_sqrt_2_lambda_D_A']} Å")
        for key, run in ds["runs"].items():
            agree = run.get("vs_relion_fsc_above_0.9_from_shell_2_to_A")
            print(f"  {key:24s} vs truth {run['vs_truth_fsc_0.5_A']:5.2f} / "
                  f"{run['vs_truth_fsc_0.143_A']:5.2f} Å  {run['wall_seconds']:6.1f} s"
                  + (f"  FSC vs RELION ≥ 0.9 to {agree} Å" if agree else ""))
    for n, c in report["cost"].items():
        print(f"box {n}: insertion {c['seconds_per_particle']['flat'] * 1e3:.1f} ms/particle flat, "
              f"{c['seconds_per_particle']['ewald'] * 1e3:.1f} ms with the side bands (×{c['ratio']:.1f})")


if __name__ == "__main__":
    main()
