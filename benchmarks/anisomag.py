"""Anisotropic magnification: refine with --fit-anisomag against the truth and
relion_ctf_refine --fit_aniso, and what the option costs per particle.

Simulates apoferritin (O) with `mpirefine simulate --mag-matrix` (a stretch of
--anisotropy at --angle: the images cut from a box twice the size, as particles from a
micrograph), then refines it three ways from the 20 Å start, on the same particles:

    mpirefine refine particles.star start_20A.mrc --symmetry O            (no matrix)
    ... --optimize-ctf-global --no-fit-tilt --no-fit-trefoil --fit-anisomag
    mpirefine refine particles_true.star ... --symmetry O                  (the true M)

and scores each map against the truth (FSC 0.5 and 0.143).  relion_ctf_refine
--fit_aniso --kmin_mag 10 then runs on the fitted run's particles.star and half maps
(RELION composes its correction with our matrix).  The cost: seconds per particle of
the undistortion (physics/anisomag.py undistort_images) and of the fit's sums
(magnification_sums: the prediction and its four derivatives made in the double box
and cut) at boxes 64, 128 and 256
(median of --repeats).

    python benchmarks/anisomag.py --out benchmarks/results/anisomag_box64.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size-A", type=float, default=2.0)
    p.add_argument("--n-particles", type=int, default=1500)
    p.add_argument("--snr", type=float, default=1.0)
    p.add_argument("--anisotropy", type=float, default=0.015, help="stretch, as a fraction")
    p.add_argument("--angle-deg", type=float, default=30.0)
    p.add_argument("--cost-boxes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--cost-particles", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-refine", action="store_true", help="measure the cost only")
    p.add_argument("--work-dir", default="runs/anisomag")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


def _mpirefine(args_list, log):
    t0 = time.time()
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-m", "mpirefine", *map(str, args_list)],
                             stdout=f, stderr=subprocess.STDOUT)
    if res.returncode:
        raise SystemExit(f"failed (see {log}): mpirefine {' '.join(map(str, args_list))}")
    return time.time() - t0


def _scores(run_dir, truth, n, px):
    import mrcfile

    from mpirefine.postprocess.fsc import fsc_curve, resolution_A

    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    fsc = fsc_curve(mrcfile.read(os.path.join(run_dir, "map.mrc")), truth)
    return {"gsfsc_A": summary["final_resolution_A"],
            "map_fsc05_vs_truth_A": resolution_A(fsc, n, px, 0.5),
            "map_fsc0143_vs_truth_A": resolution_A(fsc, n, px, 0.143),
            "iterations": len(summary["iterations"]), "wall_seconds": summary["wall_seconds"],
            "ctf_anisomag": summary.get("ctf_anisomag")}


def _relion_on(run_dir, work, px):
    """relion_ctf_refine --fit_aniso on a refine run's particles.star and half maps."""
    import starfile

    from mpirefine.physics.anisomag import MAG_COLUMNS, describe_matrix

    if shutil.which("relion_ctf_refine") is None:
        return None
    rel = os.path.join(work, "relion_ctf")
    os.makedirs(rel, exist_ok=True)
    for h, name in ((1, "map_half_A.mrc"), (2, "map_half_B.mrc")):
        shutil.copy(os.path.join(run_dir, name), os.path.join(rel, f"ref_half{h}_class001_unfil.mrc"))
    star = starfile.read(os.path.join(run_dir, "particles.star"))
    parts = star["particles"].copy()
    parts["rlnImageName"] = [f"{i.split('@')[0]}@{os.path.abspath(os.path.join(run_dir, i.split('@')[1]))}"
                             for i in parts["rlnImageName"]]
    starfile.write({"optics": star["optics"], "particles": parts}, os.path.join(rel, "in.star"),
                   overwrite=True)
    for cmd in (["relion_mask_create", "--i", "ref_half1_class001_unfil.mrc", "--o", "mask.mrc",
                 "--ini_threshold", "0.02", "--extend_inimask", "3", "--width_soft_edge", "3"],
                ["relion_postprocess", "--i", "ref_half1_class001_unfil.mrc", "--mask", "mask.mrc",
                 "--angpix", f"{px:g}", "--o", "pp"],
                ["relion_ctf_refine", "--i", "in.star", "--f", "pp.star", "--o", "ctf/",
                 "--fit_aniso", "--kmin_mag", "10"]):
        subprocess.run(cmd, cwd=rel, capture_output=True, text=True)
    out = starfile.read(os.path.join(rel, "ctf", "particles_ctf_refine.star"))["optics"].iloc[0]
    return describe_matrix([[float(out[c]) for c in MAG_COLUMNS[:2]],
                            [float(out[c]) for c in MAG_COLUMNS[2:]]])


