"""Expected time per iteration on 8, 64 and 512 ranks, from measured times.

The model (docs/parallel.md explains each term):

    T(R) = N · t_particle / R  +  T_root  +  T_comm(R)

- t_particle: seconds of search + backprojection per particle per iteration on one
  rank, measured by bench_refine.py (1-rank runs), scaled to the target box by
  (n / n_measured)² (pixels per image) and divided by --speedup for the target
  device (a GPU rank against the measured CPU rank; measure it with
  bench_search.py on the GPU and pass the ratio).
- T_root: the root pair's reconstruction, FSC and references per iteration
  (measured "reconstruction" seconds), scaled by (n / n_measured)³ and by --speedup.
- T_comm(R): each half group of G = R / 2 ranks reduces its accumulator
  (sent as complex64 data + float32 weights on the padded half-space grid:
  12 · (2n)² · (n + 1) bytes) onto its root and broadcasts the next reference and
  mask (4 n³ bytes each), as binomial trees of ceil(log2 G) steps at --network-GBps;
  the root pair swaps two pairs of half maps (16 n³ bytes).

    python benchmarks/scaling_model.py benchmarks/results/bench_refine_cpu2.json \\
        --box 256 --particles 200000 --speedup 50 --out benchmarks/results/scaling_model.json
"""

from __future__ import annotations

import argparse
import json
import math


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", help="bench_refine.py JSON with a 1-rank entry")
    p.add_argument("--box", type=int, nargs="+", default=[64, 256], help="target boxes [64 256]")
    p.add_argument("--particles", type=int, default=200_000,
                   help="particles per iteration (a full pass) [200000]")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 64, 512])
    p.add_argument("--speedup", type=float, default=1.0,
                   help="target rank's speed over the measured rank [1: the same CPU]")
    p.add_argument("--network-GBps", type=float, default=12.5,
                   help="point-to-point bandwidth between nodes, GB/s [12.5: 100 Gb/s]")
    p.add_argument("--out", default=None, help="JSON output")
    return p.parse_args(argv)


def measured(bench: dict) -> dict:
    one = bench["medians"]["1"]
    rank0 = one["per_rank"]["0"]["seconds"]
    n_it = max(1, round(sum(one["n_iterations_runs"]) / len(one["n_iterations_runs"])))
    n_particles = bench["parameters"]["n_particles"]
    return {"box": bench["parameters"]["box"],
            "t_particle_s": (rank0["search"] + rank0["backprojection"]) / n_it / n_particles,
            "t_root_s": rank0.get("reconstruction", 0.0) / n_it,
            "threads": one["threads_per_rank"]}


def comm_seconds(n: int, ranks: int, bandwidth: float) -> float:
    if ranks < 2:
        return 0.0
    group = max(1, ranks // 2)
    steps = math.ceil(math.log2(group)) if group > 1 else 0
    accumulator = 12.0 * (2 * n) ** 2 * (n + 1)
    volume = 4.0 * n ** 3
    tree = steps * (accumulator + 2 * volume) / bandwidth
    return tree + 4 * volume / bandwidth


def model(m: dict, n: int, particles: int, ranks: list, speedup: float, bandwidth: float):
    t_p = m["t_particle_s"] * (n / m["box"]) ** 2 / speedup
    t_root = m["t_root_s"] * (n / m["box"]) ** 3 / speedup
    rows = []
    t1 = particles * t_p + t_root
    for r in ranks:
        compute = particles * t_p / r
        comm = comm_seconds(n, r, bandwidth)
        total = compute + t_root + comm
        rows.append({"ranks": r, "compute_s": compute, "root_s": t_root, "comm_s": comm,
                     "total_s": total, "speedup_vs_1": t1 / total,
                     "efficiency": t1 / total / r})
    return rows


def main(argv=None):
    args = parse_args(argv)
    with open(args.bench, encoding="utf-8") as f:
        m = measured(json.load(f))
    bandwidth = args.network_GBps * 1e9
    result = {"measured": m, "assumptions": {
        "particles_per_iteration": args.particles, "speedup_over_measured_rank": args.speedup,
        "network_GBps": args.network_GBps}, "boxes": {}}
    for n in args.box:
        rows = model(m, n, args.particles, args.ranks, args.speedup, bandwidth)
        result["boxes"][str(n)] = rows
        print(f"box {n}, {args.particles} particles, speed-up {args.speedup:g}x, "
              f"{args.network_GBps:g} GB/s")
        print(f"{'ranks':>6} {'compute s':>10} {'root s':>8} {'comm s':>8} {'total s':>9} "
              f"{'speed-up':>9} {'eff.':>6}")
        for r in rows:
            print(f"{r['ranks']:6d} {r['compute_s']:10.2f} {r['root_s']:8.2f} {r['comm_s']:8.2f} "
                  f"{r['total_s']:9.2f} {r['speedup_vs_1']:9.1f} {r['efficiency']:6.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
