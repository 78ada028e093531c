"""Settings expressions (`{command: "..."}`): pure arithmetic on an allow-list of names.

An expression is parsed with Python's own parser (`ast`, mode 'eval') and walked here node by
node; nothing is compiled or passed to `eval`. What it may use:

* literals, arithmetic, comparisons, `a if c else b`, `and/or/not`, indexing and slicing, f-strings,
  list/tuple/dict/set displays and comprehensions (generator expressions become lists);
* the names in `names()`: `np` (also `numpy`) -- a namespace holding numpy's mathematical
  functions, array constructors, dtypes and constants by name, *not* the numpy module, so
  `np.save`, `np.load`, `np.ctypeslib`, `np.lib` ... do not exist --, `pi`, `e`, `today`,
  `xpr_opt` (home, data, settings, today) and a few builtins (range, len, min, max, sum, abs,
  round, int, float, complex, bool, str, list, tuple, dict, set, sorted, reversed, enumerate, zip,
  all, any, divmod, pow);
* attributes only of those namespaces and a short list of array / string / list / dict ones
  (`.shape`, `.T`, `.real`, `.tolist()`, `.reshape()`, `.replace()`, `.items()`, ...).

Names and attributes beginning with `_`, lambdas, `:=`, and everything else are refused before
evaluation starts. Size and time are bounded: every array, string or sequence made has at most
MAX_ELEMENTS entries (checked *before* a power, product, repetition, constructor or broadcast
allocates it), all containers made by one expression together hold at most MAX_TOTAL entries,
integers have at most MAX_INT_BITS bits (so `((10**9999)**9999)**9999` is refused at once), object
arrays are refused (they would carry unbounded Python integers), and one expression runs at most
TIME_LIMIT seconds. Every refusal or failure raises ExpressionError.
"""
from __future__ import annotations

import ast
import builtins
import math
import operator
import re
import time
from types import MappingProxyType

import numpy as np

MAX_ELEMENTS = 1_000_000        # entries of one array, list, tuple, string, range
MAX_TOTAL = 4_000_000           # entries of every container one expression makes
MAX_INT_BITS = 4096             # |integer| < 2**4096 (about 1e1233)
MAX_MATMUL = 100_000_000        # multiply-adds of one matrix product
TIME_LIMIT = 2.0                # seconds per expression
MAX_FORMAT_WIDTH = 1000         # widths/precisions in f-string format specs


class ExpressionError(Exception):
    """The expression was refused (not allowed, too large, too slow) or failed; the message says why."""


class Refused(ExpressionError):
    """Refused before or while evaluating: not part of the allowed arithmetic, or over a bound."""


class Namespace:
    """A read-only set of allowed names reached by attribute (`np.sin`, `xpr_opt.data`)."""

    __slots__ = ("_label", "_names")

    def __init__(self, label: str, names: dict):
        object.__setattr__(self, "_label", label)
        object.__setattr__(self, "_names", MappingProxyType(dict(names)))

    def lookup(self, name: str):
        try:
            return self._names[name]
        except KeyError:
            raise Refused(f"'{self._label}.{name}' is not available in settings expressions") from None

    def __setattr__(self, key, value):
        raise TypeError("read-only")

    def __repr__(self):
        return f"<{self._label}: {', '.join(sorted(self._names))}>"


# --------------------------------------------------------------------------------------------
# size estimates made before numpy allocates
# --------------------------------------------------------------------------------------------

