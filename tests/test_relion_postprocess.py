"""Against relion_postprocess itself (Debian's `relion` package, RELION 3.1): on the same
half maps and the same mask, our mask-corrected FSC and our B-factor agree with
RELION's.  Skipped where relion_postprocess is not installed."""

import shutil
import subprocess

import numpy as np
import pytest

from mpirefine.io import write_mrc
from mpirefine.postprocess.fsc import crossing_shell
from mpirefine.postprocess.sharpen import apply_bfactor, relion_bfactor
from mpirefine.postprocess.validation import fsc_suite
from mpirefine.synthetic.models import asymmetric_chains, model_volume

RELION = shutil.which("relion_postprocess")
pytestmark = pytest.mark.skipif(RELION is None, reason="relion_postprocess not installed "
                                "(apt-get install relion)")
N, PX = 48, 2.0


def read_star_table(path, block):
    """{column: values} of one loop_ block of a RELION STAR file (plain numbers)."""
    lines = open(path).read().split(f"data_{block}", 1)[1].splitlines()
    names, rows = [], []
    for line in lines[1:]:
        words = line.split()
        if not words:
            if rows:
                break
            continue
        if words[0].startswith("data_"):
            break
        if words[0].startswith("_rln"):
            names.append(words[0][4:])
        elif words[0] != "loop_":
            rows.append([float(w) for w in words[: len(names)]])
    return {name: np.array([r[i] for r in rows]) for i, name in enumerate(names)}


def general_value(path, name):
    for line in open(path):
        if line.startswith(f"_rln{name} "):
            return float(line.split()[1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def postprocessed(tmp_path_factory):
    """Half maps: a blurred model plus independent noise; RELION run on them with our
    tight FSC mask."""
    folder = tmp_path_factory.mktemp("relion_pp")
    truth = apply_bfactor(model_volume(box=N, pixel_size_A=PX, chains=asymmetric_chains(),
                                       center_A="chains"), 60.0, PX)
    rng = np.random.default_rng(5)
    sigma = 0.35 * truth.std()
    halves = [truth + rng.normal(0, sigma, truth.shape).astype(np.float32) for _ in range(2)]
    suite = fsc_suite(halves[0], halves[1], PX, seed=1)
    paths = [folder / "half1.mrc", folder / "half2.mrc", folder / "mask.mrc"]
    for path, volume in zip(paths, [*halves, suite.masks["tight"]]):
        write_mrc(path, volume, PX)
    out = folder / "pp"
    res = subprocess.run([RELION, "--i", str(paths[0]), "--i2", str(paths[1]), "--mask",
                          str(paths[2]), "--angpix", str(PX), "--auto_bfac", "--autob_lowres",
                          "10", "--o", str(out)], capture_output=True, text=True, timeout=300,
                         cwd=folder)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    star = f"{out}.star"
    return halves, suite, read_star_table(star, "fsc"), star


def test_corrected_fsc_matches_relion(postprocessed):
    _, suite, relion, star = postprocessed
    ours = suite.curves["fsc_corrected"]
    theirs = relion["FourierShellCorrelationCorrected"]
    assert abs(crossing_shell(ours) - crossing_shell(theirs)) <= 1.0
    # RELION reports the last shell at or above 0.143; ours interpolates within a shell
    relion_A = general_value(star, "FinalResolution")
    assert relion_A == pytest.approx(N * PX / np.floor(crossing_shell(theirs)), rel=1e-3)
    np.testing.assert_allclose(relion["FourierShellCorrelationUnmaskedMaps"],
                               suite.curves["fsc_no_mask"], atol=0.01)
    np.testing.assert_allclose(relion["FourierShellCorrelationMaskedMaps"],
                               suite.curves["fsc_tight"], atol=0.01)


def test_bfactor_matches_relion_on_the_same_fit_range(postprocessed):
    halves, suite, _, star = postprocessed
    relion_res = general_value(star, "FinalResolution")
    relion_b = -general_value(star, "BfactorUsedForSharpening")
    # the same fit range as RELION's default: 10 Å to where its corrected FSC first
    # falls to zero; the curve that weights the amplitudes is ours
    fit, _, _ = relion_bfactor(0.5 * (halves[0] + halves[1]), suite.curves["fsc_corrected"],
                               PX, None)
    assert fit.bfactor_A2 == pytest.approx(relion_b, rel=0.05), (fit, relion_b, relion_res)
