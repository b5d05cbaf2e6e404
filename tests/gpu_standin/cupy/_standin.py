"""The machinery of the CuPy stand-in: device arrays that wrap NumPy arrays, the
rules that real CuPy enforces, and the counters.

Rules (as CuPy 13/14 has them; the file and function of CuPy's own source that has
each rule is named where it matters):

- ``np.asarray(x)`` / ``x.__array__()`` raise TypeError (core.pyx ``__array__``);
  the only ways to the host are ``x.get()``, ``cupy.asnumpy(x)``, and the reads of
  one element ``x.item()``, ``float(x)``, ``int(x)``, ``complex(x)``, ``bool(x)``
  (which synchronise).  There is no ``__index__``: ``range(x)``, ``a[:x]`` fail.
- Elementwise operations (ufuncs, operators) accept device arrays, Python scalars
  and NumPy scalars; a NumPy array (any shape, 0-d included) or a list is refused
  with TypeError "Unsupported type" (_kernel.pyx ``_preprocess_arg``); NumPy ufuncs
  and functions called on device arrays dispatch to CuPy's (``__array_ufunc__``,
  ``__array_function__``), so ``np_array + x`` fails the same way.
- Other functions refuse NumPy arrays among their arguments, except the copies to
  the device: ``cupy.asarray``, ``cupy.array``, ``cupy.asanyarray``.
- Indexing with NumPy arrays or lists is allowed (an implicit host-to-device copy,
  counted); assigning a NumPy array through a basic index (``x[:] = a``, ``x[2] =
  a``) is refused (``_scatter_op``: "Refuse assignment from CPU arrays"), through an
  advanced index it is copied (counted).
- Functions CuPy lacks (present in NumPy or not) raise AttributeError; so do array
  methods CuPy's ndarray lacks.
- Reductions and element access return 0-d device arrays, never host scalars.
- ``cupy.RawKernel`` (:mod:`cupy._kernels`: CUDA C compiled with g++, the grid run
  serially) takes device arrays only, C-contiguous and of the dtype of the pointer
  parameter, and scalars only as NumPy scalars of the parameter's exact type; it
  refuses shared memory, ``__syncthreads``, warp intrinsics and CUDA headers.

Counters (``counts()``, ``reset()``, ``counting()``):

- ``launches``: calls that produce array data on the device, about one kernel launch
  each: every ufunc, reduction, FFT, matmul, copy, fill, creation (``empty`` excepted),
  advanced indexing, assignment, ``RawKernel`` call (``RawKernel:<name>``; what the
  kernel reads and writes is no copy).  Calls that return only views of their inputs
  (basic indexing, reshape of contiguous data, transpose, ``.real``, broadcast_to,
  astype to the same dtype without copy) count none.
- ``h2d`` / ``d2h`` (and ``*_bytes``): explicit and implicit copies between host and
  device (``cupy.asarray(host)``, ``x.set``, NumPy index arrays; ``x.get()``,
  ``cupy.asnumpy``, pickling).
- ``syncs``: reads that wait for the device: ``item``, ``float``/``int``/``complex``/
  ``bool``, ``tolist``, ``repr``/``str``/``format``, and operations whose output size
  depends on the data (``nonzero``, boolean-mask indexing, ``unique``, ...).
- ``by_op`` (launches per operation name) and ``by_site`` (launches per calling line
  outside this package: where a per-particle loop of launches sits).
- ``peak_bytes`` / ``live_bytes``: device memory held by arrays, as a memory pool
  would need it.
"""

# Signatures are CuPy's, arguments it takes that do not matter here included.
# ruff: noqa: ARG001, ARG002

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import warnings
import weakref

import numpy as np

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LOCK = threading.RLock()   # re-entrant: a finalizer may run while it is held

# ----------------------------------------------------------------------------- counters


class _Counts:
    def __init__(self):
        self.reset()

    def reset(self):
        self.launches = 0
        self.h2d = 0
        self.d2h = 0
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.syncs = 0
        self.by_op = collections.Counter()
        self.by_site = collections.Counter()
        self.sync_sites = collections.Counter()
        self.copy_sites = collections.Counter()
        self.peak_bytes = _MEMORY.live

    def snapshot(self) -> dict:
        return {"launches": self.launches, "h2d": self.h2d, "d2h": self.d2h,
                "copies": self.h2d + self.d2h, "h2d_bytes": self.h2d_bytes,
                "d2h_bytes": self.d2h_bytes, "syncs": self.syncs,
                "live_bytes": _MEMORY.live, "peak_bytes": self.peak_bytes,
                "by_op": dict(self.by_op), "by_site": dict(self.by_site),
                "sync_sites": dict(self.sync_sites), "copy_sites": dict(self.copy_sites)}


