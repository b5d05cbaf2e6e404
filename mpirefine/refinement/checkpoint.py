"""The state of a refinement after a complete iteration, in one HDF5 file (h5py).

World rank 0 writes ``checkpoint.h5`` in the output folder after every iteration:
first to a temporary file beside it, then renamed over the old one, so a job killed
at any moment (SIGKILL, wall time, node failure) leaves the previous complete
checkpoint intact.  ``mpirefine refine --continue DIR`` reads it on rank 0 and goes
on from the next iteration, on any number of ranks.

Nothing else is needed to reproduce the uninterrupted run: the half-set split is
stored, and every later random choice (minibatch membership, samples) is a function
of --seed and the iteration number (docs/architecture.md §1), not of a generator's history.

Layout (arrays as datasets, small things as JSON attributes):

    /                    attrs: format, version, config (JSON), state (JSON: iteration,
                         resolution, history, convergence rule, greyscale factor)
    /maps/half_A, half_B        the latest half maps (n³ float32), unregularised
    /maps_regularised/...        the same with SSNR regularisation
    /references/half_A, half_B  the next iteration's alignment references
    /masks/half_A, half_B       the dynamic refinement masks, when in use
    /fsc                         the latest FSC between the half maps
    /noise_sigma2                the noise model per shell
    /particles/{rotations, shifts_px, scale, log_likelihood, aligned, defocus_change_A, split}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from mpirefine.errors import InputError
from mpirefine.io.atomic import atomic_path

FILENAME = "checkpoint.h5"
FORMAT = "mpirefine-checkpoint"
VERSION = 1
_HALF = {0: "half_A", 1: "half_B"}
_PARTICLE_FIELDS = ("rotations", "shifts_px", "scale", "log_likelihood", "aligned", "defocus_change_A")


@dataclass
class Checkpoint:
    """Everything ``--continue`` needs (host NumPy arrays)."""

    config: dict
    iteration: int                 # the last complete iteration
    resolution_A: float
    history: list
    convergence: dict              # the stopping rule's fields
    greyscale_factor: float
    half_maps: dict                # {0: A, 1: B}, unregularised
    regularised_maps: dict
    references: dict               # {0: ref A, 1: ref B}
    fsc: np.ndarray
    noise_sigma2: np.ndarray
    particles: dict                # _PARTICLE_FIELDS → arrays
    split: np.ndarray
    masks: dict = field(default_factory=dict)


def path_in(out_dir: str) -> str:
    return os.path.join(out_dir, FILENAME)


def save(out_dir: str, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` atomically to OUT_DIR/checkpoint.h5; returns the path."""
    import h5py

    path = path_in(out_dir)
    state = {"iteration": ckpt.iteration, "resolution_A": ckpt.resolution_A,
             "history": ckpt.history, "convergence": ckpt.convergence,
             "greyscale_factor": ckpt.greyscale_factor}
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["config"] = json.dumps(ckpt.config)
            f.attrs["state"] = json.dumps(state, default=float)
            for group, arrays in (("maps", ckpt.half_maps), ("references", ckpt.references),
                                  ("maps_regularised", ckpt.regularised_maps),
                                  ("masks", ckpt.masks)):
                g = f.create_group(group)
                for half, array in arrays.items():
                    g.create_dataset(_HALF[half], data=np.asarray(array, np.float32))
            f.create_dataset("fsc", data=np.asarray(ckpt.fsc, np.float64))
            f.create_dataset("noise_sigma2", data=np.asarray(ckpt.noise_sigma2, np.float64))
            g = f.create_group("particles")
            for name in _PARTICLE_FIELDS:
                g.create_dataset(name, data=np.asarray(ckpt.particles[name]))
            g.create_dataset("split", data=np.asarray(ckpt.split, np.int8))
    return path


def load_config(out_dir: str) -> dict:
    """Only the saved job configuration (cheap: no arrays are read)."""
    return load(out_dir, arrays=False).config


def load(out_dir: str, arrays: bool = True) -> Checkpoint:
    """Read OUT_DIR/checkpoint.h5; an InputError says what is wrong and what to do."""
    import h5py

    path = path_in(out_dir)
    if not os.path.isfile(path):
        raise InputError(f"--continue {out_dir}: no {FILENAME} there; give the --out folder "
                         "of a refinement that completed at least one iteration")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise InputError(f"{path} is not an mpirefine checkpoint")
            if int(f.attrs.get("version", -1)) != VERSION:
                raise InputError(f"{path} has checkpoint version {f.attrs.get('version')}; this "
                                 f"mpirefine reads version {VERSION}: rerun the refinement")
            config = json.loads(f.attrs["config"])
            state = json.loads(f.attrs["state"])
            if not arrays:
                return Checkpoint(config=config, iteration=int(state["iteration"]),
                                  resolution_A=float(state["resolution_A"]),
                                  history=state["history"], convergence=state["convergence"],
                                  greyscale_factor=float(state["greyscale_factor"]),
                                  half_maps={}, regularised_maps={}, references={}, fsc=np.zeros(0),
                                  noise_sigma2=np.zeros(0), particles={}, split=np.zeros(0))

            def halves(group):
                return {h: np.array(f[group][name]) for h, name in _HALF.items()
                        if name in f[group]}

            return Checkpoint(
                config=config, iteration=int(state["iteration"]),
                resolution_A=float(state["resolution_A"]), history=state["history"],
                convergence=state["convergence"],
                greyscale_factor=float(state["greyscale_factor"]),
                half_maps=halves("maps"), regularised_maps=halves("maps_regularised"),
                references=halves("references"),
                masks=halves("masks"), fsc=np.array(f["fsc"]),
                noise_sigma2=np.array(f["noise_sigma2"]),
                particles={name: np.array(f["particles"][name]) for name in _PARTICLE_FIELDS
                           if name in f["particles"]},
                split=np.array(f["particles"]["split"]))
    except (OSError, KeyError) as exc:
        raise InputError(f"{path} is unreadable or incomplete ({exc}); the job may have been "
                         "killed while an older mpirefine wrote it: rerun the refinement") from exc
