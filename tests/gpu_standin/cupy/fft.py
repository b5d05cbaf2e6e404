"""cupy.fft of the stand-in: NumPy's FFTs for device arrays (one launch each)."""

import numpy as _np

from cupy._standin import device_function as _device_function

_NAMES = ("fft ifft fft2 ifft2 fftn ifftn rfft irfft rfft2 irfft2 rfftn irfftn hfft ihfft "
          "fftfreq rfftfreq fftshift ifftshift").split()

for _name in _NAMES:
    globals()[_name] = _device_function(_name, getattr(_np.fft, _name), "cupy.fft")

__all__ = list(_NAMES)


def __getattr__(name):
    raise AttributeError(f"module 'cupy.fft' has no attribute {name!r} (or the stand-in lacks it)")
