"""Refine particles that RELION simulated, and score the result against the truth.

The refinement's acceptance test is on data simulated by programs other than ours.
This script makes such data with RELION itself (``relion_project`` and
``relion_image_handler`` on PATH, e.g. Debian's ``relion`` package), then for each SNR:

1. the truth (three apoferritin chains from the shipped model, box 64 by default) is
   projected by ``relion_project --ctf --add_noise`` at uniform random poses, origins
   ~N(0, 3 Å), defocus 1-2.5 µm with up to 500 Å astigmatism; the white-noise σ makes
   the mean per-image signal variance / noise variance equal the SNR;
2. ``mpirefine refine`` runs on ``--ranks`` ranks from the truth low-passed to 20 Å
   by ``relion_image_handler --lowpass 20``;
3. ``mpirefine reconstruct`` makes the map at the TRUE poses from the same particles;
4. both maps are compared with the truth (FSC 0.5 and 0.143), and the refined poses
   with the true ones (median angular error).  ``frequency_ratio_0.5`` is the
   refined map's FSC-0.5 spatial frequency over the true-pose map's (the acceptance
   test asks for at least 0.9); with ``--information-limit-A R``, the particles are
   also searched once against the truth itself low-passed to R Å: no refinement
   can expect smaller pose errors than that.

    python benchmarks/relion_simulated.py --particles 2000 --snr 0.05 0.03 --out relion_sim.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--snr", type=float, nargs="+", default=[0.05, 0.03])
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=1.8)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--information-limit-A", type=float, default=None,
                   help="also search against the truth low-passed to this resolution")
    p.add_argument("--work-dir", default=None, help="keep the data and runs here")
    return p.parse_args(argv)


def run(*cmd, cwd):
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{result.stderr[-2000:]}")
    return result.stdout


def simulate(work, args):
    import mrcfile
    import numpy as np
    import pandas as pd
    import starfile
    from scipy.spatial.transform import Rotation

    from mpirefine.geometry.rotations import matrix_to_euler
    from mpirefine.io.mrc import write_mrc
    from mpirefine.synthetic.models import asymmetric_chains, model_volume

    truth = model_volume(args.box, args.pixel_size, chains=asymmetric_chains(), center_A="chains")
    write_mrc(os.path.join(work, "truth.mrc"), truth, args.pixel_size)
    n, rng = args.particles, np.random.default_rng(args.seed)
    euler = matrix_to_euler(Rotation.random(n, random_state=args.seed).as_matrix())
    defocus, astig = rng.uniform(10000, 25000, n), rng.uniform(0, 500, n)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7],
                           "rlnVoltage": [300.0], "rlnImagePixelSize": [args.pixel_size],
                           "rlnImageSize": [args.box], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({
        "rlnMicrographName": ["sim.mrc"] * n, "rlnAngleRot": euler[:, 0],
        "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": rng.normal(0, 3, n), "rlnOriginYAngst": rng.normal(0, 3, n),
        "rlnDefocusU": defocus + astig, "rlnDefocusV": defocus,
        "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnOpticsGroup": [1] * n})
    starfile.write({"optics": optics, "particles": particles},
                   os.path.join(work, "poses.star"), overwrite=True)
    common = ("--i", "truth.mrc", "--ang", "poses.star", "--ctf", "--angpix", args.pixel_size)
    run("relion_project", "--o", "clean", *common, cwd=work)
    with mrcfile.open(os.path.join(work, "clean.mrcs")) as m:
        signal_var = float(m.data.var(axis=(1, 2)).mean())
    sigmas = {}
    for snr in args.snr:
        sigmas[snr] = (signal_var / snr) ** 0.5
        run("relion_project", "--o", f"snr{snr:g}", *common, "--add_noise",
            "--white_noise", f"{sigmas[snr]:.6f}", cwd=work)
    run("relion_image_handler", "--i", "truth.mrc", "--o", "start_20A.mrc", "--lowpass", 20,
        "--angpix", args.pixel_size, cwd=work)
    return sigmas


def pose_error(work, particles, refined):
    import numpy as np
    import starfile

    from mpirefine.geometry.rotations import euler_to_matrix
    from mpirefine.synthetic.evaluate import pose_errors_deg

    def table(path):
        d = starfile.read(os.path.join(work, path))
        d = d["particles"] if isinstance(d, dict) else d
        return d.set_index("rlnImageName")

    true, found = table(particles), table(refined)
    true = true.loc[found.index]
    rot = [euler_to_matrix(*(t[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
           for t in (found, true)]
    return float(np.median(pose_errors_deg(*rot)))


def versus_truth(work, path, pixel_size):
    from mpirefine.io.mrc import read_volume
    from mpirefine.synthetic.evaluate import compare_with_truth

    truth, _ = read_volume(os.path.join(work, "truth.mrc"))
    volume, _ = read_volume(os.path.join(work, path))
    c = compare_with_truth(volume, truth, pixel_size)
    return {"fsc_0.5_A": float(c["resolution_A_05"]), "fsc_0.143_A": float(c["resolution_A_0143"])}


def main(argv=None) -> int:
    args = parse_args(argv)
    for tool in ("relion_project", "relion_image_handler"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH: install RELION (e.g. `apt-get install relion`)")
    work = args.work_dir or tempfile.mkdtemp(prefix="relion_sim_")
    os.makedirs(work, exist_ok=True)
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
    launch = [mpiexec, "-n", args.ranks, sys.executable, "-m", "mpirefine"]
    sigmas = simulate(work, args)
    results = []
    for snr in args.snr:
        stack = f"snr{snr:g}.star"
        run(*launch, "refine", stack, "start_20A.mrc", "--out", f"refine_{snr:g}", "--overwrite", cwd=work)
        run(*launch, "reconstruct", stack, "--out", f"true_poses_{snr:g}", "--overwrite", cwd=work)
        with open(os.path.join(work, f"refine_{snr:g}", "summary.json")) as f:
            summary = json.load(f)
        refined = versus_truth(work, f"refine_{snr:g}/map.mrc", args.pixel_size)
        true_poses = versus_truth(work, f"true_poses_{snr:g}/map.mrc", args.pixel_size)
        row = {"snr": snr, "noise_sigma": sigmas[snr],
               "median_angular_error_deg": pose_error(work, stack, f"refine_{snr:g}/particles.star"),
               "gsfsc_A": summary["final_resolution_A"], "iterations": len(summary["iterations"]),
               "refine_wall_seconds": summary["wall_seconds"],
               "refined_map_vs_truth": refined, "true_pose_map_vs_truth": true_poses,
               "frequency_ratio_0.5": true_poses["fsc_0.5_A"] / refined["fsc_0.5_A"]}
        if args.information_limit_A:
            out = f"truth_search_{snr:g}"
            run(*launch, "refine", stack, "truth.mrc", "--out", out, "--overwrite",
                "--initial-lowpass", args.information_limit_A, "--max-iterations", 1,
                "--disable-auto-batchsize", cwd=work)
            row["information_limit"] = {
                "truth_lowpass_A": args.information_limit_A,
                "median_angular_error_deg": pose_error(work, stack, f"{out}/particles.star")}
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {"benchmark": "relion_simulated", "particles": args.particles, "box": args.box,
              "pixel_size_A": args.pixel_size, "seed": args.seed, "ranks": args.ranks,
              "relion": run("relion_project", "--version", cwd=work).strip().splitlines()[0],
              "work_dir": work, "results": results}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
