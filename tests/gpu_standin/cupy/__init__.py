"""A stand-in for CuPy that computes with NumPy, for checking mpirefine's GPU path on
machines without a GPU (tests/test_gpu_standin.py, the stand-in step of
launch/run_tests.sh).

Put ``tests/gpu_standin`` first on ``sys.path`` (``PYTHONPATH=tests/gpu_standin``) and
``import cupy`` gives this module.  Its arrays (:class:`cupy.ndarray`) wrap NumPy
arrays and refuse what real CuPy refuses (implicit conversion to NumPy, NumPy arrays
in device operations, names CuPy lacks); it counts kernel launches, host/device
copies and synchronising reads.  The rules and counters are described in
:mod:`cupy._standin`; ``cupy._standin.counts()``, ``reset()`` and ``counting()`` read
them, and CUPY_STANDIN_REPORT=<prefix> makes every process write its counters to
<prefix>.<pid>.json at exit.  CUPY_STANDIN_DEVICES sets how many GPUs it shows (1).

``cupy.RawKernel`` compiles a kernel's CUDA C source with g++ (without fused
multiply-adds) and runs its launch grid serially on the CPU, one launch counted per
call; it refuses what a serial run cannot honour (shared memory, barriers, warp
intrinsics) and arguments a GPU would misread (:mod:`cupy._kernels`).

It never stands in for a real CuPy: if another ``cupy`` is importable from
``sys.path``, importing this one raises ImportError.  Results are NumPy's, so they
are bit-identical to mpirefine's NumPy array path (``MPIREFINE_JIT=0``), not to a GPU.
"""

# Signatures are CuPy's, arguments it takes that do not matter here included.
# ruff: noqa: ARG001, ARG002

from __future__ import annotations

import importlib.machinery as _machinery
import os as _os
import sys as _sys
import types as _types

import numpy as _np

_HERE = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))   # tests/gpu_standin


def _real_cupy():
    """Where another ``cupy`` package is importable from (None: nowhere)."""
    paths = [p for p in _sys.path
             if _os.path.abspath(p or _os.getcwd()) != _HERE and _os.path.isdir(p or ".")]
    spec = _machinery.PathFinder.find_spec("cupy", paths)
    return None if spec is None else (spec.origin or str(spec.submodule_search_locations))


_real = _real_cupy()
if _real is not None:
    raise ImportError(f"the CuPy stand-in in {_HERE} does not shadow the real CuPy installed at "
                      f"{_real}: take {_HERE} off sys.path / PYTHONPATH")

__version__ = "0.0.0+numpy.standin"

from cupy import _standin  # noqa: E402
from cupy._standin import ndarray, ufunc  # noqa: E402,F401

_standin._write_report_at_exit()

from cupy import cuda, fft, linalg  # noqa: E402,F401
from cupy._kernels import RawKernel  # noqa: E402,F401

# Top-level names of CuPy 13.4 and 14.2 alike (cupy/__init__.py of both): anything
# else raises AttributeError, as it would with CuPy.
_CUPY_NAMES = frozenset("""
AxisError ComplexWarning DataSource ElementwiseKernel Inf Infinity ModuleDeprecationWarning NAN
NINF NZERO NaN PINF PZERO RankWarning RawKernel RawModule ReductionKernel TooHardError
VisibleDeprecationWarning abs absolute add all allclose alltrue amax amin angle any append
apply_along_axis arange arccos arccosh arcsin arcsinh arctan arctan2 arctanh argmax argmin
argpartition argsort argwhere around array array2string array_equal array_equiv array_repr
array_split array_str asanyarray asarray asarray_chkfinite ascontiguousarray asfarray
asfortranarray asnumpy atleast_1d atleast_2d atleast_3d average bartlett base_repr binary_repr
bincount bitwise_and bitwise_not bitwise_or bitwise_xor blackman bool_ broadcast broadcast_arrays
broadcast_shapes broadcast_to byte byte_bounds c_ can_cast cbrt cdouble ceil cfloat choose
clear_memo clip column_stack common_type complex128 complex64 complex_ complexfloating compress
concatenate conj conjugate convolve copy copysign copyto corrcoef correlate cos cosh count_nonzero
cov cross csingle cuda cumprod cumproduct cumsum deg2rad degrees delete diag diag_indices
diag_indices_from diagflat diagonal diff digitize disable_experimental_feature_warning disp divide
divmod dot double dsplit dstack dtype e ediff1d einsum empty empty_like equal euler_gamma exp exp2
expand_dims expm1 extract eye fabs fft fill_diagonal find_common_type finfo fix flatiter
flatnonzero flip fliplr flipud float16 float32 float64 float_ float_power floating floor
floor_divide fmax fmin fmod format_float_positional format_float_scientific format_parser frexp
fromDlpack from_dlpack frombuffer fromfile fromfunction fromiter fromstring full full_like fuse gcd
generic genfromtxt get_array_module get_array_wrap get_default_memory_pool
get_default_pinned_memory_pool get_printoptions gradient greater greater_equal half hamming hanning
heaviside histogram histogram2d histogramdd hsplit hstack hypot i0 identity iinfo imag in1d
index_exp indices inexact inf infty inner int16 int32 int64 int8 int_ intc integer interp
intersect1d intp invert is_available isclose iscomplex iscomplexobj isfinite isfortran isin isinf
isnan isneginf isposinf isreal isrealobj isscalar issctype issubclass_ issubdtype issubsctype
iterable ix_ kaiser kron lcm ldexp left_shift less less_equal lexsort linalg linspace load loadtxt
log log10 log1p log2 logaddexp logaddexp2 logical_and logical_not logical_or logical_xor logspace
longlong mask_indices matmul max maximum may_share_memory mean median memoize meshgrid mgrid min
min_scalar_type minimum mintypecode mod modf moveaxis msort multiply nan nan_to_num nanargmax
nanargmin nancumprod nancumsum nanmax nanmean nanmedian nanmin nanprod nanstd nansum nanvar ndarray
ndim ndindex negative newaxis nextafter nonzero not_equal number obj2sctype ogrid ones ones_like
outer packbits pad partition percentile pi piecewise place poly poly1d polyadd polyfit polymul
polynomial polysub polyval positive power printoptions prod product promote_types ptp put putmask
quantile r_ rad2deg radians random ravel ravel_multi_index real real_if_close reciprocal remainder
repeat require reshape resize result_type right_shift rint roll rollaxis roots rot90 round round_
row_stack s_ safe_eval save savetxt savez savez_compressed sctype2char searchsorted select
set_printoptions set_string_function setdiff1d setxor1d shape shares_memory short show_config sign
signbit signedinteger sin sinc single singlecomplex sinh size sometrue sort sort_complex split sqrt
square squeeze stack std subtract sum swapaxes take take_along_axis tan tanh tensordot testing tile
trace transpose trapz tri tril tril_indices tril_indices_from trim_zeros triu triu_indices
triu_indices_from true_divide trunc typename ubyte ufunc uint uint16 uint32 uint64 uint8 uintc
uintp ulonglong union1d unique unpackbits unravel_index unsignedinteger unwrap ushort vander var
vdot vectorize vsplit vstack where who zeros zeros_like
""".split())