class _Memory:
    """Bytes of device arrays alive now, and the peak since the process started (each
    allocation counted once, by the array that owns the memory)."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._owners: dict = {}

    def track(self, a: np.ndarray) -> None:
        while isinstance(a.base, np.ndarray):
            a = a.base
        key, nbytes = id(a), int(a.nbytes)
        with _LOCK:
            if nbytes == 0 or key in self._owners:
                return
            self._owners[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            _COUNTS.peak_bytes = max(_COUNTS.peak_bytes, self.live)
        weakref.finalize(a, self._free, key).atexit = False

    def _free(self, key: int) -> None:
        with _LOCK:
            self.live -= self._owners.pop(key, 0)


_MEMORY = _Memory()
_COUNTS = _Counts()


def _site() -> str:
    """file:line of the innermost caller outside this package."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"


def _short(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    for anchor in ("mpirefine", "tests", "benchmarks"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor):])
    return "/".join(parts[-2:])


def _launch(name: str, n: int = 1) -> None:
    with _LOCK:
        _COUNTS.launches += n
        _COUNTS.by_op[name] += n
        _COUNTS.by_site[_site()] += n


def _sync(name: str) -> None:
    with _LOCK:
        _COUNTS.syncs += 1
        _COUNTS.sync_sites[f"{name} @ {_site()}"] += 1


def _h2d(nbytes: int) -> None:
    with _LOCK:
        _COUNTS.h2d += 1
        _COUNTS.h2d_bytes += int(nbytes)
        _COUNTS.copy_sites[f"h2d @ {_site()}"] += 1


def _d2h(nbytes: int) -> None:
    with _LOCK:
        _COUNTS.d2h += 1
        _COUNTS.d2h_bytes += int(nbytes)
        _COUNTS.copy_sites[f"d2h @ {_site()}"] += 1


def counts() -> dict:
    """A snapshot of the counters (see the module docstring)."""
    with _LOCK:
        return _COUNTS.snapshot()


def reset() -> None:
    """Set every counter to zero (the memory peak to what is alive now)."""
    with _LOCK:
        _COUNTS.reset()


class _Delta(dict):
    """Counters accumulated inside a ``counting()`` block (filled when it ends)."""


@contextlib.contextmanager
def counting():
    """``with counting() as c: ...``: afterwards ``c`` holds what the block counted
    (the plain counters as differences; the per-op and per-site ones included;
    ``peak_bytes``: the most device memory held at once during the block)."""
    with _LOCK:
        outer_peak, _COUNTS.peak_bytes = _COUNTS.peak_bytes, _MEMORY.live
    before = counts()
    delta = _Delta()
    try:
        yield delta
    finally:
        after = counts()
        with _LOCK:
            _COUNTS.peak_bytes = max(outer_peak, _COUNTS.peak_bytes)
        for key, value in after.items():
            if isinstance(value, dict):
                old = before[key]
                delta[key] = {k: v - old.get(k, 0) for k, v in value.items() if v != old.get(k, 0)}
            elif key in ("live_bytes", "peak_bytes"):
                delta[key] = value
            else:
                delta[key] = value - before[key]


def _write_report_at_exit() -> None:
    """With CUPY_STANDIN_REPORT=<prefix>, each process writes its counters to
    <prefix>.<pid>.json when it exits (the MPI ranks of a refinement, for instance)."""
    prefix = os.environ.get("CUPY_STANDIN_REPORT")
    if not prefix:
        return
    import atexit
    import json

    def write():
        data = counts()
        data["pid"] = os.getpid()
        data["rank"] = next((int(os.environ[v]) for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK",
                                                           "SLURM_PROCID") if v in os.environ), 0)
        data["argv"] = sys.argv
        data["process_peak_bytes"] = _MEMORY.peak
        with open(f"{prefix}.{os.getpid()}.json", "w", encoding="utf-8") as f:
            json.dump(data, f)

    atexit.register(write)


# ----------------------------------------------------------------------------- arrays

_SCALARS = (bool, int, float, complex, np.generic)


