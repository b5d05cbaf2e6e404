"""The launch scripts: valid bash, and the commands they would run."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(REPO.glob("launch/*.sh")) + [REPO / "launch/slurm_refine.sbatch", REPO / ".ci/run"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", ["launch/run_tests.sh", "launch/demo.sh",
                                    "launch/mpirun_refine.sh", ".ci/run"])
def test_entry_points_are_executable(script):
    assert os.access(REPO / script, os.X_OK)


def dry_run(*args):
    # The launcher and mpirefine come from this interpreter's environment, whichever
    # venv the suite runs in (CI uses a fresh temporary one).
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MPIREFINE_VENV=str(Path(sys.executable).parents[1]))
    return subprocess.run(["bash", str(REPO / "launch/mpirun_refine.sh"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_mpirun_wrapper_dry_run_prints_command_and_threads():
    result = dry_run("--dry-run", "-n", "3", "--out", "x")
    assert result.returncode == 0, result.stderr
    env_line, command_line = result.stdout.strip().splitlines()
    threads = max(1, os.cpu_count() // 3)
    assert f"OMP_NUM_THREADS={threads}" in env_line.split()
    words = shlex.split(command_line)
    assert Path(words[0]).name in ("mpiexec", "mpirun")
    assert words[1:3] == ["-n", "3"]
    assert Path(words[-4]).name == "mpirefine" and words[-3:] == ["refine", "--out", "x"]
    assert "one rank more" in result.stderr  # odd counts unbalance the half groups


@pytest.mark.parametrize("args", [("--dry-run",), ("--dry-run", "-n", "0"),
                                  ("--dry-run", "-n", "two"), ("--dry-run", "-n")])
def test_mpirun_wrapper_rejects_bad_rank_counts(args):
    result = dry_run(*args)
    assert result.returncode == 2
    assert "error:" in result.stderr and result.stdout == ""


def test_slurm_script_runs_one_rank_per_gpu():
    text = (REPO / "launch/slurm_refine.sbatch").read_text()
    assert "#SBATCH --gpus-per-task=1" in text
    assert "#SBATCH --ntasks-per-node=" in text and "#SBATCH --cpus-per-task=" in text
    assert "#SBATCH --signal=B:TERM@120" in text
    assert "srun " in text and "mpirefine\" refine" in text
    assert 'OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK' in text