# CuPy's aliases whose NumPy name differs (or is gone from NumPy 2).
_ALIASES = {"Inf": "inf", "Infinity": "inf", "NaN": "nan", "NAN": "nan", "PINF": "inf",
            "float_": "float64", "complex_": "complex128", "cfloat": "complex128",
            "singlecomplex": "complex64", "round_": "round", "product": "prod",
            "cumproduct": "cumprod", "alltrue": "all", "sometrue": "any", "in1d": "isin",
            "trapz": "trapezoid", "row_stack": "vstack", "msort": "sort"}

inf, nan, pi, e, euler_gamma, newaxis = _np.inf, _np.nan, _np.pi, _np.e, _np.euler_gamma, None


def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    """Device array of ``a``: a copy to the device for host data (counted)."""
    return _standin.to_device(a, dtype=dtype, copy=copy, order=order, name="asarray")


def asanyarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    return _standin.to_device(a, dtype=dtype, copy=copy, order=order, name="asanyarray")


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    out = _standin.to_device(obj, dtype=dtype, copy=copy, order=order, name="array")
    while out.ndim < ndmin:
        out = out[None]
    return out


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """Host copy of ``a`` (counted for device arrays)."""
    return _standin.to_host(a, stream=stream, order=order, out=out, blocking=blocking)


def get_array_module(*args):
    return _sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


def is_available():
    return cuda.is_available()


class _MemoryPool:
    """cupy.get_default_memory_pool(): the bytes device arrays hold now (used) and
    the most they held at once (total, since a pool keeps what it was given)."""

    def used_bytes(self):
        return _standin._MEMORY.live

    def total_bytes(self):
        return _standin._MEMORY.peak

    def free_bytes(self):
        return self.total_bytes() - self.used_bytes()

    def free_all_blocks(self, stream=None):
        _standin._MEMORY.peak = _standin._MEMORY.live

    def n_free_blocks(self):
        return 0

    def set_limit(self, size=None, fraction=None):
        pass

    def get_limit(self):
        return 0


_POOL = _MemoryPool()


def get_default_memory_pool():
    return _POOL


def get_default_pinned_memory_pool():
    return _POOL


def __getattr__(name):
    if name not in _CUPY_NAMES:
        raise AttributeError(f"module 'cupy' has no attribute {name!r}")
    target = getattr(_np, _ALIASES.get(name, name), None)
    if target is None:
        raise AttributeError(f"cupy.{name} exists in CuPy but the NumPy stand-in "
                             f"(tests/gpu_standin) does not provide it")
    if isinstance(target, _np.ufunc):
        value = ufunc(target)
    elif isinstance(target, (int, float)) or (isinstance(target, type) and (
            issubclass(target, (_np.generic, Exception, Warning))
            or target in (_np.dtype, _np.finfo, _np.iinfo))) or name in ("s_", "index_exp"):
        value = target                          # constants, scalar types, dtype, finfo, errors
    elif callable(target) and not isinstance(target, (type, _types.ModuleType)):
        value = _standin.device_function(name, target)
    else:                                       # NumPy objects that would make host arrays
        raise AttributeError(f"cupy.{name} exists in CuPy but the NumPy stand-in "
                             f"(tests/gpu_standin) does not provide it")
    globals()[name] = value
    return value