def refine_comparison(args):
    import mrcfile

    from mpirefine.physics.anisomag import anisotropic_matrix, describe_matrix

    work = os.path.abspath(args.work_dir)
    data = os.path.join(work, "data")
    m = anisotropic_matrix(args.anisotropy, args.angle_deg)
    _mpirefine(["simulate", "--model", "--box", args.box, "--pixel-size", args.pixel_size_A,
                "--n-particles", args.n_particles, "--snr", args.snr, "--seed", args.seed,
                "--mag-matrix", *m.ravel(), "--out", data, "--overwrite"],
               os.path.join(work, "simulate.log"))
    truth = mrcfile.read(os.path.join(data, "truth.mrc"))
    common = [os.path.join(data, "start_20A.mrc"), "--symmetry", "O", "--overwrite"]
    runs = {"no_matrix": [os.path.join(data, "particles.star"), *common],
            "fit_anisomag": [os.path.join(data, "particles.star"), *common, "--optimize-ctf-global",
                             "--no-fit-tilt", "--no-fit-trefoil", "--fit-anisomag"],
            "true_matrix": [os.path.join(data, "particles_true.star"), *common]}
    out = {"truth": describe_matrix(m), "runs": {}}
    for name, a in runs.items():
        run_dir = os.path.join(work, name)
        _mpirefine(["refine", a[0], a[1], "--out", run_dir, *a[2:]], os.path.join(work, f"{name}.log"))
        out["runs"][name] = _scores(run_dir, truth, args.box, args.pixel_size_A)
        print(name, json.dumps(out["runs"][name]), flush=True)
    out["relion_ctf_refine_on_fit"] = _relion_on(os.path.join(work, "fit_anisomag"), work,
                                                 args.pixel_size_A)
    return out


def cost(args):
    """Seconds per particle of the undistortion and of the fit's sums."""
    from scipy.spatial.transform import Rotation

    from mpirefine.fourier.project import volume_ft
    from mpirefine.fourier.transforms import centered_rfft2
    from mpirefine.physics.anisomag import anisotropic_matrix, magnification_sums, undistort_images
    from mpirefine.physics.ctf import CTFParams
    from mpirefine.refinement.images import ImagePrep, ctf_grid
    from mpirefine.synthetic.models import model_volume

    rng = np.random.default_rng(0)
    m = anisotropic_matrix(args.anisotropy, args.angle_deg)
    out = {}
    for n in args.cost_boxes:
        B, px = args.cost_particles, 1.0
        double = ImagePrep(box=2 * n, pixel_size_A=px)
        vft = volume_ft(model_volume(n, px))
        raw = rng.normal(size=(B, n, n)).astype(np.float32)
        params = CTFParams(defocus_u_A=rng.uniform(8000, 20000, B), defocus_v_A=rng.uniform(8000, 20000, B),
                           defocus_angle_deg=0.0, voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1)
        rot = Rotation.random(B, random_state=1).as_matrix()
        shifts = rng.normal(size=(B, 2))
        times = {"undistort": [], "fit_sums": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            images = centered_rfft2(undistort_images(raw, m))
            times["undistort"].append((time.perf_counter() - t) / B)
            t = time.perf_counter()

            def ctf_at(rows, dx, dy, params=params, double=double):
                return ctf_grid(params.subset(rows), double, np, freq_shift=(2 * dx, 2 * dy))

            magnification_sums(vft, images, ctf_at, rot, shifts, np.ones(B))
            times["fit_sums"].append((time.perf_counter() - t) / B)
        out[str(n)] = {"seconds_per_particle": {k: float(np.median(v)) for k, v in times.items()},
                       "particles": B}
        print(n, json.dumps(out[str(n)]), flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    result = {"benchmark": "anisomag", "args": vars(args), "cost": cost(args)}
    if not args.skip_refine:
        result["refine"] = refine_comparison(args)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
