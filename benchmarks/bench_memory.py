"""Measured peak memory of `mpirefine refine` per rank against the memory plan's forecast
(mpirefine/report/memory.py, what `mpirefine info --ranks N` prints), on the CPU with
the array code (MPIREFINE_JIT=0: the array-namespace reference, without the Numba
and CUDA kernels).

For each box (``--boxes``, default 64 128 256) the shipped apoferritin model is
simulated with `mpirefine simulate` (``--n-particles``, default 300; a 282 Å box: 4.4,
2.2, 1.1 Å/px at 64, 128, 256 px; SNR 0.05). The peak depends on the box, the image
batch and the rank layout, not on the number of particles (docs/performance.md), so a
few hundred particles are enough. Then, for each rank count (``--ranks``, default 1 2):

    [mpiexec -n R] python -m mpirefine refine particles.star start_20A.mrc --out OUT
        --overwrite --cpu --disable-auto-batchsize --max-iterations 1 --initial-lowpass 20

with MPIREFINE_JIT=0 and OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS=1: the noise model and
greyscale estimate, one full pass at 20 Å (search, insertion), the reconstruction of
both half maps, the map from all particles, and every output. Every
``--sample-seconds`` each rank's /proc/PID/status is read (ranks named by PMI_RANK, as
benchmarks/bench_scale.py does); a rank's peak is its VmHWM, the kernel's high-water
mark of its resident set, so no peak between samples is missed.

The forecast is :func:`mpirefine.report.memory.memory_plan` for the same box, particle
count, ranks and image batch, with the particle file's metadata and the run's alignment
radius (box × pixel size / 20 Å); per rank it names the phase it expects the peak in.
First, what a rank holds besides its arrays (the model's BASELINE_HOST_BYTES): the
peak RSS of a process that has imported what a refinement imports, and of a whole
refinement at box 32 (``--baseline-box``).

A run whose forecast, summed over its ranks, exceeds 90 % of the machine's available
memory is skipped (recorded as such), so the benchmark never drives a shared machine
into swapping or the OOM killer.

    python benchmarks/bench_memory.py --out benchmarks/results/bench_memory.json

docs/performance.md ("Memory") shows the table it prints.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scale  # noqa: E402  (its /proc samplers)

THREAD_VARIABLES = bench_scale.THREAD_VARIABLES
START_LOWPASS_A = bench_scale.START_LOWPASS_A
BOX_A = 282.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON results file")
    p.add_argument("--boxes", type=int, nargs="*", default=[64, 128, 256],
                   help="boxes; none: only the baseline [64 128 256]")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts [1 2]")
    p.add_argument("--n-particles", type=int, default=300, help="[300]")
    p.add_argument("--image-batch-size", type=int, default=256, help="[256]")
    p.add_argument("--symmetry", default="C1", help="--symmetry of the refinements [C1]")
    p.add_argument("--baseline-box", type=int, default=32,
                   help="box of the run that measures a rank's fixed memory; 0: none [32]")
    p.add_argument("--work-dir", default=None, help="data and outputs [a temporary folder]")
    p.add_argument("--keep", action="store_true", help="keep --work-dir afterwards")
    p.add_argument("--sample-seconds", type=float, default=0.5, help="[0.5]")
    p.add_argument("--update", action="store_true",
                   help="add the runs to an existing --out (same box and ranks replaced)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- sampling

def _rank_pids(root: int, mpi: bool) -> dict:
    """{rank: pid} of the refinement's ranks: the process itself without MPI, else the
    processes below the launcher with PMI_RANK in their environment (bench_scale's)."""
    return bench_scale._rank_pids(root, {}) if mpi else {0: root}


def _available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------- runs

def simulate(box: int, n_particles: int, folder: str) -> str:
    px = round(BOX_A / box, 4)
    if not os.path.isfile(os.path.join(folder, "particles.star")):
        subprocess.run([sys.executable, "-m", "mpirefine", "simulate", "--model", "--box", str(box),
                        "--pixel-size", f"{px:g}", "--n-particles", str(n_particles),
                        "--snr", "0.05", "--seed", "1", "--out", folder, "--overwrite"],
                       check=True, capture_output=True, env=_env())
    return folder


def _env() -> dict:
    return dict(os.environ, MPIREFINE_JIT="0", **dict.fromkeys(THREAD_VARIABLES, "1"))


def _mpiexec() -> str | None:
    return (shutil.which("mpiexec", path=os.path.dirname(sys.executable))
            or shutil.which("mpiexec"))


def forecast(folder: str, ranks: int, args) -> dict:
    """The memory plan for a run: per world rank its role's RAM peak and phases."""
    from mpirefine.geometry.symmetry import group_order
    from mpirefine.io import read_particles
    from mpirefine.report.memory import memory_plan, metadata_bytes

    ps = read_particles(os.path.join(folder, "particles.star"))
    radius = ps.box * ps.pixel_size_A / START_LOWPASS_A
    plan = memory_plan(ps.box, len(ps), ranks, args.image_batch_size, metadata_bytes(ps),
                       group_order(args.symmetry), radius)
    roles = plan["roles"]
    out = {}
    for rank in range(ranks):
        if ranks <= 2 or rank < 2:
            role = roles[min(rank, len(roles) - 1)]
        elif ranks % 2 == 1 and rank == ranks - 1:
            role = roles[-1]
        else:
            role = roles[2]
        out[rank] = {"role": role["ranks"], "peak_MiB": role["peak"]["ram"] / 2 ** 20,
                     "phase": role["peak"]["ram_phase"],
                     "phases_MiB": {k: v["ram"] / 2 ** 20 for k, v in role["phases"].items()}}
    return {"alignment_radius_px": radius, "per_rank": out}


def run_refine(folder: str, ranks: int, args, work: str) -> dict:
    out_dir = os.path.join(work, f"refine_{os.path.basename(folder)}_{ranks}")
    cmd = [sys.executable, "-m", "mpirefine", "refine", os.path.join(folder, "particles.star"),
           os.path.join(folder, "start_20A.mrc"), "--out", out_dir, "--overwrite", "--cpu",
           "--disable-auto-batchsize", "--max-iterations", "1",
           "--initial-lowpass", f"{START_LOWPASS_A:g}",
           "--image-batch-size", str(args.image_batch_size), "--symmetry", args.symmetry]
    mpi = ranks > 1
    if mpi:
        cmd = [_mpiexec(), "-n", str(ranks)] + cmd
    log_path = out_dir + ".log"
    peaks, last_rss, pids = {}, {}, {}
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if len(pids) < ranks:
                pids.update(_rank_pids(proc.pid, mpi))
            for rank, pid in pids.items():
                s = bench_scale._status(pid)
                if s is not None:
                    peaks[rank] = max(peaks.get(rank, 0), s["VmHWM"])
                    last_rss[rank] = s["VmRSS"]
            time.sleep(args.sample_seconds)
    wall = time.perf_counter() - t0
    result = {"command": " ".join(cmd), "returncode": proc.returncode, "wall_seconds": wall,
              "peak_rss_MiB": {r: v / 1024 for r, v in sorted(peaks.items())}}
    if proc.returncode != 0 or len(peaks) < ranks:
        with open(log_path, encoding="utf-8") as f:
            result["log_tail"] = f.read().splitlines()[-30:]
        result["failed"] = True
    return result


IMPORTS = ("import mpi4py.MPI, h5py, matplotlib; matplotlib.use('Agg'); "
           "import matplotlib.pyplot, mpirefine.cli.refine, mpirefine.refinement.refine, "
           "mpirefine.postprocess.validation, mpirefine.report.html, mpirefine.report.plots")


def measure_baseline(args, work: str) -> dict:
    """What a rank holds besides its arrays: the peak RSS of a process that imported
    what a refinement imports (MPI initialised), and, for scale, of a whole refinement
    at a tiny box."""
    probe = subprocess.run([sys.executable, "-c", IMPORTS + "; print(open('/proc/self/status')"
                            ".read().split('VmHWM:')[1].split()[0])"],
                           capture_output=True, text=True, check=True, env=_env())
    imports = int(probe.stdout.split()[-1]) / 1024
    folder = simulate(args.baseline_box, 100, os.path.join(work, f"sim{args.baseline_box}"))
    run = run_refine(folder, 1, args, work)
    from mpirefine.report.memory import BASELINE_HOST_BYTES

    out = {"imports_peak_rss_MiB": imports, "model_baseline_MiB": BASELINE_HOST_BYTES / 2 ** 20,
           "tiny_refine": {"box": args.baseline_box, "n_particles": 100,
                           "peak_rss_MiB": run["peak_rss_MiB"].get(0)}}
    print(f"baseline: {imports:.0f} MiB after the imports (the model: "
          f"{out['model_baseline_MiB']:.0f} MiB); a refinement at box {args.baseline_box} "
          f"peaks at {out['tiny_refine']['peak_rss_MiB']:.0f} MiB", flush=True)
    return out


def machine() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    try:
        import numpy

        info["numpy"] = numpy.__version__
        with open("/proc/meminfo", encoding="ascii") as f:
            info["memory_GiB"] = int(f.readline().split()[1]) / 2 ** 20
        with open("/proc/cpuinfo", encoding="ascii") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f
                                      if line.startswith("model name")), None)
    except (OSError, ImportError):
        pass
    return info