def _unsupported(value) -> TypeError:
    return TypeError(f"Unsupported type {type(value)}")


class _Flags:
    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, a: np.ndarray):
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = bool(a.flags.owndata)

    def __getitem__(self, name):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[name]

    def __repr__(self):
        return (f"  C_CONTIGUOUS : {self.c_contiguous}\n  F_CONTIGUOUS : {self.f_contiguous}\n"
                f"  OWNDATA : {self.owndata}")


class _MemoryPointer:
    """What ``x.data`` is in CuPy (here the address is a host address)."""

    def __init__(self, a: np.ndarray):
        self.ptr = int(a.ctypes.data)
        self.device_id = 0
        self.mem = type("Memory", (), {"size": int(a.nbytes)})()


# Methods of cupy.ndarray (core.pyx, CuPy 13 and 14) that the stand-in implements by
# NumPy's method of the same name.
_NDARRAY_METHODS = frozenset("""
all any argmax argmin argpartition argsort choose clip compress conj conjugate cumprod cumsum
diagonal dot flatten max mean min nonzero partition prod ptp put ravel repeat reshape round
searchsorted sort squeeze std sum swapaxes take trace transpose var view
""".split())
_SYNC_METHODS = frozenset({"nonzero", "compress"})          # output size depends on data
_IN_PLACE_METHODS = frozenset({"sort", "partition", "put"})


