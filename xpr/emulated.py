"""An emulated GPU: arrays that live on the CPU but meet the host as cupy's arrays do.

`XPR_DEVICE=emulated` makes `xpr.backend` hand out a device backend built on this module (see
backend.py), so the device path of every kernel runs, and is checked, on machines without a GPU.
A `DeviceArray` wraps a numpy array; `Device.xp` is a namespace with numpy's names whose functions
take device arrays and return device arrays, as `cupy` does.

Refused with TypeError (cupy refuses these too, or its result would silently change meaning):
  * implicit conversion to numpy: `np.asarray(a)`, `np.array(a)`, `__array__`, a device array
    where numpy, scipy or h5py expect an ndarray;
  * numpy functions and ufuncs applied to device arrays: `np.fft.fftn(a)`, `np.mean(a)`,
    `np.exp(a)` (cupy dispatches some of these to itself through NEP 13/18; xpr's kernels must
    not rely on that: they call `xp.*` and the backend's FFTs, so the same line runs on both);
  * a numpy ndarray mixed with a device array, in arithmetic or as an argument of an `xp`
    function (only `xp.asarray`/`xp.array`/`xp.asanyarray` and the backend's `asarray` take host
    arrays; indices and values assigned into a device array may be host arrays, as in cupy);
  * `ufunc.at` (cupy >= 12.1 has `add.at` and a few others for real types, not complex ones
    nor older versions: the backend's `scatter_add` is the one way that serves every case).
Counted, not refused (cupy allows these, each a device synchronisation and a transfer):
  `float()`, `int()`, `complex()`, `bool()`, `operator.index()` and formatting of a one-element
  array, `.item()`, `.tolist()`. `Device.syncs` holds the counts by kind. Iterating over the
  leading axis is neither (cupy yields device views, as here).
Explicit transfers: `xp.asarray(host)` copies to the "device" (so it never aliases the host array,
as on a GPU), `xp.asnumpy(a)` / `a.get()` / `Backend.asnumpy(a)` copy back.
"""
from __future__ import annotations

import collections
import operator
import types

import numpy as np

_HOST_INPUTS = frozenset({"asarray", "array", "asanyarray", "ascontiguousarray"})


class Device:
    """One emulated device: its namespace `xp` and its count of host synchronisations."""

    def __init__(self):
        self.syncs = collections.Counter()
        self.xp = Namespace(np, self, "xp")

    def __reduce__(self):
        return (Device, ())

    # --- crossing the boundary ------------------------------------------------------------
    def wrap(self, value):
        """numpy results -> device arrays (numpy scalars become 0-d arrays, as cupy returns)."""
        if isinstance(value, np.ndarray):
            return DeviceArray(value, self)
        if isinstance(value, np.generic):
            return DeviceArray(np.asarray(value), self)
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self.wrap(v) for v in value)
        if isinstance(value, list):
            return [self.wrap(v) for v in value]
        if isinstance(value, np.random.Generator):
            return ObjectProxy(value, self)
        return value

    def unwrap(self, value, where, host_ok=False):
        """Device arrays -> their numpy arrays; a host ndarray is refused unless host_ok."""
        if isinstance(value, DeviceArray):
            return value._a
        if isinstance(value, np.ndarray):
            if host_ok:
                return value
            raise TypeError(f"{where}: a numpy.ndarray {value.shape} {value.dtype} where a device array is "
                            "expected (cupy refuses host arrays here): move it with xp.asarray / backend.asarray")
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(self.unwrap(v, where, host_ok) for v in value)
        if isinstance(value, dict):
            return {k: self.unwrap(v, where, host_ok) for k, v in value.items()}
        return value

    def count(self, kind):
        self.syncs[kind] += 1

    def call(self, function, name, host_ok=False):
        """A numpy function taking and returning device arrays."""
        where = f"xp.{name}"

        def device_function(*args, **kwargs):
            args = self.unwrap(args, where, host_ok)
            kwargs = self.unwrap(kwargs, where, host_ok)
            return self.wrap(function(*args, **kwargs))

        device_function.__name__ = name
        device_function.__doc__ = getattr(function, "__doc__", None)
        return device_function

    def to_device(self, a, dtype=None, copy=None):
        """xp.asarray: host data is copied (a device never aliases host memory)."""
        if isinstance(a, DeviceArray):
            a = a._a
            result = np.array(a, dtype=dtype, copy=True) if copy else np.asarray(a, dtype=dtype)
        else:
            a = self.unwrap(a, "xp.asarray", host_ok=True)
            result = np.array(a, dtype=dtype, copy=True)
        return DeviceArray(result, self)


