"""The ``mpirefine`` command: dispatches to one module per subcommand.

Each subcommand lives in ``mpirefine/cli/<name>.py`` with a module docstring (its
help text), ``add_args(parser)`` and ``main(args) -> int``. Only the chosen
subcommand's module is imported; the others' help lines are read from their source,
so a half-written module cannot break the rest and ``--help`` stays fast.

Exit status: the subcommand's return value; 2 for usage errors and
:class:`mpirefine.errors.InputError` (one line, ``mpirefine <cmd>: error: ...``);
130 on Ctrl-C; 141, quietly, when standard output was closed (``mpirefine info P |
head``); under MPI any other failure aborts every rank (see
:func:`mpirefine.parallel.run_guarded` and docs/parallel.md, "Failures").
"""

# BLAS and OpenMP size their thread pools when numpy loads, so the per-rank limit must
# be in the environment before anything below imports numpy.
from mpirefine.ranks import limit_threads

limit_threads()

import argparse  # noqa: E402
import ast  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402

from mpirefine import __version__  # noqa: E402
from mpirefine.parallel import EXIT_CLOSED_OUTPUT, discard_stdout, run_guarded  # noqa: E402

# Known subcommands, in the order `mpirefine --help` lists them.
COMMANDS = ("refine", "demo", "simulate", "reconstruct", "fsc", "info", "report")


def _module_name(command: str) -> str:
    return f"{__name__}.{command}"


def available_commands() -> list[str]:
    """The known subcommands whose module exists in this installation."""
    found = []
    for command in COMMANDS:
        try:
            if importlib.util.find_spec(_module_name(command)) is not None:
                found.append(command)
        except (ImportError, ValueError):  # ValueError: a module object without a spec
            continue
    return found


def _docstring(command: str) -> str:
    """A subcommand's module docstring, without importing the module when avoidable."""
    module = sys.modules.get(_module_name(command))
    if module is not None:
        return (module.__doc__ or "").strip()
    spec = importlib.util.find_spec(_module_name(command))
    try:
        with open(spec.origin, encoding="utf-8") as source:
            return (ast.get_docstring(ast.parse(source.read())) or "").strip()
    except (OSError, TypeError, SyntaxError, ValueError):
        return ""


def _selected_command(argv: list[str]) -> str | None:
    """The first positional word: top-level options (--help, --version) take no value."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(selected: str | None = None):
    """The argument parser, with full arguments for ``selected`` only.

    Returns (parser, module of ``selected`` or None).
    """
    parser = argparse.ArgumentParser(
        prog="mpirefine",
        description="Cryo-EM homogeneous 3D refinement as an MPI program "
        "(run it as `mpirun -n N mpirefine refine ...`; one rank per GPU, "
        "NumPy on ranks without one).",
        epilog="`mpirefine COMMAND --help` describes a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"mpirefine {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    for command in available_commands():
        doc = _docstring(command)
        summary = doc.splitlines()[0] if doc else ""
        if command == selected:
            module = importlib.import_module(_module_name(command))
            doc = (module.__doc__ or doc).strip()
        sub = subparsers.add_parser(
            command, help=summary, description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        if command == selected:
            module.add_args(sub)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    """Run ``mpirefine`` with ``argv`` (default: sys.argv[1:]); returns the exit status.

    A closed standard output (the reader of a pipe went away, as ``| head`` does) ends
    any subcommand quietly with status 141, as a shell reports a program that SIGPIPE
    ended, instead of with a BrokenPipeError traceback.
    """
    try:
        try:
            return _main(argv)
        finally:  # what is still buffered fails here, while it can still be handled
            sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()
        return EXIT_CLOSED_OUTPUT


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = _selected_command(argv)
    parser, module = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return run_guarded(module.main, args, command=f"mpirefine {args.command}")
