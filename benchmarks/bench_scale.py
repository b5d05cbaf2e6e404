"""Benchmark `mpirefine refine` on a stack far larger than memory: 100,000 particles of
256 px (26 GB of float32) on 2 MPI ranks, with the resident memory of every rank sampled
while it runs, and the same refinement on a 10,000-particle subset of the same stack to
show that the peak does not grow with the stack.

Data (``--work-dir``; reused when a previous run completed it, deleted at the end unless
``--keep-data`` or a step failed): the shipped apoferritin model at ``--box`` px and
``--pixel-size-A``, projected at uniformly random poses with the package's own
simulation code (:func:`mpirefine.synthetic.simulate.clean_images`: projection, CTF,
origin shift), white Gaussian noise of σ fixed from the first 1,000 clean images for
the wanted SNR (the SNR of :mod:`mpirefine.synthetic.simulate`). Stacks of
``--stack-size`` images are written chunk by chunk (``--chunk`` images at a time) into
files laid out by ``mrcfile.new_mmap``, each written chunk flushed and dropped from the
page cache, so no process ever holds more than a chunk of images;
``--gen-workers`` processes write different stacks at once. particles.star (CTF, no
poses), particles_<subset>.star (its first rows), the start (the model low-passed to
20 Å) and the true poses (truth.npz) go next to them.

Each run: the stacks are dropped from the page cache, then
``mpiexec -n RANKS python -m mpirefine refine STAR start.mrc --out OUT
--disable-auto-batchsize --max-iterations 1 --initial-lowpass RES`` (plus
``--refine-args``) with OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS=1: setup (noise model,
greyscale), one full pass over every particle at the start resolution, the
reconstruction and every output. Every ``--sample-seconds`` the ranks' /proc/PID/status
(VmRSS, VmHWM, RssAnon, RssFile; ranks named by PMI_RANK) and /proc/loadavg are read.

Recorded per run: wall seconds of the command; the full pass's seconds and seconds per
1,000 particles (summary.json ``iterations``); per rank (``timings_per_rank``) the
timer's categories, ``reading`` (the time the loop waited for images) over the pass's
seconds, and the rank's CPU seconds; peak RSS per rank (VmHWM at the last sample) and
its RSS over time; the load average; the pose error of the pass against the truth
(minimum over the model's 24 octahedral operators: the refinement runs in C1); the
memory model's estimate (``mpirefine info``) per rank role; the code it ran (git commit
and a digest of the package's source, before and after). Every run imports the package
from a copy of its source taken when the script starts (``--no-freeze-code``: from
where it is installed), so runs compare like with like while the tree is edited.
``--sizes`` refines only some of the sets; ``--update`` adds the runs to an existing
``--out``.

    nice -n 10 python benchmarks/bench_scale.py --work-dir /tmp/scale100k \
        --out benchmarks/results/bench_scale_100k_box256.json

benchmarks/README.md and docs/performance.md explain the fields.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")
CALIBRATION_IMAGES = 1000
START_LOWPASS_A = 20.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON results file")
    p.add_argument("--n-particles", type=int, default=100_000, help="[100000]")
    p.add_argument("--subsets", type=int, nargs="*", default=[10_000],
                   help="smaller sets (the stack's first N particles) refined first [10000]")
    p.add_argument("--box", type=int, default=256, help="box, px [256]")
    p.add_argument("--pixel-size-A", type=float, default=1.1, help="pixel size, Å [1.1]")
    p.add_argument("--snr", type=float, default=0.05, help="[0.05]")
    p.add_argument("--stack-size", type=int, default=10_000, help="images per .mrcs [10000]")
    p.add_argument("--chunk", type=int, default=256, help="images made and written at once [256]")
    p.add_argument("--gen-workers", type=int, default=2, help="processes writing stacks [2]")
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks [2]")
    p.add_argument("--initial-lowpass-A", type=float, default=20.0,
                   help="start resolution = the full pass's alignment resolution, Å [20]")
    p.add_argument("--image-batch-size", type=int, default=256, help="[256]")
    p.add_argument("--refine-args", default="", help="more `mpirefine refine` options (one string)")
    p.add_argument("--sample-seconds", type=float, default=2.0, help="[2]")
    p.add_argument("--warm-cache", action="store_true",
                   help="leave the stacks in the page cache (default: drop them before each run)")
    p.add_argument("--work-dir", default="/tmp/scale100k", help="data and outputs [/tmp/scale100k]")
    p.add_argument("--keep-data", action="store_true", help="keep --work-dir at the end")
    p.add_argument("--data-only", action="store_true", help="make the data and stop (keeps it)")
    p.add_argument("--sizes", type=int, nargs="*", default=None,
                   help="refine only these of the prepared sets (default: all, smallest first)")
    p.add_argument("--update", action="store_true",
                   help="keep the runs already in --out and add these (a run of the same size "
                        "made with the same code is replaced)")
    p.add_argument("--no-freeze-code", action="store_true",
                   help="run the package where it is installed (default: from a copy of its "
                        "source taken at the start, the same code for every run even while "
                        "the tree is edited)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ data

def _data_key(args) -> dict:
    return {"n_particles": args.n_particles, "box": args.box, "pixel_size_A": args.pixel_size_A,
            "snr": args.snr, "stack_size": args.stack_size, "seed": args.seed}


def _draw_truth(n: int, seed: int):
    """Uniform poses, origins N(0, 3 Å), CTFs as `mpirefine simulate` draws them."""
    import numpy as np
    from scipy.spatial.transform import Rotation

    from mpirefine.geometry.rotations import euler_to_matrix, matrix_to_euler

    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
    angles = matrix_to_euler(Rotation.random(n, random_state=streams[0]).as_matrix()
                             .transpose(0, 2, 1))
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    origins = streams[1].normal(0.0, 3.0, size=(n, 2))
    mean_df = streams[2].uniform(1.0e4, 2.5e4, n)
    astig = streams[2].uniform(0.0, 500.0, n)
    return {"angles": angles, "rotations": rotations, "origins_A": origins,
            "defocus_u_A": mean_df + astig / 2, "defocus_v_A": mean_df - astig / 2,
            "defocus_angle_deg": streams[2].uniform(0.0, 180.0, n)}


def _ctf(truth, idx):
    from mpirefine.physics.ctf import CTFParams

    return CTFParams(defocus_u_A=truth["defocus_u_A"][idx], defocus_v_A=truth["defocus_v_A"][idx],
                     defocus_angle_deg=truth["defocus_angle_deg"][idx], voltage_kV=300.0,
                     cs_mm=2.7, amplitude_contrast=0.1, phase_shift_deg=0.0, bfactor_A2=0.0)


_GEN = {}   # a writer's state: the volume's transform, the truth, the noise level


def _init_generator(spec: dict) -> None:
    """Set up a writer (the parent too): the model's Fourier transform and the truth."""
    import numpy as np

    from mpirefine.fourier.project import volume_ft
    from mpirefine.synthetic.models import model_volume

    for var in THREAD_VARIABLES:
        os.environ[var] = "1"
    with np.load(os.path.join(spec["folder"], "truth.npz")) as f:
        truth = {k: f[k] for k in f.files}
    _GEN.update(spec, truth=truth,
                vft=volume_ft(model_volume(box=spec["box"], pixel_size_A=spec["pixel_size_A"])))


