#!/usr/bin/env bash
# benchmarks/gpu_check.sh: mpirefine's GPU path checked on a GPU node, in one go, into
# ONE JSON file.  Meant to take at most 5 minutes on a node with one H100/H200 and 16
# cores (GPU_CHECK_BUDGET_S, default 300, counted from the start: a step that would
# start later is skipped, and the check fails).
#
#   bash benchmarks/gpu_check.sh                  # results in ./gpu_check_out/gpu_check.json
#   OUT=/scratch/gpu_check bash benchmarks/gpu_check.sh
#
# Steps (each logged to $OUT/logs/<step>.log, its exit status and seconds recorded):
#   node         nvidia-smi's name, memory and driver of each GPU (not required)
#   install      a venv ($OUT/venv, reused when it exists) with `pip install -e .[test,gpu]`
#                (CuPy for CUDA 12 with its CUDA libraries); GPU_CHECK_PYTHON=/path/python
#                uses that interpreter's environment as it is instead
#   backend      python -m mpirefine.backend: a kernel, an FFT and a matmul on each GPU;
#                the check stops here if it fails
#   tests        the backend-parametrised tests on CuPy (pytest -k "cupy or gpu"), then
#   tests_mpi    the MPI ones on 2 ranks
#   bench_box128, bench_box256
#                benchmarks/bench_search.py --backend gpu (the refinement's search plan at
#                6 Å, 1.1 Å/px): seconds per 1,000 particles, GEMM rate, pool peak
#   simulate     mpirefine simulate: the asymmetric apoferritin model, box 128
#   refine_1rank, refine_2rank
#                mpirefine refine --gpu under mpiexec -n 1 and -n 2 (both ranks on GPU 0
#                with one GPU), with the CuPy memory pool's peak per rank
#   gather       $OUT/gpu_check.json: every step's status and time, the node, the test
#                counts and failures, the search benchmarks, each refinement's resolution,
#                wall time, per-phase seconds per rank (summary.json timings_per_rank) and
#                device memory peak.  Exit status 0 only if every step passed.
#
# Environment: OUT (output folder, default ./gpu_check_out), PYTHON (makes the venv,
# default python3), GPU_CHECK_VENV (venv folder), GPU_CHECK_PYTHON (use as is),
# GPU_CHECK_BUDGET_S (300), GPU_CHECK_BOXES ("128 256"), GPU_CHECK_BENCH_PARTICLES (500),
# GPU_CHECK_BENCH_REPEATS (2), GPU_CHECK_REFINE_BOX (128), GPU_CHECK_REFINE_PARTICLES
# (1000), GPU_CHECK_REFINE_ITERATIONS (3), GPU_CHECK_RANKS ("1 2"), MPIEXEC.
# GPU_CHECK_STANDIN=1 runs every step on the CuPy stand-in of tests/gpu_standin instead
# (no GPU needed, small sizes): a test of this script, not of a GPU.
# `bash benchmarks/gpu_check.sh --gather-only` rewrites $OUT/gpu_check.json from $OUT.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT/logs" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
STANDIN="${GPU_CHECK_STANDIN:-0}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-300}"
STEPS="$OUT/steps.tsv"
if [[ "$STANDIN" == 1 ]]; then
    BOXES="${GPU_CHECK_BOXES:-64 128}"
    BENCH_PARTICLES="${GPU_CHECK_BENCH_PARTICLES:-64}"
    BENCH_REPEATS="${GPU_CHECK_BENCH_REPEATS:-1}"
    REFINE_BOX="${GPU_CHECK_REFINE_BOX:-32}"
    REFINE_PARTICLES="${GPU_CHECK_REFINE_PARTICLES:-120}"
    REFINE_ITERATIONS="${GPU_CHECK_REFINE_ITERATIONS:-2}"
else
    BOXES="${GPU_CHECK_BOXES:-128 256}"
    BENCH_PARTICLES="${GPU_CHECK_BENCH_PARTICLES:-500}"
    BENCH_REPEATS="${GPU_CHECK_BENCH_REPEATS:-2}"
    REFINE_BOX="${GPU_CHECK_REFINE_BOX:-128}"
    REFINE_PARTICLES="${GPU_CHECK_REFINE_PARTICLES:-1000}"
    REFINE_ITERATIONS="${GPU_CHECK_REFINE_ITERATIONS:-3}"