class Namespace:
    """numpy's names, device-side: functions unwrap their arguments and wrap their results."""

    def __init__(self, module, device: Device, path: str):
        self._module = module
        self._device = device
        self._path = path
        self._cache = {}

    def __repr__(self):
        return f"<emulated device namespace {self._path}>"

    def __reduce__(self):
        return (_namespace_of, (self._device, self._path))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._cache[name]
        except KeyError:
            pass
        value = self._resolve(name)
        self._cache[name] = value
        return value

    def _resolve(self, name):
        device = self._device
        if self._path == "xp":
            if name == "ndarray":
                return DeviceArray
            if name in ("asarray", "asanyarray", "array"):
                def to_device(a, dtype=None, copy=None, **_):
                    return device.to_device(a, dtype=dtype, copy=(copy is not False) if name == "array" else copy)
                to_device.__name__ = name
                return to_device
            if name == "asnumpy":
                return lambda a, *args, **kwargs: a.get() if isinstance(a, DeviceArray) else np.asarray(a)
            if name == "get_array_module":
                return lambda *arrays: self
        attr = getattr(self._module, name)
        if isinstance(attr, types.ModuleType):
            return Namespace(attr, device, f"{self._path}.{name}")
        if isinstance(attr, np.ufunc):
            return Ufunc(attr, device)
        if isinstance(attr, type) or not callable(attr):
            return attr
        return device.call(attr, f"{self._path[3:] + '.' if self._path != 'xp' else ''}{name}",
                           host_ok=name in _HOST_INPUTS)


def _namespace_of(device, path):
    namespace = device.xp
    for part in path.split(".")[1:]:
        namespace = getattr(namespace, part)
    return namespace


class Ufunc:
    """A numpy ufunc on device arrays; `.reduce`/`.outer`/`.accumulate` as cupy, `.at` refused."""

    def __init__(self, ufunc, device):
        self._ufunc = ufunc
        self._device = device
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return self._device.call(self._ufunc, self.__name__)(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "at":
            raise TypeError(f"xp.{self.__name__}.at: cupy's ufunc.at takes no complex types and "
                            "is missing before cupy 12.1: use backend.scatter_add")
        attr = getattr(self._ufunc, name)
        return self._device.call(attr, f"{self.__name__}.{name}") if callable(attr) else attr


class ObjectProxy:
    """A numpy object whose methods make device arrays (a random Generator, as cupy's)."""

    def __init__(self, target, device):
        self._target = target
        self._device = device

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._target, name)
        return self._device.call(attr, name) if callable(attr) else attr


def _refuse_host_operand(other, op):
    raise TypeError(f"a device array {op} a numpy.ndarray {other.shape} {other.dtype}: cupy refuses to mix "
                    "them; move the host array with xp.asarray / backend.asarray")


def _operand(other, op):
    if isinstance(other, DeviceArray):
        return other._a
    if isinstance(other, np.ndarray):
        _refuse_host_operand(other, op)
    return other


def _binary(function, symbol):
    def forward(self, other):
        return self._device.wrap(function(self._a, _operand(other, symbol)))

    def reflected(self, other):
        return self._device.wrap(function(_operand(other, symbol), self._a))

    return forward, reflected


def _inplace(function, symbol):
    def method(self, other):
        self._a = function(self._a, _operand(other, symbol))
        return self

    return method


def _unary(function):
    def method(self):
        return self._device.wrap(function(self._a))

    return method


