"""mpirefine: cryo-EM homogeneous 3D refinement as an MPI program (NumPy or CuPy per rank)."""

__version__ = "0.1.0"