def _clean(idx):
    from mpirefine.synthetic.simulate import clean_images

    t = _GEN["truth"]
    return clean_images(_GEN["vft"], t["rotations"][idx], t["origins_A"][idx], _ctf(t, idx),
                        _GEN["pixel_size_A"])


def _write_stack(task) -> dict:
    """Stack k: particles [start, stop), written chunk by chunk after a header-only
    layout by mrcfile.new_mmap (a sparse file of the whole size)."""
    import mrcfile
    import numpy as np

    path, k, start, stop = task
    box, chunk, sigma = _GEN["box"], _GEN["chunk"], _GEN["sigma"]
    t0 = time.perf_counter()
    with mrcfile.new_mmap(path + ".part", shape=(stop - start, box, box), mrc_mode=2,
                          overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = _GEN["pixel_size_A"]
        offset = mrc.header.nbytes + mrc.extended_header.nbytes
    fd = os.open(path + ".part", os.O_WRONLY)
    try:
        for s in range(start, stop, chunk):
            idx = np.arange(s, min(stop, s + chunk))
            images = _clean(idx)
            rng = np.random.default_rng([_GEN["seed"], 1, int(s)])
            images += np.float32(sigma) * rng.standard_normal(images.shape, dtype=np.float32)
            data = images.astype("<f4", copy=False).tobytes()
            pos = offset + (s - start) * box * box * 4
            os.pwrite(fd, data, pos)
            os.fdatasync(fd)
            os.posix_fadvise(fd, pos, len(data), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    os.replace(path + ".part", path)
    return {"stack": os.path.basename(path), "images": stop - start,
            "seconds": time.perf_counter() - t0, "peak_MiB": _status_kib("self", "VmHWM") / 1024}


def make_data(args, folder: str) -> dict:
    """The stacks, STAR files, start and truth in ``folder``; reused when complete."""
    import multiprocessing

    import numpy as np
    import pandas as pd

    from mpirefine.fourier.filters import lowpass
    from mpirefine.io.mrc import write_mrc
    from mpirefine.io.star import write_relion_star
    from mpirefine.synthetic.models import model_volume

    done = os.path.join(folder, "complete.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            record = json.load(f)
        if record["key"] == _data_key(args):
            record["reused"] = True
            return record
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    n, box, px = args.n_particles, args.box, args.pixel_size_A
    volume = model_volume(box=box, pixel_size_A=px)
    truth = _draw_truth(n, args.seed)
    np.savez(os.path.join(folder, "truth.npz"), **truth)
    write_mrc(os.path.join(folder, "start.mrc"), lowpass(volume, START_LOWPASS_A, px), px)
    del volume
    spec = {"folder": folder, "pixel_size_A": px, "box": box, "chunk": args.chunk,
            "seed": args.seed}
    _init_generator(spec)
    calibration = _clean(np.arange(min(n, CALIBRATION_IMAGES)))
    signal_variance = float(calibration.var(axis=(1, 2), dtype=np.float64).mean())
    del calibration
    spec["sigma"] = sigma = (signal_variance / args.snr) ** 0.5
    _GEN["sigma"] = sigma
    setup_seconds = time.perf_counter() - t0

    starts = list(range(0, n, args.stack_size))
    names = [f"stack_{k:03d}.mrcs" for k in range(len(starts))]
    tasks = [(os.path.join(folder, names[k]), k, s, min(n, s + args.stack_size))
             for k, s in enumerate(starts) if not os.path.isfile(os.path.join(folder, names[k]))]
    t1 = time.perf_counter()
    workers = max(1, min(args.gen_workers, len(tasks)))
    if workers > 1:
        _GEN.clear()     # the writers make their own (a fork would copy OpenMP's threads)
        with multiprocessing.get_context("spawn").Pool(workers, _init_generator, (spec,)) as pool:
            written = []
            for r in pool.imap_unordered(_write_stack, tasks):
                written.append(r)
                print(f"  {r['stack']}: {r['images']} images in {r['seconds']:.0f} s "
                      f"(writer peak RSS {r['peak_MiB']:.0f} MiB)", flush=True)
    else:
        written = [_write_stack(t) for t in tasks]
    write_seconds = time.perf_counter() - t1
    _GEN.clear()

    stack_of = np.arange(n) // args.stack_size
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7], "rlnVoltage": [300.0],
        "rlnImagePixelSize": [px], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({
        "rlnImageName": [f"{i % args.stack_size + 1:06d}@{names[k]}" for i, k in enumerate(stack_of)],
        "rlnMicrographName": [f"micrograph_{k:03d}.mrc" for k in stack_of],
        "rlnDefocusU": truth["defocus_u_A"], "rlnDefocusV": truth["defocus_v_A"],
        "rlnDefocusAngle": truth["defocus_angle_deg"], "rlnPhaseShift": np.zeros(n),
        "rlnCtfBfactor": np.zeros(n), "rlnCtfScalefactor": np.ones(n),
        "rlnOpticsGroup": np.ones(n, dtype=int)})
    stars = {str(n): "particles.star"}
    write_relion_star(os.path.join(folder, "particles.star"), optics, particles)
    for m in args.subsets:
        if m < n:
            stars[str(m)] = f"particles_{m}.star"
            write_relion_star(os.path.join(folder, stars[str(m)]), optics, particles.iloc[:m])
    record = {"key": _data_key(args), "reused": False, "folder": folder, "stars": stars,
              "stacks": names, "start": "start.mrc", "start_lowpass_A": START_LOWPASS_A,
              "noise_sigma": sigma, "signal_variance_first_1000": signal_variance,
              "bytes": int(n) * box * box * 4, "setup_seconds": setup_seconds,
              "write_seconds": write_seconds, "workers": workers, "chunk": args.chunk,
              "stacks_written": written, "seconds": time.perf_counter() - t0}
    with open(done + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(done + ".tmp", done)
    return record


# --------------------------------------------------------------------------- sampling

def _status_kib(pid, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _status(pid) -> dict | None:
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(line.split()[1])
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        out["cpu_seconds"] = (int(fields[11]) + int(fields[12])) / tick
    except (OSError, IndexError, ValueError):
        return None
    return out if "VmRSS" in out else None


def _children() -> dict:
    """{pid: ppid} of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", encoding="ascii") as f:
                    table[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return table


def _rank_pids(root: int, known: dict) -> dict:
    """{rank: pid} of the MPI ranks below ``root`` (PMI_RANK in their environment)."""
    parents = _children()
    below, frontier = set(), {root}
    while frontier:
        frontier = {p for p, q in parents.items() if q in frontier} - below
        below |= frontier
    ranks = {}
    for pid in below:
        if pid in known.values():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"PMI_RANK" in env and b"mpirefine" in cmdline:
            ranks[int(env[b"PMI_RANK"])] = pid
    return ranks


def _loadavg() -> float:
    with open("/proc/loadavg", encoding="ascii") as f:
        return float(f.read().split()[0])


def _drop_from_page_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------- runs

def run_refine(args, data: dict, n: int, work: str) -> dict:
    import numpy as np

    folder = data["folder"]
    star = os.path.join(folder, data["stars"][str(n)])
    out_dir = os.path.join(work, f"refine_{n}")
    cmd = ["mpiexec", "-n", str(args.ranks), sys.executable, "-m", "mpirefine", "refine", star,
           os.path.join(folder, data["start"]), "--out", out_dir, "--overwrite",
           "--disable-auto-batchsize", "--max-iterations", "1",
           "--initial-lowpass", f"{args.initial_lowpass_A:g}",
           "--image-batch-size", str(args.image_batch_size)] + args.refine_args.split()
    env = dict(os.environ, **dict.fromkeys(THREAD_VARIABLES, "1"))
    if not args.warm_cache:
        _drop_from_page_cache(os.path.join(folder, s) for s in data["stacks"])
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(work, f"refine_{n}.log")
    samples, ranks, last = [], {}, {}
    print(f"run N={n}: {' '.join(cmd)}", flush=True)
    code_before = code_identity()
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        next_report = 60.0
        while proc.poll() is None:
            if len(ranks) < args.ranks:
                ranks.update(_rank_pids(proc.pid, ranks))
            now = time.perf_counter() - t0
            row = {"t": round(now, 1), "load1": _loadavg(), "ranks": {}}
            for rank, pid in sorted(ranks.items()):
                s = _status(pid)
                if s is not None:
                    last[rank] = s
                    row["ranks"][rank] = {"rss_MiB": round(s["VmRSS"] / 1024),
                                          "anon_MiB": round(s.get("RssAnon", 0) / 1024),
                                          "file_MiB": round(s.get("RssFile", 0) / 1024)}
            samples.append(row)
            if now >= next_report:
                next_report += 60.0
                print(f"  {now:6.0f} s  load {row['load1']:.2f}  RSS (MiB) "
                      + "  ".join(f"r{r}: {v['rss_MiB']}" for r, v in row["ranks"].items()),
                      flush=True)
            time.sleep(args.sample_seconds)
    wall = time.perf_counter() - t0
    code_after = code_identity()
    code = {"before": code_before, "after": code_after,
            "changed_during_run": code_before["source_sha256"] != code_after["source_sha256"]}
    with open(log_path, encoding="utf-8") as f:
        log_tail = f.read().splitlines()[-40:]
    result = {"n_particles": n, "command": " ".join(cmd), "returncode": proc.returncode,
              "started": code_before["time"], "code": code, "wall_seconds": wall,
              "log_tail": log_tail}
    if proc.returncode != 0:
        result["failed"] = True
        return result

    with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    passes = [h for h in summary["iterations"] if h["full_pass"]]
    full = passes[0]
    per_rank = []
    for t in summary["timings_per_rank"]:
        sec = t["seconds"]
        rank = t["rank"]
        peak = last.get(rank, {})
        rss = [row["ranks"][rank]["rss_MiB"] for row in samples if rank in row["ranks"]]
        per_rank.append({
            "rank": rank,
            "timer_seconds": sec,
            "reading_seconds": sec.get("reading", 0.0),
            "reading_fraction_of_pass": sec.get("reading", 0.0) / full["seconds"],
            "search_fraction_of_pass": sec.get("search", 0.0) / full["seconds"],
            "counts": t["counts"],
            "comm_seconds": t["comm_seconds"],
            "bytes_communicated": t["bytes_communicated"],
            "cpu_seconds": peak.get("cpu_seconds"),
            "peak_rss_MiB": peak.get("VmHWM", 0) / 1024,
            "max_sampled_rss_MiB": max(rss) if rss else None,
            "median_sampled_rss_MiB": float(np.median(rss)) if rss else None,
            "final_sample": {k: v / 1024 for k, v in peak.items() if k != "cpu_seconds"}})
    loads = [row["load1"] for row in samples]
    result.update(
        summary_wall_seconds=summary["wall_seconds"],
        full_pass={"iteration": full["iteration"], "batch_size": full["batch_size"],
                   "seconds": full["seconds"],
                   # history's value is the next iteration's: the pass used the one before
                   "alignment_resolution_A": ([args.initial_lowpass_A]
                                              + [h["alignment_resolution_A"]
                                                 for h in summary["iterations"]])[
                                                  summary["iterations"].index(full)],
                   "seconds_per_1000_particles": 1000 * full["seconds"] / full["batch_size"],
                   "rank_seconds_per_1000_particles":
                       1000 * full["seconds"] * summary["n_ranks"] / full["batch_size"]},
        iterations=summary["iterations"],
        resolution_after_pass_A=summary["gsfsc_unmasked_resolution_A"],
        final_resolution_A=summary["final_resolution_A"],
        n_particles_aligned=summary["n_particles_aligned"], n_ranks=summary["n_ranks"],
        projection_kernel=summary.get("projection_kernel"), per_rank=per_rank,
        peak_rss_MiB_per_rank={r["rank"]: r["peak_rss_MiB"] for r in per_rank},
        load_average_1min={"min": min(loads), "median": float(np.median(loads)), "max": max(loads)},
        rss_over_time={"sample_seconds": args.sample_seconds,
                       "columns": ["t_s", "load1"] + [f"rank{r}_{k}_MiB" for r in sorted(last)
                                                      for k in ("rss", "anon", "file")],
                       "rows": [[row["t"], row["load1"]] + [row["ranks"].get(r, {}).get(k)
                                                            for r in sorted(last)
                                                            for k in ("rss_MiB", "anon_MiB", "file_MiB")]
                                for row in samples]},
        pose_accuracy=pose_accuracy(out_dir, folder, n),
        memory_model_MiB=memory_model(star, args))
    return result


def pose_accuracy(out_dir: str, folder: str, n: int) -> dict:
    """The pass's poses against the truth, up to the model's octahedral symmetry."""
    import numpy as np
    import starfile

    from mpirefine.geometry.rotations import euler_to_matrix
    from mpirefine.synthetic.evaluate import octahedral_group, pose_errors_deg

    table = starfile.read(os.path.join(out_dir, "particles.star"), always_dict=True)["particles"]
    est = euler_to_matrix(*(table[c].to_numpy(float) for c in
                            ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    true = np.load(os.path.join(folder, "truth.npz"))["rotations"][:n]
    errors = pose_errors_deg(est, true, octahedral_group())
    return {"median_deg": float(np.median(errors)), "within_5deg": float(np.mean(errors <= 5)),
            "over_20deg": float(np.mean(errors > 20))}


def memory_model(star: str, args) -> list:
    from mpirefine.io import read_particles
    from mpirefine.report.memory import memory_per_rank, metadata_bytes

    ps = read_particles(star)
    model = memory_per_rank(ps.box, len(ps), args.ranks, args.image_batch_size,
                            metadata=metadata_bytes(ps))
    return [{"ranks": r["ranks"], "total_MiB": (r["device_total"] + r["host_total"]) / 2 ** 20}
            for r in model["roles"]]


def freeze_code(work: str) -> str:
    """Copy the mpirefine package's source to WORK/code and import it from there (this
    process, the data writers and, through PYTHONPATH, the ranks)."""
    import importlib.util

    source = os.path.dirname(importlib.util.find_spec("mpirefine").origin)
    target = os.path.join(work, "code")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, os.path.join(target, "mpirefine"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sys.path.insert(0, target)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [target] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return source


def code_identity() -> dict:
    """The package's source as a run sees it: the git commit of the checkout (read
    only) and a digest of every mpirefine/**/*.py. Modules imported late in a run
    (e.g. for the outputs) are read from disk then, so a digest taken before and after
    each run says whether the code changed under it."""
    import hashlib

    import mpirefine

    root = os.path.dirname(os.path.abspath(mpirefine.__file__))
    checkout = _FROZEN_FROM or root
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = None
    return {"git_head": head, "source_sha256": digest.hexdigest()[:16], "imported_from": root,
            "time": datetime.datetime.now().isoformat(timespec="seconds")}


_FROZEN_FROM = None   # the package's own folder when the runs use a copy of it


def machine() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info["memory_GiB"] = int(f.readline().split()[1]) / 2 ** 20
        with open("/proc/cpuinfo", encoding="ascii") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f
                                      if line.startswith("model name")), None)
    except OSError:
        pass
    return info


def rss_growth(runs: list) -> list:
    """Peak and median RSS per rank of the largest set over each smaller one, saying
    whether both runs ran the same code (the same source digest, unchanged during
    either run)."""
    def digest(r):
        code = r.get("code", {})
        return None if code.get("changed_during_run") is not False else code["before"]["source_sha256"]

    ok = sorted((r for r in runs if not r.get("failed")), key=lambda r: r["n_particles"])
    if not ok:
        return []
    large = max(ok, key=lambda r: (r["n_particles"], r.get("started", "")))
    out = []
    for small in ok:
        if small["n_particles"] == large["n_particles"]:
            continue
        out.append({"from_particles": small["n_particles"], "from_started": small.get("started"),
                    "to_particles": large["n_particles"], "to_started": large.get("started"),
                    "same_code": digest(small) is not None and digest(small) == digest(large),
                    "peak_ratio_per_rank": {str(p["rank"]): q["peak_rss_MiB"] / p["peak_rss_MiB"]
                                            for p, q in zip(small["per_rank"], large["per_rank"])},
                    "median_ratio_per_rank": {
                        str(p["rank"]): q["median_sampled_rss_MiB"] / p["median_sampled_rss_MiB"]
                        for p, q in zip(small["per_rank"], large["per_rank"])}})
    return out


# ------------------------------------------------------------------------------ main

def main(argv=None):
    args = parse_args(argv)
    for var in THREAD_VARIABLES:
        os.environ[var] = "1"
    work = os.path.abspath(args.work_dir)
    data_dir = os.path.join(work, "data")
    if not args.no_freeze_code:
        global _FROZEN_FROM
        os.makedirs(work, exist_ok=True)
        _FROZEN_FROM = freeze_code(work)
    result = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "niceness": os.nice(0), "threads_per_rank": 1,
              "box": args.box, "pixel_size_A": args.pixel_size_A, "snr": args.snr,
              "n_particles": args.n_particles, "ranks": args.ranks,
              "page_cache": "warm" if args.warm_cache else "dropped before each run",
              "code": code_identity(), "code_frozen": not args.no_freeze_code,
              "runs": []}
    failed = True
    try:
        t0 = time.perf_counter()
        print(f"data: {args.n_particles} × {args.box} px into {data_dir}", flush=True)
        data = make_data(args, data_dir)
        result["data"] = {k: v for k, v in data.items() if k != "key"}
        print(f"data ready in {time.perf_counter() - t0:.0f} s"
              f"{' (reused)' if data['reused'] else ''}", flush=True)
        if args.data_only:
            args.keep_data = True
            failed = False
            return 0
        sizes = sorted(int(k) for k in data["stars"])
        if args.sizes:
            missing = sorted(set(args.sizes) - set(sizes))
            if missing:
                raise SystemExit(f"no prepared set of {missing} particles (have {sizes})")
            sizes = sorted(args.sizes)
        if args.update and args.out and os.path.isfile(args.out):
            with open(args.out, encoding="utf-8") as f:
                previous = json.load(f)
            result["earlier_commands"] = (previous.get("earlier_commands", [])
                                          + [{"date": previous["date"],
                                              "command": previous["command"]}])
            result["runs"] = previous["runs"]
        for n in sizes:
            r = run_refine(args, data, n, work)
            same = r["code"]["before"]["source_sha256"]
            result["runs"] = [q for q in result["runs"] if not (
                q["n_particles"] == n and q.get("code", {}).get("before", {}).get(
                    "source_sha256") == same)] + [r]
            if r.get("failed"):
                print(f"run N={n} failed (status {r['returncode']}):\n" + "\n".join(r["log_tail"]),
                      flush=True)
                break
            fp = r["full_pass"]
            print(f"run N={n}: wall {r['wall_seconds']:.0f} s, pass {fp['seconds']:.0f} s = "
                  f"{fp['seconds_per_1000_particles']:.2f} s / 1000 particles, reading "
                  + ", ".join(f"r{p['rank']} {100 * p['reading_fraction_of_pass']:.2f} %"
                              for p in r["per_rank"])
                  + ", peak RSS " + ", ".join(f"r{p['rank']} {p['peak_rss_MiB']:.0f} MiB"
                                              for p in r["per_rank"])
                  + f", median pose error {r['pose_accuracy']['median_deg']:.2f}°", flush=True)
        else:
            failed = False
        result["peak_rss_growth"] = rss_growth(result["runs"])
    finally:
        result["failed"] = failed
        if args.out and not args.data_only:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(json.dumps(result, indent=1) + "\n")
        if args.keep_data or failed:
            print(f"data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
