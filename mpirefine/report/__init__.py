"""Plots and the HTML report of a refinement's output folder.

``write_report(out_dir) -> path`` draws ``out_dir/plots/*.png`` and writes a
self-contained ``out_dir/report.html``; ``mpirefine report DIR`` calls it.
:mod:`mpirefine.report.memory` estimates the memory per rank (``mpirefine info``).
"""

from mpirefine.report.html import write_report

__all__ = ["write_report"]
