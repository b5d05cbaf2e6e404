"""mpirefine against RELION 3D auto-refine, side by side, on particles RELION simulated.

Two cases, both simulated here with ``relion_project`` (projection and CTF are
RELION's; white Gaussian noise is then added with NumPy from a fixed seed, so the
particles are the same on every run and RELION's results can be reused):

* ``hard``: two apoferritin subunits related by a 3-fold (chains A and I of the
  shipped model, an asymmetric ~40 kDa Cα dimer), box 64, 2.5 Å/px, 3,000
  particles, SNR 0.03, refined in C1;
* ``symmetric``: the whole apoferritin, box 64, 2.5 Å/px, 2,000 particles, SNR 0.05,
  refined with O symmetry by both programs.

Defocus 1–2.5 µm with up to 500 Å astigmatism, origins ~N(0, 3 Å) per axis, uniform
random poses.  SNR = mean per-image variance of the clean CTF-modulated projections
(whole box) / noise variance, as in ``relion_simulated.py``.  Both programs get the
same particle STAR (no angles, no origins) and the same start: the truth low-passed
to 20 Å by ``relion_image_handler``.

RELION (``relion_refine_mpi``, as its users run it): ``--auto_refine
--split_random_halves``, ``--ini_high 20`` on the same reference, which is on the
particles' greyscale (so no ``--firstiter_cc``), ``--healpix_order 2
--auto_local_healpix_order 4 --offset_range 5 --offset_step 2``, ``--ctf --norm
--scale --flatten_solvent --zero_mask --particle_diameter D``, ``--sym C1|O``,
``--j 1``, under ``mpirun -np 3`` (1 master + 2 workers; RELION refuses fewer than 3
processes for split halves) on the same 2 cores.  Each iteration's files are kept.

mpirefine: ``mpiexec -n 2 mpirefine refine`` with default options (``--initial-lowpass
20``, ``--symmetry O`` for the symmetric case) and, for the hard case, also with
``--adaptive-marginalization``.  ``checkpoint.h5`` is copied after every iteration
(it holds the half maps and every particle's pose), so each iteration can be scored.

Scored against the truth, per iteration and final: unmasked FSC of the map vs the
truth at 0.5 and 0.143, for the average of the two half maps (RELION:
``run_itNNN_half{1,2}_class001.mrc``; mpirefine: the unregularised half maps) and for
the final maps (RELION ``run_class001.mrc``, mpirefine ``map.mrc``); pose errors
(median angular error, % within 5°, over the 24 symmetry-related poses for O;
median origin error in Å); wall time per iteration and in total, CPU seconds of all
processes, the load average while running; the time each program first reaches
RELION's final FSC-0.5 resolution (half-map average vs truth).  The ceiling is the
reconstruction at the TRUE poses (``relion_reconstruct --ctf``, and ``mpirefine
reconstruct``).

RELION takes long and does not change when mpirefine does: ``--skip-relion`` keeps the
``relion`` and ``simulation`` sections of the existing JSON (the particles are
re-made, or reused from --out, and must have the same checksum) and reruns mpirefine
only; ``--skip-mpirefine`` does the converse.

    python benchmarks/vs_relion.py --case hard --out runs/vs_relion_hard
    python benchmarks/vs_relion.py --case hard --out runs/vs_relion_hard --skip-relion
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from relion_simulated import run  # noqa: E402  (runs a tool, exits with its stderr on failure)

CASES = {
    "hard": {"chains": ["A", "I"], "center": "chains", "box": 64, "pixel_size_A": 2.5,
             "particles": 3000, "snr": 0.03, "symmetry": "C1", "particle_diameter_A": 120,
             "seed": 21, "mpirefine_variants": {"default": [],
                                                 "adaptive": ["--adaptive-marginalization"]}},
    "symmetric": {"chains": None, "center": None, "box": 64, "pixel_size_A": 2.5,
                  "particles": 2000, "snr": 0.05, "symmetry": "O", "particle_diameter_A": 140,
                  "seed": 22, "mpirefine_variants": {"default": [],
                                                     "adaptive": ["--adaptive-marginalization"]}},
}
ORIGIN_SIGMA_A = 3.0
WITHIN_DEG = 5.0
GROSS_DEG = 20.0     # a pose this far off is a wrong assignment, not an inaccurate one


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), required=True)
    p.add_argument("--particles", type=int, default=None, help="default: the case's")
    p.add_argument("--out", default=None, help="work folder [runs/vs_relion_CASE]")
    p.add_argument("--json", default=None,
                   help="results file [benchmarks/results/vs_relion_CASE.json]")
    p.add_argument("--skip-relion", action="store_true",
                   help="reuse the RELION results of the existing JSON")
    p.add_argument("--skip-mpirefine", action="store_true",
                   help="reuse the mpirefine results of the existing JSON (or leave them out)")
    p.add_argument("--relion-from-files", action="store_true",
                   help="score the RELION run already in OUT/relion instead of running it")
    p.add_argument("--variants", nargs="+", default=None,
                   help="mpirefine variants to run (default: all of the case's)")
    p.add_argument("--table", action="store_true",
                   help="print the JSON's results as Markdown tables and exit")
    p.add_argument("--ranks", type=int, default=2, help="mpirefine ranks [2]")
    p.add_argument("--repeats", type=int, default=3,
                   help="mpirefine runs per variant; the run of median wall time is kept [3]")
    p.add_argument("--relion-np", type=int, default=3, help="RELION MPI processes [3]")
    p.add_argument("--relion-mpirun", default=None,
                   help="the mpirun RELION was built with [mpirun on PATH outside the venv]")
    return p.parse_args(argv)


def show(cmd):
    """A command line as text, with paths inside the repository made relative."""
    return " ".join(map(str, cmd)).replace(ROOT + os.sep, "")


# ---------------------------------------------------------------- monitoring

class LoadSampler:
    """1-min load average every few seconds while a run goes on."""

    def __init__(self, every_s=5.0):
        self.every_s, self.samples, self._stop = every_s, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        import numpy as np
        s = np.asarray(self.samples or [os.getloadavg()[0]])
        return {"median": round(float(np.median(s)), 2), "min": round(float(s.min()), 2),
                "max": round(float(s.max()), 2), "samples": int(s.size)}


class CheckpointCopier:
    """Copy OUT/checkpoint.h5 each time rank 0 renames a new one over it."""

    def __init__(self, out_dir, dest_dir, poll_s=0.05):
        self.src, self.dest, self.poll_s = os.path.join(out_dir, "checkpoint.h5"), dest_dir, poll_s
        self.copies, self._seen, self._stop = [], None, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        os.makedirs(dest_dir, exist_ok=True)

    def _grab(self):
        try:
            st = os.stat(self.src)
        except FileNotFoundError:
            return
        key = (st.st_ino, st.st_mtime_ns)
        if key == self._seen:
            return
        path = os.path.join(self.dest, f"copy_{len(self.copies):03d}.h5")
        try:
            with open(self.src, "rb") as f:   # the open file survives a rename over it
                shutil.copyfileobj(f, open(path, "wb"))
        except FileNotFoundError:
            return
        self._seen = key
        self.copies.append({"path": path, "mtime": st.st_mtime_ns / 1e9})

    def _loop(self):
        while not self._stop.is_set():
            self._grab()
            self._stop.wait(self.poll_s)
        self._grab()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def tree_cpu_seconds(root_pid):
    """User + system CPU seconds so far of root_pid and its live descendants (/proc)."""
    parent, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    children = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """(epoch seconds, CPU seconds of the process tree) every poll_s."""

    def __init__(self, root_pid, poll_s=1.0):
        self.root, self.poll_s, self.samples, self._stop = root_pid, poll_s, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append((round(time.time(), 3), round(tree_cpu_seconds(self.root), 2)))
            self._stop.wait(self.poll_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_at(samples, t):
    """CPU seconds at epoch t, interpolated between samples (None outside them)."""
    import numpy as np
    if not samples or t < samples[0][0] - 2 or t > samples[-1][0] + 2:
        return None
    a = np.asarray(samples, float)
    # the tree's CPU time drops when a process exits (its time leaves the sum): the
    # running maximum keeps what was used
    return round(float(np.interp(t, a[:, 0], np.maximum.accumulate(a[:, 1]))), 2)


def timed(cmd, cwd, log_path, env=None, poll_s=1.0):
    """Run cmd; wall seconds, CPU seconds of it and its descendants (in total, and
    sampled every poll_s), load averages."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with LoadSampler() as load, open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        with CpuSampler(proc.pid, poll_s) as cpu:
            rc = proc.wait()
    t1 = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        sys.exit(f"failed ({rc}): {' '.join(map(str, cmd))}\n{tail}")
    cpu_total = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"start_epoch": t0, "wall_seconds": round(t1 - t0, 2),
            "cpu_seconds": round(cpu_total, 2), "load_average_1min": load.summary(),
            "cpu_samples": cpu.samples}


