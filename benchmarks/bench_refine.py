"""Benchmark a whole refinement at several MPI rank counts (strong scaling).

Simulates one dataset (three neighbouring apoferritin chains, no symmetry) into a
work folder, then runs

    mpiexec -n R python -m mpirefine refine particles.star start_20A.mrc --out DIR --overwrite \
        --max-iterations M [--disable-auto-batchsize]

``--repeats`` times for every rank count R, with OMP_NUM_THREADS = OPENBLAS_NUM_THREADS
= MKL_NUM_THREADS = max(1, cores // R) so that every rank count uses the same cores.
Each run's summary.json is read back; the JSON written to ``--out`` holds the machine,
the parameters, every run's raw numbers and, per rank count, the medians: seconds per
iteration, wall seconds, time to the final resolution, final resolution, the
communication fraction per rank, bytes communicated per iteration and the speed-up
relative to one rank.  The project target is t(2)/t(1) <= 0.6 per iteration with
communication below 10 % of the wall time.

    python benchmarks/bench_refine.py --out bench_refine.json --ranks 1 2 --repeats 3 \
        --n-particles 2000 --box 64 --max-iterations 3

benchmarks/README.md explains every field of the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# Timer categories that refine.py / parallel.py fill (seconds per rank, each second
# counted once, in the innermost category): the particle work (reading, preparation,
# search, backprojection = insertion), the map work every rank does (reconstruction:
# packing, the slab stages), work only the root pair does (root), rank 0's checkpoint
# copy and waits (checkpoint; the file is written by a thread), time inside MPI calls
# moving data (communication) and waiting at barriers for slower ranks (idle).
CATEGORIES = ("reading", "preparation", "search", "backprojection", "reconstruction", "root",
              "checkpoint", "communication", "idle")
TARGET_RATIO_2_RANKS = 0.6
TARGET_COMM_FRACTION = 0.10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts [1 2]")
    p.add_argument("--repeats", type=int, default=3, help="runs per rank count [3]")
    p.add_argument("--n-particles", type=int, default=2000, help="particles to simulate [2000]")
    p.add_argument("--box", type=int, default=64, help="box size, px [64]")
    p.add_argument("--pixel-size", type=float, default=1.8, help="pixel size, Å [1.8]")
    p.add_argument("--snr", type=float, default=0.05, help="simulation SNR [0.05]")
    p.add_argument("--seed", type=int, default=0, help="simulation and refinement seed [0]")
    p.add_argument("--max-iterations", type=int, default=3,
                   help="iterations of every run (same for every rank count) [3]")
    p.add_argument("--disable-auto-batchsize", action=argparse.BooleanOptionalAction,
                   default=True, help="all particles in every iteration, so that iterations "
                   "do the same work at every rank count [on]")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="refine's device choice [auto]")
    p.add_argument("--cores", type=int, default=None,
                   help="cores to share among the ranks [the CPUs this process may use]")
    p.add_argument("--work-dir", default=None,
                   help="folder for the dataset and the runs [a temporary folder, removed "
                        "at the end unless --keep]")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--mpiexec", default=None,
                   help="MPI launcher [mpiexec next to this Python, else on PATH]")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run [3600]")
    p.add_argument("--refine-args", default="",
                   help="extra arguments for `mpirefine refine`, one string (e.g. \"--seed 1\")")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- machine

def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info() -> dict:
    import numpy as np

    info = {"numpy": np.__version__}
    try:
        config = np.show_config(mode="dicts")
        deps = config.get("Build Dependencies", {})
        for key in ("blas", "lapack"):
            if key in deps:
                info[key] = {k: deps[key].get(k) for k in
                             ("name", "version", "openblas configuration") if deps[key].get(k)}
    except Exception as exc:  # older numpy: no mode="dicts"
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def _command_output(cmd, cwd=None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if out.returncode == 0 and text else None


def machine_info(cores: int, mpiexec: str) -> dict:
    import mpirefine

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mpi_version = None
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
        lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
        mpi_version = " | ".join(lines[:2]) if lines else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "os_cpu_count": os.cpu_count(),
        "cores_used": cores,
        "python": sys.version.split()[0],
        "blas": blas_info(),
        "mpiexec": mpiexec,
        "mpi_version": mpi_version,
        "mpirefine_version": mpirefine.__version__,
        "git_commit": _command_output(["git", "rev-parse", "HEAD"], cwd=repo),
        "git_dirty": bool(_command_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                          cwd=repo)),
    }


def machine_gemm_rate(threads: int) -> float | None:
    """Single-precision GEMM FLOP/s of one process with ``threads`` BLAS threads:
    bench_search.py's measurement, in a subprocess so that the thread count takes
    effect."""
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); "
            "from bench_search import _gemm_rate; print(_gemm_rate(np, lambda: None))")
    env = dict(os.environ, **{v: str(threads) for v in
                              ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    try:
        out = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
                             env=env, capture_output=True, text=True, timeout=300, check=True).stdout
        return float(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def find_mpiexec(given: str | None) -> str:
    if given:
        return given
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.exists(here):
        return here
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        sys.exit("bench_refine: no mpiexec found; pass --mpiexec")
    return found


# ----------------------------------------------------------------------------- runs

def simulate(work: str, args) -> dict:
    from mpirefine.synthetic.models import asymmetric_chains, model_volume
    from mpirefine.synthetic.simulate import simulate_dataset

    t0 = time.perf_counter()
    volume = model_volume(box=args.box, pixel_size_A=args.pixel_size,
                          chains=asymmetric_chains(), center_A="chains")
    data = os.path.join(work, "data")
    result = simulate_dataset(volume, args.pixel_size, args.n_particles, data, snr=args.snr,
                              seed=args.seed, overwrite=True)
    return {"folder": data, "particles": result.particles_star, "start": result.start_mrc,
            "seconds": time.perf_counter() - t0}


def refine_command(mpiexec: str, ranks: int, data: dict, out: str, args) -> list[str]:
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpirefine", "refine",
           data["particles"], data["start"], "--out", out, "--overwrite",
           "--max-iterations", str(args.max_iterations), "--seed", str(args.seed)]
    if args.disable_auto_batchsize:
        cmd.append("--disable-auto-batchsize")
    if args.device != "auto":
        cmd.append(f"--{args.device}")
    cmd += args.refine_args.split()
    return cmd


def run_once(cmd: list[str], threads: int, out: str, timeout: float) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    os.makedirs(out, exist_ok=True)
    load_before = _loadavg()
    t0 = time.perf_counter()
    with open(os.path.join(out, "stdout.log"), "w") as so, \
            open(os.path.join(out, "stderr.log"), "w") as se:
        proc = subprocess.run(cmd, env=env, stdout=so, stderr=se, timeout=timeout)
    launcher = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(os.path.join(out, "stderr.log")) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"run failed with status {proc.returncode}: {' '.join(cmd)}\n{tail}")
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    return {"launcher_seconds": launcher, "summary": summary,
            "loadavg_1min_before": load_before, "loadavg_1min_after": _loadavg()}


def _loadavg() -> float | None:
    """1-minute load average: a busy machine (other jobs) makes the timings unreliable."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def digest_run(ranks: int, repeat: int, threads: int, cmd: list[str], raw: dict) -> dict:
    """The numbers of one run that the benchmark keeps."""
    s = raw["summary"]
    wall = float(s["wall_seconds"])
    its = [{"iteration": it.get("iteration"), "seconds": float(it["seconds"]),
            "resolution_A": float(it["resolution_A"]), "batch_size": int(it["batch_size"]),
            "alignment_resolution_A": it.get("alignment_resolution_A")}
           for it in s["iterations"]]
    n_it = len(its)
    final = float(s["final_resolution_A"])
    # Time to the final resolution: iteration seconds up to the first iteration whose
    # (unmasked) GSFSC reached the best any iteration reached; the masked, corrected
    # final figure comes from the last half maps, so no iteration reports it itself.
    # Setup before the first iteration and output writing are not included.
    best = min(it["resolution_A"] for it in its)
    elapsed, to_final, first_it = 0.0, None, None
    for it in its:
        elapsed += it["seconds"]
        if to_final is None and it["resolution_A"] <= best * (1 + 1e-9):
            to_final, first_it = elapsed, it["iteration"]
    per_rank = []
    for t in sorted(s.get("timings_per_rank") or [], key=lambda r: r["rank"]):
        sec = {c: float(t["seconds"].get(c, 0.0)) for c in CATEGORIES}
        other = {k: float(v) for k, v in t["seconds"].items() if k not in CATEGORIES}
        counts = t.get("counts") or {}
        flops = float(counts.get("search_gemm_flops", 0.0))
        per_rank.append({
            "rank": t["rank"], "seconds": sec, "other_seconds": other,
            "search_poses_scored": counts.get("search_poses_scored"),
            "search_gemm_flops": flops,
            "search_gemm_flops_per_s": flops / sec["search"] if sec["search"] else None,
            "comm_seconds": float(t.get("comm_seconds", 0.0)),
            "bytes_communicated": int(t.get("bytes_communicated", 0)),
            "communication_fraction": sec["communication"] / wall if wall else None,
            "comm_seconds_fraction": float(t.get("comm_seconds", 0.0)) / wall if wall else None,
            "bytes_per_iteration": int(t.get("bytes_communicated", 0)) / n_it if n_it else None,
            # wall time that no category holds (setup before the first iteration, outputs)
            "unaccounted_seconds": wall - sum(sec.values()) - sum(other.values()),
            "checkpoint_write_seconds": counts.get("checkpoint_write_seconds"),
            "collectives": t.get("collectives") or {},
        })
    iteration_seconds = [it["seconds"] for it in its]
    return {
        "ranks": ranks, "repeat": repeat, "threads_per_rank": threads, "command": " ".join(cmd),
        "launcher_seconds": raw["launcher_seconds"], "wall_seconds": wall,
        "loadavg_1min_before": raw.get("loadavg_1min_before"),
        "loadavg_1min_after": raw.get("loadavg_1min_after"),
        "iteration_seconds_total": sum(it["seconds"] for it in its),
        "setup_and_output_seconds": wall - sum(iteration_seconds),
        "n_iterations": n_it, "iterations": its,
        "median_seconds_per_iteration": statistics.median(iteration_seconds) if its else None,
        "final_resolution_A": final,
        "time_to_final_resolution_s": to_final, "iteration_reaching_final": first_it,
        "backend": s.get("backend"), "n_ranks_reported": s.get("n_ranks"),
        "n_particles": s.get("n_particles"), "n_particles_aligned": s.get("n_particles_aligned"),
        "per_rank": per_rank,
        "bytes_communicated_per_iteration_all_ranks":
            sum(r["bytes_communicated"] for r in per_rank) / n_it if n_it else None,
    }


