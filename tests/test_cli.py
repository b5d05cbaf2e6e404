"""The command-line contract: help, version, exit statuses, one-line input errors,
and thread limits set before NumPy loads."""

import importlib.machinery
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import mpirefine
from mpirefine import cli
from mpirefine.errors import InputError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(args, env=None, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=env, **kwargs)


def fake_command_module(name: str, main) -> types.ModuleType:
    """A subcommand module as cli expects one: docstring, add_args, main."""
    module = types.ModuleType(f"mpirefine.cli.{name}", f"Check the {name} plumbing.\n\nLonger text.")
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    module.add_args = lambda parser: parser.add_argument("--value", default="0")
    module.main = main
    return module


@pytest.fixture
def fake_command(monkeypatch):
    """Register ``mpirefine fake``: returns int(--value), or raises InputError for "bad"."""
    def main(args):
        if args.value == "bad":
            raise InputError("--value must be an integer, got 'bad'")
        return int(args.value)

    module = fake_command_module("fake", main)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ("fake",))
    return module


def test_help_lists_existing_commands_only():
    script = BIN / "mpirefine"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mpirefine"]
    result = run(command + ["--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mpirefine")
    for name in cli.COMMANDS:
        assert (f"    {name}" in result.stdout) == (name in cli.available_commands())


def test_version_via_python_m():
    result = run([sys.executable, "-m", "mpirefine", "--version"])
    assert result.returncode == 0
    assert result.stdout.strip() == f"mpirefine {mpirefine.__version__}"


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "usage: mpirefine" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-command"])
    assert exit_info.value.code == 2


@pytest.mark.usefixtures("fake_command")
def test_subcommand_status_and_help(capsys):
    assert cli.available_commands()[-1] == "fake"
    assert cli.main(["fake", "--value", "3"]) == 3
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "Check the fake plumbing." in capsys.readouterr().out


@pytest.mark.usefixtures("fake_command")
def test_input_error_is_one_line_and_status_2(capsys):
    assert cli.main(["fake", "--value", "bad"]) == 2
    out, err = capsys.readouterr()
    assert err == "mpirefine fake: error: --value must be an integer, got 'bad'\n"
    assert out == ""


def test_threads_are_limited_before_numpy_loads():
    probe = ("import json, os, sys; import mpirefine.cli; print(json.dumps(["
             "os.environ.get('OMP_NUM_THREADS'), os.environ.get('OPENBLAS_NUM_THREADS'),"
             "'numpy' in sys.modules, 'mpi4py.MPI' in sys.modules]))")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env["MPI_LOCALNRANKS"] = "2"
    result = run([sys.executable, "-c", probe], env=env)
    assert result.returncode == 0, result.stderr
    omp, openblas, numpy_loaded, mpi_loaded = json.loads(result.stdout)
    expected = max(1, os.cpu_count() // 2)
    if hasattr(os, "sched_getaffinity"):
        expected = min(expected, len(os.sched_getaffinity(0)))
    assert omp == openblas == str(expected)
    assert not numpy_loaded and not mpi_loaded
    env["OMP_NUM_THREADS"] = "5"  # the user's choice wins
    result = run([sys.executable, "-c", probe], env=env)
    assert json.loads(result.stdout)[0] == "5"


TWO_RANK_INPUT_ERROR = textwrap.dedent("""
    import importlib.machinery, sys, types
    from mpirefine import cli
    from mpirefine.errors import InputError
    from mpirefine.parallel import Parallel

    def main(args):
        par = Parallel()
        if par.rank == 1:
            raise InputError("particles.star: no rlnImageName column")
        par.barrier()  # rank 0 would wait here forever without the abort

    module = types.ModuleType("mpirefine.cli.boom", "Fail on rank 1.")
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    module.add_args = lambda parser: None
    module.main = main
    sys.modules[module.__name__] = module
    cli.COMMANDS += ("boom",)
    sys.exit(cli.main(["boom"]))
""")


def test_input_error_on_one_rank_ends_a_two_rank_run():
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec beside this interpreter")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL"))}
    env["OMP_NUM_THREADS"] = "1"
    result = run([str(mpiexec), "-n", "2", sys.executable, "-c", TWO_RANK_INPUT_ERROR], env=env)
    assert result.returncode == 2, result.stderr
    assert "mpirefine boom: error: particles.star: no rlnImageName column\n" in result.stderr
