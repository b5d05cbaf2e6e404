"""The refinement: batch-size and stopping rules, the CLI contract, and a real
refinement from a 20 Å start recovering the truth."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from refine_data import median_pose_error, refine_args

from mpirefine.refinement.batching import auto_minibatch_size, choose_minibatch
from mpirefine.refinement.refine import Convergence


def test_auto_minibatch_size_follows_the_coverage_rule():
    # N = 2 halves x snrfactor x 2 r ln(1/eps)
    assert auto_minibatch_size(10, 0.001, 40) == math.ceil(2 * 40 * 2 * 10 * math.log(1000))
    base = auto_minibatch_size(10, 0.001, 40)
    assert auto_minibatch_size(20, 0.001, 40) == pytest.approx(2 * base, rel=1e-3)
    assert auto_minibatch_size(10, 0.001, 80) == pytest.approx(2 * base, rel=1e-3)
    assert auto_minibatch_size(10, 0.01, 40) < auto_minibatch_size(10, 0.001, 40)
    assert auto_minibatch_size(10, 0.001, 40, symmetry_order=24) < auto_minibatch_size(10, 0.001, 40) / 20


def test_choose_minibatch_is_seeded_and_bounded():
    a = choose_minibatch(1000, 100, seed=1, iteration=2)
    assert len(a) == 100 and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, choose_minibatch(1000, 100, seed=1, iteration=2))
    assert not np.array_equal(a, choose_minibatch(1000, 100, seed=1, iteration=3))
    np.testing.assert_array_equal(choose_minibatch(50, 100, 1, 1), np.arange(50))
    np.testing.assert_array_equal(choose_minibatch(50, None, 1, 1), np.arange(50))


def test_convergence_stops_after_first_full_pass_without_improvement():
    rule = Convergence(extra_passes=0)
    assert not rule.update(12.0, full_pass=False)
    assert not rule.update(12.5, full_pass=False)      # minibatch: never converged
    assert not rule.update(9.0, full_pass=True)
    assert not rule.update(8.0, full_pass=True)
    assert rule.update(8.0, full_pass=True)            # no improvement: stop now


def test_convergence_runs_the_extra_final_passes():
    rule = Convergence(extra_passes=2)
    assert not rule.update(9.0, True)
    assert not rule.update(9.5, True)                  # converged here
    assert rule.converged and rule.remaining == 2
    assert not rule.update(9.4, True)
    assert rule.update(9.3, True)


def test_minibatches_give_way_to_full_passes_once_they_stop_improving():
    rule = Convergence(extra_passes=1)
    assert not rule.update(14.0, full_pass=False) and not rule.full_passes
    assert not rule.update(12.0, full_pass=False) and not rule.full_passes   # improving
    assert not rule.update(12.1, full_pass=False) and rule.full_passes       # not: switch
    assert not rule.update(9.0, full_pass=True) and not rule.converged
    assert not rule.update(9.0, full_pass=True) and rule.converged
    assert rule.update(8.9, full_pass=True)                                   # the extra pass
    from dataclasses import asdict

    assert Convergence(**asdict(rule)) == rule                               # checkpoint form


def test_a_stack_much_larger_than_its_minibatches_converges_on_its_own(refine_dataset, tmp_path):
    """Auto minibatches of at most 1/5 of the stack (a low --batchsize-snrfactor) that
    at no resolution reach the stack size: the run switches to full passes, converges
    before --max-iterations, aligns every particle in its last pass, and ends within 2 %
    of a run that aligns every particle in every iteration."""
    runs = {}
    for name, extra in (("auto", ("--batchsize-snrfactor", "1")),
                        ("full", ("--disable-auto-batchsize",))):
        out = str(tmp_path / name)
        args = refine_args(refine_dataset, out, "--cpu", *extra)
        args[args.index("--max-iterations") + 1] = "25"
        res = run_cli(args)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.load(open(os.path.join(out, "summary.json")))
    auto, n = runs["auto"], runs["auto"]["n_particles"]
    assert auto["iterations"][0]["batch_size"] <= n / 5
    assert auto["converged"] and len(auto["iterations"]) < 25
    assert auto["iterations"][-1]["full_pass"] and auto["n_particles_last_pass"] == n
    assert auto["n_particles_aligned"] == n
    assert auto["final_resolution_A"] == pytest.approx(runs["full"]["final_resolution_A"], rel=0.02)


def run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "mpirefine", *args], capture_output=True,
                          text=True, timeout=600, **kw)


def test_help_lists_every_common_parameter_with_default():
    out = run_cli(["refine", "--help"]).stdout
    for option in ["--window-inner", "--window-outer", "--symmetry", "--symmetry-relaxation",
                   "--symmetry-alignment", "--reestimate-greyscale", "--extra-final-passes",
                   "--adaptive-marginalization", "--max-align-resolution", "--initial-lowpass",
                   "--gsfsc-split-resolution", "--batchsize-epsilon", "--batchsize-snrfactor",
                   "--disable-auto-batchsize", "--minimize-scale", "--reset-scale",
                   "--noise-from-images", "--dynamic-mask", "--dynamic-mask-start-resolution",
                   "--dynamic-mask-threshold", "--dynamic-mask-near", "--dynamic-mask-far",
                   "--dynamic-mask-absolute", "--optimize-defocus", "--optimize-ctf-global",
                   "--ewald-correction", "--ewald-curvature", "--image-batch-size", "--mask"]:
        assert option in out, option
    assert "[20]" in out and "[0.001]" in out and "[40]" in out


@pytest.mark.parametrize("flag", [["--symmetry", "C4", "--symmetry-relaxation", "maximization",
                                   "--adaptive-marginalization"]])
def test_unbuilt_parameters_are_refused_not_ignored(refine_dataset, tmp_path, flag):
    out = tmp_path / "r"
    res = run_cli(refine_args(refine_dataset, str(out), *flag))
    assert res.returncode == 2, res.stderr
    assert "not supported yet" in res.stderr
    assert not (out / "map.mrc").exists()


def test_bad_parameters_are_refused(refine_dataset, tmp_path):
    res = run_cli(refine_args(refine_dataset, str(tmp_path / "r"), "--symmetry", "X7"))
    assert res.returncode == 2 and "--symmetry X7" in res.stderr
    res = run_cli(refine_args(refine_dataset, str(tmp_path / "r"), "--initial-lowpass", "-5"))
    assert res.returncode == 2 and "--initial-lowpass" in res.stderr
    res = run_cli(refine_args(refine_dataset, str(tmp_path / "r"), "--window-inner", "0.9",
                              "--window-outer", "0.5"))
    assert res.returncode == 2 and "window" in res.stderr
    # the curvature sign alone would do nothing: refused, not ignored
    res = run_cli(refine_args(refine_dataset, str(tmp_path / "r"), "--ewald-curvature", "positive"))
    assert res.returncode == 2 and "applies only with --ewald-correction" in res.stderr
    res = run_cli(refine_args(refine_dataset, str(tmp_path / "r"), "--particle-diameter", "80"))
    assert res.returncode == 2 and "applies only with --ewald-correction" in res.stderr
    res = run_cli(refine_args(refine_dataset, str(tmp_path / "r"), "--ewald-correction",
                              "--particle-diameter", "-3"))
    assert res.returncode == 2 and "--particle-diameter" in res.stderr


@pytest.fixture(scope="module")
def refined(refine_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("refined") / "run")
    res = run_cli(refine_args(refine_dataset, out, "--cpu"))
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res.stdout


def test_refinement_recovers_the_truth_from_a_20A_start(refine_dataset, refined):
    from mpirefine.io import read_volume
    from mpirefine.synthetic.evaluate import compare_with_truth

    out, _ = refined
    truth, px = read_volume(os.path.join(refine_dataset, "truth.mrc"))
    a, _ = read_volume(os.path.join(out, "map_half_A.mrc"))
    b, _ = read_volume(os.path.join(out, "map_half_B.mrc"))
    got = compare_with_truth(0.5 * (a + b), truth, px)
    start, _ = read_volume(os.path.join(refine_dataset, "start_20A.mrc"))
    before = compare_with_truth(start, truth, px)
    # from a 20 Å start, well past it, and the poses are right
    assert got["resolution_A_05"] < 12.0 < before["resolution_A_05"], (got, before)
    assert median_pose_error(refine_dataset, out) < 6.0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["final_resolution_A"] < 12.0


def test_refinement_outputs_and_progress(refined):
    from mpirefine.io import read_particles

    out, stdout = refined
    for name in ["map.mrc", "map_half_A.mrc", "map_half_B.mrc", "particles.star", "particles.cs",
                 "fsc.csv", "summary.json", "map_sharp.mrc", "mask_fsc.mrc", "mask_fsc_auto.mrc"]:
        assert os.path.exists(os.path.join(out, name)), name
    summary = json.load(open(os.path.join(out, "summary.json")))
    for key in ["final_resolution_A", "wall_seconds", "n_particles", "n_ranks", "backend", "iterations"]:
        assert key in summary
    assert summary["n_ranks"] == 1 and summary["backend"] == "numpy"
    its = summary["iterations"]
    assert len(its) >= 2 and all({"resolution_A", "batch_size", "seconds"} <= set(i) for i in its)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("iteration")]
    assert len(lines) == len(its) and all("GSFSC" in ln and "ETA" in ln for ln in lines)
    ps = read_particles(os.path.join(out, "particles.star"))
    assert ps.rotations is not None and set(np.unique(ps.split)) == {0, 1}
    cs = read_particles(os.path.join(out, "particles.cs"))
    np.testing.assert_allclose(cs.rotations, ps.rotations, atol=1e-5)
    # an existing result is never overwritten silently
    res = run_cli(["refine", "x.star", "y.mrc", "--out", out])
    assert res.returncode == 2 and "--overwrite" in res.stderr
