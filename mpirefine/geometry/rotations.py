"""Rotations in RELION's convention.

RELION Euler angles (rlnAngleRot, rlnAngleTilt, rlnAnglePsi; degrees, ZYZ) define the
matrix A that maps volume coordinates (x, y, z) into the particle frame.  Its
transpose is SciPy's intrinsic 'ZYZ' rotation with the same three angles, so we let
SciPy do the trigonometry.  A particle's projection samples the volume's Fourier
transform at A^T (kx, ky, 0).

CryoSPARC stores a rotation vector (alignments3D/pose); the RELION matrix is
``Rotation.from_rotvec(pose).as_matrix().T``.

All functions take and return NumPy arrays (poses are few and live on the host);
matrices have shape (n, 3, 3) and act on column vectors (x, y, z).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION matrices A, shape (n, 3, 3), from Euler angles in degrees."""
    angles = np.stack(np.broadcast_arrays(*(np.atleast_1d(np.asarray(a, float))
                                            for a in (rot_deg, tilt_deg, psi_deg))), axis=-1)
    return np.ascontiguousarray(Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix()
                                .transpose(0, 2, 1))


def matrix_to_euler(A) -> np.ndarray:
    """RELION Euler angles (rot, tilt, psi) in degrees, shape (n, 3), from matrices A.

    tilt lies in [0, 180]; rot and psi in (-180, 180].  At tilt = 0 or 180 only
    rot + psi (or rot - psi) is defined and SciPy sets psi to 0 (its warning about
    gimbal lock is silenced: the matrix is still reproduced exactly).
    """
    A = np.asarray(A, float).reshape(-1, 3, 3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Rotation.from_matrix(A.transpose(0, 2, 1)).as_euler("ZYZ", degrees=True)


def rotvec_to_matrix(rotvec) -> np.ndarray:
    """RELION matrices A from CryoSPARC rotation vectors (radians), shape (n, 3)."""
    rv = np.asarray(rotvec, float).reshape(-1, 3)
    return np.ascontiguousarray(Rotation.from_rotvec(rv).as_matrix().transpose(0, 2, 1))


def matrix_to_rotvec(A) -> np.ndarray:
    """CryoSPARC rotation vectors (radians), shape (n, 3), from RELION matrices A."""
    A = np.asarray(A, float).reshape(-1, 3, 3)
    return Rotation.from_matrix(A.transpose(0, 2, 1)).as_rotvec()


def angular_distance_deg(A, B) -> np.ndarray:
    """Angle of the rotation A B^T, degrees, for matching stacks of matrices."""
    A = np.asarray(A, float).reshape(-1, 3, 3)
    B = np.asarray(B, float).reshape(-1, 3, 3)
    # SciPy's magnitude is accurate near 0, unlike arccos of the trace
    return np.degrees(Rotation.from_matrix(A @ B.transpose(0, 2, 1)).magnitude())