class ndarray:  # noqa: N801 (CuPy's name)
    """A device array of the stand-in: a NumPy array that only CuPy's ways reach."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("the CuPy stand-in does not take memptr/strides")
        self._a = np.empty(shape, dtype, order=order)
        _MEMORY.track(self._a)

    # --- conversions (host) ----------------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        _d2h(self._a.nbytes)
        host = np.array(self._a, order=order if order in "CFA" else "C", copy=True)
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
            out[...] = host
            return out
        return host

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, not {type(arr)}")
        if arr.shape != self._a.shape:
            raise ValueError("Shape mismatch")
        if arr.dtype != self._a.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self._a.dtype} array")
        _h2d(arr.nbytes)
        self._a[...] = arr

    def item(self):
        if self._a.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        _sync("item")
        return self._a.item()

    def tolist(self):
        _sync("tolist")
        return self._a.tolist()

    def tobytes(self, order="C"):
        _sync("tobytes")
        return self._a.tobytes(order)

    def _scalar(self, kind, convert):
        _sync(kind)
        return convert(self._a)

    def __float__(self):
        return self._scalar("float", float)

    def __int__(self):
        return self._scalar("int", int)

    def __complex__(self):
        return self._scalar("complex", complex)

    def __bool__(self):
        if self._a.size == 0:
            warnings.warn("The truth value of an empty array is ambiguous. Returning False, but "
                          "in future this will result in an error. Use `array.size > 0` to check "
                          "that an array is not empty.", DeprecationWarning, stacklevel=2)
            return False
        if self._a.size == 1:
            return self._scalar("bool", bool)
        raise ValueError("The truth value of an array with more than one element is ambiguous. "
                         "Use a.any() or a.all()")

    def __repr__(self):
        _sync("repr")
        return repr(self._a)

    def __str__(self):
        _sync("str")
        return str(self._a)

    def __format__(self, spec):
        _sync("format")
        return format(self._a if self._a.ndim else self._a[()], spec)

    def __reduce__(self):   # pickling goes through the host, as in CuPy
        return _from_pickle, (self.get(),)

    # --- attributes ------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    data = property(lambda self: _MemoryPointer(self._a))
    base = property(lambda self: None if self._a.base is None else _wrap(self._a.base))
    T = property(lambda self: _wrap(self._a.T))
    mT = property(lambda self: _wrap(np.swapaxes(self._a, -1, -2)))

    @property
    def device(self):
        from cupy import cuda

        return cuda.Device(0)

    @property
    def real(self):
        return _apply("real", np.real, (self,), {})

    @real.setter
    def real(self, value):
        self.real[...] = value

    @property
    def imag(self):
        return _apply("imag", np.imag, (self,), {})

    @imag.setter
    def imag(self, value):
        self.imag[...] = value

    def __getattr__(self, name):
        if name in _NDARRAY_METHODS:
            method = getattr(np.ndarray, name, None) or getattr(np, name)   # ptp: NumPy 2

            def call(*args, **kwargs):
                if name in _SYNC_METHODS:
                    _sync(name)
                result = _apply(name, method, (self, *args), kwargs, in_place=name in _IN_PLACE_METHODS)
                return result
            call.__name__ = name
            return call
        raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")

    # --- methods with CuPy semantics ---------------------------------------------------
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self._a.dtype:
            return self
        _launch("astype")
        out = self._a.astype(dtype, order=order, casting=casting or "unsafe", copy=True)
        _MEMORY.track(out)
        return _wrap(out)

    def copy(self, order="C"):
        _launch("copy")
        out = self._a.copy(order=order)
        _MEMORY.track(out)
        return _wrap(out)

    def fill(self, value):
        if isinstance(value, ndarray):
            value = value._a
        elif not isinstance(value, _SCALARS):
            raise _unsupported(value)
        _launch("fill")
        self._a.fill(value)

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # --- containers --------------------------------------------------------------------
    def __len__(self):
        if self._a.ndim == 0:
            raise TypeError("len() of unsized object")
        return self._a.shape[0]

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __getitem__(self, index):
        index, advanced, mask = _device_index(index)
        if mask:
            _sync("boolean-mask indexing")
        if not advanced:
            result = self._a[index]
            if not isinstance(result, np.ndarray):      # CuPy: a 0-d view, not a scalar
                result = self._a[_with_ellipsis(index)]
            return _wrap(result)
        _launch("getitem (advanced)")
        result = self._a[index]
        if not isinstance(result, np.ndarray):
            result = np.asarray(result)
        _MEMORY.track(result)
        return _wrap(result)

    def __setitem__(self, index, value):
        index, advanced, _ = _device_index(index)
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, (np.ndarray, list, tuple)):
            if not advanced:   # CuPy fills a basic selection, and fill refuses host arrays
                raise _unsupported(value)
            host = np.asarray(value)
            _h2d(host.nbytes)
            value = host
        elif not isinstance(value, _SCALARS):
            raise _unsupported(value)
        _launch("setitem")
        self._a[index] = value

    # --- NumPy protocols -------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        import cupy

        func = getattr(cupy, ufunc.__name__, None)
        if not isinstance(func, ufunc_type):
            return NotImplemented
        if method != "__call__":
            func = getattr(func, method, None)
            if func is None:
                return NotImplemented
        if "out" in kwargs:
            out = kwargs["out"]
            if isinstance(out, tuple):
                if len(out) != 1:
                    raise ValueError("The 'out' parameter must have exactly one array value")
                kwargs["out"] = out[0]
        for x in inputs:
            if not isinstance(x, (ndarray, np.ndarray, *_SCALARS)):
                return NotImplemented
        return func(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        import cupy

        target = cupy
        try:
            for part in func.__module__.split(".")[1:]:
                target = getattr(target, part)
            cupy_func = getattr(target, func.__name__)
        except AttributeError:
            return NotImplemented
        if cupy_func is func:
            return NotImplemented
        for t in types:
            if not issubclass(t, (ndarray, np.ndarray)):
                return NotImplemented
        return cupy_func(*args, **kwargs)


def _from_pickle(host):
    import cupy

    return cupy.array(host)


def _wrap(a) -> ndarray:
    out = object.__new__(ndarray)
    out._a = a
    return out


def _with_ellipsis(index):
    index = index if isinstance(index, tuple) else (index,)
    return index if any(i is Ellipsis for i in index) else (*index, Ellipsis)


def _device_index(index):
    """(index with device arrays unwrapped, whether it is advanced, whether it has a
    boolean mask); host index arrays are copied to the device (counted)."""
    items = index if isinstance(index, tuple) else (index,)
    out, advanced, mask = [], False, False
    for item in items:
        if isinstance(item, ndarray):
            advanced = True
            mask = mask or item._a.dtype == np.bool_
            item = item._a
        elif isinstance(item, (np.ndarray, list)):
            host = np.asarray(item)
            _h2d(host.nbytes)
            advanced = True
            mask = mask or host.dtype == np.bool_
            item = host
        elif isinstance(item, (bool, np.bool_)):
            advanced = True
        out.append(item)
    return (tuple(out) if isinstance(index, tuple) else out[0]), advanced, mask


# ----------------------------------------------------------------------------- operators

def _binary(ufunc_name, reflected=False, in_place=False):
    def op(self, other):
        import cupy

        if not isinstance(other, (ndarray, *_SCALARS)):
            if isinstance(other, np.ndarray):
                raise _unsupported(other)
            return NotImplemented
        func = getattr(cupy, ufunc_name)
        if in_place:
            return func(self, other, out=self)
        return func(other, self) if reflected else func(self, other)
    return op


for _name, _ufunc in (("add", "add"), ("sub", "subtract"), ("mul", "multiply"),
                      ("truediv", "true_divide"), ("floordiv", "floor_divide"),
                      ("mod", "remainder"), ("pow", "power"), ("matmul", "matmul"),
                      ("and", "bitwise_and"), ("or", "bitwise_or"), ("xor", "bitwise_xor"),
                      ("lshift", "left_shift"), ("rshift", "right_shift")):
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    setattr(ndarray, f"__i{_name}__", _binary(_ufunc, in_place=True))
for _name, _ufunc in (("lt", "less"), ("le", "less_equal"), ("gt", "greater"),
                      ("ge", "greater_equal"), ("eq", "equal"), ("ne", "not_equal")):
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))


def _unary(ufunc_name):
    def op(self):
        import cupy

        return getattr(cupy, ufunc_name)(self)
    return op


for _name, _ufunc in (("neg", "negative"), ("pos", "positive"), ("abs", "absolute"),
                      ("invert", "invert")):
    setattr(ndarray, f"__{_name}__", _unary(_ufunc))


# ----------------------------------------------------------------------------- functions

def _unwrap(value, refuse_host: bool, where: str):
    """``value`` with device arrays replaced by their NumPy arrays (in lists and
    tuples too); a NumPy array is refused when ``refuse_host``."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray):
        if refuse_host:
            raise TypeError(f"Unsupported type {type(value)} (a NumPy array given to the device "
                            f"function {where}: copy it with cupy.asarray first)")
        return value
    if isinstance(value, (list, tuple)) and value:
        items = [_unwrap(v, refuse_host, where) for v in value]
        return type(value)(items) if isinstance(value, list) else tuple(items)
    return value