# ----------------------------------------------------------------------------- medians

def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict]) -> dict:
    """Medians over the repeats of one rank count."""
    all_iter = [it["seconds"] for r in runs for it in r["iterations"]]
    ranks = runs[0]["ranks"]
    per_rank = {}
    for k in range(ranks):
        rows = [r["per_rank"][k] for r in runs if len(r["per_rank"]) > k]
        if not rows:
            continue
        names = sorted({name for row in rows for name in row.get("collectives", {})})
        per_rank[str(k)] = {
            "seconds": {c: _median([row["seconds"][c] for row in rows]) for c in CATEGORIES},
            "unaccounted_seconds": _median([row.get("unaccounted_seconds") for row in rows]),
            "checkpoint_write_seconds": _median([row.get("checkpoint_write_seconds") for row in rows]),
            "collectives": {name: {key: _median([row["collectives"][name][key] for row in rows
                                                 if name in row.get("collectives", {})])
                                   for key in ("calls", "seconds", "bytes")} for name in names},
            "communication_fraction": _median([row["communication_fraction"] for row in rows]),
            "comm_seconds_fraction": _median([row["comm_seconds_fraction"] for row in rows]),
            "bytes_per_iteration": _median([row["bytes_per_iteration"] for row in rows]),
            "search_gemm_flops_per_s": _median([row.get("search_gemm_flops_per_s") for row in rows]),
        }
    fractions = [v["communication_fraction"] for v in per_rank.values()
                 if v["communication_fraction"] is not None]
    return {
        "ranks": ranks,
        "threads_per_rank": runs[0]["threads_per_rank"],
        "n_runs": len(runs),
        "seconds_per_iteration": _median(all_iter),
        "seconds_per_iteration_median_of_run_medians":
            _median([r["median_seconds_per_iteration"] for r in runs]),
        "seconds_per_iteration_by_iteration": [
            _median([r["iterations"][i]["seconds"] for r in runs if len(r["iterations"]) > i])
            for i in range(max(len(r["iterations"]) for r in runs))],
        "iteration_seconds_total": _median([r["iteration_seconds_total"] for r in runs]),
        "n_iterations_runs": [r["n_iterations"] for r in runs],
        "wall_seconds": _median([r["wall_seconds"] for r in runs]),
        "launcher_seconds": _median([r["launcher_seconds"] for r in runs]),
        "setup_and_output_seconds": _median([r["setup_and_output_seconds"] for r in runs]),
        "time_to_final_resolution_s": _median([r["time_to_final_resolution_s"] for r in runs]),
        "final_resolution_A": _median([r["final_resolution_A"] for r in runs]),
        "final_resolution_A_runs": [r["final_resolution_A"] for r in runs],
        "resolution_A_by_iteration": [
            _median([r["iterations"][i]["resolution_A"] for r in runs if len(r["iterations"]) > i])
            for i in range(max(len(r["iterations"]) for r in runs))],
        "per_rank": per_rank,
        "communication_fraction_max_rank": max(fractions) if fractions else None,
        "bytes_communicated_per_iteration_all_ranks":
            _median([r["bytes_communicated_per_iteration_all_ranks"] for r in runs]),
    }


