"""``cupy.RawKernel`` of the stand-in: a kernel's CUDA C source compiled with g++ and
its launch grid run serially on the CPU.

The source is wrapped in a prelude that makes CUDA C valid C++17 (``__global__`` and
``__device__`` qualifiers, ``blockIdx``/``threadIdx``/``blockDim``/``gridDim``,
``float2``/``double2``, ``complex<T>`` of ``cupy/complex.cuh``, serial ``atomicAdd``,
``sincosf``), and followed by a launcher that calls the kernel once per thread: blocks
in z, y, x order, and the threads of each block in z, y, x order, one after another.
What a serial run cannot honour is refused (NotImplementedError): shared memory, block
barriers, warp intrinsics, cooperative groups, CUDA headers.

It is compiled without fused multiply-adds (``-ffp-contract=off``), so float32
arithmetic is IEEE per operation, as NumPy's float32 ufuncs are: a kernel that writes
the operations of an array expression in the same order gives its values bit for bit
(on a GPU that needs ``options=('--fmad=false',)``).  Libraries are cached under
``<tempdir>/mpirefine-standin-kernels`` by a hash of their source and flags.

Arguments are checked as a GPU cannot: device arrays must be C-contiguous and of the
dtype of the pointer they are passed as; scalars must be NumPy scalars of the exact
type of the parameter (CuPy would pass a Python int as 64 bits into an ``int``).  Each
call counts one launch, ``RawKernel:<name>`` in ``by_op``.  A kernel that reads or
writes out of bounds corrupts or crashes the Python process, as it would not on a GPU.
"""

# Signatures are CuPy's, arguments it takes that do not matter here included.
# ruff: noqa: ARG002

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import operator
import os
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np

from cupy import _standin

FLAGS = ("-O2", "-ffp-contract=off", "-fno-fast-math", "-std=c++17", "-shared", "-fPIC")
CACHE_DIR = os.path.join(tempfile.gettempdir(), "mpirefine-standin-kernels")

PRELUDE = r"""
#include <algorithm>
#include <cmath>
#include <complex>
#include <cstddef>
#include <cstdint>
#include <math.h>   /* libstdc++: the float overloads (sqrt(float), ...) at global scope, as in CUDA */

#define __global__
#define __device__ static
#define __host__
#define __forceinline__
#define __noinline__
#define __constant__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)

using std::complex;
using std::max;
using std::min;

struct dim3 { unsigned int x, y, z; };
typedef dim3 uint3;
static dim3 blockIdx, threadIdx, blockDim, gridDim;

struct float2 { float x, y; };
struct double2 { double x, y; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline double2 make_double2(double x, double y) { return double2{x, y}; }

/* Threads run one at a time: an atomic operation is a plain read-modify-write. */
template <class T> static inline T standin_atomic_add(T* address, T value)
{
    T old = *address;
    *address = old + value;
    return old;
}
static inline float atomicAdd(float* a, float v) { return standin_atomic_add(a, v); }
static inline double atomicAdd(double* a, double v) { return standin_atomic_add(a, v); }
static inline int atomicAdd(int* a, int v) { return standin_atomic_add(a, v); }
static inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return standin_atomic_add(a, v); }
static inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v)
{
    return standin_atomic_add(a, v);
}

/* CUDA functions that C++ lacks, or has only as a GNU extension. */
static inline void standin_sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
static inline void standin_sincos(double x, double* s, double* c) { *s = sin(x); *c = cos(x); }
#define sincosf standin_sincosf
#define sincos standin_sincos
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
template <class T> static inline T __ldg(const T* address) { return *address; }
"""