def _inputs(args, kwargs):
    """The (unwrapped) arrays among the arguments."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, np.ndarray):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _inputs(v, {})


def _outputs(result):
    if isinstance(result, np.ndarray):
        yield result
    elif isinstance(result, (list, tuple)):
        for r in result:
            yield from _outputs(r)


def _wrap_result(result):
    if isinstance(result, np.ndarray):
        return _wrap(result)
    if isinstance(result, np.generic):
        return _wrap(np.asarray(result))
    if isinstance(result, tuple):
        return tuple(_wrap_result(r) for r in result)
    if isinstance(result, list):
        return [_wrap_result(r) for r in result]
    return result


def _apply(name, func, args, kwargs, refuse_host=True, in_place=False, launches=None):
    """Run NumPy's ``func`` on the unwrapped arguments, count, wrap the result."""
    args = tuple(_unwrap(a, refuse_host, name) for a in args)
    kwargs = {k: _unwrap(v, refuse_host, name) for k, v in kwargs.items()}
    result = func(*args, **kwargs)
    if isinstance(result, np.generic):
        result = np.asarray(result)
    if launches is None:
        if in_place or "out" in kwargs or result is None:
            launches = 1
        else:
            inputs = list(_inputs(args, kwargs))
            new = [o for o in _outputs(result)
                   if not any(np.may_share_memory(o, i) for i in inputs)]
            for o in new:
                _MEMORY.track(o)
            launches = 1 if new else 0
    else:
        for o in _outputs(result):
            _MEMORY.track(o)
    if launches:
        _launch(name, launches)
    return _wrap_result(result)


