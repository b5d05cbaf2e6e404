"""Time per iteration on 8, 64 and 512 GPUs, from phases measured on this machine.

Two subcommands (docs/parallel.md, "Scaling model", explains every term):

``measure``  times, on one CPU core and in one process (user CPU seconds), the work of one iteration's
reconstruction at each --box: the root pair's serial work as it was before the
reconstruction was distributed (each half root reconstructs its half twice, the FSC,
its next reference, its dynamic mask, and rank 0 writes the checkpoint), and the
distributed design's work per rank for G ranks per half (--parts): packing the
accumulator, the slab stages of both reconstructions, the FSC sums, the reference and
mask rows (each slab played in turn; a rank's time is the slowest slab's), the bytes
each rank sends in each collective, and the work left to the root pair (assembling the
whole maps for the checkpoint; the file itself is written by a thread).

    python benchmarks/scaling_model.py measure --box 64 128 256 --out phases.json
    python benchmarks/scaling_model.py measure --box 360 --parts 1 4 32 256 --out phases360.json

``model``  predicts the iteration time of the distributed design (and, for comparison,
of the root-pair design it replaced) on R GPUs, R/2 per half, from those phases, the
per-particle search + insertion time measured by bench_refine.py, and the assumptions
given as options (each with its source in --help and in the JSON):

    T(R) = N·t_particle/R + T_pack + T_reduce_scatter(R) + T_slabs(R/2) + T_transposes(R)
           + T_root + T_checkpoint_copy

    python benchmarks/scaling_model.py model \\
        --phases benchmarks/results/reconstruction_phases_cpu1.json \\
        --bench benchmarks/results/bench_refine_cpu2_ranks124_box64.json \\
                benchmarks/results/bench_refine_cpu2_ranks124_box128.json \\
        --box 256 360 --out benchmarks/results/scaling_model_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PAD = 2

# ----------------------------------------------------------------------------- measure

# Compute phases are timed in user CPU seconds of this (single-threaded) process,
# which a shared, busy machine disturbs far less than wall seconds, and which leave out
# the kernel's time zeroing the pages of every new large array (a GPU's memory pool has
# none); the checkpoint's file write is timed in wall seconds (it waits for the disk).


def CLOCK() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _timed(fn, *args, **kwargs):
    t0 = CLOCK()
    out = fn(*args, **kwargs)
    return out, CLOCK() - t0


def _volume(n: int):
    """A map like a refined one: the shipped apoferritin model in a box of 230 Å."""
    import numpy as np

    from mpirefine.synthetic.models import model_volume

    px = 230.0 / n
    return np.asarray(model_volume(box=n, pixel_size_A=px), np.float32), px


def _accumulator(n: int, seed: int = 0, single: bool = False):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (PAD * n, PAD * n, n + 1)
    data = np.empty(shape, np.complex64 if single else np.complex128)
    data.real = rng.standard_normal(shape, np.float32)
    data.imag = rng.standard_normal(shape, np.float32)
    weight = (rng.random(shape, np.float32) + 0.5).astype(np.float32 if single else np.float64)
    return data, weight


def measure_root_pair(n: int, volume, px: float, resolution_A: float, single: bool = False) -> dict:
    """Seconds of the root pair's serial work per iteration before the reconstruction
    was distributed (one half root; rank 0 also writes the checkpoint). ``single``:
    single-precision accumulator arrays (when the double-precision ones and
    reconstruct()'s temporaries do not fit in memory together)."""
    import numpy as np

    from mpirefine.fourier.reconstruct import reconstruct, ssnr_from_fsc
    from mpirefine.postprocess.fsc import fsc_curve
    from mpirefine.postprocess.masks import dynamic_mask
    from mpirefine.refinement.references import next_references

    data, weight = _accumulator(n, single=single)
    t = {}
    unreg, t["reconstruct_unregularised"] = _timed(reconstruct, data, weight, n, PAD,
                                                   mask_corners=False)
    other = (volume + 0.1 * np.random.default_rng(1).standard_normal(volume.shape)).astype(np.float32)
    fsc, t["fsc"] = _timed(fsc_curve, volume, other)
    _, t["reconstruct_regularised"] = _timed(reconstruct, data, weight, n, PAD,
                                             ssnr=ssnr_from_fsc(fsc), mask_corners=False)
    del data, weight, unreg
    _, t["next_reference"] = _timed(next_references, {0: volume, 1: other}, fsc, 20.0, px, (0,))
    _, t["dynamic_mask"] = _timed(dynamic_mask, volume, resolution_A, px, 0.2, 0.5, 1.2)
    t["total"] = sum(t.values())
    return t


def measure_checkpoint(n: int, volume, particles: int) -> dict:
    """Seconds to copy the checkpoint's arrays (the snapshot) and to write the file."""
    import tempfile

    import numpy as np

    from mpirefine.refinement import checkpoint

    maps = {h: volume for h in (0, 1)}
    parts = {"rotations": np.tile(np.eye(3), (particles, 1, 1)), "shifts_px": np.zeros((particles, 2)),
             "scale": np.ones(particles), "log_likelihood": np.zeros(particles),
             "aligned": np.ones(particles, bool)}
    t0 = CLOCK()
    copies = {k: {h: np.array(v, copy=True) for h, v in maps.items()} for k in range(4)}
    copies_p = {k: np.array(v, copy=True) for k, v in parts.items()}
    snapshot = CLOCK() - t0
    ckpt = checkpoint.Checkpoint(config={}, iteration=1, resolution_A=4.0, history=[], convergence={},
                                 greyscale_factor=1.0, half_maps=copies[0], regularised_maps=copies[1],
                                 references=copies[2], fsc=np.ones(n // 2 + 1),
                                 noise_sigma2=np.ones(n // 2 + 1), particles=copies_p,
                                 split=np.zeros(particles, np.int8), masks=copies[3])
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as folder:
        t0 = time.perf_counter()
        checkpoint.save(folder, ckpt)
        write = time.perf_counter() - t0
        size = os.path.getsize(checkpoint.path_in(folder))
    return {"snapshot_s": snapshot, "write_s": write, "bytes": size}


def measure_slabs(n: int, volume, px: float, resolution_A: float, parts_list) -> dict:
    """Per-rank seconds of the distributed design for each G in ``parts_list``."""
    import numpy as np

    from mpirefine.fourier import reconstruct as R
    from mpirefine.refinement import halfmaps
    from mpirefine.refinement import references as refs

    data, weight = _accumulator(n)
    t0 = CLOCK()
    R.fold_kx0(data, weight)
    layout1 = R.SlabLayout(n, PAD, 1)
    packed_all = R.pack_sphere(data, weight, layout1)
    pack = CLOCK() - t0
    del data, weight
    n_shells, nxn = n // 2 + 1, n // 2 + 1
    halo = refs.mask_halo_rows(resolution_A, px, 0.5, 1.2)
    rows_all = np.ascontiguousarray(volume.transpose(1, 0, 2))
    peak = float(volume.max())
    out = {"pack_s": pack, "sphere_voxels": int(layout1.voxels.sum()),
           "reduce_scatter_bytes": 12 * int(layout1.voxels.sum()), "mask_halo_rows": halo,
           "by_parts": {}}
    for G in parts_list:
        L = R.SlabLayout(n, PAD, G)
        starts = np.concatenate([[0], np.cumsum(L.voxels)])
        stages = []
        for s in range(G):
            st = {}
            packed = packed_all[starts[s]:starts[s + 1]]
            z0, z1 = L.planes(s)
            y0, y1 = L.rows(s)
            k0, k1 = L.kplanes(s)
            ny, nz, nk = y1 - y0, z1 - z0, k1 - k0
            t = CLOCK()
            shells = R.sphere_shells(L, s, np)
            ws = R.shell_weight_sums(packed, shells, n_shells)
            reg = R.slab_regulariser(ws)
            st["weights_s"] = CLOCK() - t
            t = CLOCK()
            rows = R.padded_inverse_rows(R.divide_sphere(packed, shells, reg), L, s)
            st["inverse_rows_s"] = CLOCK() - t
            # the columns step of this slab gets the same amount of data from the others
            blocks = np.zeros(ny * L.P * L.nx, np.complex64)
            t = CLOCK()
            mine = R.padded_inverse_columns(blocks, L, s)
            st["inverse_columns_s"] = CLOCK() - t
            my_rows = rows_all[y0:y1]
            t = CLOCK()
            f = R.forward_rows(my_rows)
            st["forward_rows_s"] = CLOCK() - t
            fblocks = np.zeros(nk * n * nxn, np.complex128)
            t = CLOCK()
            planes = R.forward_columns(fblocks, L, s)
            st["forward_columns_s"] = CLOCK() - t
            t = CLOCK()
            radius = R.slab_radius(n, k0, k1, np)
            halfmaps.fsc_shell_sums(planes, planes, radius, n)
            st["fsc_sums_s"] = CLOCK() - t
            t = CLOCK()
            low = radius < refs.split_shell(n, 20.0, px)
            filtered = refs.filter_reference_planes(planes, radius, low, planes[low],
                                                    np.linspace(1, 0, n_shells), n)
            back = R.inverse_rows(filtered, n)
            st["reference_rows_s"] = CLOCK() - t
            iblocks = np.zeros(ny * n * nxn, np.complex128)
            t = CLOCK()
            R.inverse_columns(iblocks, L, s)
            st["reference_columns_s"] = CLOCK() - t
            lo, hi = max(0, y0 - halo), min(n, y1 + halo)
            t = CLOCK()
            refs.dynamic_mask_rows(rows_all[lo:hi], y0 - lo, ny, peak, resolution_A, px, 0.2, 0.5, 1.2)
            st["mask_rows_s"] = CLOCK() - t
            # the second reconstruction (regularised) repeats the padded inverse, the
            # references repeat the forward transform
            st["total_s"] = (st["weights_s"] + 2 * (st["inverse_rows_s"] + st["inverse_columns_s"])
                             + 2 * (st["forward_rows_s"] + st["forward_columns_s"]) + st["fsc_sums_s"]
                             + st["reference_rows_s"] + st["reference_columns_s"] + st["mask_rows_s"])
            # bytes this slab sends in each collective (complex64 / complex128 / float32)
            st["bytes"] = {
                "padded_transpose": 2 * 8 * n * nz * L.nx,          # two reconstructions
                "forward_transpose": 2 * 16 * n * ny * nxn,         # FSC, references
                "inverse_transpose": 16 * n * nk * nxn,
                "fsc_partner": 16 * nk * n * nxn,                   # half B's planes to A
                "allgather_received": 2 * 4 * n ** 3,               # reference and mask
                "mask_halo": 4 * 2 * halo * n * n,
            }
            del rows, mine, f, planes, back, filtered
            stages.append(st)
        slowest = max(stages, key=lambda st: st["total_s"])
        out["by_parts"][str(G)] = {
            "per_rank_s": slowest["total_s"],
            "sum_over_ranks_s": sum(st["total_s"] for st in stages),
            "slowest_stages": {k: v for k, v in slowest.items() if k.endswith("_s")},
            "bytes_max_rank": {k: max(st["bytes"][k] for st in stages) for k in slowest["bytes"]},
        }
        print(f"  box {n} G {G}: {slowest['total_s']:.3f} s per rank "
              f"({out['by_parts'][str(G)]['sum_over_ranks_s']:.2f} s over all)", flush=True)
    # the root pair's own work: whole maps from the gathered rows (two per half root,
    # four more arrive whole at rank 0 from half B's root)
    flat = np.random.default_rng(0).random(n ** 3, np.float32)   # real pages, not the zero page
    t0 = CLOCK()
    for _ in range(2):
        halfmaps._as_volume(flat, n)
    out["root_assembly_s"] = CLOCK() - t0
    out["root_receive_bytes"] = 4 * n ** 3 * (2 + 4)
    return out


def cmd_measure(args) -> dict:
    from mpirefine.fourier.reconstruct import SlabLayout

    result = {"machine": _machine(), "threads": os.environ.get("OMP_NUM_THREADS"), "boxes": {}}
    for n in args.box:
        print(f"box {n}", flush=True)
        volume, px = _volume(n)
        resolution = args.mask_resolution_A
        entry = {"pixel_size_A": px, "mask_resolution_A": resolution,
                 "padded_grid_voxels": (PAD * n) ** 2 * (n + 1),
                 "accumulator_reduce_bytes_before": 12 * (PAD * n) ** 2 * (n + 1),
                 "sphere_voxels": int(SlabLayout(n, PAD, 1).voxels.sum())}
        if not args.skip_root_pair:
            entry["root_pair_before"] = measure_root_pair(n, volume, px, resolution,
                                                          args.root_pair_single)
            entry["root_pair_before"]["single_precision_accumulator"] = args.root_pair_single
            print(f"  root pair before: {entry['root_pair_before']['total']:.2f} s", flush=True)
        entry["checkpoint"] = measure_checkpoint(n, volume, args.particles)
        if not args.skip_slabs:
            entry["distributed"] = measure_slabs(n, volume, px, resolution, args.parts)
        result["boxes"][str(n)] = entry
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


def _machine() -> dict:
    import platform

    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "hostname": platform.node(), "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- model

ASSUMPTIONS = {
    "gpus_per_node": (4, "4 GPUs per node (e.g. NVIDIA DGX/HGX A100 and H100 nodes have 4 or 8; "
                         "Perlmutter, Leonardo and JUWELS Booster GPU nodes have 4)"),
    "node_network_GBps": (25.0, "200 Gb/s per node (one InfiniBand HDR or Slingshot-11 200G "
                                "port), shared by the node's GPUs"),
    "intra_node_GBps": (25.0, "rank to rank on a node through host memory: PCIe 4.0 x16, "
                              "32 GB/s peak, ~25 GB/s achieved (no CUDA-aware MPI: the mpich "
                              "wheel stages GPU arrays through the host)"),
    "pcie_GBps": (25.0, "GPU↔host staging of every array an MPI call moves: PCIe 4.0 x16, ~25 GB/s"),
    "latency_s": (2e-5, "per collective step (InfiniBand/Slingshot MPI latency ~2 µs; "
                        "20 µs allows for Python and staging)"),
    "gpu_map_speedup": (50.0, "map work (FFTs, division, masks: memory-bound) on one GPU vs one "
                              "CPU core of this machine: H100 HBM3 3.35 TB/s vs ~20-40 GB/s of "
                              "one core's streaming; 50 is conservative"),
    "gpu_ms_per_particle_360": (0.75, "search + insertion per particle and iteration on one GPU at "
                                      "box 360 (not measurable here: no GPU). Anchor: RELION 5 on "
                                      "one A10G classifies the 105,247 box-360 particles of "
                                      "EMPIAR-10028 into 6 classes in 198 min for 25 iterations "
                                      "(clusterra.cloud case study, 2026): 0.75 ms per particle and "
                                      "class-iteration; other boxes scale as this machine's "
                                      "measured CPU time per particle does"),
}


def measured_particle_seconds(bench_files) -> dict:
    """Per-particle seconds of search + insertion (+ image preparation and reading) on
    one core, by box, from bench_refine JSONs: the largest rank count that ran one
    thread per rank without oversubscribing the machine's cores."""
    out = {}
    for path in bench_files:
        with open(path, encoding="utf-8") as f:
            bench = json.load(f)
        p = bench["parameters"]
        cores = bench["machine"].get("cores_used") or 1
        best = None
        for key, m in bench["medians"].items():
            ranks = int(key)
            if m["threads_per_rank"] != 1 or ranks > cores or (ranks > 1 and ranks % 2):
                continue
            n_it = max(1, round(sum(m["n_iterations_runs"]) / len(m["n_iterations_runs"])))
            per = []
            for row in m["per_rank"].values():
                sec = row["seconds"]
                work = sum(sec.get(c) or 0.0 for c in ("search", "backprojection", "preparation", "reading"))
                per.append(work / n_it / (p["n_particles"] / ranks))
            if best is None or ranks > best[0]:
                best = (ranks, max(per))
        if best is not None:
            out[int(p["box"])] = {"seconds_per_particle": best[1], "ranks": best[0],
                                  "file": os.path.basename(path)}
    return out


def particle_seconds_at(measured: dict, n: int) -> tuple[float, float]:
    """(seconds per particle at box n on one core, exponent) from the measured boxes:
    a power law through the two largest, n² when only one was measured."""
    boxes = sorted(measured)
    if len(boxes) >= 2:
        a, b = boxes[-2], boxes[-1]
        ta, tb = measured[a]["seconds_per_particle"], measured[b]["seconds_per_particle"]
        k = math.log(tb / ta) / math.log(b / a)
    else:
        b, k = boxes[-1], 2.0
        tb = measured[b]["seconds_per_particle"]
    return tb * (n / b) ** k, k


def slab_seconds(entry: dict, G: int) -> tuple[float, dict]:
    """Per-rank CPU seconds of the slab work with G ranks per half, and the bytes each
    sends: the mean over the G slabs (they are balanced by construction; the slowest
    one measured on a shared machine is mostly noise, and is kept in the JSON), for the
    measured G or the nearest measured G scaled by G_m / G."""
    by = entry["distributed"]["by_parts"]
    if str(G) in by:
        row = by[str(G)]
        return row["sum_over_ranks_s"] / G, row["bytes_max_rank"]
    nearest = min((int(k) for k in by), key=lambda k: abs(math.log(k / G)))
    row = by[str(nearest)]
    scale = nearest / G
    b = {k: (v if k in ("allgather_received", "mask_halo") else v * scale)
         for k, v in row["bytes_max_rank"].items()}
    return row["sum_over_ranks_s"] / nearest * scale, b


def _one_rank_root(root: dict, a: dict) -> float:
    """One rank does both halves on the root path: two reconstructions of each on the
    GPU, one FSC, both references (two forward and two inverse transforms: 1.5 times
    one half's) and two masks on the host."""
    gpu = 2 * (root["reconstruct_unregularised"] + root["reconstruct_regularised"])
    return (gpu / a["gpu_map_speedup"] + root["fsc"] + 1.5 * root["next_reference"]
            + 2 * root["dynamic_mask"])


def predict(entry: dict, R: int, particles: int, t_particle: float, a: dict) -> dict:
    """Seconds per iteration on R GPUs (distributed design), by term."""
    g = min(a["gpus_per_node"], R)
    nodes = max(1, R // g)
    G = max(1, R // 2)
    L = max(1, g // 2)                      # ranks of one half on a node
    M = max(1, G // L)                      # nodes a half spans
    GB = 1e9
    compute = particles * t_particle / R
    if R == 1:
        # one rank: both halves on the root path; only the GPU part of today's root
        # work changes with the GPU; the host part (FSC, references, masks) stays
        t_root = _one_rank_root(entry["root_pair_before"], a)
        return {"gpus": R, "particles_s": compute, "pack_s": 0.0, "reduce_scatter_s": 0.0,
                "slabs_s": 0.0, "transposes_s": 0.0, "root_s": t_root,
                "checkpoint_s": entry["checkpoint"]["snapshot_s"],
                "total_s": compute + t_root + entry["checkpoint"]["snapshot_s"]}
    V = entry["distributed"]["reduce_scatter_bytes"]
    pack = entry["distributed"]["pack_s"] / a["gpu_map_speedup"] + V / (a["pcie_GBps"] * GB)
    # two-level reduce-scatter: within the node (L ranks), then across M nodes, where
    # the node's g ranks (both halves) share its network
    rs_intra = V * (L - 1) / L / (a["intra_node_GBps"] * GB)
    rs_inter = (g * V / L * (M - 1) / M) / (a["node_network_GBps"] * GB) if M > 1 else 0.0
    reduce_scatter = rs_intra + rs_inter + V / G / (a["pcie_GBps"] * GB) \
        + (math.ceil(math.log2(max(L, 1))) + math.ceil(math.log2(max(M, 1)))) * a["latency_s"]
    slab_cpu, b = slab_seconds(entry, G)
    slabs = slab_cpu / a["gpu_map_speedup"]
    # all-to-alls within a half group: a fraction (M - 1)/M of each rank's blocks leave
    # its node, and the node's g ranks share the network; everything crosses PCIe twice
    a2a = b["padded_transpose"] + b["forward_transpose"] + b["inverse_transpose"] + b["mask_halo"]
    off_node = (M - 1) / M if M > 1 else 0.0
    transposes = (g * a2a * off_node / (a["node_network_GBps"] * GB)
                  + a2a * (1 - off_node) / (a["intra_node_GBps"] * GB)
                  + 2 * a2a / (a["pcie_GBps"] * GB)
                  + b["fsc_partner"] / (a["node_network_GBps"] / g * GB)
                  + g * b["allgather_received"] * off_node / (a["node_network_GBps"] * GB)
                  + b["allgather_received"] / (a["pcie_GBps"] * GB)
                  + 8 * (G - 1) * a["latency_s"])
    d = entry["distributed"]
    root = (d["root_assembly_s"] + d["root_receive_bytes"] / (a["node_network_GBps"] / g * GB))
    ckpt = entry["checkpoint"]["snapshot_s"]
    total = compute + pack + reduce_scatter + slabs + transposes + root + ckpt
    return {"gpus": R, "nodes": nodes, "ranks_per_half": G, "particles_s": compute, "pack_s": pack,
            "reduce_scatter_s": reduce_scatter, "slabs_s": slabs, "transposes_s": transposes,
            "root_s": root, "checkpoint_s": ckpt, "total_s": total}


def predict_before(entry: dict, n: int, R: int, particles: int, t_particle: float, a: dict) -> dict:
    """The root-pair design it replaced: reduce whole accumulators onto the half roots
    (a binomial tree per half, ceil(log2 G) steps of 12·(2n)²(n+1) bytes through the
    root's share of its node's network), the roots' serial work (GPU reconstruction,
    host FSC, references, masks), synchronous checkpoint, references broadcast."""
    GB = 1e9
    g = min(a["gpus_per_node"], R)
    G = max(1, R // 2)
    compute = particles * t_particle / R
    root = entry["root_pair_before"]
    serial = ((root["reconstruct_unregularised"] + root["reconstruct_regularised"]) / a["gpu_map_speedup"]
              + root["fsc"] + root["next_reference"] + root["dynamic_mask"])
    if R == 1:
        serial = _one_rank_root(root, a)
    acc = entry["accumulator_reduce_bytes_before"]
    per_gpu = a["node_network_GBps"] / g * GB
    steps = math.ceil(math.log2(G)) if G > 1 else 0
    reduce = steps * (acc / per_gpu + 2 * acc / (a["pcie_GBps"] * GB))
    bcast = steps * 2 * 4 * n ** 3 / per_gpu + (16 * n ** 3 / per_gpu if R > 1 else 0.0)
    ckpt = entry["checkpoint"]["write_s"]
    total = compute + reduce + serial + bcast + ckpt
    return {"gpus": R, "particles_s": compute, "reduce_s": reduce, "root_serial_s": serial,
            "bcast_s": bcast, "checkpoint_s": ckpt, "total_s": total}


def cmd_model(args) -> dict:
    phases = {}   # later files add to (and override) the earlier ones' entries per box
    for path in args.phases:
        with open(path, encoding="utf-8") as f:
            for box, entry in json.load(f)["boxes"].items():
                phases.setdefault(box, {}).update(entry)
    a = {k: v[0] for k, v in ASSUMPTIONS.items()}
    for k in a:
        given = getattr(args, k)
        if given is not None:
            a[k] = given
    measured = measured_particle_seconds(args.bench)
    result = {"assumptions": {k: {"value": a[k], "source": ASSUMPTIONS[k][1]} for k in a},
              "inputs": {"phases": [os.path.basename(p) for p in args.phases],
                         "bench": [os.path.basename(p) for p in args.bench]},
              "particles_per_iteration": args.particles,
              "measured_particle_seconds_one_core": {str(k): v for k, v in measured.items()},
              "boxes": {}}
    for n in args.box:
        entry = phases[str(n)]
        t_core, k = particle_seconds_at(measured, n)
        t_gpu_n = a["gpu_ms_per_particle_360"] * 1e-3 * (n / 360.0) ** k
        result["boxes"][str(n)] = {"particle_seconds_one_core": t_core, "box_exponent": k,
                                   "gpu_seconds_per_particle": t_gpu_n,
                                   "implied_gpu_over_one_core": t_core / t_gpu_n, "sensitivity": {}}
        for factor in args.sensitivity:
            t_gpu = t_gpu_n * factor
            rows = [predict(entry, R, args.particles, t_gpu, a) for R in [1] + args.gpus]
            before = [predict_before(entry, n, R, args.particles, t_gpu, a) for R in [1] + args.gpus]
            ideal = args.particles * t_gpu
            for row, old in zip(rows, before):
                row["efficiency"] = ideal / (row["gpus"] * row["total_s"])
                row["speedup_vs_1"] = rows[0]["total_s"] / row["total_s"]
                old["efficiency"] = ideal / (old["gpus"] * old["total_s"])
            result["boxes"][str(n)]["sensitivity"][str(factor)] = {
                "gpu_seconds_per_particle": t_gpu, "distributed": rows, "root_pair_before": before}
    print_model(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


def print_model(result: dict) -> None:
    for n, box in result["boxes"].items():
        for factor, s in box["sensitivity"].items():
            print(f"\nbox {n}, {result['particles_per_iteration']} particles, "
                  f"{1e3 * s['gpu_seconds_per_particle']:.3f} ms per particle per GPU (×{factor})")
            print(f"{'GPUs':>5} {'particles':>9} {'pack':>6} {'r-scat':>6} {'slabs':>6} {'transp':>6} "
                  f"{'root':>6} {'ckpt':>6} {'total s':>8} {'eff.':>5} | {'before s':>8} {'eff.':>5}")
            for r, o in zip(s["distributed"], s["root_pair_before"]):
                print(f"{r['gpus']:5d} {r['particles_s']:9.2f} {r['pack_s']:6.3f} "
                      f"{r['reduce_scatter_s']:6.3f} {r['slabs_s']:6.3f} {r['transposes_s']:6.3f} "
                      f"{r['root_s']:6.3f} {r['checkpoint_s']:6.3f} {r['total_s']:8.2f} "
                      f"{r['efficiency']:5.2f} | {o['total_s']:8.2f} {o['efficiency']:5.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="time the reconstruction's phases on one core")
    m.add_argument("--box", type=int, nargs="+", default=[64, 128, 256])
    m.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 256],
                   help="ranks per half to play (G) [1 2 4 8 16 32 64 256]")
    m.add_argument("--mask-resolution-A", type=float, default=8.0,
                   help="resolution of the dynamic mask (sets its reach) [8]")
    m.add_argument("--particles", type=int, default=100_000, help="particles in the checkpoint [100000]")
    m.add_argument("--skip-root-pair", action="store_true",
                   help="do not time the root pair's work before (it needs ~4x the accumulator)")
    m.add_argument("--skip-slabs", action="store_true", help="do not time the distributed design")
    m.add_argument("--root-pair-single", action="store_true",
                   help="time the root pair's work with single-precision accumulators (less memory)")
    m.add_argument("--out", required=True)
    d = sub.add_parser("model", help="predict the iteration time on R GPUs")
    d.add_argument("--phases", nargs="+", required=True, help="JSONs of `measure`")
    d.add_argument("--bench", nargs="+", required=True,
                   help="bench_refine.py JSONs (per-particle search + insertion on one core)")
    d.add_argument("--box", type=int, nargs="+", default=[256, 360])
    d.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    d.add_argument("--particles", type=int, default=100_000)
    d.add_argument("--sensitivity", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0],
                   help="factors on the assumed GPU time per particle [0.25 0.5 1 2]")
    for k, (v, source) in ASSUMPTIONS.items():
        d.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None,
                       help=f"[{v}] {source}")
    d.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "measure":
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")
        sys.path.insert(0, os.path.dirname(HERE))
        return cmd_measure(args)
    return cmd_model(args)


if __name__ == "__main__":
    main()
