"""Never hang, never run twice: how a job ends when something goes wrong.

Each multi-rank case starts a real 2- or 3-rank job with the venv's mpiexec, with a
timeout well below the suite's, so a regression fails here instead of hanging: Ctrl-C
on one rank ends every rank; a rank that does not come to a collective is named by
the watchdog; a second SIGTERM (or the grace period) aborts a job that defers SIGTERM;
a launch that promises several ranks to an MPI that sees one is refused; a closed
stdout ends quietly; the SLURM script resumes from a checkpoint and reports
pre-emption; --gpu names what is missing.
"""

import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

from mpirefine import backend, logs, parallel, ranks

REPO = Path(__file__).resolve().parents[1]
PARTICLES = REPO / "tests/data/relion_projected/noisy.star"
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (install the mpich wheel)")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
LAUNCHER_PREFIXES = ("PMI_", "MPI_LOCAL", "OMPI_", "HYDRA_", "PMIX_", "SLURM_", "MPIREFINE_")


def clean_env(**extra) -> dict:
    """This environment without launcher or mpirefine variables, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


# A job in which every rank writes its pid to DIR/rank<R>.pid, then the rank named
# by argv[2] "works" (sleeps in Python) while the others wait in a collective.
JOB = textwrap.dedent("""
    import os, sys, time
    from mpirefine.parallel import (Parallel, defer_sigterm, run_guarded,
                                    sigterm_requested)

    folder, slow, iterations, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

    def work():
        par = Parallel()
        defer_sigterm()
        par.allgather_obj(par.rank)
        with open(os.path.join(folder, f"rank{par.rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
        for _ in range(iterations):
            if par.rank == slow:
                time.sleep(seconds)
            par.barrier()
            if par.allreduce_obj(int(sigterm_requested()), op="max"):
                print("stopped at a checkpoint", flush=True)
                return 75
        return 0

    sys.exit(run_guarded(work, command="mpirefine test"))
""")


def start_job(tmp_path, ranks=2, slow=0, iterations=1, seconds=60.0, **env):
    proc = subprocess.Popen(
        [MPIEXEC, "-n", str(ranks), sys.executable, "-c", JOB, str(tmp_path), str(slow),
         str(iterations), str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=clean_env(**env), start_new_session=True)
    pids, deadline = {}, time.monotonic() + 30
    while len(pids) < ranks and time.monotonic() < deadline and proc.poll() is None:
        for rank in range(ranks):
            path = tmp_path / f"rank{rank}.pid"
            if rank not in pids and path.exists() and path.read_text():
                pids[rank] = int(path.read_text())
        time.sleep(0.02)
    if len(pids) < ranks:
        finish(proc)
        pytest.fail(f"the job did not start: {proc.stderr.read()[-2000:]}")
    time.sleep(0.3)  # let every rank reach its sleep or collective
    return proc, pids


def finish(proc, timeout=20):
    """Wait for the job; kill it (and fail) if it hangs."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job hung: {err[-2000:]}")
    return proc.returncode, out, err


# ---- signals -------------------------------------------------------------------------

@needs_mpiexec
@pytest.mark.parametrize("target", ["waiting_in_collective", "computing"])
def test_sigint_to_one_rank_ends_every_rank(tmp_path, target):
    """Rank 0 computes while rank 1 waits in a barrier; Ctrl-C reaches one of them."""
    proc, pids = start_job(tmp_path, slow=0)
    start = time.monotonic()
    os.kill(pids[1 if target == "waiting_in_collective" else 0], signal.SIGINT)
    status, _out, err = finish(proc)
    assert time.monotonic() - start < 10
    assert status == parallel.EXIT_INTERRUPTED, err
    assert "interrupted (SIGINT); stopping every rank" in err


@needs_mpiexec
def test_second_sigterm_aborts_a_job_that_defers_sigterm(tmp_path):
    proc, pids = start_job(tmp_path, slow=0, MPIREFINE_TERM_GRACE_S="60")
    os.kill(pids[1], signal.SIGTERM)  # remembered: the job would stop at its checkpoint
    time.sleep(0.5)
    assert proc.poll() is None
    os.kill(pids[1], signal.SIGTERM)
    status, _out, err = finish(proc)
    assert status == parallel.EXIT_TERMINATED, err
    assert "second SIGTERM; stopping every rank" in err


@needs_mpiexec
def test_sigterm_grace_period_ends_in_an_abort(tmp_path):
    proc, pids = start_job(tmp_path, slow=0, MPIREFINE_TERM_GRACE_S="1")
    start = time.monotonic()
    os.kill(pids[1], signal.SIGTERM)
    status, _out, err = finish(proc)
    assert 1 <= time.monotonic() - start < 10
    assert status == parallel.EXIT_TERMINATED, err
    assert "has not stopped 1 s after SIGTERM (MPIREFINE_TERM_GRACE_S)" in err


@needs_mpiexec
def test_one_sigterm_stops_every_rank_at_the_next_checkpoint(tmp_path):
    proc, pids = start_job(tmp_path, slow=0, iterations=100, seconds=0.1)
    os.kill(pids[1], signal.SIGTERM)  # one rank only: the others learn it at the checkpoint
    status, out, err = finish(proc)
    assert status == parallel.EXIT_PREEMPTED, err
    assert out.count("stopped at a checkpoint") == 2


# ---- collective watchdog -------------------------------------------------------------

@needs_mpiexec
@pytest.mark.parametrize("ranks, slow", [(2, 1), (3, 0)])
def test_watchdog_names_the_rank_that_does_not_come(tmp_path, ranks, slow):
    proc, _pids = start_job(tmp_path, ranks=ranks, slow=slow, MPIREFINE_COLLECTIVE_TIMEOUT_S="1.5")
    status, _out, err = finish(proc)
    assert status == parallel.EXIT_WATCHDOG, err
    line = next(line for line in err.splitlines() if "collective watchdog" in line)
    assert "MPIREFINE_COLLECTIVE_TIMEOUT_S=1.5 s" in line
    waiting = [r for r in range(ranks) if r != slow]
    assert f"rank{'s' if len(waiting) > 1 else ''} {', '.join(map(str, waiting))} waited" in line
    assert "in barrier" in line
    assert f"behind: rank {slow} (outside MPI" in line and "allgather_obj" in line


@needs_mpiexec
def test_watchdog_leaves_a_healthy_job_alone(tmp_path):
    proc, _pids = start_job(tmp_path, slow=1, iterations=4, seconds=0.2,
                            MPIREFINE_COLLECTIVE_TIMEOUT_S="1.5")
    status, _out, err = finish(proc)
    assert status == 0, err
    assert err == ""


def test_watchdog_verdict_lists_late_and_silent_ranks():
    dog = parallel._Watchdog()
    dog.timeout, dog.period, dog.size = 10.0, 2.0, 4
    now = 100.0
    heard = {0: ((5, "bcast_obj", 12.0, "bcast_obj"), now),
             1: ((4, None, 30.0, "allgather_obj"), now - 1),
             2: ((5, "bcast_obj", 11.0, "bcast_obj"), now - 50)}   # heartbeat stopped
    text = dog._verdict(heard, now, started=0.0)
    assert "rank 0 waited up to 12.0 s in bcast_obj (collective #5)" in text
    assert "rank 1 (outside MPI for 31.0 s, since its collective #4, allgather_obj)" in text
    assert "rank 2 (no heartbeat for 50 s" in text and "rank 3 (no heartbeat" in text
    assert dog._verdict({0: ((5, "barrier", 3.0, "barrier"), now)}, now, started=99.0) is None


def test_durations_from_the_environment():
    read = ranks.seconds_from_environment
    assert read("X", 300.0, {}) == 300.0 and read("X", None, {"X": ""}) is None
    assert read("X", 300.0, {"X": "2.5"}) == 2.5
    assert read("X", 300.0, {"X": "0"}) is None and read("X", 300.0, {"X": "off"}) is None
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(parallel.InputError, match="X="):
            read("X", None, {"X": bad})


# ---- launch check --------------------------------------------------------------------

@pytest.mark.parametrize("env, promised", [
    ({"PMI_SIZE": "4", "PMI_RANK": "2"}, (4, "PMI_SIZE")),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, (2, "OMPI_COMM_WORLD_SIZE")),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"},
     (8, "SLURM_STEP_NUM_TASKS")),
    ({"SLURM_STEPID": "3", "SLURM_NTASKS": "2"}, (2, "SLURM_NTASKS")),
    # a batch script (sbatch, no srun) or salloc shell: SLURM_NTASKS is the allocation's
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "77"}, None),
    ({"SLURM_STEP_ID": "4294967291", "SLURM_NTASKS": "4"}, None),   # the batch step
    ({"SLURM_STEP_ID": "batch", "SLURM_NTASKS": "4"}, None),
    # hydra inside a SLURM job: the launcher's own count wins over SLURM's
    ({"PMI_SIZE": "6", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"}, (6, "PMI_SIZE")),
    ({"MPI_LOCALNRANKS": "2"}, (2, "MPI_LOCALNRANKS")),
    ({}, None),
])
def test_promised_world_size(env, promised):
    assert ranks.promised_world_size(env) == promised