class DeviceArray:
    """A numpy array standing on the emulated device (see the module's docstring)."""

    __slots__ = ("_a", "_device")
    __array_ufunc__ = None          # numpy ufuncs and ndarray operators refuse it (TypeError)
    __hash__ = None

    def __init__(self, array: np.ndarray, device: Device):
        self._a = array
        self._device = device

    # --- explicit transfers and the refused implicit ones ------------------------------
    def get(self, *args, **kwargs):
        return np.array(self._a, copy=True)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion of a device array to a NumPy array is not allowed (as with cupy): "
                        "use backend.asnumpy(a) / a.get() to copy it to the host explicitly")

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} applied to a device array: use the backend's xp.{func.__name__} "
                        "(or its FFTs) so that the same line runs on cupy")

    def __reduce__(self):
        return (DeviceArray, (self._a, self._device))

    # --- what cupy allows at the price of a synchronisation ------------------------------
    def _sync(self, kind):
        self._device.count(kind)
        return self._a

    def __float__(self):
        return float(self._sync("float()"))

    def __int__(self):
        return int(self._sync("int()"))

    def __complex__(self):
        return complex(self._sync("complex()"))

    def __bool__(self):
        return bool(self._sync("bool()"))

    def __index__(self):
        return operator.index(self._sync("index()"))

    def __format__(self, spec):
        return format(self._sync("format()"), spec)

    def item(self, *args):
        return self._sync("item()").item(*args)

    def tolist(self):
        return self._sync("tolist()").tolist()

    def __iter__(self):
        for element in self._a:
            yield self._device.wrap(element)

    def __repr__(self):
        return "device_" + repr(self._a)

    __str__ = __repr__

    # --- array attributes ------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: DeviceArray(self._a.T, self._device))

    @property
    def real(self):
        return DeviceArray(self._a.real, self._device)

    @real.setter
    def real(self, value):
        self._a.real = _operand(value, "real =")

    @property
    def imag(self):
        return DeviceArray(self._a.imag, self._device)

    @imag.setter
    def imag(self, value):
        self._a.imag = _operand(value, "imag =")

    def __len__(self):
        return len(self._a)

    def __getitem__(self, key):
        return self._device.wrap(self._a[self._device.unwrap(key, "indexing", host_ok=True)])

    def __setitem__(self, key, value):
        self._a[self._device.unwrap(key, "indexing", host_ok=True)] = self._device.unwrap(
            value, "assignment", host_ok=True)

    def __getattr__(self, name):
        # ndarray methods (astype, reshape, sum, conj, copy, ...) on the device
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            return self._device.call(attr, f"ndarray.{name}")
        return self._device.wrap(attr)

    __neg__ = _unary(operator.neg)
    __pos__ = _unary(operator.pos)
    __abs__ = _unary(operator.abs)
    __invert__ = _unary(operator.invert)

    __add__, __radd__ = _binary(operator.add, "+")
    __sub__, __rsub__ = _binary(operator.sub, "-")
    __mul__, __rmul__ = _binary(operator.mul, "*")
    __truediv__, __rtruediv__ = _binary(operator.truediv, "/")
    __floordiv__, __rfloordiv__ = _binary(operator.floordiv, "//")
    __mod__, __rmod__ = _binary(operator.mod, "%")
    __pow__, __rpow__ = _binary(operator.pow, "**")
    __matmul__, __rmatmul__ = _binary(operator.matmul, "@")
    __and__, __rand__ = _binary(operator.and_, "&")
    __or__, __ror__ = _binary(operator.or_, "|")
    __xor__, __rxor__ = _binary(operator.xor, "^")
    __lshift__, __rlshift__ = _binary(operator.lshift, "<<")
    __rshift__, __rrshift__ = _binary(operator.rshift, ">>")
    __lt__, __gt__ = _binary(operator.lt, "<")
    __le__, __ge__ = _binary(operator.le, "<=")
    __eq__, _ = _binary(operator.eq, "==")
    __ne__, _ = _binary(operator.ne, "!=")
    del _

    __iadd__ = _inplace(operator.iadd, "+=")
    __isub__ = _inplace(operator.isub, "-=")
    __imul__ = _inplace(operator.imul, "*=")
    __itruediv__ = _inplace(operator.itruediv, "/=")
    __ifloordiv__ = _inplace(operator.ifloordiv, "//=")
    __imod__ = _inplace(operator.imod, "%=")
    __ipow__ = _inplace(operator.ipow, "**=")
    __iand__ = _inplace(operator.iand, "&=")
    __ior__ = _inplace(operator.ior, "|=")
    __ixor__ = _inplace(operator.ixor, "^=")