def scaling(medians: dict) -> dict:
    """Speed-up of every rank count relative to one rank (per iteration and wall)."""
    base = medians.get("1")
    out = {}
    if not base:
        return out
    for key, m in medians.items():
        ratio = (m["seconds_per_iteration"] / base["seconds_per_iteration"]
                 if base["seconds_per_iteration"] else None)
        out[key] = {
            "time_per_iteration_ratio": ratio,
            "speedup_per_iteration": 1.0 / ratio if ratio else None,
            "parallel_efficiency": (1.0 / ratio) / m["ranks"] if ratio else None,
            "time_per_iteration_ratio_of_run_medians":
                (m["seconds_per_iteration_median_of_run_medians"]
                 / base["seconds_per_iteration_median_of_run_medians"]),
            "iteration_seconds_total_ratio":
                m["iteration_seconds_total"] / base["iteration_seconds_total"],
            "wall_ratio": m["wall_seconds"] / base["wall_seconds"],
            "speedup_wall": base["wall_seconds"] / m["wall_seconds"],
        }
    if "2" in out:
        r2 = out["2"]["time_per_iteration_ratio"]
        comm = medians["2"]["communication_fraction_max_rank"]
        out["target_2_ranks"] = {
            "time_per_iteration_ratio": r2, "ratio_target": TARGET_RATIO_2_RANKS,
            "communication_fraction_max_rank": comm, "communication_target": TARGET_COMM_FRACTION,
            "met": bool(r2 is not None and r2 <= TARGET_RATIO_2_RANKS
                        and comm is not None and comm < TARGET_COMM_FRACTION),
        }
    return out


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    if any(r < 1 for r in args.ranks) or args.repeats < 1 or args.max_iterations < 1:
        sys.exit("bench_refine: --ranks, --repeats and --max-iterations must be >= 1")
    cores = args.cores or available_cores()
    mpiexec = find_mpiexec(args.mpiexec)
    started = datetime.datetime.now(datetime.timezone.utc)
    temporary = args.work_dir is None
    work = tempfile.mkdtemp(prefix="bench_refine_") if temporary else os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    print(f"bench_refine: work folder {work}; {cores} cores; ranks {args.ranks}; "
          f"{args.repeats} repeats", flush=True)
    try:
        data = simulate(work, args)
        print(f"simulated {args.n_particles} particles, box {args.box} in "
              f"{data['seconds']:.1f} s", flush=True)
        runs = {r: [] for r in args.ranks}
        # Repeats are interleaved (1, 2, 1, 2, ...) so that drift in the machine's
        # speed affects every rank count alike.
        for repeat in range(args.repeats):
            for ranks in args.ranks:
                threads = max(1, cores // ranks)
                out = os.path.join(work, "runs", f"r{ranks}_rep{repeat}")
                cmd = refine_command(mpiexec, ranks, data, out, args)
                raw = run_once(cmd, threads, out, args.timeout)
                rec = digest_run(ranks, repeat, threads, cmd, raw)
                runs[ranks].append(rec)
                comm = max((p["communication_fraction"] or 0.0) for p in rec["per_rank"]) \
                    if rec["per_rank"] else float("nan")
                over = f", oversubscribed on {cores} cores" if ranks > cores else ""
                print(f"ranks {ranks} ({threads} threads each{over}) repeat {repeat + 1}/{args.repeats}: "
                      f"{rec['median_seconds_per_iteration']:.2f} s/iteration, wall "
                      f"{rec['wall_seconds']:.1f} s, final {rec['final_resolution_A']:.2f} Å, "
                      f"communication {100 * comm:.1f} % (max rank), load "
                      f"{rec['loadavg_1min_before']} → {rec['loadavg_1min_after']}", flush=True)
        medians = {str(r): summarise(runs[r]) for r in args.ranks}
        for r in args.ranks:   # more ranks than cores: they time-share the cores
            medians[str(r)]["oversubscribed"] = r > cores
        for r in args.ranks:  # the search's GEMM FLOP rate against sgemm on the same threads
            rate = machine_gemm_rate(max(1, cores // r))
            medians[str(r)]["machine_gemm_flops_per_s_per_rank"] = rate
            for row in medians[str(r)]["per_rank"].values():
                v = row.get("search_gemm_flops_per_s")
                row["search_fraction_of_machine_gemm"] = v / rate if v and rate else None
        result = {
            "benchmark": "bench_refine",
            "date_utc": started.isoformat(timespec="seconds"),
            "command_line": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": machine_info(cores, mpiexec),
            "parameters": {
                "ranks": args.ranks, "repeats": args.repeats, "n_particles": args.n_particles,
                "box": args.box, "pixel_size_A": args.pixel_size, "snr": args.snr,
                "seed": args.seed, "max_iterations": args.max_iterations,
                "disable_auto_batchsize": args.disable_auto_batchsize, "device": args.device,
                "refine_args": args.refine_args, "model": "asymmetric_chains() centred on chains",
                "threads_per_rank": {str(r): max(1, cores // r) for r in args.ranks},
                "simulation_seconds": data["seconds"],
            },
            "runs": [rec for r in args.ranks for rec in runs[r]],
            "medians": medians,
            "scaling": scaling(medians),
        }
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif temporary:
            print(f"kept work folder {work}", flush=True)
    print_table(result)
    print(f"wrote {args.out}")
    return 0


def print_table(result: dict) -> None:
    print(f"{'ranks':>5} {'thr':>3} {'s/iter':>8} {'wall s':>8} {'t→final s':>10} "
          f"{'final Å':>8} {'comm %':>7} {'MB/iter':>8} {'t(R)/t(1)':>9} {'search %GEMM':>12}")
    for key, m in result["medians"].items():
        sc = result["scaling"].get(key, {})
        comm = m["communication_fraction_max_rank"]
        mb = m["bytes_communicated_per_iteration_all_ranks"]
        ratio = sc.get("time_per_iteration_ratio")
        gemm = [r.get("search_fraction_of_machine_gemm") for r in m["per_rank"].values()]
        gemm = _median(gemm)
        print(f"{m['ranks']:5d} {m['threads_per_rank']:3d} {m['seconds_per_iteration']:8.2f} "
              f"{m['wall_seconds']:8.1f} {m['time_to_final_resolution_s'] or float('nan'):10.1f} "
              f"{m['final_resolution_A']:8.2f} {100 * (comm or 0):7.1f} "
              f"{(mb or 0) / 1e6:8.2f} {ratio if ratio is not None else float('nan'):9.3f} "
              f"{100 * gemm if gemm is not None else float('nan'):12.1f}")
    print("seconds per rank over the whole run (medians; each second in one category):")
    short = {"reading": "read", "preparation": "prep", "search": "search",
             "backprojection": "insert", "reconstruction": "recon", "root": "root",
             "checkpoint": "ckpt", "communication": "comm", "idle": "idle"}
    print(f"{'ranks':>5} {'rank':>4} " + " ".join(f"{v:>7}" for v in short.values())
          + f" {'other':>7} {'MB/iter':>8}")
    for m in result["medians"].values():
        for rank, row in m["per_rank"].items():
            sec = row["seconds"]
            print(f"{m['ranks']:5d} {rank:>4} " + " ".join(f"{sec.get(c) or 0.0:7.2f}" for c in short)
                  + f" {row.get('unaccounted_seconds') or 0.0:7.2f}"
                  + f" {(row.get('bytes_per_iteration') or 0) / 1e6:8.2f}"
                  + ("  (oversubscribed)" if m.get("oversubscribed") and rank == "0" else ""))
    target = result["scaling"].get("target_2_ranks")
    if target:
        print(f"target t(2)/t(1) <= {target['ratio_target']} with communication < "
              f"{100 * target['communication_target']:.0f} %: "
              f"{'met' if target['met'] else 'NOT met'}")


if __name__ == "__main__":
    raise SystemExit(main())