# ---------------------------------------------------------------- simulation

def content_hash(path):
    """SHA-256 of what a file holds, leaving out the creation times that mrcfile,
    RELION and starfile write into MRC labels and STAR comments."""
    h = hashlib.sha256()
    if path.endswith((".mrc", ".mrcs")):
        import mrcfile
        with mrcfile.mmap(path, mode="r") as m:
            h.update(str((m.data.shape, m.data.dtype.str, float(m.voxel_size.x))).encode())
            h.update(memoryview(m.data.tobytes()))
    else:
        with open(path, "rb") as f:
            for line in f:
                if not line.startswith(b"#"):
                    h.update(line)
    return h.hexdigest()


SIMULATED = ("truth.mrc", "start_20A.mrc", "particles.mrcs", "particles.star",
             "particles_true.star")


def simulate(work, case, n):
    """Simulate in a scratch folder, then move each product into WORK unless the same
    bytes are already there (a RELION run may be reading them)."""
    scratch = os.path.join(work, "simulating")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    record = _simulate(scratch, case, n)
    for name in SIMULATED:
        new, old = os.path.join(scratch, name), os.path.join(work, name)
        if not (os.path.exists(old) and content_hash(old) == content_hash(new)):
            os.replace(new, old)
    shutil.rmtree(scratch)
    return record