fi
RANKS="${GPU_CHECK_RANKS:-1 2}"

# ----------------------------------------------------------------------------- gather
# Reads what the steps left in $OUT and writes $OUT/gpu_check.json; exit status 1 if a
# step failed or was skipped.
write_gather_script() {
    mkdir -p "$OUT/tools"
    cat > "$OUT/tools/gather.py" <<'PYTHON'
"""Gather benchmarks/gpu_check.sh's results in $OUT into $OUT/gpu_check.json."""
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

out = sys.argv[1]


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tail(path, lines=25):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()[-lines:]
    except OSError:
        return []


steps = []
if os.path.exists(os.path.join(out, "steps.tsv")):
    with open(os.path.join(out, "steps.tsv"), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 4:
                name, status, seconds, log = parts
                step = {"name": name, "status": status, "seconds": float(seconds), "log": log}
                if status != "0":
                    step["log_tail"] = tail(log)
                steps.append(step)
failed = [s["name"] for s in steps if s["status"] != "0"]


def junit(pattern):
    """Counts and failed test ids of the JUnit XML files matching ``pattern``."""
    files = sorted(glob.glob(os.path.join(out, pattern)))
    if not files:
        return None
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "files": files}
    for path in files:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:
            total["errors"] += 1
            total["failed"].append(f"{os.path.basename(path)}: unreadable ({exc})")
            continue
        for suite in (root.iter("testsuite")):
            for key in ("tests", "failures", "errors", "skipped"):
                total[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                total["failed"].append(f"{case.get('classname')}::{case.get('name')}")
    return total


def bench(path):
    r = load(path)
    if r is None:
        return None
    keep = ("backend", "cupy", "projection_kernel", "particles", "box", "n_levels", "repeats",
            "search_seconds_median", "seconds_per_1000_particles", "poses_scored_per_s",
            "gemm_flops_per_s", "machine_gemm_flops_per_s", "fraction_of_machine_gemm",
            "projection_samples_per_s", "warmup_seconds", "seconds_breakdown_last_run",
            "accuracy", "device_pool_total_bytes")
    got = {k: r[k] for k in keep if k in r}
    if "standin_counts" in r:
        got["standin_counts"] = {k: v for k, v in r["standin_counts"].items()
                                 if not isinstance(v, dict)}
    return got


def refine(folder):
    summary = load(os.path.join(folder, "summary.json"))
    if summary is None:
        return None
    got = {k: summary.get(k) for k in ("n_ranks", "backend", "projection_kernel", "box",
                                        "n_particles", "final_resolution_A", "wall_seconds",
                                        "converged")}
    its = summary.get("iterations") or []
    got["iterations"] = [{k: it.get(k) for k in ("iteration", "batch_size", "resolution_A",
                                                 "seconds")} for it in its]
    got["particle_iterations"] = sum(int(it.get("batch_size") or 0) for it in its)
    got["timings_per_rank"] = [{"rank": t.get("rank"), "seconds": t.get("seconds"),
                                "comm_seconds": t.get("comm_seconds"),
                                "bytes_communicated": t.get("bytes_communicated")}
                               for t in summary.get("timings_per_rank") or []]
    pools = [load(p) for p in sorted(glob.glob(os.path.join(folder, "pool", "*.json")))]
    got["device_memory_per_rank"] = sorted((p for p in pools if p), key=lambda p: p.get("rank", 0))
    counts = [load(p) for p in glob.glob(os.path.join(folder, "standin", "*.json"))]
    counts = [c for c in counts if c]
    if counts and got["particle_iterations"]:
        per = got["particle_iterations"]
        got["standin_per_particle_iteration"] = {
            key: sum(c[key] for c in counts) / per for key in ("launches", "copies", "syncs")}
    return got


node = {}
for name in ("node.txt", "backend.txt"):
    path = os.path.join(out, name)
    if os.path.exists(path):
        node[name[:-4]] = tail(path, 40)

result = {
    "ok": bool(steps) and not failed,
    "failed_steps": failed,
    "mode": "standin" if os.environ.get("GPU_CHECK_STANDIN") == "1" else "gpu",
    "out": out,
    "seconds_total": round(sum(s["seconds"] for s in steps), 1),
    "node": node,
    "steps": steps,
    "tests": {"serial": junit("pytest_serial.xml"), "mpi": junit("pytest_mpi.*.xml")},
    "bench_search": {},
    "refine": {},
}
for path in sorted(glob.glob(os.path.join(out, "bench_box*.json"))):
    result["bench_search"][os.path.basename(path)[len("bench_box"):-len(".json")]] = bench(path)
for folder in sorted(glob.glob(os.path.join(out, "refine_*rank"))):
    result["refine"][os.path.basename(folder)[len("refine_"):]] = refine(folder)

with open(os.path.join(out, "gpu_check.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, default=str)
    f.write("\n")
print(f"gpu_check: {'all steps passed' if result['ok'] else 'FAILED: ' + ', '.join(failed)}; "
      f"results in {os.path.join(out, 'gpu_check.json')}")
sys.exit(0 if result["ok"] else 1)
PYTHON
}

gather() {
    write_gather_script
    local python="${PY:-${GPU_CHECK_PYTHON:-python3}}"
    command -v "$python" >/dev/null 2>&1 || python=python3
    GPU_CHECK_STANDIN="$STANDIN" "$python" "$OUT/tools/gather.py" "$OUT"
}

if [[ "${1:-}" == "--gather-only" ]]; then
    gather
    exit $?
fi

# ----------------------------------------------------------------------------- steps
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
: > "$STEPS"
START=$SECONDS
echo "== gpu_check: repository $REPO, results in $OUT (mode: $([[ $STANDIN == 1 ]] && echo 'CuPy stand-in' || echo GPU))"

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in logs/NAME.log (and on
# the terminal), within LIMIT_S and what is left of the budget; record status and time.
step() {
    local name="$1" limit="$2"
    shift 2
    local log="$OUT/logs/$name.log" left=$((BUDGET_S - (SECONDS - START)))
    if (( left < 15 )); then
        echo "== [$name] skipped: the ${BUDGET_S} s budget is spent"
        printf '%s\tskipped (budget)\t0\t%s\n' "$name" "$log" >> "$STEPS"
        return 1
    fi
    if (( limit > left )); then limit=$left; fi
    echo "== [$name] $* (limit ${limit} s; log $log)"
    local t0=$SECONDS status=0
    if declare -F "$1" >/dev/null || ! command -v timeout >/dev/null 2>&1; then
        "$@" > >(tee "$log") 2>&1 || status=$?     # a shell function: no timeout for it
    else
        timeout --kill-after=10 "$limit" "$@" > >(tee "$log") 2>&1 || status=$?
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$log" >> "$STEPS"
    echo "== [$name] exit $status after $((SECONDS - t0)) s"
    return "$status"
}

finish() {
    echo "== gather ($((SECONDS - START)) s so far)"
    gather
    exit $?
}

# --- node
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader \
        > "$OUT/node.txt" 2>&1 || true
else
    echo "nvidia-smi not found" > "$OUT/node.txt"
fi
{ echo "cores: $(nproc 2>/dev/null || echo '?')"; uname -srm; } >> "$OUT/node.txt"

# --- install
install_env() {
    if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
        "$GPU_CHECK_PYTHON" -c "import mpirefine, mpi4py, pytest; print('using', mpirefine.__file__)"
        return
    fi
    local venv="${GPU_CHECK_VENV:-$OUT/venv}" extras="test,gpu"
    [[ "$STANDIN" == 1 ]] && extras="test"   # no CuPy: the stand-in must not meet a real one
    if [[ ! -x "$venv/bin/python" ]]; then
        "${PYTHON:-python3}" -m venv "$venv" || return 1
    fi
    "$venv/bin/python" -m pip install --quiet -e "$REPO[$extras]"
}
step install 240 install_env || finish
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
    PY="$GPU_CHECK_PYTHON"
else
    PY="${GPU_CHECK_VENV:-$OUT/venv}/bin/python"
fi
BIN="$(dirname "$PY")"
MPIEXEC="${MPIEXEC:-$([[ -x "$BIN/mpiexec" ]] && echo "$BIN/mpiexec" || echo mpiexec)}"
NCORES="$(nproc 2>/dev/null || echo 4)"
THREADS=$(( NCORES < 8 ? NCORES : 8 ))
cd "$REPO" || finish
if [[ "$STANDIN" == 1 ]]; then
    export PYTHONPATH="$REPO/tests/gpu_standin${PYTHONPATH:+:$PYTHONPATH}"
    export MPIREFINE_CUPY_STANDIN=1
fi

# --- the GPU works (kernel, FFT, matmul)
step backend 90 "$PY" -m mpirefine.backend || { cp "$OUT/logs/backend.log" "$OUT/backend.txt"; finish; }
cp "$OUT/logs/backend.log" "$OUT/backend.txt"

# --- tests on CuPy (tests/test_gpu_standin.py is the stand-in's: skipped with CuPy)
step tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider -m "not mpi" -k "cupy or gpu" \
    --ignore=tests/test_gpu_standin.py --junitxml="$OUT/pytest_serial.xml" tests
step tests_mpi 90 "$MPIEXEC" -n 2 bash -c 'exec "$0" -m pytest -q -p no:cacheprovider --with-mpi \
    -m mpi -k cupy --junitxml="$1/pytest_mpi.${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}.xml" tests' \
    "$PY" "$OUT"

# --- the pose search
for box in $BOXES; do
    step "bench_box$box" 120 "$PY" benchmarks/bench_search.py --backend gpu --box "$box" \
        --particles "$BENCH_PARTICLES" --repeats "$BENCH_REPEATS" --pixel-size-A 1.1 \
        --plan-resolution-A 6 --threads "$THREADS" --out "$OUT/bench_box$box.json"
done

# --- refinements on 1 and 2 ranks
mkdir -p "$OUT/tools"
cat > "$OUT/tools/run_refine.py" <<'PYTHON'
"""mpirefine with the device memory peak of this rank written at exit (gpu_check.sh):
GPU_CHECK_POOL_REPORT/<rank>.json gets the most bytes CuPy's memory pool handed out at
once (a counting allocator around the default pool) and what the pool holds at the end."""
import atexit
import json
import os
import sys

import mpirefine.cli  # noqa: F401 (first: it sets the thread counts before NumPy loads)
from mpirefine.cli import main

folder = os.environ.get("GPU_CHECK_POOL_REPORT")
rank = next((int(os.environ[v]) for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
             if os.environ.get(v, "").isdigit()), 0)
peak = {"rank": rank, "peak_used_bytes": 0, "allocations": 0}
try:
    import cupy
except Exception:  # noqa: BLE001 (no CuPy: nothing to record)
    cupy = None
if folder and cupy is not None:
    os.makedirs(folder, exist_ok=True)
    if hasattr(cupy, "_standin"):
        def sample():
            peak["peak_used_bytes"] = cupy._standin._MEMORY.peak
            peak["pool_total_bytes"] = cupy.get_default_memory_pool().total_bytes()
    else:
        pool = cupy.get_default_memory_pool()

        def malloc(size):
            memory = pool.malloc(size)
            peak["allocations"] += 1
            peak["peak_used_bytes"] = max(peak["peak_used_bytes"], pool.used_bytes())
            return memory

        cupy.cuda.set_allocator(malloc)

        def sample():
            peak["pool_total_bytes"] = pool.total_bytes()

    def write():
        sample()
        with open(os.path.join(folder, f"{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(peak, f)

    atexit.register(write)
sys.exit(main(sys.argv[1:]))
PYTHON
pixel=$(awk -v b="$REFINE_BOX" 'BEGIN { printf "%.3f", 179.2 / b }')   # a 179 Å box
step simulate 90 "$PY" -m mpirefine simulate --model --asymmetric --center-on-chains \
    --box "$REFINE_BOX" --pixel-size "$pixel" --n-particles "$REFINE_PARTICLES" --snr 0.05 \
    --seed 1 --out "$OUT/data" --overwrite
for ranks in $RANKS; do
    folder="$OUT/refine_${ranks}rank"
    rm -rf "$folder/pool" "$folder/standin"
    mkdir -p "$folder/pool" "$folder/standin"
    GPU_CHECK_POOL_REPORT="$folder/pool" CUPY_STANDIN_REPORT="$folder/standin/counts" \
        step "refine_${ranks}rank" 150 "$MPIEXEC" -n "$ranks" "$PY" "$OUT/tools/run_refine.py" \
        refine "$OUT/data/particles.star" "$OUT/data/start_20A.mrc" --out "$folder" --overwrite \
        --gpu --max-iterations "$REFINE_ITERATIONS"
done

finish
