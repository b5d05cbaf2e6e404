"""relion_ctf_refine (Debian's RELION 3.1) on our simulated particles at their true
poses: the procedure the aberration tests share (test_aberrations.py,
test_even_aberrations.py)."""

from __future__ import annotations

import shutil
import subprocess


def relion_ctf_refine_at_true_poses(dataset, tmp_path, drop_columns, ctf_refine_args):
    """Half maps reconstructed at the true poses by `mpirefine reconstruct` (which applies
    particles_true.star's aberrations), a mask and relion_postprocess on them, then
    relion_ctf_refine ``ctf_refine_args`` on particles_true.star without the optics
    columns ``drop_columns`` (so that RELION has to find them).  Returns (the first
    optics row of relion_ctf_refine's output, the two half-map paths)."""
    import starfile
    from test_refine import run_cli

    true = starfile.read(dataset / "particles_true.star")
    res = run_cli(["reconstruct", str(dataset / "particles_true.star"), "--out",
                   str(tmp_path / "rec"), "--project-dir", str(dataset)])
    assert res.returncode == 0, res.stderr[-2000:]
    maps = [tmp_path / f"ref_half{h}_class001_unfil.mrc" for h in (1, 2)]
    shutil.copy(tmp_path / "rec" / "map_half_A.mrc", maps[0])
    shutil.copy(tmp_path / "rec" / "map_half_B.mrc", maps[1])
    particles = true["particles"].copy()
    particles["rlnImageName"] = [f"{i.split('@')[0]}@{dataset / i.split('@')[1]}"
                                 for i in particles["rlnImageName"]]
    optics = true["optics"].drop(columns=list(drop_columns))
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "in.star", overwrite=True)
    pixel = f"{float(optics['rlnImagePixelSize'].iloc[0]):g}"
    for cmd in (["relion_mask_create", "--i", maps[0].name, "--o", "mask.mrc", "--ini_threshold",
                 "0.02", "--extend_inimask", "3", "--width_soft_edge", "3"],
                ["relion_postprocess", "--i", maps[0].name, "--mask", "mask.mrc", "--angpix",
                 pixel, "--o", "pp"],
                ["relion_ctf_refine", "--i", "in.star", "--f", "pp.star", "--o", "ctf/",
                 *ctf_refine_args]):
        subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    out = tmp_path / "ctf" / "particles_ctf_refine.star"
    assert out.exists(), "relion_ctf_refine wrote no particles_ctf_refine.star"
    return starfile.read(out)["optics"].iloc[0], maps


def sums_at_true_poses(star, maps, batch_sums, min_res_A=10.0, max_res_A=2.6):
    """Per-pixel sums of ``batch_sums`` over the particles of ``star`` at the poses it
    carries, each half's particles against the *other* half's map and the images
    unwindowed, as refine sums them.  batch_sums(vft, images_ft, ctf_params, rotations,
    shifts_px, prep, kx_A, ky_A) gives one batch's arrays.  Returns (the summed arrays,
    kx_A, ky_A, the half maps' FSC at each pixel, refine's weight: that FSC where it is
    at least 0.143, between the two resolutions)."""
    import numpy as np
    import starfile

    from mpirefine.fourier.project import volume_ft
    from mpirefine.fourier.transforms import freq_grid_2d
    from mpirefine.geometry.rotations import euler_to_matrix
    from mpirefine.io import read_particles, read_volume
    from mpirefine.postprocess.fsc import fsc_curve
    from mpirefine.refinement.images import ImagePrep, open_images, prepare_images

    ps = read_particles(str(star))
    table = starfile.read(star)["particles"]
    rot = euler_to_matrix(*(table[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt",
                                                          "rlnAnglePsi")))
    n, px = ps.box, ps.pixel_size_A
    shifts = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / px
    half = table["rlnRandomSubset"].to_numpy()
    prep = ImagePrep(n, px)
    ky, kx = freq_grid_2d(n, np)
    kx_A, ky_A = kx / (n * px), ky / (n * px)
    total = None
    for h, other in ((1, maps[1]), (2, maps[0])):
        vft = volume_ft(np.asarray(read_volume(str(other))[0], np.float32))
        with open_images(ps) as source:
            for idx, images in source.batches(np.flatnonzero(half == h), 256):
                f = prepare_images(images, prep, np, unwindowed=True)[1]
                batch = batch_sums(vft, f, ps.ctf.subset(idx), rot[idx], shifts[idx], prep,
                                   kx_A, ky_A)
                total = batch if total is None else [a + b for a, b in zip(total, batch)]
    k = np.hypot(kx_A, ky_A)
    fsc = np.asarray(fsc_curve(*(read_volume(str(m))[0] for m in maps)))
    fsc_pixel = np.clip(fsc[np.minimum(np.rint(np.hypot(kx, ky)).astype(int), len(fsc) - 1)], 0, 1)
    weight = np.where(fsc_pixel >= 0.143, fsc_pixel, 0.0)
    weight = weight * ((k >= 1 / min_res_A) & (k <= 1 / max_res_A))
    return total, kx_A, ky_A, fsc_pixel, weight
