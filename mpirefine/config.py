"""Every parameter of a homogeneous refinement, in one frozen, validated object.

Built once at the CLI boundary (the library never sees argparse) and saved with the
results.  Units are in the names.  Parameters whose behaviour is not built yet are
still accepted here with their defaults; :meth:`RefineConfig.unsupported` lists any
that a user changed, and the CLI refuses to run with them (never silently ignored).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from mpirefine.errors import InputError, NotSupportedError
from mpirefine.geometry.symmetry import canonical_name

RELAXATION_METHODS = ("none", "maximization", "marginalization")


@dataclass(frozen=True)
class RefineConfig:
    # inputs
    particles: str
    volume: str
    out_dir: str
    mask: str | None = None                     # static refinement mask (alignment only)
    project_dir: str | None = None
    # reference grid of maps and search: None = the first optics group's
    pixel_size_A: float | None = None
    box_px: int | None = None
    # window dataset (real space); radii as fractions of half the box
    window: bool = True
    window_inner: float = 0.85
    window_outer: float = 0.99
    # symmetry
    symmetry: str = "C1"
    symmetry_relaxation: str = "none"
    symmetry_alignment: bool = True
    # reference and iterations
    reestimate_greyscale: bool = True
    extra_final_passes: int = 0
    adaptive_marginalization: bool = False
    max_align_resolution_A: float | None = None
    initial_lowpass_A: float = 20.0
    gsfsc_split_resolution_A: float = 20.0
    max_iterations: int = 30
    # minibatches
    batchsize_epsilon: float = 0.001
    batchsize_snrfactor: float = 40.0
    disable_auto_batchsize: bool = False
    # per-particle scale and noise
    minimize_scale: bool = False
    reset_scale: bool = True
    noise_from_images: bool = False
    # dynamic masking (near/far as multiples of the current resolution, as in v5)
    dynamic_mask: bool = True
    dynamic_mask_start_resolution_A: float = 12.0
    dynamic_mask_threshold: float = 0.2
    dynamic_mask_near: float = 0.5
    dynamic_mask_far: float = 1.2
    dynamic_mask_absolute: bool = False
    # CTF refinement and Ewald sphere
    optimize_defocus: bool = False
    defocus_search_range_A: float = 2000.0      # ± around the current defocus
    defocus_min_resolution_A: float = 20.0      # lowest frequency the defocus fit uses
    defocus_start_resolution_A: float = 8.0     # fit once the GSFSC is finer than this
    optimize_ctf_global: bool = False
    ctf_fit_tilt: bool = True                   # --optimize-ctf-global: beam tilt
    ctf_fit_trefoil: bool = True                # ... and trefoil (CryoSPARC v4's defaults)
    ctf_fit_spherical: bool = False             # ... a Cs error, fitted once converged
    ctf_fit_tetrafoil: bool = False             # ... tetrafoil, likewise
    ctf_fit_anisomag: bool = False              # ... the magnification matrix, after each iteration
    ctf_min_resolution_A: float = 10.0          # lowest frequency the global CTF fit uses
    ctf_start_resolution_A: float = 8.0         # fit once the GSFSC is finer than this
    ewald_correction: bool = False
    # "negative" (the default) or "positive"; with --ewald-correction only
    ewald_curvature: str | None = None
    # the diameter that separates the side bands; None: measured on the initial reference
    particle_diameter_A: float | None = None
    # computation (no effect on results)
    image_batch_size: int = 256
    # True unless --image-batch-size was given: a GPU rank then takes the largest batch
    # its free memory holds (cli/refine.py, report/memory.py); NumPy keeps image_batch_size
    image_batch_auto: bool = True
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self):
        def flag(name):
            # CLI flags drop the unit suffix: max_align_resolution_A -> --max-align-resolution
            return "--" + (name[:-2] if name.endswith("_A") else name).replace("_", "-")

        def positive(name):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                unit = " (Å)" if name.endswith("_A") else ""
                raise InputError(f"{flag(name)} must be a positive number{unit}, got {v}; "
                                 f"give a value above 0 or leave {flag(name)} out for its default")

        for name in ("pixel_size_A", "particle_diameter_A", "initial_lowpass_A",
                     "gsfsc_split_resolution_A", "batchsize_epsilon", "batchsize_snrfactor",
                     "dynamic_mask_start_resolution_A", "max_align_resolution_A",
                     "dynamic_mask_near", "dynamic_mask_far"):
            positive(name)
        if self.box_px is not None and (int(self.box_px) != self.box_px or self.box_px < 2
                                        or self.box_px % 2):
            raise InputError(f"--box must be an even number of pixels >= 2, got {self.box_px}; "
                             "leave it out to use the first optics group's box")
        if not 0 < self.window_inner <= self.window_outer <= 1.0:
            raise InputError(
                f"window radii must satisfy 0 < --window-inner ({self.window_inner}) <= "
                f"--window-outer ({self.window_outer}) <= 1 (fractions of half the box); "
                "e.g. --window-inner 0.85 --window-outer 0.99")
        if self.batchsize_epsilon >= 1:
            raise InputError(f"--batchsize-epsilon is a fraction in (0, 1), got "
                             f"{self.batchsize_epsilon}; the default is 0.001")
        if not 0 <= self.dynamic_mask_threshold <= 1:
            raise InputError(f"--dynamic-mask-threshold must lie in [0, 1] (a fraction of the "
                             f"map's maximum), got {self.dynamic_mask_threshold}")
        if self.dynamic_mask_far < self.dynamic_mask_near:
            raise InputError(f"--dynamic-mask-far ({self.dynamic_mask_far}) must not be smaller "
                             f"than --dynamic-mask-near ({self.dynamic_mask_near})")
        if self.extra_final_passes < 0:
            raise InputError(f"--extra-final-passes must be >= 0, got {self.extra_final_passes}")
        if self.max_iterations < 1:
            raise InputError(f"--max-iterations must be >= 1, got {self.max_iterations}")
        if self.image_batch_size < 1:
            raise InputError(f"--image-batch-size must be >= 1, got {self.image_batch_size}")
        if self.seed < 0:
            raise InputError(f"--seed must be a non-negative integer, got {self.seed}")
        try:
            canonical_name(self.symmetry)
        except ValueError as exc:
            raise InputError(f"--symmetry {self.symmetry}: {exc}") from exc
        if self.symmetry_relaxation not in RELAXATION_METHODS:
            raise InputError(f"--symmetry-relaxation must be one of {RELAXATION_METHODS}")
        for name in ("defocus_search_range_A", "defocus_min_resolution_A",
                     "defocus_start_resolution_A", "ctf_min_resolution_A",
                     "ctf_start_resolution_A"):
            if not getattr(self, name) > 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.ewald_curvature not in (None, "negative", "positive"):
            raise InputError("--ewald-curvature must be 'negative' or 'positive'")
        if self.ewald_curvature is not None and not self.ewald_correction:
            raise InputError("--ewald-curvature sets the sign of the Ewald sphere correction; "
                             "it applies only with --ewald-correction")
        if self.particle_diameter_A is not None and not self.ewald_correction:
            raise InputError("--particle-diameter is the mask that separates the side bands "
                             "of the Ewald sphere correction; it applies only with --ewald-correction")

    def unsupported(self) -> list[str]:
        """Reasons this configuration cannot run yet (empty when it can)."""
        problems = []
        if self.symmetry_relaxation != "none" and self.adaptive_marginalization:
            problems.append("--adaptive-marginalization together with --symmetry-relaxation "
                            f"{self.symmetry_relaxation} is not supported yet (relaxation by "
                            "marginalization already weights the symmetry-related poses)")
        if self.optimize_ctf_global:
            if not (self.ctf_fit_tilt or self.ctf_fit_trefoil or self.ctf_fit_spherical
                    or self.ctf_fit_tetrafoil or self.ctf_fit_anisomag):
                problems.append("--optimize-ctf-global with --no-fit-tilt and --no-fit-trefoil "
                                "fits nothing: turn one on")
        return problems

    def check_supported(self) -> None:
        problems = self.unsupported()
        if problems:
            raise NotSupportedError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