def test_launch_problem_only_for_singletons_of_a_larger_launch():
    assert ranks.launch_problem(2, {"PMI_SIZE": "2"}) is None
    assert ranks.launch_problem(1, {"PMI_SIZE": "1"}) is None
    assert ranks.launch_problem(1, {"PMI_SIZE": "2", "MPIREFINE_ALLOW_SINGLETON": "1"}) is None
    text = ranks.launch_problem(1, {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"},
                                   library="Open MPI v4.1.6")
    assert "one of 4 ranks (SLURM_STEP_NUM_TASKS=4)" in text and "(Open MPI v4.1.6)" in text
    assert "--mpi=pmi2" in text and "MPIREFINE_ALLOW_SINGLETON=1" in text
    assert "\n" not in text


def test_singletons_of_a_two_rank_launch_are_refused(tmp_path):
    """Two processes that a launcher said were ranks of one job, but MPI sees two
    one-rank jobs (what a launcher of another MPI gives): both refuse, in one line."""
    runs = [subprocess.Popen(
        [sys.executable, "-m", "mpirefine", "reconstruct", str(PARTICLES), "--cpu",
         "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=clean_env(PMI_SIZE="2", PMI_RANK=str(rank))) for rank in (0, 1)]
    for proc in runs:
        status, out, err = finish(proc, timeout=60)
        assert status == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("mpirefine reconstruct: error: the launcher "
                                                       "started this process as one of 2 ranks")
    assert not (tmp_path / "out" / "map.mrc").exists()


# ---- closed standard output ----------------------------------------------------------

@pytest.mark.parametrize("args", [["info", str(PARTICLES)], ["--help"]])
def test_closed_stdout_ends_quietly(args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as after `| head`
    try:
        result = subprocess.run([sys.executable, "-m", "mpirefine", *args], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60, cwd=REPO,
                                env=clean_env())
    finally:
        os.close(write_end)
    assert result.stderr == ""
    # argparse's help gives up on a closed stream by itself, with status 0
    assert result.returncode == (0 if "--help" in args else parallel.EXIT_CLOSED_OUTPUT)


@needs_bash
def test_info_piped_into_head_has_no_traceback():
    result = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {shlex.quote(sys.executable)} -m mpirefine info "
                       f"{shlex.quote(str(PARTICLES))} | head -n 1"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=clean_env())
    assert result.stdout.startswith("file") and result.stderr == ""


def test_run_guarded_turns_a_broken_pipe_into_status_141():
    def closed():
        raise BrokenPipeError(32, "Broken pipe")

    assert parallel.run_guarded(closed) == parallel.EXIT_CLOSED_OUTPUT


def test_logging_to_a_closed_stdout_stops_instead_of_printing_tracebacks(monkeypatch):
    class Closed(io.StringIO):
        def write(self, _text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    log = logs.get_logger("mpirefine.test_closed_stdout", rank=0)
    with pytest.raises(BrokenPipeError):
        log.info("iteration 1")


# ---- GPU check -----------------------------------------------------------------------

def fake_cupy(broken_step=None):
    """A stand-in for cupy that computes with NumPy; ``broken_step`` raises."""

    def fail(name, result):
        if broken_step == name:
            raise RuntimeError(f"{name} failed\nsecond line")
        return result

    class Device:
        def __init__(self, index=0):
            self.index = index

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Array(np.ndarray):
        def __mul__(self, other):
            return fail("kernel", np.asarray(self) * other).view(Array)

        def __matmul__(self, other):
            return fail("matmul", np.asarray(self) @ np.asarray(other)).view(Array)

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 2, getDevice=lambda: 0,
                                    deviceSynchronize=lambda: None)
    return types.SimpleNamespace(
        __version__="0.fake", cuda=types.SimpleNamespace(runtime=runtime, Device=Device),
        asarray=lambda a: np.asarray(a).view(Array), asnumpy=np.asarray,
        fft=types.SimpleNamespace(rfftn=lambda a: fail("fft", np.fft.rfftn(np.asarray(a)))))


@pytest.fixture
def probe(monkeypatch):
    """Run backend.gpu_problem against a given cupy (None: not installed)."""
    monkeypatch.setattr(backend, "_GPU_PROBLEMS", {})

    def run(cupy, device=None):
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        backend._GPU_PROBLEMS.clear()
        return backend.gpu_problem(device)

    return run


def test_gpu_check_runs_a_kernel_an_fft_and_a_matmul(probe):
    assert probe(fake_cupy()) is None
    assert probe(fake_cupy(), device=1) is None
    for step, what in (("kernel", "an elementwise kernel (needs NVRTC)"),
                       ("fft", "an FFT (cuFFT)"), ("matmul", "a matrix product (cuBLAS)")):
        text = probe(fake_cupy(step))
        assert f"CuPy 0.fake cannot run {what} on GPU 0 (RuntimeError: {step} failed)" in text
        assert "\n" not in text
    assert "CuPy is not installed" in probe(None)


def test_gpu_option_names_the_problem_in_one_line(probe, monkeypatch):
    monkeypatch.delenv("MPIREFINE_BACKEND", raising=False)
    probe(fake_cupy("fft"))
    with pytest.raises(RuntimeError) as info:
        backend.choose_device("gpu", local_rank=3)
    assert str(info.value).startswith("--gpu, but CuPy 0.fake cannot run an FFT (cuFFT) on GPU 1")
    assert backend.choose_device("auto", local_rank=3) == (np, None)   # auto falls back
    assert backend.choose_device("cpu") == (np, None)


def test_gpu_flag_without_a_usable_gpu_is_one_line(tmp_path):
    if backend.gpu_available():
        pytest.skip("this machine has a usable GPU")
    result = subprocess.run(
        [sys.executable, "-m", "mpirefine", "reconstruct", str(PARTICLES), "--gpu",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=clean_env())
    assert result.returncode == 2
    assert result.stderr.startswith("mpirefine reconstruct: error: --gpu, but ")
    assert result.stderr.count("\n") == 1


# ---- the SLURM script ----------------------------------------------------------------

SBATCH = REPO / "launch/slurm_refine.sbatch"


def sbatch(folder, *, extra_path=None, **env):
    variables = clean_env(MPIREFINE_VENV=str(Path(sys.executable).parents[1]), **env)
    if extra_path:
        variables["PATH"] = f"{extra_path}{os.pathsep}{variables['PATH']}"
    return subprocess.Popen(["bash", str(SBATCH)], cwd=folder, env=variables, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def dry_run(folder, **env):
    status, out, err = finish(sbatch(folder, MPIREFINE_DRY_RUN="1", **env), timeout=60)
    assert status == 0, err
    return shlex.split(out.strip().splitlines()[-1])


@needs_bash
def test_sbatch_starts_a_new_job_then_resumes_it(tmp_path):
    args = "particles.star volume.mrc --cpu --symmetry C2"
    words = dry_run(tmp_path, MPIREFINE_REFINE_ARGS=args, OUT_DIR="run1")
    assert words[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert Path(words[2]).name == "mpirefine"
    assert words[3:] == ["refine", "particles.star", "volume.mrc", "--cpu", "--symmetry", "C2",
                         "--out", "run1"]
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "checkpoint.h5").write_bytes(b"")  # a killed job's last checkpoint
    words = dry_run(tmp_path, MPIREFINE_REFINE_ARGS=args, OUT_DIR="run1",
                    MPIREFINE_SRUN_OPTIONS="--mpi=pmix")
    assert words[:3] == ["srun", "--kill-on-bad-exit=1", "--mpi=pmix"]
    assert words[4:] == ["refine", "--continue", "run1", "--cpu"]


@needs_bash
def test_sbatch_output_folder_is_stable_and_setup_runs_first(tmp_path):
    words = dry_run(tmp_path, MPIREFINE_REFINE_ARGS="p.star v.mrc --cpu", SLURM_JOB_ID="4242",
                    MPIREFINE_SETUP="export MPIREFINE_TERM_GRACE_S=42")
    assert words[-2:] == ["--out", "refine_out"]
    status, out, _err = finish(sbatch(tmp_path, MPIREFINE_DRY_RUN="1",
                                      MPIREFINE_REFINE_ARGS="p.star v.mrc --cpu",
                                      MPIREFINE_SETUP="export MPIREFINE_TERM_GRACE_S=42"))
    assert "MPIREFINE_TERM_GRACE_S=42" in out
    status, _out, err = finish(sbatch(tmp_path, MPIREFINE_DRY_RUN="1", MPIREFINE_SETUP="false"))
    assert status == 2 and "MPIREFINE_SETUP failed" in err
    status, _out, err = finish(sbatch(tmp_path, MPIREFINE_DRY_RUN="1",
                                      MPIREFINE_REFINE_ARGS="p.star v.mrc --out x"))
    assert status == 2 and "OUT_DIR" in err


@needs_bash
def test_sbatch_with_gpu_fails_early_without_a_usable_gpu(tmp_path):
    status, out, err = finish(sbatch(tmp_path, MPIREFINE_DRY_RUN="1",
                                     MPIREFINE_REFINE_ARGS="p.star v.mrc --gpu"), timeout=60)
    if backend.gpu_available():
        assert status == 0, err
    else:
        assert status == 2 and out == ""
        assert err.startswith("slurm_refine.sbatch: error: --gpu, but not every GPU here works")


FAKE_SRUN = """#!/bin/bash
# stands in for srun: exits with $FAKE_STATUS, or 75 once it is sent SIGTERM
child=""
trap '[[ -n "$child" ]] && kill "$child"; echo "srun got TERM" >&2; exit 75' TERM
if [[ -n "${FAKE_WAIT:-}" ]]; then sleep 30 & child=$!; wait "$child"; fi
exit "${FAKE_STATUS:-0}"
"""


@needs_bash
@pytest.mark.parametrize("how", ["status", "sigterm"])
def test_sbatch_reports_preemption_with_status_75(tmp_path, how):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {"FAKE_STATUS": "75"} if how == "status" else {"FAKE_WAIT": "1"}
    proc = sbatch(tmp_path, extra_path=bin_dir, MPIREFINE_REFINE_ARGS="p.star v.mrc --cpu", **env)
    if how == "sigterm":
        time.sleep(1.0)  # SLURM's --signal=B:TERM reaches the batch shell
        proc.send_signal(signal.SIGTERM)
    status, _out, err = finish(proc)
    assert status == parallel.EXIT_PREEMPTED, err
    assert "submit this script again with OUT_DIR=refine_out to continue" in err
    if how == "sigterm":
        assert "srun got TERM" in err