def _simulate(work, case, n):
    """truth.mrc, start_20A.mrc, particles.mrcs, particles.star (no poses),
    particles_true.star (true poses and origins); returns the simulation record."""
    import mrcfile
    import numpy as np
    import pandas as pd
    import starfile
    from scipy.spatial.transform import Rotation

    from mpirefine.geometry.rotations import matrix_to_euler
    from mpirefine.io.mrc import write_mrc
    from mpirefine.synthetic.models import model_volume

    box, px, seed = case["box"], case["pixel_size_A"], case["seed"]
    truth = model_volume(box, px, chains=case["chains"], center_A=case["center"])
    write_mrc(os.path.join(work, "truth.mrc"), truth, px)
    rng = np.random.default_rng(seed)
    euler = matrix_to_euler(Rotation.random(n, random_state=seed).as_matrix())
    defocus, astig = rng.uniform(10000, 25000, n), rng.uniform(0, 500, n)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7],
                           "rlnVoltage": [300.0], "rlnImagePixelSize": [px],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    ctf = {"rlnDefocusU": defocus + astig, "rlnDefocusV": defocus,
           "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnOpticsGroup": [1] * n}
    poses = {"rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
             "rlnOriginXAngst": rng.normal(0, ORIGIN_SIGMA_A, n),
             "rlnOriginYAngst": rng.normal(0, ORIGIN_SIGMA_A, n)}
    true = pd.DataFrame({"rlnImageName": names, "rlnMicrographName": ["sim.mrc"] * n,
                         **poses, **ctf})
    starfile.write({"optics": optics, "particles": true},
                   os.path.join(work, "particles_true.star"), overwrite=True)
    bare = true.drop(columns=list(poses))
    starfile.write({"optics": optics, "particles": bare},
                   os.path.join(work, "particles.star"), overwrite=True)
    # relion_project: projection + CTF at the true poses (no noise: added below, seeded).
    run("relion_project", "--i", "truth.mrc", "--o", "clean", "--ang", "particles_true.star",
        "--ctf", "--angpix", px, cwd=work)
    with mrcfile.open(os.path.join(work, "clean.mrcs")) as m:
        clean = np.asarray(m.data, np.float32)
    signal_var = float(clean.var(axis=(1, 2)).mean())
    sigma = (signal_var / case["snr"]) ** 0.5
    noisy = clean + np.random.default_rng(seed + 1000).normal(0, sigma, clean.shape).astype(np.float32)
    with mrcfile.new(os.path.join(work, "particles.mrcs"), overwrite=True) as m:
        m.set_data(noisy)
        m.voxel_size = px
    os.remove(os.path.join(work, "clean.mrcs"))
    run("relion_image_handler", "--i", "truth.mrc", "--o", "start_20A.mrc", "--lowpass", 20,
        "--angpix", px, cwd=work)
    chains = case["chains"] or "all 24"
    return {"model": f"shipped apoferritin Cα model, chains {chains}",
            "box": box, "pixel_size_A": px, "particles": n, "snr": case["snr"],
            "noise_sigma": sigma, "signal_variance": signal_var,
            "defocus_A": [10000, 25000], "astigmatism_A": [0, 500],
            "origin_sigma_A_per_axis": ORIGIN_SIGMA_A, "seed": seed,
            "symmetry": case["symmetry"], "particle_diameter_A": case["particle_diameter_A"],
            "start": "truth low-passed to 20 Å by relion_image_handler --lowpass 20",
            "projector": run("relion_project", "--version", cwd=work).strip().splitlines()[0],
            "particles_data_sha256": content_hash(os.path.join(work, "particles.mrcs")),
            "start_data_sha256": content_hash(os.path.join(work, "start_20A.mrc"))}


# ---------------------------------------------------------------- scoring

def read_table(path):
    import starfile
    d = starfile.read(path)
    return d["particles"] if isinstance(d, dict) else d