class ufunc:  # noqa: N801 (CuPy's name)
    """A CuPy ufunc: NumPy's, for device arrays and scalars only."""

    def __init__(self, np_ufunc: np.ufunc):
        self._ufunc = np_ufunc
        self.__name__ = np_ufunc.__name__
        self.nin, self.nout, self.nargs = np_ufunc.nin, np_ufunc.nout, np_ufunc.nargs
        self.types = np_ufunc.types

    def _check(self, operands):
        for x in operands:
            if not isinstance(x, (ndarray, *_SCALARS)):
                raise _unsupported(x)

    def __call__(self, *args, **kwargs):
        self._check(args[: self.nin])
        out = kwargs.get("out")
        if out is not None and not isinstance(out, ndarray):
            raise TypeError("Output arguments must be cupy.ndarray")
        return _apply(self.__name__, self._ufunc, args, kwargs)

    def reduce(self, array, axis=0, dtype=None, out=None, keepdims=False):
        self._check((array,))
        kwargs = {"axis": axis, "dtype": dtype, "keepdims": keepdims}
        if out is not None:
            kwargs["out"] = out
        return _apply(f"{self.__name__}.reduce", self._ufunc.reduce, (array,), kwargs)

    def at(self, a, indices, b=None):
        self._check((a,) + (() if b is None else (b,)))
        if isinstance(indices, np.ndarray):
            _h2d(indices.nbytes)
        args = (a, indices) if b is None else (a, indices, b)
        return _apply(f"{self.__name__}.at", self._ufunc.at, args, {}, refuse_host=False,
                      in_place=True)

    def outer(self, a, b, **kwargs):
        self._check((a, b))
        return _apply(f"{self.__name__}.outer", self._ufunc.outer, (a, b), kwargs)

    def __repr__(self):
        return f"<ufunc '{self.__name__}'>"


ufunc_type = ufunc

# Functions whose output size depends on the data: CuPy reads a count back first.
_SYNC_FUNCTIONS = frozenset({"nonzero", "argwhere", "flatnonzero", "unique", "extract",
                             "compress", "setdiff1d", "intersect1d", "union1d", "setxor1d",
                             "trim_zeros", "histogram_bin_edges"})
# No kernel: memory only.
_NO_LAUNCH = frozenset({"empty", "empty_like"})
# About metadata or dtypes, not array data: host functions that take anything.
_HOST_FUNCTIONS = frozenset("""
shape ndim size result_type can_cast promote_types min_scalar_type common_type issubdtype
iscomplexobj isrealobj isscalar iterable may_share_memory shares_memory isfortran typename
mintypecode base_repr binary_repr format_float_positional format_float_scientific
get_printoptions set_printoptions printoptions broadcast_shapes ndindex
""".split())


def device_function(name: str, func, module: str = "cupy"):
    """CuPy's ``name``: NumPy's ``func`` for device arrays (host arrays refused)."""
    if name in _HOST_FUNCTIONS:
        def host(*args, **kwargs):
            args = tuple(_unwrap(a, False, name) for a in args)
            kwargs = {k: _unwrap(v, False, name) for k, v in kwargs.items()}
            return func(*args, **kwargs)
        host.__name__ = name
        host.__module__ = module
        return host

    def call(*args, **kwargs):
        if name in _SYNC_FUNCTIONS or (name == "where" and len(args) == 1 and not kwargs):
            _sync(name)
        if name in ("arange", "linspace", "zeros", "ones", "empty", "full") and \
                any(isinstance(a, ndarray) for a in args[:3]):
            _sync(f"{name} (size from a device array)")
        return _apply(f"{module[5:] + '.' if module != 'cupy' else ''}{name}", func, args, kwargs,
                      launches=0 if name in _NO_LAUNCH else None)
    call.__name__ = name
    call.__qualname__ = name
    call.__module__ = module
    call.__doc__ = f"cupy{module[4:]}.{name} (stand-in: NumPy's, for device arrays)"
    return call


def to_device(obj, dtype=None, copy=None, order=None, name="asarray"):
    """cupy.asarray / cupy.array: device arrays stay (cast or copied as asked), host
    data are copied to the device (counted)."""
    if isinstance(obj, ndarray):
        same = dtype is None or np.dtype(dtype) == obj.dtype
        if same and not copy and (order in (None, "K", "A") or
                                  (order == "C" and obj._a.flags.c_contiguous) or
                                  (order == "F" and obj._a.flags.f_contiguous)):
            return obj
        _launch(name)
        out = np.array(obj._a, dtype=dtype, order=order or "K", copy=True)
        _MEMORY.track(out)
        return _wrap(out)
    if isinstance(obj, (list, tuple)) and any(isinstance(v, ndarray) for v in obj):
        _launch(name)                                  # stacking device arrays
        out = np.array(_unwrap(obj, True, name), dtype=dtype, order=order or "K")
        _MEMORY.track(out)
        return _wrap(out)
    out = np.array(obj, dtype=dtype, order=order or "K", copy=True)
    if out.dtype == object:
        raise ValueError("Unsupported dtype object")
    _h2d(out.nbytes)
    _MEMORY.track(out)
    return _wrap(out)


def to_host(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    result = np.asarray(a, order=order)
    if out is not None:
        out[...] = result
        return out
    return result
