"""Benchmark a refinement pass over stacks that do not fit in memory: time per 1,000
particles, the share of it spent reading images, and the peak memory of the rank.

Simulates a base dataset (the shipped apoferritin model, SNR 0.05) into a scratch
folder; larger sets are the base images tiled into new stacks of 1,000 images, each
copy with fresh noise added, and a STAR file of their own.  Then, each in a fresh
process on one core (OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = MKL_NUM_THREADS =
NUMBA_NUM_THREADS = 1, one rank, pinned to ``--core``):

- ``--passes N:RES ...``: one full pass of the iteration's own code
  (:func:`mpirefine.refinement.refine.align_and_backproject`: read, prepare, search,
  insert, residual sums) over N particles with the search plan of an alignment
  resolution of RES Å, after the job is built and its initial noise model estimated.
  The stacks are dropped from the page cache first (``posix_fadvise(DONTNEED)``, unless
  ``--warm-cache``), so the images come from the disk.
- ``--read-passes N ...``: the reads alone (``ImageSource.batches`` over N particles),
  with the mapped pages handed back as the refinement does, and, for comparison,
  without (``keep_mapped_pages``): the resident memory a memory-mapped pass leaves.

Per pass: wall and CPU seconds, both per 1,000 particles; the refinement's timer
categories (search, backprojection, preparation, reading = time the loop waited for
images); the reader's own busy time (``read_seconds``, overlapped with the search by
the one-batch-ahead prefetch); the peak resident memory (VmHWM of /proc/self/status)
of the setup and of the pass alone (VmHWM reset through /proc/self/clear_refs after
setup), and ``peak_MiB``, the larger of the two: the process's peak.  (``ru_maxrss``
is not used: Linux carries the parent's peak into a child started by vfork + exec.)
Also the memory model's estimate (:mod:`mpirefine.report.memory`) for comparison, and
the load average.  The scratch folder (``--work-dir``, reused when it holds the data
already) is deleted at the end unless ``--keep-data``.

    python benchmarks/bench_stream.py --box 256 --pixel-size-A 1.1 --base-particles 2000 \
        --passes 2000:20 2000:8 20000:20 --read-passes 2000 20000 \
        --out benchmarks/results/bench_stream_box256.json

benchmarks/README.md explains the fields.
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
import tempfile
import time

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")
TILE_STACK_SIZE = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON results file")
    p.add_argument("--box", type=int, default=128, help="box, px [128]")
    p.add_argument("--pixel-size-A", type=float, default=2.2, help="pixel size, Å [2.2]")
    p.add_argument("--base-particles", type=int, default=2000,
                   help="particles simulated; larger sets tile them [2000]")
    p.add_argument("--snr", type=float, default=0.05, help="simulation SNR [0.05]")
    p.add_argument("--passes", nargs="*", default=["2000:20", "2000:8"],
                   help="N:RES[:noprefetch], a full pass over N particles at an alignment "
                        "resolution of RES Å (noprefetch: each batch read when it is due) "
                        "[2000:20 2000:8]")
    p.add_argument("--read-passes", type=int, nargs="*", default=[],
                   help="particle counts of passes that only read the images []")
    p.add_argument("--image-batch-size", type=int, default=256, help="[256]")
    p.add_argument("--warm-cache", action="store_true",
                   help="leave the stacks in the page cache (default: drop them first)")
    p.add_argument("--core", type=int, default=0,
                   help="the core every pass runs on (-1: no pinning) [0]")
    p.add_argument("--scratch", default=None, help="folder for the synthetic data [system tmp]")
    p.add_argument("--work-dir", default=None,
                   help="the synthetic data's folder; data already there are reused")
    p.add_argument("--keep-data", action="store_true", help="keep the synthetic data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------ data (parent)

def simulate_base(args, folder: str) -> dict:
    from mpirefine.synthetic.models import model_volume
    from mpirefine.synthetic.simulate import simulate_dataset

    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(folder, "simulation.json")):
        volume = model_volume(box=args.box, pixel_size_A=args.pixel_size_A)
        simulate_dataset(volume, args.pixel_size_A, args.base_particles, folder, snr=args.snr,
                         seed=args.seed, stack_size=TILE_STACK_SIZE, overwrite=True)
    with open(os.path.join(folder, "simulation.json"), encoding="utf-8") as f:
        record = json.load(f)
    return {"folder": folder, "star": os.path.join(folder, "particles.star"),
            "volume": os.path.join(folder, "start_20A.mrc"), "noise_sigma": record["noise_sigma"],
            "seconds": time.perf_counter() - t0, "n": args.base_particles, "box": args.box}


def particle_set(base: dict, n: int, folder: str, seed: int) -> str:
    """A STAR file of n particles: the base set's first n, or its images tiled into new
    stacks (copy k of an image gets noise of 0.3 × the simulation's σ, seed + k)."""
    import mrcfile
    import numpy as np
    import starfile

    from mpirefine.io.star import write_relion_star

    blocks = starfile.read(base["star"], always_dict=True)
    optics, particles = blocks["optics"], blocks["particles"]
    if n <= base["n"]:
        path = os.path.join(base["folder"], f"particles_{n}.star")
        write_relion_star(path, optics, particles.iloc[:n].reset_index(drop=True))
        return path
    path = os.path.join(folder, "particles.star")
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    rows = np.arange(n) % base["n"]
    table = particles.iloc[rows].reset_index(drop=True)
    names = [str(v).split("@", 1) for v in particles["rlnImageName"]]
    src = {}
    for start in range(0, n, TILE_STACK_SIZE):
        stop = min(n, start + TILE_STACK_SIZE)
        out = mrcfile.new_mmap(os.path.join(folder, f"stack_{start // TILE_STACK_SIZE:03d}.mrcs"),
                               shape=(stop - start, base["box"], base["box"]), mrc_mode=2,
                               overwrite=True)
        rng = np.random.default_rng([seed, start])
        for j in range(start, stop):
            index, stack = names[rows[j]]
            if stack not in src:
                src[stack] = mrcfile.mmap(os.path.join(base["folder"], stack), mode="r")
            noise = rng.normal(0.0, 0.3 * base["noise_sigma"], out.data.shape[1:]).astype(np.float32)
            out.data[j - start] = src[stack].data[int(index) - 1] + noise
        out.set_image_stack()
        out.voxel_size = float(optics["rlnImagePixelSize"].iloc[0])
        out.close()
    for m in src.values():
        m.close()
    table["rlnImageName"] = [f"{j % TILE_STACK_SIZE + 1:06d}@stack_{j // TILE_STACK_SIZE:03d}.mrcs"
                             for j in range(n)]
    write_relion_star(path, optics, table)
    return path


def run_child(spec: dict, args) -> dict:
    env = dict(os.environ, **dict.fromkeys(THREAD_VARIABLES, "1"))
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        result_path = f.name
    spec = dict({"prefetch": True}, **spec, result=result_path, core=args.core,
                image_batch_size=args.image_batch_size, drop_cache=not args.warm_cache)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    with open(result_path, encoding="utf-8") as f:
        out = json.load(f)
    os.unlink(result_path)
    out["process_seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------- child side

def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _drop_from_page_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _memory() -> dict:
    return {"VmHWM_MiB": _status_kib("VmHWM") / 1024, "VmRSS_MiB": _status_kib("VmRSS") / 1024,
            "RssFile_MiB": _status_kib("RssFile") / 1024, "RssAnon_MiB": _status_kib("RssAnon") / 1024}


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(spec: dict) -> None:
    if spec["core"] >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec["core"]})
    import numpy as np

    from mpirefine.io import ImageSource, read_particles
    from mpirefine.refinement import refine

    made = []
    init = ImageSource.__init__

    def recorded(self, *a, **k):     # every source the pass opens, whoever opens it
        k.setdefault("prefetch", spec["prefetch"])
        init(self, *a, **k)
        made.append(self)

    ImageSource.__init__ = recorded
    if spec.get("keep_mapped_pages"):
        ImageSource._drop_resident_pages = staticmethod(lambda _stack: None)
    out = {"spec": {k: v for k, v in spec.items() if k != "result"},
           "threads": {v: os.environ.get(v) for v in THREAD_VARIABLES},
           "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    n = spec["n"]
    if spec["kind"] == "read":
        ps = read_particles(spec["star"])
        if spec["drop_cache"]:
            _drop_from_page_cache(ps.stack_paths)
        out["memory_setup"] = _memory()
        out["peak_reset"] = _reset_peak()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        checksum = 0.0
        with ImageSource(ps) as source:
            for _, images in source.batches(np.arange(n), spec["image_batch_size"]):
                checksum += float(images[:, 0, 0].sum())
        out.update(wall_seconds=time.perf_counter() - t0, cpu_seconds=_cpu_seconds() - c0,
                   read_seconds=made[0].read_seconds, wait_seconds=made[0].wait_seconds,
                   images_read=made[0].images_read, checksum=checksum,
                   bytes_read=n * ps.box * ps.box * 4, memory=_memory())
    else:
        from mpirefine.config import RefineConfig
        from mpirefine.logs import get_logger
        from mpirefine.parallel import Parallel
        from mpirefine.report.memory import memory_per_rank, metadata_bytes

        par = Parallel()
        log = get_logger("bench_stream", level=40)
        with tempfile.TemporaryDirectory() as tmp_out:
            cfg = RefineConfig(particles=spec["star"], volume=spec["volume"], out_dir=tmp_out,
                               image_batch_size=spec["image_batch_size"], seed=spec["seed"],
                               reestimate_greyscale=False, device="cpu")
            t_setup = time.perf_counter()
            job = refine.build_job(cfg, par, log)
            job.noise = refine.initial_noise_model(job)
            job.resolution_A = float(spec["resolution_A"])
            setup_seconds = time.perf_counter() - t_setup
            if spec["drop_cache"]:
                _drop_from_page_cache(job.particles.stack_paths)
            out["memory_setup"] = _memory()
            out["peak_reset"] = _reset_peak()
            made.clear()
            timer = par.timer
            t0, c0 = time.perf_counter(), _cpu_seconds()
            accs, _, _ = refine.align_and_backproject(job, np.arange(n), 1, timer)
            wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            out["memory"] = _memory()
            plan = refine.plan_search(job.alignment_resolution_A(), job.prep, cfg, marginalize=False)
            model = memory_per_rank(job.prep.box, n, 1, cfg.image_batch_size,
                                    metadata=metadata_bytes(job.particles))["roles"][0]
            read_seconds = sum(m.read_seconds for m in made)
            wait_seconds = sum(m.wait_seconds for m in made)
            out.update(
                setup_seconds=setup_seconds, wall_seconds=wall, cpu_seconds=cpu,
                seconds_per_1000_particles=1000 * wall / n,
                cpu_seconds_per_1000_particles=1000 * cpu / n,
                timer_seconds=dict(timer.seconds), counts=dict(timer.counts),
                read_seconds=read_seconds, wait_seconds=wait_seconds,
                images_read=sum(m.images_read for m in made),
                reading_fraction_busy=read_seconds / wall,
                reading_fraction_waited=wait_seconds / wall,
                plan={k: getattr(plan.params, k) for k in (
                    "coarse_step_deg", "final_step_deg", "coarse_radius_px", "final_radius_px",
                    "shift_range_px", "coarse_shift_step_px", "n_keep")},
                model_estimate_MiB={"device_total": model["device_total"] / 2 ** 20,
                                    "host_total": model["host_total"] / 2 ** 20,
                                    "numpy_rank_total": (model["device_total"]
                                                         + model["host_total"]) / 2 ** 20},
                accumulator_weight_sum=float(sum(float(a.weight.sum()) for a in accs.values())),
                box=job.prep.box, pixel_size_A=job.prep.pixel_size_A)
    out["peak_MiB"] = max(out["memory_setup"]["VmHWM_MiB"], out["memory"]["VmHWM_MiB"])
    out["loadavg_after"] = os.getloadavg()
    with open(spec["result"], "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)


def summarize(result: dict) -> dict:
    """Medians per (particles, resolution, prefetch) of the passes, and per (particles,
    keep_mapped_pages) of the read passes."""
    import statistics

    def med(rows, key):
        return statistics.median(key(r) for r in rows)

    groups: dict = {}
    for r in result["passes"]:
        sp = r["spec"]
        groups.setdefault((sp["n"], sp["resolution_A"], sp["prefetch"]), []).append(r)
    passes = [{"n": n, "resolution_A": res, "prefetch": pf, "runs": len(rows),
               "seconds_per_1000_particles": med(rows, lambda r: r["seconds_per_1000_particles"]),
               "cpu_seconds_per_1000_particles": med(rows, lambda r: r["cpu_seconds_per_1000_particles"]),
               "reading_fraction_busy": med(rows, lambda r: r["reading_fraction_busy"]),
               "reading_fraction_waited": med(rows, lambda r: r["reading_fraction_waited"]),
               "search_fraction": med(rows, lambda r: r["timer_seconds"]["search"] / r["wall_seconds"]),
               "peak_MiB": max(r["peak_MiB"] for r in rows),
               "pass_peak_MiB": max(r["memory"]["VmHWM_MiB"] for r in rows),
               "model_estimate_MiB": rows[0]["model_estimate_MiB"]["numpy_rank_total"]}
              for (n, res, pf), rows in sorted(groups.items())]
    reads = {}
    for r in result["read_passes"]:
        reads.setdefault((r["spec"]["n"], r["spec"]["keep_mapped_pages"]), []).append(r)
    read_passes = [{"n": n, "keep_mapped_pages": keep, "pass_peak_MiB": max(
                        r["memory"]["VmHWM_MiB"] for r in rows),
                    "setup_MiB": max(r["memory_setup"]["VmRSS_MiB"] for r in rows),
                    "MB_per_s": med(rows, lambda r: r["bytes_read"] / r["wall_seconds"] / 1e6)}
                   for (n, keep), rows in sorted(reads.items())]
    return {"passes": passes, "read_passes": read_passes}


# ------------------------------------------------------------------------------ main

def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    for var in THREAD_VARIABLES:
        os.environ[var] = "1"
    passes = [(int(s.split(":")[0]), float(s.split(":")[1]), s.split(":")[2:] != ["noprefetch"])
              for s in args.passes]
    sizes = sorted({n for n, _, _ in passes} | set(args.read_passes))
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_stream_", dir=args.scratch)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "python": platform.python_version()},
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "box": args.box, "pixel_size_A": args.pixel_size_A, "snr": args.snr,
              "base_particles": args.base_particles, "image_batch_size": args.image_batch_size,
              "page_cache": "warm" if args.warm_cache else "cold",
              "core": args.core, "passes": [], "read_passes": []}
    try:
        base = simulate_base(args, os.path.join(work, "base"))
        result["simulation_seconds"] = base["seconds"]   # 0 when reused
        stars = {}
        for n in sizes:
            t0 = time.perf_counter()
            stars[n] = particle_set(base, n, os.path.join(work, f"tiled_{n}"), args.seed)
            print(f"set of {n} particles: {time.perf_counter() - t0:.0f} s", flush=True)
        for n, res, prefetch in passes:
            r = run_child({"kind": "pass", "n": n, "resolution_A": res, "star": stars[n],
                           "volume": base["volume"], "seed": args.seed, "prefetch": prefetch}, args)
            result["passes"].append(r)
            print(f"pass N={n} at {res:g} Å{'' if prefetch else ' (no prefetch)'}: "
                  f"{r['seconds_per_1000_particles']:.2f} s / 1000 "
                  f"(cpu {r['cpu_seconds_per_1000_particles']:.2f}), reading busy "
                  f"{100 * r['reading_fraction_busy']:.1f} % waited "
                  f"{100 * r['reading_fraction_waited']:.1f} %, peak RSS {r['peak_MiB']:.0f} MiB "
                  f"(pass {r['memory']['VmHWM_MiB']:.0f})",
                  flush=True)
        for n in args.read_passes:
            for keep in (False, True):
                r = run_child({"kind": "read", "n": n, "star": stars[n],
                               "keep_mapped_pages": keep}, args)
                result["read_passes"].append(r)
                print(f"read N={n} keep_mapped_pages={keep}: {r['wall_seconds']:.1f} s, "
                      f"peak RSS {r['peak_MiB']:.0f} MiB "
                      f"(pass {r['memory']['VmHWM_MiB']:.0f})", flush=True)
    finally:
        if args.keep_data:
            print(f"data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["summary"] = summarize(result)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