class Scorer:
    def __init__(self, work, sim):
        import numpy as np

        from mpirefine.geometry.rotations import euler_to_matrix
        from mpirefine.geometry.symmetry import point_group
        from mpirefine.io.mrc import read_volume

        self.work, self.px = work, sim["pixel_size_A"]
        self.truth, _ = read_volume(os.path.join(work, "truth.mrc"))
        true = read_table(os.path.join(work, "particles_true.star")).set_index("rlnImageName")
        self.names = list(true.index)
        self.true_rot = euler_to_matrix(*(true[c].to_numpy() for c in
                                          ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
        self.true_origin = true[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
        self.group = None if sim["symmetry"] == "C1" else point_group(sim["symmetry"])
        self.np = np

    def maps(self, *volumes):
        from mpirefine.synthetic.evaluate import compare_with_truth
        v = sum(self.np.asarray(m, float) for m in volumes) / len(volumes)
        c = compare_with_truth(v, self.truth, self.px)
        return {"fsc_0.5_A": round(float(c["resolution_A_05"]), 3),
                "fsc_0.143_A": round(float(c["resolution_A_0143"]), 3)}

    def map_files(self, *paths):
        from mpirefine.io.mrc import read_volume
        return self.maps(*(read_volume(os.path.join(self.work, p))[0] for p in paths))

    def poses(self, rotations, origins_A, rows=None):
        from mpirefine.synthetic.evaluate import pose_errors_deg
        np = self.np
        rows = np.arange(len(self.names)) if rows is None else np.asarray(rows)
        err = pose_errors_deg(rotations, self.true_rot[rows], self.group)
        oerr = np.linalg.norm(np.asarray(origins_A) - self.true_origin[rows], axis=1)
        return {"n": int(rows.size), "median_angular_error_deg": round(float(np.median(err)), 3),
                "percent_within_5deg": round(100.0 * float(np.mean(err <= WITHIN_DEG)), 2),
                "percent_over_20deg": round(100.0 * float(np.mean(err > GROSS_DEG)), 2),
                "median_origin_error_A": round(float(np.median(oerr)), 3),
                "percent_origin_within_1px": round(100.0 * float(np.mean(oerr <= self.px)), 2)}

    def star_poses(self, path):
        from mpirefine.geometry.rotations import euler_to_matrix
        t = read_table(os.path.join(self.work, path))
        rows = self.np.asarray([self.names.index(n) for n in t["rlnImageName"]]) \
            if list(t["rlnImageName"]) != self.names else None
        rot = euler_to_matrix(*(t[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt",
                                                          "rlnAnglePsi")))
        return self.poses(rot, t[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), rows)


# ---------------------------------------------------------------- RELION

def find_mpirun(explicit):
    if explicit:
        return explicit
    venv_bin = os.path.dirname(sys.executable)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if os.path.abspath(p) != os.path.abspath(venv_bin))
    found = shutil.which("mpirun", path=path)
    if not found:
        sys.exit("mpirun (the MPI RELION was built with) is not on PATH")
    return found


def relion_command(case, args):
    mpirun = find_mpirun(args.relion_mpirun)
    launcher = [mpirun, "-np", args.relion_np]
    if "Open MPI" in subprocess.run([mpirun, "--version"], capture_output=True,
                                    text=True).stdout:
        launcher[1:1] = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return launcher + [
        "relion_refine_mpi", "--o", "relion/run", "--i", "particles.star",
        "--ref", "start_20A.mrc", "--ini_high", 20, "--auto_refine", "--split_random_halves",
        "--ctf", "--particle_diameter", case["particle_diameter_A"],
        "--flatten_solvent", "--zero_mask", "--norm", "--scale", "--sym", case["symmetry"],
        "--healpix_order", 2, "--auto_local_healpix_order", 4, "--offset_range", 5,
        "--offset_step", 2, "--oversampling", 1, "--pad", 2, "--low_resol_join_halves", 40,
        "--dont_combine_weights_via_disc", "--pool", 3, "--j", 1, "--random_seed", 0]


def star_value(path, label):
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == label:
                return float(parts[1])
    return None


def run_relion(work, case, args, scorer):
    d = os.path.join(work, "relion")
    cmd = relion_command(case, args)
    if args.relion_from_files and not os.path.exists(os.path.join(d, "timing.json")):
        t = unfinished_timing(d)
    elif args.relion_from_files:
        with open(os.path.join(d, "timing.json")) as f:
            t = json.load(f)
    else:
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            os.remove(os.path.join(d, f))
        print("RELION:", " ".join(map(str, cmd)), flush=True)
        t = timed(cmd, work, os.path.join(d, "log.txt"))
        with open(os.path.join(d, "timing.json"), "w") as f:
            json.dump(t, f)
    files = os.listdir(d)
    its = sorted({int(f[6:9]) for f in files if f.startswith("run_it") and f[6:9].isdigit()})
    samples = t.get("cpu_samples")
    if not samples and os.path.exists(os.path.join(d, "cpu_samples.json")):
        with open(os.path.join(d, "cpu_samples.json")) as f:   # from an outside monitor
            samples = json.load(f)
    ends = {it: max(os.path.getmtime(os.path.join(d, f)) for f in files
                    if f.startswith(f"run_it{it:03d}_")) for it in its}
    final_pass = None                 # written without an iteration number
    if its and os.path.exists(os.path.join(d, "run_data.star")):
        final_pass = its[-1] + 1
        ends[final_pass] = max(os.path.getmtime(os.path.join(d, f)) for f in files
                               if f.startswith("run_") and not f.startswith("run_it"))
    segments = continued_segments(d)
    times = (segment_times(ends, t["start_epoch"], samples, segments) if segments
             else single_run_times(ends, t["start_epoch"], samples))
    iterations = []
    for it in its:
        rec = {"iteration": it, **times[it]}
        model = os.path.join(d, f"run_it{it:03d}_half1_model.star")
        if os.path.exists(model):
            rec["reported_resolution_A"] = star_value(model, "_rlnCurrentResolution")
        halves = [f"relion/run_it{it:03d}_half{h}_class001.mrc" for h in (1, 2)]
        if all(os.path.exists(os.path.join(work, h)) for h in halves):
            rec["half_map_average_vs_truth"] = scorer.map_files(*halves)
        data = f"relion/run_it{it:03d}_data.star"
        if it > 0 and os.path.exists(os.path.join(work, data)):
            rec["poses"] = scorer.star_poses(data)
        iterations.append(rec)
    final = None                      # an unfinished run (see unfinished_timing) has none
    if os.path.exists(os.path.join(d, "run_data.star")):
        final = {"map_vs_truth": scorer.map_files("relion/run_class001.mrc"),
                 "half_map_average_vs_truth": scorer.map_files(
                     "relion/run_half1_class001_unfil.mrc", "relion/run_half2_class001_unfil.mrc"),
                 "poses": scorer.star_poses("relion/run_data.star"),
                 "reported_resolution_A": star_value(os.path.join(d, "run_model.star"),
                                                     "_rlnCurrentResolution"),
                 "iteration": final_pass, **times[final_pass]}
    version = subprocess.run(["relion_refine", "--version"], capture_output=True,
                             text=True).stdout.split("\n")[0].strip()
    return {"program": version, "command": show(cmd),
            "processes": args.relion_np, "cores": os.cpu_count(),
            "note": f"{args.relion_np} MPI processes (1 master + workers) on "
                    f"{os.cpu_count()} cores, --j 1",
            **{k: v for k, v in t.items() if k not in ("start_epoch", "cpu_samples")},
            **(segments_summary(times, segments, final is not None) if segments else {}),
            "iterations": iterations, "final": final,
            "best_iteration": best_iteration(iterations)}


def single_run_times(ends, start, samples):
    """Per iteration: when its files appeared, since the start and since the previous
    iteration's, and the CPU seconds the run's processes used meanwhile."""
    out, prev, prev_cpu = {}, start, 0.0
    for it in sorted(ends):
        cpu = cpu_at(samples, ends[it])
        out[it] = {"seconds_since_start": round(ends[it] - start, 2),
                   "seconds": round(ends[it] - prev, 2), "cpu_seconds_since_start": cpu,
                   "cpu_seconds": None if cpu is None or prev_cpu is None
                   else round(cpu - prev_cpu, 2)}
        prev, prev_cpu = ends[it], cpu
    return out


def continued_segments(d):
    """A run stopped and resumed with ``relion_refine_mpi --continue
    run_itNNN_optimiser.star``: [(NNN, CPU samples of that continuation)], one per
    cpu_samples_from_NNN.json ([epoch, CPU s of the process tree], written by whoever
    ran the continuation).  RELION rewrites iteration NNN's files when it continues;
    their modification times must be set back to when they were first written.  A continuation redoes the
    iteration after NNN from its start, so an attempt that was stopped costs nothing
    here; only the continuation that finished an iteration is charged for it."""
    out = []
    for f in sorted(os.listdir(d)):
        m = re.fullmatch(r"cpu_samples_from_(\d+)\.json", f)
        if m:
            with open(os.path.join(d, f)) as fh:
                out.append((int(m.group(1)), json.load(fh)))
    return out


def segment_times(ends, start, samples, segments):
    """single_run_times for a run made of the first run (samples, from ``start``) and
    its continuations.  An iteration is charged to the last run that started before
    it, from that run's start or its previous iteration's end.  Where an iteration's
    files appeared after its run's last CPU sample (the machine was paused between
    working sessions with RELION running), the CPU seconds up to the last sample are a
    lower bound, and the wall seconds are taken as half of them (the least 2 cores
    allow); such rows say ``"lower_bound": true``.  Where the sampler went on after a
    pause, the pause is left out of the wall seconds.  seconds_since_start adds up the
    iterations' wall seconds, leaving out the pauses and the stopped attempts."""
    runs = [(-1, samples)] + segments
    first = min(ends)
    start = min(start, ends[first])      # a monitor may have started after RELION
    out, elapsed = {}, ends[first] - start
    for it in sorted(ends):
        if it == first:
            out[it] = {"seconds_since_start": round(elapsed, 2), "seconds": round(elapsed, 2),
                       "cpu_seconds": None}
            continue
        began, s = max((r for r in runs if r[0] < it), key=lambda r: r[0])
        if it - 1 > began and it - 1 in ends:
            t0, c0 = ends[it - 1], cpu_at(s, ends[it - 1])
        else:
            t0, c0 = s[0][0], s[0][1]
        c1 = cpu_at(s, ends[it])
        lower = c1 is None and c0 is not None
        cpu = None if c0 is None else round((s[-1][1] if lower else c1) - c0, 2)
        wall = round(cpu / 2 if lower else ends[it] - t0 - paused(s, t0, ends[it]), 2)
        elapsed += wall
        out[it] = {"seconds_since_start": round(elapsed, 2), "seconds": wall,
                   "cpu_seconds": cpu, "cpu_seconds_since_start": None,
                   **({"lower_bound": True} if lower else {})}
    total = 0.0
    for it in sorted(out):
        total += out[it]["cpu_seconds"] or 0.0
        out[it]["cpu_seconds_since_start"] = round(total, 2)
    return out


def paused(samples, t0, t1, gap_s=60.0):
    """Seconds between t0 and t1 in which RELION was paused: the sampler wrote nothing
    for over gap_s (it samples every few seconds, so the machine itself was paused), or
    the process tree used no CPU for over gap_s (it was stopped with SIGSTOP)."""
    out, stall = 0.0, []
    for (a, ca), (b, cb) in zip(samples, samples[1:]):
        if b - a > gap_s:
            out += max(0.0, min(b, t1) - max(a, t0))
        if cb - ca < 0.01 * (b - a):
            stall.append((a, b))
            continue
        out += stalled(stall, t0, t1, gap_s)
        stall = []
    return out + stalled(stall, t0, t1, gap_s)


def stalled(stall, t0, t1, gap_s):
    """The part of [t0, t1] covered by a run of consecutive CPU-idle sample intervals,
    if the run lasts over gap_s (gaps already counted by paused are not counted again)."""
    if not stall or stall[-1][1] - stall[0][0] <= gap_s:
        return 0.0
    return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in stall if b - a <= gap_s)


def segments_summary(times, segments, finished):
    """Totals of a continued run: wall and CPU seconds summed over its iterations."""
    last = times[max(times)]
    return {"wall_seconds": last["seconds_since_start"],
            "cpu_seconds": last["cpu_seconds_since_start"], "finished": finished,
            "continued_from_iterations": [s[0] for s in segments],
            "totals_are_lower_bounds": any(r.get("lower_bound") for r in times.values()),
            "note": ("stopped and continued with relion_refine_mpi --continue; wall and CPU "
                     "seconds are summed over the iterations each run finished (the "
                     "stopped attempts and the pauses between them left out)"
                     + ("" if finished else "; not finished: up to its last iteration"))}


def unfinished_timing(d):
    """Timing of a RELION run that was stopped before it finished (no timing.json):
    from the CPU samples an outside monitor wrote (cpu_samples.json: [epoch, CPU s of
    the process tree] every 2 s, started with RELION) and the last iteration's files."""
    with open(os.path.join(d, "cpu_samples.json")) as f:
        samples = json.load(f)
    last = max(os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)
               if f.startswith("run_it"))
    return {"start_epoch": samples[0][0], "wall_seconds": round(last - samples[0][0], 2),
            "cpu_seconds": cpu_at(samples, last), "cpu_samples": samples, "finished": False,
            "load_average_1min": None,
            "note": "stopped before it finished; times up to its last complete iteration"}