# What a serial run of the threads cannot honour (searched with comments removed).
_REFUSED = (
    (r"\b__shared__\b", "shared memory (__shared__)"),
    (r"\b__syncthreads\w*", "block barriers (__syncthreads)"),
    (r"\b__syncwarp\b|\b__shfl\w*|\b__ballot\w*|\b__(?:any|all|match)_sync\b|\b__activemask\b",
     "warp intrinsics (__shfl, __ballot, __syncwarp, ...)"),
    (r"\bcooperative_groups\b|\bthis_grid\b", "cooperative groups"),
)
_COMPLEX_HEADER = re.compile(r'^[ \t]*#[ \t]*include[ \t]*[<"]cupy/complex\.cuh[>"]', re.M)
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*([<"][^>"]*[>"])', re.M)
_STANDARD_HEADERS = frozenset("""
cmath math.h cstdint stdint.h cstddef stddef.h cfloat float.h climits limits.h
""".split())

# C types of parameters (qualifiers and spaces normalised) and the dtypes they take.
_SCALAR_DTYPES = {
    "float": np.float32, "double": np.float64,
    "float2": np.complex64, "complex<float>": np.complex64,
    "double2": np.complex128, "complex<double>": np.complex128,
    "bool": np.bool_, "signed char": np.int8, "int8_t": np.int8,
    "unsigned char": np.uint8, "uint8_t": np.uint8,
    "short": np.int16, "int16_t": np.int16, "unsigned short": np.uint16, "uint16_t": np.uint16,
    "int": np.int32, "int32_t": np.int32, "unsigned int": np.uint32, "uint32_t": np.uint32,
    "long long": np.int64, "int64_t": np.int64, "long": np.int64, "ptrdiff_t": np.int64,
    "unsigned long long": np.uint64, "uint64_t": np.uint64, "unsigned long": np.uint64,
    "size_t": np.uint64,
}
_BYTE_TYPES = ("unsigned char", "uint8_t", "bool")       # pointers to bytes: uint8 or bool
_SPELLINGS = {"unsigned": "unsigned int", "long long int": "long long", "long int": "long",
              "unsigned long long int": "unsigned long long", "unsigned long int": "unsigned long",
              "signed int": "int", "signed": "int", "short int": "short",
              "unsigned short int": "unsigned short"}

_CUDA_LIMITS = {"block": (1024, 1024, 64), "grid": (2**31 - 1, 65535, 65535)}
_MAX_THREADS_PER_BLOCK = 1024


class CompileException(RuntimeError):
    """g++ rejected a kernel's source (CuPy: cupy.cuda.compiler.CompileException)."""


@dataclasses.dataclass(frozen=True)
class _Param:
    """One parameter of a kernel: its declaration, the type to cast ``args[i]`` to,
    whether it is a pointer, and the dtypes it accepts."""

    declaration: str
    cast_type: str
    pointer: bool
    dtypes: tuple

    @classmethod
    def parse(cls, declaration: str, kernel: str) -> _Param:
        match = re.fullmatch(r"(.*?)\b[A-Za-z_]\w*", declaration.strip(), re.S)
        if match is None or not match.group(1).strip():
            raise NotImplementedError(f"cupy.RawKernel {kernel!r}: cannot read the parameter "
                                      f"{declaration.strip()!r} (the stand-in needs 'type name')")
        cast_type = " ".join(re.sub(r"\b__restrict(?:__)?\b", " ", match.group(1)).split())
        base = re.sub(r"\b(?:const|volatile)\b", " ", cast_type)
        depth = base.count("*")
        base = " ".join(base.replace("*", " ").split())
        base = re.sub(r"\s*([<>])\s*", r"\1", re.sub(r"\b(?:std|thrust)::", "", base))
        base = _SPELLINGS.get(base, base)
        if base not in _SCALAR_DTYPES or depth > 1:
            raise NotImplementedError(f"cupy.RawKernel {kernel!r}: the stand-in cannot pass the "
                                      f"parameter {declaration.strip()!r} (type {cast_type!r})")
        if depth and base in _BYTE_TYPES:
            dtypes = (np.dtype(np.uint8), np.dtype(np.bool_))
        else:
            dtypes = (np.dtype(_SCALAR_DTYPES[base]),)
        return cls(" ".join(declaration.split()), cast_type, bool(depth), dtypes)


def _without_comments(code: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", " ", code, flags=re.S)


def _split_parameters(text: str) -> list:
    """The declarations of a parameter list (commas inside <> do not split)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    if len(parts) == 1 and parts[0].strip() in ("", "void"):
        return []
    return parts


def parse_kernel(code: str, name: str) -> tuple:
    """The parameters of kernel ``name`` in ``code``; NotImplementedError for what the
    stand-in cannot run, ValueError when the kernel is not there."""
    text = _without_comments(code)
    for pattern, what in _REFUSED:
        if re.search(pattern, text):
            raise NotImplementedError(
                f"cupy.RawKernel {name!r} uses {what}: the CuPy stand-in runs the threads of a "
                f"launch one after another on the CPU and cannot honour it")
    for header in _INCLUDE.findall(_COMPLEX_HEADER.sub("", text)):
        if header[1:-1] not in _STANDARD_HEADERS:
            raise NotImplementedError(
                f"cupy.RawKernel {name!r} includes {header}: the CuPy stand-in compiles kernels "
                f"with g++, without CUDA headers (only <cupy/complex.cuh> is provided)")
    bounds = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"
    match = re.search(rf'(extern\s+"C"\s+)?__global__\s+{bounds}void\s+{bounds}'
                      rf"{re.escape(name)}\s*\(([^)]*)\)", text)
    if match is None:
        raise ValueError(f"cupy.RawKernel: no kernel '__global__ void {name}(...)' in the source")
    if match.group(1) is None and not re.search(r'extern\s+"C"\s*\{', text):
        raise ValueError(f"cupy.RawKernel {name!r}: declare the kernel extern \"C\" (CuPy looks "
                         f"kernels up by their unmangled name)")
    return tuple(_Param.parse(p, name) for p in _split_parameters(match.group(2)))


def _launcher(name: str, params: tuple) -> str:
    """C++ of ``standin_launch``: every thread of the grid, one after another."""
    call = ", ".join(f"*({p.cast_type}*)args[{i}]" for i, p in enumerate(params))
    return f"""
#line 1 "standin launcher of {name}"
extern "C" void standin_launch(unsigned gx, unsigned gy, unsigned gz,
                               unsigned bx, unsigned by, unsigned bz, void** args)
{{
    (void)args;
    gridDim = dim3{{gx, gy, gz}};
    blockDim = dim3{{bx, by, bz}};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {{
                blockIdx = dim3{{x, y, z}};
                for (unsigned tz = 0; tz < bz; ++tz)
                    for (unsigned ty = 0; ty < by; ++ty)
                        for (unsigned tx = 0; tx < bx; ++tx) {{
                            threadIdx = dim3{{tx, ty, tz}};
                            {name}({call});
                        }}
            }}
}}
"""


_LOCK = threading.Lock()
_LIBRARIES: dict = {}


def compile_source(source: str, flags: tuple = FLAGS):
    """``standin_launch`` of the C++ ``source`` compiled with g++ into a shared library,
    cached on disk by a hash of the source, the flags and the compiler."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise RuntimeError("cupy.RawKernel of the CuPy stand-in compiles kernels with g++, "
                           "which is not on PATH")
    key = hashlib.sha256("\0".join((source, *flags, compiler)).encode()).hexdigest()[:40]
    with _LOCK:
        if key not in _LIBRARIES:
            path = os.path.join(CACHE_DIR, f"{key}.so")
            if not os.path.exists(path):
                _build(compiler, source, flags, path)
            library = ctypes.PyDLL(path)      # holds the GIL: launches run one at a time
            launch = library.standin_launch
            launch.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p]
            launch.restype = None
            _LIBRARIES[key] = launch
        return _LIBRARIES[key]


def _build(compiler: str, source: str, flags: tuple, path: str) -> None:
    """Compile to a private name and rename: processes that compile the same kernel at
    once (MPI ranks) each write a whole library."""
    os.makedirs(CACHE_DIR, exist_ok=True)
    partial = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        result = subprocess.run([compiler, *flags, "-x", "c++", "-", "-o", partial],
                                input=source, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise CompileException(f"g++ could not compile the kernel (CuPy stand-in):\n"
                                   f"{result.stderr}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _dims(value, what: str) -> tuple:
    """(x, y, z) of a grid or block given as an int or a tuple of 1 to 3 ints."""
    dims = (value,) if not isinstance(value, (tuple, list)) else tuple(value)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must have 1 to 3 dimensions, not {value!r}")
    dims = tuple(operator.index(d) for d in dims) + (1,) * (3 - len(dims))
    for d, limit in zip(dims, _CUDA_LIMITS[what]):
        if not 1 <= d <= limit:
            raise ValueError(f"invalid {what} {value!r}: each dimension must be in "
                             f"[1, {limit}] (CUDA: invalid configuration argument)")
    if what == "block" and dims[0] * dims[1] * dims[2] > _MAX_THREADS_PER_BLOCK:
        raise ValueError(f"block {value!r} has more than {_MAX_THREADS_PER_BLOCK} threads "
                         f"(CUDA: invalid configuration argument)")
    return dims


class RawKernel:
    """CuPy's ``RawKernel``: kernel ``name`` of the CUDA C source ``code``, launched as
    ``kernel(grid, block, args)``.  ``options``: ``-D`` definitions are passed to g++,
    the rest (NVRTC's) ignored; ``backend``, ``jitify`` do not matter here."""

    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False, *,
                 enable_cooperative_groups=False, jitify=False):
        if backend not in ("nvrtc", "nvcc"):
            raise ValueError(f"Invalid backend {backend}")
        if translate_cucomplex or enable_cooperative_groups:
            raise NotImplementedError("cupy.RawKernel of the CuPy stand-in supports neither "
                                      "translate_cucomplex nor enable_cooperative_groups")
        self.code, self.name, self.options = code, name, tuple(options)
        self.backend, self.jitify = backend, jitify
        self.translate_cucomplex = translate_cucomplex
        self.enable_cooperative_groups = enable_cooperative_groups
        self._params = parse_kernel(code, name)
        self._function = None

    @property
    def max_threads_per_block(self) -> int:
        return _MAX_THREADS_PER_BLOCK

    def compile(self, log_stream=None):
        """Compile now (otherwise at the first launch)."""
        if self._function is None:
            defines = tuple(o for o in self.options if o.startswith("-D"))
            source = (PRELUDE + f'#line 1 "kernel {self.name}"\n'
                      + _COMPLEX_HEADER.sub("", self.code) + _launcher(self.name, self._params))
            self._function = compile_source(source, FLAGS + defines)
        return self._function

    def __call__(self, grid, block, args, *, shared_mem=0):
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        if not isinstance(args, tuple):
            raise TypeError(f"args of a kernel must be a tuple, not {type(args).__name__}")
        if len(args) != len(self._params):
            raise TypeError(f"kernel {self.name!r} takes {len(self._params)} arguments "
                            f"({len(args)} given)")
        if operator.index(shared_mem) < 0:
            raise ValueError("shared_mem must not be negative")
        holders = [self._argument(i, p, a) for i, (p, a) in enumerate(zip(self._params, args))]
        addresses = (ctypes.c_void_p * max(1, len(holders)))(*(h.ctypes.data for h in holders))
        launch = self.compile()
        _standin._launch(f"RawKernel:{self.name}")
        launch(*grid, *block, addresses)

    def _argument(self, index: int, param: _Param, value) -> np.ndarray:
        """A host buffer holding what the kernel receives for ``value``: the address of
        a device array's data, or the scalar itself."""
        where = f"argument {index} ({param.declaration}) of kernel {self.name!r}"
        expected = " or ".join(str(d) for d in param.dtypes)
        if param.pointer:
            if not isinstance(value, _standin.ndarray):
                raise TypeError(f"Unsupported type {type(value)}: {where} must be a cupy.ndarray"
                                + (" (copy host arrays with cupy.asarray)"
                                   if isinstance(value, (np.ndarray, list, tuple)) else ""))
            if value.dtype not in param.dtypes:
                raise TypeError(f"{where} is an array of {value.dtype}, the kernel reads {expected}")
            if not value._a.flags.c_contiguous:
                raise ValueError(f"{where} is not C-contiguous (strides {value.strides}): the "
                                 f"kernel would read it as if it were; pass "
                                 f"cupy.ascontiguousarray(...)")
            return np.array(value._a.ctypes.data, np.uintp)
        if isinstance(value, (bool, int, float, complex)):
            raise TypeError(f"{where} is a Python {type(value).__name__}, whose width the kernel "
                            f"does not know (CuPy would pass an int as 64 bits, a float as a "
                            f"double): pass np.{expected}(...)")
        if not isinstance(value, np.generic):
            raise TypeError(f"Unsupported type {type(value)}: {where} takes a NumPy scalar "
                            f"np.{expected}(...)")
        if value.dtype not in param.dtypes:
            raise TypeError(f"{where} is a scalar of {value.dtype}, the kernel takes {expected}")
        return np.array(value)