def _as_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise Refused(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise Refused(f"{what} must be finite")
    return int(value)


def _shape_size(shape) -> int:
    if isinstance(shape, (list, tuple, np.ndarray)):
        size = 1
        for n in list(np.ravel(np.asarray(shape, dtype=object))):
            size *= max(_as_int(n, "a shape entry"), 0)
            if size > MAX_ELEMENTS:
                return size
        return size
    return max(_as_int(shape, "a shape"), 0)


def _size_of(value) -> int:
    if isinstance(value, np.ndarray):
        return int(value.size)
    if isinstance(value, (list, tuple, str, bytes, range, dict, set, frozenset)):
        return len(value)
    return 1


def _bounded(size: int, what: str):
    if size > MAX_ELEMENTS:
        raise Refused(f"{what} would have {size:.3g} entries; settings expressions are limited "
                      f"to {MAX_ELEMENTS:,}")


def _estimate_range(*args) -> int:
    start, stop, step = (0, args[0], 1) if len(args) == 1 else (args + (1,))[:3]
    step = float(step)
    if step == 0:
        return 0
    return max(0, math.ceil((float(stop) - float(start)) / step))


def _arange_size(*args, **kwargs):
    args = list(args)
    for key in ("start", "stop", "step"):
        if key in kwargs:
            args.append(kwargs[key])
    return _estimate_range(*args)


def _num_size(*args, **kwargs):
    num = kwargs.get("num", args[2] if len(args) > 2 else 50)
    return _as_int(num, "num")


def _eye_size(n, m=None, *args, **kwargs):
    m = kwargs.get("M", m)
    n = _as_int(n, "N")
    return n * (n if m is None else _as_int(m, "M"))


def _tile_size(a, reps, *args, **kwargs):
    return _size_of(a) * _shape_size(reps)


def _repeat_size(a, repeats, *args, **kwargs):
    total = np.sum(np.asarray(repeats, dtype=float))
    size = _size_of(a)
    return int(size * total) if np.ndim(repeats) == 0 else int(total)


def _outer_size(a, b, *args, **kwargs):
    return _size_of(a) * _size_of(b)


def _meshgrid_size(*arrays, **kwargs):
    size = 1
    for a in arrays:
        size *= _size_of(a)
    return size * max(1, len(arrays))


def _diag_size(v, *args, **kwargs):
    return _size_of(v) ** 2 if np.ndim(v) == 1 else _size_of(v)


def _shape_first(shape, *args, **kwargs):
    return _shape_size(kwargs.get("shape", shape))


def _broadcast_size(*args, **kwargs):
    values = [a for a in list(args) + list(kwargs.values())
              if isinstance(a, (np.ndarray, list, tuple, int, float, complex, np.generic))]
    for a in values:
        _bounded(_nested_size(a), "an array argument")
    shapes = [np.shape(a) for a in values]
    try:
        return _shape_size(np.broadcast_shapes(*shapes)) if shapes else 1
    except ValueError:
        return 1          # numpy raises its own error for incompatible shapes


SIZE_RULES = {
    "zeros": _shape_first, "ones": _shape_first, "empty": _shape_first, "full": _shape_first,
    "arange": _arange_size, "linspace": _num_size, "logspace": _num_size, "geomspace": _num_size,
    "eye": _eye_size, "identity": _eye_size, "tile": _tile_size, "repeat": _repeat_size,
    "outer": _outer_size, "meshgrid": _meshgrid_size, "diag": _diag_size,
}

NUMPY_FUNCTIONS = (
    # elementwise mathematics
    "sin cos tan arcsin arccos arctan arctan2 sinh cosh tanh arcsinh arccosh arctanh deg2rad rad2deg "
    "degrees radians hypot exp exp2 expm1 log log2 log10 log1p sqrt cbrt square abs absolute fabs sign "
    "floor ceil round around rint trunc fix maximum minimum fmax fmin mod fmod remainder power "
    "float_power reciprocal negative positive add subtract multiply divide true_divide floor_divide "
    "sinc heaviside isnan isinf isfinite isclose allclose array_equal conj conjugate real imag angle "
    "gcd lcm logical_and logical_or logical_not logical_xor "
    # reductions and ordering
    "sum prod cumsum cumprod mean median average std var min max amin amax ptp argmin argmax sort "
    "argsort unique clip where nonzero count_nonzero all any dot vdot inner cross outer interp diff "
    "trapezoid gradient "
    # constructors and shape
    "array asarray zeros ones empty full zeros_like ones_like full_like eye identity arange linspace "
    "logspace geomspace meshgrid concatenate stack hstack vstack column_stack tile repeat reshape "
    "transpose flip roll diag ravel squeeze expand_dims atleast_1d atleast_2d shape ndim size"
).split()
NUMPY_CONSTANTS = ("pi", "e", "inf", "nan", "euler_gamma", "newaxis")
NUMPY_TYPES = ("float16 float32 float64 complex64 complex128 int8 int16 int32 int64 uint8 uint16 "
               "uint32 uint64 bool_ intp").split()
LINALG_FUNCTIONS = ("norm", "det", "inv", "solve", "eigvalsh", "eigh", "svd", "qr", "pinv", "matrix_rank")

BUILTINS = ("range len min max sum abs round int float complex bool str list tuple dict set sorted "
            "reversed enumerate zip all any divmod pow").split()

ARRAY_ATTRIBUTES = {"shape", "ndim", "size", "T", "real", "imag", "dtype"}
ARRAY_METHODS = {"tolist", "sum", "mean", "min", "max", "prod", "std", "var", "reshape", "ravel",
                 "flatten", "transpose", "astype", "copy", "round", "conj", "conjugate", "any", "all",
                 "argmax", "argmin", "cumsum", "item", "squeeze"}
NUMBER_ATTRIBUTES = {"real", "imag"}
NUMBER_METHODS = {"conjugate", "is_integer"}
STR_METHODS = {"upper", "lower", "strip", "lstrip", "rstrip", "split", "rsplit", "startswith", "endswith",
               "join", "replace", "zfill", "count", "find", "index"}
LIST_METHODS = {"index", "count"}
DICT_METHODS = {"keys", "values", "items", "get"}


def _nested_size(value, limit=MAX_ELEMENTS) -> int:
    """Entries numpy would make of `value` (characters of strings count), stopping once over limit."""
    if isinstance(value, np.ndarray):
        return int(value.size) * (max(1, value.itemsize // 4) if value.dtype.kind in "US" else 1)
    if isinstance(value, (str, bytes)):
        return max(1, len(value))
    if isinstance(value, (list, tuple, set, frozenset, range)):
        total = 0
        for item in value:
            total += _nested_size(item, limit - total)
            if total > limit:
                break
        return max(total, 1)
    if isinstance(value, dict):
        return len(value)
    return 1


def _check_dtype(value, what: str):
    """Refuse object dtypes and items wider than 64 bytes (a 'U1000000' string dtype)."""
    if value is object:
        raise Refused(f"{what}: object arrays are not allowed")
    if isinstance(value, (str, type, np.dtype)):
        try:
            dtype = np.dtype(value)
        except (TypeError, ValueError):
            return
        if dtype.kind == "O" or dtype.itemsize > 64:
            raise Refused(f"{what}: dtype {value!r} is not allowed")


def _guarded(name: str, function):
    """`function` with its output size estimated (SIZE_RULES, else by broadcasting) before it runs."""
    rule = SIZE_RULES.get(name, _broadcast_size)

    def call(*args, **kwargs):
        for value in list(args) + list(kwargs.values()):
            _check_dtype(value, f"np.{name}")
            _bounded(_nested_size(value), f"an argument of np.{name}")
        try:
            size = rule(*args, **kwargs)
        except Refused:
            raise
        except (TypeError, ValueError, IndexError):
            size = 0      # numpy reports its own error for a malformed call
        _bounded(size, f"np.{name}(...)")
        return function(*args, **kwargs)

    call.__name__ = name
    return call


def _bounded_range(*args):
    _bounded(len(range(*args)), "range(...)")
    return range(*args)


def _bounded_pow(base, exponent, mod=None):
    if mod is None:
        _check_power(base, exponent)
        return base ** exponent
    return builtins.pow(base, exponent, mod)


def _make_numpy_namespace() -> Namespace:
    names = {name: _guarded(name, getattr(np, name)) for name in NUMPY_FUNCTIONS if hasattr(np, name)}
    names.update({name: getattr(np, name) for name in NUMPY_CONSTANTS})
    names.update({name: getattr(np, name) for name in NUMPY_TYPES})
    names["linalg"] = Namespace("np.linalg", {name: _guarded(name, getattr(np.linalg, name))
                                              for name in LINALG_FUNCTIONS})
    return Namespace("np", names)


NUMPY = _make_numpy_namespace()
SAFE_BUILTINS = {name: getattr(builtins, name) for name in BUILTINS}
SAFE_BUILTINS.update(range=_bounded_range, pow=_bounded_pow)


def names(xpr_opt: dict, today: str) -> dict:
    """Every name an expression may use (xpr_opt: home, data, settings, today -> str or None)."""
    table = dict(SAFE_BUILTINS)
    table.update(np=NUMPY, numpy=NUMPY, pi=math.pi, e=math.e, inf=math.inf, nan=math.nan, today=today,
                 xpr_opt=Namespace("xpr_opt", xpr_opt))
    return table


# --------------------------------------------------------------------------------------------
# checks made while evaluating
# --------------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(value):
    if _is_int(value) and value.bit_length() > MAX_INT_BITS:
        raise Refused(f"an integer of {value.bit_length()} bits; settings expressions allow {MAX_INT_BITS}")


def _check_power(base, exponent):
    if _is_int(base) and _is_int(exponent) and exponent > 0 and abs(base) > 1:
        bits = (abs(base).bit_length() - 1) * exponent
        if bits > MAX_INT_BITS:
            raise Refused(f"{base if base.bit_length() < 64 else '(a large integer)'} ** {exponent} "
                          f"has about {bits:.3g} bits; settings expressions allow {MAX_INT_BITS}")
    if isinstance(base, np.ndarray) or isinstance(exponent, np.ndarray):
        _bounded(_broadcast_size(base, exponent), "a power")


def _check_binop(op, left, right):
    if isinstance(op, ast.Pow):
        _check_power(left, right)
    elif isinstance(op, ast.Mult):
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, (int, np.integer)):
                _bounded(len(seq) * max(int(count), 0), "a repeated sequence")
        if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise Refused(f"a product of {left.bit_length() + right.bit_length()} bits; settings "
                          f"expressions allow {MAX_INT_BITS}")
    elif isinstance(op, ast.LShift):
        if _is_int(left) and _is_int(right) and left.bit_length() + right > MAX_INT_BITS:
            raise Refused(f"a shift to {left.bit_length() + right} bits; settings expressions allow {MAX_INT_BITS}")
    elif isinstance(op, ast.Mod) and isinstance(left, (str, bytes)):
        raise Refused("%-formatting of strings is not available (use an f-string)")
    elif isinstance(op, ast.MatMult):
        a, b = np.asarray(left), np.asarray(right)
        if a.dtype == object or b.dtype == object:
            raise Refused("object arrays are not allowed")
        if a.size * (b.shape[-1] if b.ndim >= 2 else 1) > MAX_MATMUL:
            raise Refused("a matrix product too large for a settings expression")
    if isinstance(op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
                       ast.BitAnd, ast.BitOr, ast.BitXor)) \
            and (isinstance(left, np.ndarray) or isinstance(right, np.ndarray)):
        _bounded(_broadcast_size(left, right), "an array operation")


BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
          ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitOr: operator.or_,
          ast.BitXor: operator.xor, ast.BitAnd: operator.and_, ast.MatMult: operator.matmul}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_, ast.Invert: operator.invert}
COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}

ALLOWED_NODES = (
    ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Store, ast.BinOp, ast.UnaryOp, ast.BoolOp,
    ast.Compare, ast.IfExp, ast.Call, ast.keyword, ast.Starred, ast.Attribute, ast.Subscript, ast.Slice,
    ast.List, ast.Tuple, ast.Set, ast.Dict, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
    ast.comprehension, ast.JoinedStr, ast.FormattedValue, ast.And, ast.Or,
    *BINARY, *UNARY, *COMPARE,
)
if hasattr(ast, "Index"):   # Python < 3.9 wrappers (harmless elsewhere)
    ALLOWED_NODES = ALLOWED_NODES + (ast.Index,)

NODE_WORDS = {ast.Lambda: "lambda", ast.NamedExpr: "':='", ast.Await: "await", ast.Yield: "yield",
              ast.YieldFrom: "yield"}
FORMAT_NUMBER = re.compile(r"\d+")


class _Evaluation:
    """One expression's walk: its deadline, its element budget and its comprehension scopes."""

    def __init__(self, table: dict, time_limit: float):
        self.table = table
        self.deadline = time.monotonic() + time_limit
        self.time_limit = time_limit
        self.total = 0
        self.scopes: list[dict] = []
        self.table = dict(table, sum=self.sum)       # a sum that keeps to the deadline
        self.callables = {id(v): v for v in self.table.values() if callable(v)}
        for namespace in (NUMPY, NUMPY.lookup("linalg")):
            self.callables.update((id(v), v) for v in namespace._names.values() if callable(v))

    # --- bookkeeping ------------------------------------------------------------------------
    def tick(self):
        if time.monotonic() > self.deadline:
            raise Refused(f"took longer than {self.time_limit:g} s")

    def sum(self, iterable, start=0):
        """Python's sum of numbers or arrays, one addition at a time under the bounds."""
        if not isinstance(start, (int, float, complex, np.number, np.ndarray)):
            raise Refused("sum of sequences is not available (use + or a comprehension)")
        total = start
        for item in iterable:
            self.tick()
            _check_binop(ast.Add(), total, item)
            total = self.made(total + item)
        return total

    def made(self, value):
        """Account for a value just made; refuse it when over a bound."""
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise Refused("object arrays are not allowed (Python integers beyond 64 bits?)")
            size = value.size
        elif isinstance(value, (list, tuple, str, bytes, dict, set, frozenset, range)):
            size = len(value)
        else:
            _check_int(value)
            return value
        _bounded(size, "a value")
        self.total += size
        if self.total > MAX_TOTAL:
            raise Refused(f"the expression makes more than {MAX_TOTAL:,} entries in all")
        return value

    # --- the walk ---------------------------------------------------------------------------
    def run(self, node):
        self.tick()
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise Refused(f"{type(node).__name__} is not allowed")
        return method(node)

    def _Expression(self, node):
        return self.run(node.body)

    def _Constant(self, node):
        return self.made(node.value)

    def _Name(self, node):
        for scope in reversed(self.scopes):
            if node.id in scope:
                return scope[node.id]
        if node.id in self.table:
            return self.table[node.id]
        raise NameError(f"name '{node.id}' is not defined (available: {', '.join(sorted(self.table))})")

    def _BinOp(self, node):
        left, right = self.run(node.left), self.run(node.right)
        _check_binop(node.op, left, right)
        return self.made(BINARY[type(node.op)](left, right))

    def _UnaryOp(self, node):
        return self.made(UNARY[type(node.op)](self.run(node.operand)))

    def _BoolOp(self, node):
        value = None
        for operand in node.values:
            value = self.run(operand)
            if isinstance(node.op, ast.And) and not value:
                return value
            if isinstance(node.op, ast.Or) and value:
                return value
        return value

    def _Compare(self, node):
        left = self.run(node.left)
        result = True
        for op, comparator in zip(node.ops, node.comparators):
            right = self.run(comparator)
            result = COMPARE[type(op)](left, right)
            if isinstance(result, np.ndarray):
                if len(node.ops) > 1:
                    raise Refused("chained comparisons of arrays are not allowed")
                return self.made(result)
            if not result:
                return False
            left = right
        return result

    def _IfExp(self, node):
        return self.run(node.body) if self.run(node.test) else self.run(node.orelse)

    def _Attribute(self, node):
        if node.attr.startswith("_"):
            raise Refused(f"attribute '{node.attr}' is not allowed")
        owner = self.run(node.value)
        value = self._attribute(owner, node.attr)
        if callable(value):
            self.callables[id(value)] = value       # kept alive, so its id stays its own
        return value

    @staticmethod
    def _attribute(owner, attr):
        if isinstance(owner, Namespace):
            return owner.lookup(attr)
        if isinstance(owner, (np.ndarray, np.generic)) and (attr in ARRAY_ATTRIBUTES or attr in ARRAY_METHODS):
            return getattr(owner, attr)
        if isinstance(owner, (int, float, complex)) and not isinstance(owner, bool) \
                and (attr in NUMBER_ATTRIBUTES or attr in NUMBER_METHODS):
            return getattr(owner, attr)
        if isinstance(owner, str) and attr in STR_METHODS:
            return getattr(owner, attr)
        if isinstance(owner, (list, tuple)) and attr in LIST_METHODS:
            return getattr(owner, attr)
        if isinstance(owner, dict) and attr in DICT_METHODS:
            return getattr(owner, attr)
        raise Refused(f"attribute '{attr}' of {type(owner).__name__} is not available in settings expressions")

    def _Call(self, node):
        function = self.run(node.func)
        if not callable(function) or self.callables.get(id(function)) is not function:
            raise Refused(f"{getattr(function, '__name__', type(function).__name__)} cannot be called "
                          "in settings expressions")
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                args.extend(self.run(arg.value))
            else:
                args.append(self.run(arg))
        kwargs = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                kwargs.update(self.run(keyword.value))
            else:
                kwargs[keyword.arg] = self.run(keyword.value)
        self._check_call(function, args, kwargs)
        result = function(*args, **kwargs)
        if isinstance(result, (map, filter, zip, enumerate, reversed)) or type(result).__name__.endswith("iterator"):
            result = list(result)
        return self.made(result)

    @staticmethod
    def _check_call(function, args, kwargs):
        owner = getattr(function, "__self__", None)
        name = getattr(function, "__name__", "")
        if isinstance(owner, str) and name == "replace" and len(args) >= 2:
            old, new = args[0], args[1]
            count = (len(owner) + 1) if old == "" else owner.count(old)
            _bounded(len(owner) + count * len(new), "a replaced string")
        if isinstance(owner, str) and name == "zfill" and args:
            _bounded(_as_int(args[0], "width"), "a filled string")
        if isinstance(owner, (np.ndarray, np.generic)) and name == "astype":
            _check_dtype(args[0] if args else kwargs.get("dtype"), "astype")
        if isinstance(owner, str) and name == "join" and args:
            parts = list(args[0]) if not isinstance(args[0], str) else args[0]
            total = len(owner) * len(parts)
            for part in parts:
                total += len(part) if isinstance(part, str) else 1
                if total > MAX_ELEMENTS:
                    break
            _bounded(total, "a joined string")
        if function in (str, int, float, complex, list, tuple, set, dict) and args:
            _bounded(_size_of(args[0]), f"{name}(...)")

    def _Subscript(self, node):
        return self.made(self.run(node.value)[self.run(node.slice)])

    def _Index(self, node):   # Python < 3.9
        return self.run(node.value)

    def _Slice(self, node):
        return slice(*(None if part is None else self.run(part) for part in (node.lower, node.upper, node.step)))

    def _elements(self, nodes):
        out = []
        for element in nodes:
            if isinstance(element, ast.Starred):
                out.extend(self.run(element.value))
            else:
                out.append(self.run(element))
        return out

    def _List(self, node):
        return self.made(self._elements(node.elts))

    def _Tuple(self, node):
        return self.made(tuple(self._elements(node.elts)))

    def _Set(self, node):
        return self.made(set(self._elements(node.elts)))

    def _Dict(self, node):
        out = {}
        for key, value in zip(node.keys, node.values):
            if key is None:
                out.update(self.run(value))
            else:
                out[self.run(key)] = self.run(value)
        return self.made(out)

    def _JoinedStr(self, node):
        return self.made("".join(str(self.run(part)) for part in node.values))

    def _FormattedValue(self, node):
        value = self.run(node.value)
        conversion = {-1: None, ord("s"): str, ord("r"): repr, ord("a"): ascii}[node.conversion]
        if conversion is not None:
            value = conversion(value)
        spec = "" if node.format_spec is None else self.run(node.format_spec)
        if any(int(n) > MAX_FORMAT_WIDTH for n in FORMAT_NUMBER.findall(spec)):
            raise Refused(f"format width or precision above {MAX_FORMAT_WIDTH}")
        return format(value, spec)

    # --- comprehensions ---------------------------------------------------------------------
    def _bind(self, target, value, scope):
        if isinstance(target, ast.Name):
            if target.id.startswith("_") and target.id != "_":
                raise Refused(f"name '{target.id}' is not allowed")
            scope[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = list(value)
            if len(values) != len(target.elts):
                raise ValueError(f"cannot unpack {len(values)} values into {len(target.elts)} names")
            for element, item in zip(target.elts, values):
                self._bind(element, item, scope)
        else:
            raise Refused(f"{type(target).__name__} as a comprehension target is not allowed")

    def _generate(self, generators, emit):
        first, rest = generators[0], generators[1:]
        for item in self.run(first.iter):
            self.tick()
            scope = {}
            self._bind(first.target, item, scope)
            self.scopes.append(scope)
            try:
                if all(self.run(condition) for condition in first.ifs):
                    if rest:
                        self._generate(rest, emit)
                    else:
                        emit()
            finally:
                self.scopes.pop()

    def _comprehension_list(self, node, element):
        out = []

        def emit():
            out.append(element())
            if len(out) > MAX_ELEMENTS:
                _bounded(len(out), "a comprehension")
        # the outer scopes stay visible; each generator level adds its own
        self._generate(node.generators, emit)
        return out

    def _ListComp(self, node):
        return self.made(self._comprehension_list(node, lambda: self.run(node.elt)))

    def _GeneratorExp(self, node):
        return self.made(self._comprehension_list(node, lambda: self.run(node.elt)))

    def _SetComp(self, node):
        return self.made(set(self._comprehension_list(node, lambda: self.run(node.elt))))

    def _DictComp(self, node):
        pairs = self._comprehension_list(node, lambda: (self.run(node.key), self.run(node.value)))
        return self.made(dict(pairs))


def _static_check(tree):
    """Refuse what is never allowed before anything runs: unknown node kinds, private names."""
    for node in ast.walk(tree):
        if type(node) in NODE_WORDS:
            raise Refused(f"{NODE_WORDS[type(node)]} is not allowed")
        if not isinstance(node, ALLOWED_NODES):
            raise Refused(f"{type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and node.id.startswith("_") and node.id != "_":
            raise Refused(f"name '{node.id}' is not allowed")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise Refused(f"attribute '{node.attr}' is not allowed")


def evaluate(expression: str, table: dict, time_limit: float = TIME_LIMIT):
    """The value of `expression` using only `table`'s names; ExpressionError says why not."""
    if not isinstance(expression, str):
        raise Refused(f"expected the expression as text, got {type(expression).__name__}")
    if len(expression) > 100_000:
        raise Refused("the expression is longer than 100,000 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise ExpressionError(f"SyntaxError: {error.msg} (only an expression is allowed: no statements, "
                              "no imports)") from None
    _static_check(tree)
    try:
        return _Evaluation(table, time_limit).run(tree)
    except ExpressionError:
        raise
    except RecursionError:
        raise Refused("nested too deeply") from None
    except MemoryError:
        raise Refused("too large") from None
    except Exception as error:  # the arithmetic's own failure (ZeroDivisionError, NameError, ...)
        text = str(error).splitlines()[-1] if str(error) else ""
        raise ExpressionError(f"{type(error).__name__}: {text}") from None