def best_iteration(iterations):
    """The iteration whose half-map average is closest to the truth (FSC 0.5)."""
    scored = [r for r in iterations if r.get("half_map_average_vs_truth")]
    if not scored:
        return None
    return min(scored, key=lambda r: r["half_map_average_vs_truth"]["fsc_0.5_A"])


# ---------------------------------------------------------------- mpirefine

def run_mpirefine(work, case, args, scorer, name, extra):
    import h5py

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
    out = f"mpirefine_{name}"
    cmd = [mpiexec, "-n", args.ranks, sys.executable, "-m", "mpirefine", "refine",
           "particles.star", "start_20A.mrc", "--out", out, "--overwrite",
           "--initial-lowpass", 20, "--symmetry", case["symmetry"], *extra]
    print(f"mpirefine {name}:", " ".join(map(str, cmd)), flush=True)
    iters_dir = os.path.join(work, out + "_iterations")
    for stale in (iters_dir, os.path.join(work, out)):   # no earlier run's checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    with CheckpointCopier(os.path.join(work, out), iters_dir) as copier:
        t = timed(cmd, work, os.path.join(work, out + ".log"))
    with open(os.path.join(work, out, "summary.json")) as f:
        summary = json.load(f)
    seconds = {r["iteration"]: r for r in summary["iterations"]}
    iterations, prev_cpu = [], 0.0
    px = scorer.px
    for c in copier.copies:
        with h5py.File(c["path"], "r") as f:
            it = int(json.loads(f.attrs["state"])["iteration"])
            halves = [f["maps"][h][()] for h in ("half_A", "half_B")]
            p = {k: f["particles"][k][()] for k in ("rotations", "shifts_px", "aligned")}
        rows = scorer.np.flatnonzero(p["aligned"])
        rec = {"iteration": it, "seconds_since_start": round(c["mtime"] - t["start_epoch"], 2),
               "seconds": round(seconds.get(it, {}).get("seconds", float("nan")), 2),
               "cpu_seconds_since_start": cpu_at(t["cpu_samples"], c["mtime"]),
               "batch_size": seconds.get(it, {}).get("batch_size"),
               "reported_resolution_A": seconds.get(it, {}).get("resolution_A"),
               "half_map_average_vs_truth": scorer.maps(*halves),
               "poses": scorer.poses(p["rotations"][rows], p["shifts_px"][rows] * px, rows)}
        cpu = rec["cpu_seconds_since_start"]
        rec["cpu_seconds"] = None if cpu is None or prev_cpu is None else round(cpu - prev_cpu, 2)
        prev_cpu = cpu
        iterations.append(rec)
    final = {"map_vs_truth": scorer.map_files(f"{out}/map.mrc"),
             "half_map_average_vs_truth": scorer.map_files(f"{out}/map_half_A.mrc",
                                                           f"{out}/map_half_B.mrc"),
             "poses": scorer.star_poses(f"{out}/particles.star"),
             "reported_resolution_A": summary["final_resolution_A"]}
    return {"command": show(cmd),
            "ranks": args.ranks, "cores": os.cpu_count(),
            **{k: v for k, v in t.items() if k not in ("start_epoch", "cpu_samples")},
            "internal_wall_seconds": round(summary["wall_seconds"], 2),
            "source": source_state(),
            "symmetry_alignment": summary.get("symmetry_alignment"),
            "iterations": iterations, "final": final}