def table(runs: list) -> str:
    lines = ["| box | ranks | rank | forecast peak (phase) | measured peak RSS | error |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        if run.get("failed") or run.get("skipped"):
            lines.append(f"| {run['box']} | {run['ranks']} | – | "
                         f"{'skipped' if run.get('skipped') else 'failed'} | – | – |")
            continue
        for rank, f in sorted(run["forecast"]["per_rank"].items(), key=lambda kv: int(kv[0])):
            measured = run["peak_rss_MiB"][rank]
            lines.append(f"| {run['box']} | {run['ranks']} | {rank} | "
                         f"{f['peak_MiB'] / 1024:.2f} GiB ({f['phase']}) | "
                         f"{measured / 1024:.2f} GiB | {run['error_percent'][rank]:+.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work_dir or os.path.join("/tmp", f"bench_memory_{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    previous, invocations, baseline = [], [], None
    if args.update and args.out and os.path.isfile(args.out):
        with open(args.out, encoding="utf-8") as f:
            old = json.load(f)
        previous, invocations = old.get("runs", []), old.get("invocations", [])
        baseline = old.get("baseline")
    command = " ".join(["python benchmarks/bench_memory.py"] + sys.argv[1:])
    now = datetime.datetime.now().isoformat(timespec="seconds")
    result = {"machine": machine(), "date": now,
              "invocations": invocations + [{"date": now, "command": command}],
              "environment": {"MPIREFINE_JIT": "0", **dict.fromkeys(THREAD_VARIABLES, "1")},
              "n_particles": args.n_particles, "image_batch_size": args.image_batch_size,
              "symmetry": args.symmetry, "runs": []}
    if baseline is not None:
        result["baseline"] = baseline
    try:
        if args.baseline_box:
            result["baseline"] = measure_baseline(args, work)
        for box in args.boxes:
            folder = simulate(box, args.n_particles, os.path.join(work, f"sim{box}"))
            for ranks in args.ranks:
                plan = forecast(folder, ranks, args)
                need = sum(r["peak_MiB"] for r in plan["per_rank"].values()) * 2 ** 20
                entry = {"box": box, "pixel_size_A": round(BOX_A / box, 4), "ranks": ranks,
                         "forecast": plan}
                if need > 0.9 * _available_bytes():
                    entry.update(skipped=True, reason=f"forecast {need / 2 ** 30:.1f} GiB, "
                                 f"available {_available_bytes() / 2 ** 30:.1f} GiB")
                    print(f"box {box}, {ranks} rank(s): skipped ({entry['reason']})", flush=True)
                    result["runs"].append(entry)
                    continue
                print(f"box {box}, {ranks} rank(s): running", flush=True)
                entry.update(run_refine(folder, ranks, args, work))
                if not entry.get("failed"):
                    entry["error_percent"] = {
                        r: 100.0 * (plan["per_rank"][r]["peak_MiB"] - m) / m
                        for r, m in entry["peak_rss_MiB"].items()}
                    print("  " + "  ".join(
                        f"rank {r}: measured {m / 1024:.2f} GiB, forecast "
                        f"{plan['per_rank'][r]['peak_MiB'] / 1024:.2f} GiB "
                        f"({entry['error_percent'][r]:+.1f} %)"
                        for r, m in entry["peak_rss_MiB"].items()), flush=True)
                result["runs"].append(entry)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    done = {(r["box"], r["ranks"]) for r in result["runs"]}
    result["runs"] = sorted([r for r in previous if (r["box"], r["ranks"]) not in done]
                            + result["runs"], key=lambda r: (r["box"], r["ranks"]))
    result["table"] = table(result["runs"])
    print(result["table"])
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0 if not any(r.get("failed") for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
