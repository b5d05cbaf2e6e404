"""cupy.linalg of the stand-in: NumPy's linear algebra for device arrays."""

import numpy as _np

from cupy._standin import device_function as _device_function

_NAMES = ("matrix_power matmul cholesky qr svd eigh eig eigvalsh eigvals norm cond det "
          "matrix_rank slogdet solve tensorsolve lstsq inv pinv tensorinv").split()

for _name in _NAMES:
    globals()[_name] = _device_function(_name, getattr(_np.linalg, _name), "cupy.linalg")

LinAlgError = _np.linalg.LinAlgError
__all__ = [*_NAMES, "LinAlgError"]


def __getattr__(name):
    raise AttributeError(f"module 'cupy.linalg' has no attribute {name!r} (or the stand-in "
                         f"lacks it)")