def median_run(runs):
    """The run of median wall time (results are seeded, so every repeat gives the same
    maps and poses), with the wall and CPU seconds of all repeats."""
    import numpy as np
    order = sorted(range(len(runs)), key=lambda i: runs[i]["wall_seconds"])
    best = dict(runs[order[(len(runs) - 1) // 2]])
    best["repeats"] = [{k: r[k] for k in ("wall_seconds", "cpu_seconds", "load_average_1min")}
                       | {"fsc_0.5_A": r["final"]["map_vs_truth"]["fsc_0.5_A"]} for r in runs]
    best["median_wall_seconds"] = round(float(np.median([r["wall_seconds"] for r in runs])), 2)
    best["median_cpu_seconds"] = round(float(np.median([r["cpu_seconds"] for r in runs])), 2)
    return best


def source_state():
    """The commit mpirefine was run from, and whether mpirefine/ had local edits."""
    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    dirty = git("status", "--porcelain", "--", "mpirefine")
    return {"commit": git("rev-parse", "HEAD"),
            "mpirefine_uncommitted_changes": bool(dirty) if dirty is not None else None}


def ceiling(work, case, scorer, args):
    sym = ["--sym", case["symmetry"]] if case["symmetry"] != "C1" else []
    run("relion_reconstruct", "--i", "particles_true.star", "--o", "true_poses_relion.mrc",
        "--ctf", *sym, cwd=work)
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
    run(mpiexec, "-n", args.ranks, sys.executable, "-m", "mpirefine", "reconstruct",
        "particles_true.star", "--out", "true_poses_mpirefine", "--overwrite", cwd=work)
    return {"relion_reconstruct": scorer.map_files("true_poses_relion.mrc"),
            "relion_reconstruct_command": "relion_reconstruct --i particles_true.star "
                                          f"--o true_poses_relion.mrc --ctf {' '.join(sym)}".strip(),
            "mpirefine_reconstruct_note": "mpirefine reconstruct has no symmetry option: C1",
            "mpirefine_reconstruct_map_unfil": scorer.map_files("true_poses_mpirefine/map_unfil.mrc"),
            "mpirefine_reconstruct_half_map_average": scorer.map_files(
                "true_poses_mpirefine/map_half_A.mrc", "true_poses_mpirefine/map_half_B.mrc")}


def time_to_reach(section, target_A):
    """Seconds since launch at the end of the first iteration whose half-map average
    reaches target_A (FSC 0.5 vs truth), else the end of the run if its final map
    does, else None."""
    for r in section["iterations"]:
        v = r.get("half_map_average_vs_truth")
        if v and v["fsc_0.5_A"] <= target_A + 1e-6:
            return {"iteration": r["iteration"], "seconds": r["seconds_since_start"],
                    "by": "half-map average of the iteration"}
    if section["final"] and section["final"]["map_vs_truth"]["fsc_0.5_A"] <= target_A + 1e-6:
        return {"iteration": "final", "seconds": section["wall_seconds"], "by": "final map"}
    return None


def compare(report, target_program="relion"):
    """When each run first reaches the final map FSC 0.5 of RELION (or of mpirefine
    with default options)."""
    runs = {"relion": report.get("relion")}
    runs.update({f"mpirefine_{k}": v for k, v in report.get("mpirefine", {}).items()})
    ref = runs.get(target_program)
    if not ref:
        return None
    if ref["final"] is None:          # an unfinished run: its best iteration
        best = ref["best_iteration"]
        target = best["half_map_average_vs_truth"]["fsc_0.5_A"]
        what = f"the unfinished run's best half-map average (iteration {best['iteration']})"
    else:
        target = ref["final"]["map_vs_truth"]["fsc_0.5_A"]
        what = ("RELION's final run_class001.mrc" if target_program == "relion"
                else "mpirefine's final map.mrc")
    out = {"target": f"{what}: FSC 0.5 vs truth", "target_A": target}
    out.update({name: time_to_reach(sec, target) for name, sec in runs.items() if sec})
    return out


def fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def tables(report):
    """Markdown: the final comparison, then iteration by iteration."""
    sections = []
    if "relion" in report:
        sections.append(("RELION 3.1 auto-refine", report["relion"], "processes"))
    for name, sec in report.get("mpirefine", {}).items():
        label = "mpirefine" + ("" if name == "default" else f" --{name}-marginalization"
                               if name == "adaptive" else f" ({name})")
        sections.append((label, sec, "ranks"))
    reach = report.get("time_to_relion_final_resolution") or {}
    reach2 = report.get("time_to_mpirefine_final_resolution") or {}
    lines = ["| program | map vs truth FSC 0.5 / 0.143 (Å) | half-map average FSC 0.5 / 0.143 (Å) "
             "| median angular error | within 5° | over 20° | median origin error | iterations "
             "| wall s (CPU s) | reaches RELION's final FSC 0.5 at "
             "| reaches mpirefine's final FSC 0.5 at |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, sec, _ in sections:
        f = sec["final"]
        if f is None:                 # unfinished: its best iteration's half maps and poses
            b = sec["best_iteration"]
            f = {"map_vs_truth": {"fsc_0.5_A": math.nan, "fsc_0.143_A": math.nan},
                 "half_map_average_vs_truth": b["half_map_average_vs_truth"], "poses": b["poses"]}
            label += f" (unfinished; best iteration, {b['iteration']})"
        key = "relion" if label.startswith("RELION") else "mpirefine_" + \
            next(k for k, v in report["mpirefine"].items() if v is sec)
        r, r2 = reach.get(key), reach2.get(key)
        wall = sec.get("median_wall_seconds", sec["wall_seconds"])
        cpu = sec.get("median_cpu_seconds", sec["cpu_seconds"])
        n_it = len([i for i in sec["iterations"] if i["iteration"] != 0])
        reached = " | ".join("never" if x is None else "{:.0f} s (iteration {})".format(
            x["seconds"], x["iteration"]) for x in (r, r2))
        lines.append(
            f"| {label} | {f['map_vs_truth']['fsc_0.5_A']:.2f} / {f['map_vs_truth']['fsc_0.143_A']:.2f} "
            f"| {f['half_map_average_vs_truth']['fsc_0.5_A']:.2f} / "
            f"{f['half_map_average_vs_truth']['fsc_0.143_A']:.2f} "
            f"| {f['poses']['median_angular_error_deg']:.2f}° | {f['poses']['percent_within_5deg']:.1f} % "
            f"| {fmt(f['poses'].get('percent_over_20deg'))} % "
            f"| {f['poses']['median_origin_error_A']:.2f} Å | {n_it} | {wall:.0f} ({cpu:.0f}) "
            f"| {reached} |")
    c = report.get("true_poses_ceiling", {})
    if c:
        t = c["relion_reconstruct"]
        lines.append(f"| true poses, relion_reconstruct | {t['fsc_0.5_A']:.2f} / {t['fsc_0.143_A']:.2f} "
                     "| – | 0 | 100 % | 0 % | 0 | – | – | – | – |")
    out = ["\n".join(lines)]
    for label, sec, _ in sections:
        load = (sec.get("load_average_1min") or {}).get("median")
        rows = [f"{label}, load average {fmt(load)} (median):", "",
                "| iteration | ends at s | wall s | CPU s | reported resolution (Å) "
                "| half-map average vs truth FSC 0.5 / 0.143 (Å) | median angular error | within 5° |",
                "|---|---|---|---|---|---|---|---|"]
        for it in sec["iterations"]:
            h, p = it.get("half_map_average_vs_truth"), it.get("poses")
            rows.append(f"| {it['iteration']} | {it['seconds_since_start']:.0f} | {it['seconds']:.1f} "
                        f"| {fmt(it.get('cpu_seconds'))} | {fmt(it.get('reported_resolution_A'), 2)} "
                        f"| {fmt(h and h['fsc_0.5_A'], 2)} / {fmt(h and h['fsc_0.143_A'], 2)} "
                        f"| {fmt(p and p['median_angular_error_deg'], 2)}° "
                        f"| {fmt(p and p['percent_within_5deg'])} % |")
        out.append("\n".join(rows))
    return "\n\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    case = dict(CASES[args.case])
    n = args.particles or case["particles"]
    work = os.path.abspath(args.out or os.path.join(ROOT, "runs", f"vs_relion_{args.case}"))
    json_path = args.json or os.path.join(HERE, "results", f"vs_relion_{args.case}.json")
    if args.table:
        with open(json_path) as f:
            print(tables(json.load(f)))
        return 0
    os.makedirs(work, exist_ok=True)
    old = {}
    if os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
    if args.skip_relion and "relion" not in old:
        print(f"--skip-relion: {json_path} has no RELION results; leaving RELION out",
              flush=True)
    for tool in ("relion_project", "relion_image_handler", "relion_reconstruct"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH: install RELION (e.g. `apt-get install relion`)")

    sim = simulate(work, case, n)
    if args.skip_relion and "relion" in old:
        for key in ("particles_data_sha256", "start_data_sha256"):
            if old["simulation"].get(key, sim[key]) != sim[key]:
                sys.exit(f"--skip-relion: the particles differ from those RELION refined "
                         f"({key}); rerun without --skip-relion")
    scorer = Scorer(work, sim)
    report = {"benchmark": "vs_relion", "case": args.case, "simulation": sim,
              "machine": {"cores": os.cpu_count(), "note": "shared machine: see load averages"},
              "work_dir": os.path.relpath(work, ROOT)}
    report["true_poses_ceiling"] = ceiling(work, case, scorer, args)
    if args.skip_relion:
        if "relion" in old:
            report["relion"] = old["relion"]
    else:
        report["relion"] = run_relion(work, case, args, scorer)
        print(json.dumps(report["relion"]["final"]), flush=True)
    report["mpirefine"] = dict(old.get("mpirefine", {})) if args.skip_mpirefine else {}
    if not args.skip_mpirefine:
        keep = old.get("mpirefine", {})
        variants = args.variants or list(case["mpirefine_variants"])
        for name in case["mpirefine_variants"]:
            if name in variants:
                runs = [run_mpirefine(work, case, args, scorer, name,
                                      case["mpirefine_variants"][name])
                        for _ in range(args.repeats)]
                report["mpirefine"][name] = median_run(runs)
                print(name, json.dumps(report["mpirefine"][name]["final"]), flush=True)
            elif name in keep:
                report["mpirefine"][name] = keep[name]
    report["time_to_relion_final_resolution"] = compare(report)
    report["time_to_mpirefine_final_resolution"] = compare(report, "mpirefine_default")
    report["reproduce"] = {
        "all": f"python benchmarks/vs_relion.py --case {args.case}",
        "mpirefine_only": f"python benchmarks/vs_relion.py --case {args.case} --skip-relion"}
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
