"""Phasing schedules are data: a spipy string or xFrame-style YAML blocks, compiled to steps.

Two spellings describe the same thing, a sequence of iterative-projection algorithms:

* spipy's string ``'100RAAR 200DM 200ERA'`` -- each token is an iteration count followed by an
  algorithm name; a bare ``SW`` token (or ``1SW``) updates the support by shrink-wrap once.
* xFrame's nested blocks::

      main_loop:
        sub_loops:
          order: [start, refine]
          start:
            iterations: 5                 # the block is repeated this many times
            order: [HIO, SW, ER]          # methods within one repetition
            methods:
              HIO: {iterations: 60, beta: 0.9}
              SW: {sigma: 2.0, threshold: 0.1}
              ER: {iterations: 10}

Both compile once, before any iteration runs, into a flat list of `Step`s. An iterating step
carries its algorithm, its number of iterations and its feedback parameter beta: a (first, last)
linear ramp, or, once a policy is compiled in, the value of every one of its iterations
(`Step.betas`). A non-iterating step is an operation (SW = shrink-wrap, or any name the caller
registers with the engine, as cohere's op_flow) carrying its options (for SW: blur width and
threshold). Policies are compiled into the list, never applied while it runs:

* `apply_beta_ramp` gives the feedback steps without a beta of their own one ramp across all of
  their iterations (linear or exponential, `ramp_values`), or xFrame's per-block ramps
  (`xframe_block_values`);
* `apply_option_ramp` gives operation steps an option ramped over their occurrences (the blur
  width of successive shrink-wraps) where they do not set it themselves;
* `schedule_operation` / `with_periodic_shrink_wrap` insert operations after chosen global
  iterations, splitting iterating steps there.

So the engine only ever walks one list, and `describe` of that list is what runs.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from xpr.errors import InputError

#: algorithm names accepted in schedules -> canonical name
ALGORITHM_NAMES = {
    "ER": "ER", "ERA": "ER",
    "HIO": "HIO",
    "DM": "DM",
    "RAAR": "RAAR",
    "ML": "ML",
    "SW": "SW",
}
ITERATING = ("ER", "HIO", "DM", "RAAR", "ML")
#: iterating steps without a feedback parameter (beta ramps and shrink-wrap's default stop skip them)
NO_FEEDBACK = ("ER", "ML")

_TOKEN = re.compile(r"^(\d*)([A-Za-z_]+)$")


@dataclass(frozen=True)
class Step:
    """One entry of a compiled schedule.

    method: 'ER' | 'HIO' | 'DM' | 'RAAR', or an operation name ('SW' or one the caller registers).
    iterations: iterations of an algorithm (1 for an operation).
    beta: (first, last) feedback parameter across this step's iterations (a linear ramp).
    options: extra per-step parameters (for SW: sigma, threshold, support_size).
    betas: the feedback parameter of each iteration, when a policy compiled one in (wins over beta).
    own_beta: the settings gave this step its own beta (global policies leave it alone).
    """

    method: str
    iterations: int = 1
    beta: tuple = (0.8, 0.8)
    options: dict = field(default_factory=dict)
    betas: tuple | None = None
    own_beta: bool = False

    def beta_at(self, k: int) -> float:
        """Feedback parameter at iteration k (0-based) of this step."""
        if self.betas is not None:
            return float(self.betas[k])
        first, last = self.beta
        if self.iterations <= 1:
            return float(first)
        return float(first + (last - first) * k / (self.iterations - 1))

    def split(self, k: int) -> tuple["Step", "Step"]:
        """The first k iterations and the rest, with the beta ramp cut where it stands."""
        if self.betas is not None:
            head = replace(self, iterations=k, betas=self.betas[:k],
                           beta=(self.betas[0], self.betas[k - 1]))
            tail = replace(self, iterations=self.iterations - k, betas=self.betas[k:],
                           beta=(self.betas[k], self.betas[-1]))
            return head, tail
        head = replace(self, iterations=k, beta=(self.beta_at(0), self.beta_at(k - 1)))
        tail = replace(self, iterations=self.iterations - k,
                       beta=(self.beta_at(k), self.beta_at(self.iterations - 1)))
        return head, tail


def _beta_pair(beta, key, source) -> tuple:
    if isinstance(beta, (int, float)):
        pair = (float(beta), float(beta))
    elif isinstance(beta, (list, tuple)) and len(beta) == 2:
        pair = (float(beta[0]), float(beta[1]))
    else:
        raise InputError(f"beta must be a number or a [first, last] ramp, got {beta!r}",
                         file=source, key=key)
    if not all(0.0 <= b <= 1.0 for b in pair):
        raise InputError(f"beta must lie in [0, 1], got {beta!r}", file=source, key=key)
    return pair


def _algorithm(name: str, key, source, operations=()) -> str:
    canonical = ALGORITHM_NAMES.get(str(name).upper())
    if canonical is None and str(name).upper() in {str(o).upper() for o in operations}:
        canonical = str(name).upper()
    if canonical is None:
        known = ", ".join(sorted(set(ALGORITHM_NAMES) | {str(o).upper() for o in operations}))
        raise InputError(f"unknown phasing algorithm '{name}' (known: {known})",
                         file=source, key=key)
    return canonical


def _iterations(value, key, source) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"iterations must be a whole number, got {value!r}", file=source, key=key)
    if value < 0:
        raise InputError(f"iterations must not be negative, got {value}", file=source, key=key)
    return value


def parse_string(text: str, beta=0.8, key="phasing.iters", source=None, operations=()) -> list[Step]:
    """spipy's schedule string, e.g. '100RAAR 200DM 200ERA', into steps (operations: names of
    extra operations the caller's engine call provides, written like SW)."""
    pair = _beta_pair(beta, "phasing_parameters.beta", source)
    steps = []
    for token in str(text).replace(",", " ").split():
        if token.startswith("-"):
            raise InputError(f"iterations must not be negative: '{token}' in '{text}'",
                             file=source, key=key)
        match = _TOKEN.match(token)
        if match is None:
            raise InputError(f"cannot read '{token}' in schedule '{text}': expected a count "
                             "followed by an algorithm, e.g. 100RAAR", file=source, key=key)
        count, name = match.groups()
        method = _algorithm(name, key, source, operations)
        n = int(count) if count else 1
        if method not in ITERATING:
            steps.extend(Step(method) for _ in range(n))
        elif n > 0:
            steps.append(Step(method, n, pair))
    if not any(step.method in ITERATING for step in steps):
        raise InputError(f"schedule '{text}' has no iterations", file=source, key=key)
    return ramp_across(steps, pair)


def ramp_across(steps, pair) -> list[Step]:
    """Give the feedback steps (HIO, DM, RAAR) one beta ramp pair[0] -> pair[1] across all of
    their iterations together, in schedule order (ER takes no beta)."""
    feedback = [s for s in steps if s.method in ITERATING and s.method not in NO_FEEDBACK]
    total = sum(s.iterations for s in feedback)
    first, last = pair

    def beta(i):
        return first if total <= 1 else first + (last - first) * i / (total - 1)

    out, done = [], 0
    for step in steps:
        if step.method in ITERATING and step.method not in NO_FEEDBACK:
            step = replace(step, beta=(beta(done), beta(done + step.iterations - 1)))
            done += step.iterations
        out.append(step)
    return out


def parse_blocks(main_loop: dict, beta=0.8, key="phasing.main_loop", source=None, operations=(),
                 names=None) -> list[Step]:
    """xFrame-style `main_loop: {sub_loops: {order: [...], <block>: {...}}}` into steps.

    A method's own `beta` is kept on its step (own_beta) so that global policies leave it alone.
    names: a list that receives, per step, the name of the block it came from.
    """
    default_beta = _beta_pair(beta, "phasing_parameters.beta", source)
    sub_loops = (main_loop or {}).get("sub_loops")
    if not isinstance(sub_loops, Mapping):
        raise InputError("main_loop needs a 'sub_loops' mapping", file=source, key=key)
    order = sub_loops.get("order", [name for name in sub_loops if name != "order"])
    steps = []
    for block_name in order:
        block_key = f"{key}.sub_loops.{block_name}"
        block = sub_loops.get(block_name)
        if not isinstance(block, Mapping):
            raise InputError(f"sub-loop '{block_name}' named in order is not defined",
                             file=source, key=f"{key}.sub_loops.order")
        methods = block.get("methods", {})
        repeats = _iterations(block.get("iterations", 1), f"{block_key}.iterations", source)
        method_order = block.get("order", list(methods))
        one_pass = []
        for name in method_order:
            method_key = f"{block_key}.methods.{name}"
            method = _algorithm(name, f"{block_key}.order", source, operations)
            params = dict(methods.get(name) or {})
            n = _iterations(params.pop("iterations", 1), f"{method_key}.iterations", source)
            if method not in ITERATING:
                one_pass.extend(Step(method, 1, default_beta, params) for _ in range(n))
            elif n > 0:
                own = "beta" in params
                pair = _beta_pair(params.pop("beta", default_beta), f"{method_key}.beta", source)
                one_pass.append(Step(method, n, pair, params, own_beta=own))
        steps.extend(one_pass * repeats)
        if names is not None:
            names.extend([block_name] * (len(one_pass) * repeats))
    if not any(step.method in ITERATING for step in steps):
        raise InputError("schedule has no iterations", file=source, key=key)
    return steps


def compile_schedule(iters=None, main_loop=None, beta=0.8, source=None) -> list[Step]:
    """Steps from either spelling; YAML blocks win when both are given."""
    if main_loop:
        return parse_blocks(main_loop, beta=beta, source=source)
    if isinstance(iters, Mapping):
        return parse_blocks(iters, beta=beta, key="phasing.iters", source=source)
    if iters is None:
        raise InputError("no phasing schedule given", file=source, key="phasing.iters")
    return parse_string(iters, beta=beta, source=source)


def total_iterations(steps) -> int:
    return sum(step.iterations for step in steps if step.method in ITERATING)


def schedule_operation(steps, method: str, after: list, options: list | None = None) -> list[Step]:
    """Insert the operation `method` after each global iteration count in `after` (ascending;
    0 = before the first iteration), with options[i] at the i-th point. Iterating steps are split
    where a point falls inside them; steps already in the list are kept."""
    points = [int(a) for a in after]
    options = options if options is not None else [{} for _ in points]
    out, done, next_i = [], 0, 0
    while next_i < len(points) and points[next_i] <= 0:
        out.append(Step(method, 1, (0.8, 0.8), dict(options[next_i])))
        next_i += 1
    for step in steps:
        remaining = step
        if step.method not in ITERATING:
            out.append(step)
            continue
        while next_i < len(points) and done + remaining.iterations >= points[next_i]:
            k = points[next_i] - done
            if k < remaining.iterations:
                head, remaining = remaining.split(k) if k > 0 else (None, remaining)
            else:
                head, remaining = remaining, None
            if head is not None:
                out.append(head)
                done += head.iterations
            out.append(Step(method, 1, step.beta, dict(options[next_i])))
            next_i += 1
            if remaining is None:
                break
        if remaining is not None and remaining.iterations > 0:
            out.append(remaining)
            done += remaining.iterations
    return out


def with_periodic_shrink_wrap(steps, start: int, every: int, stop=None,
                              sigma=(3.0, 1.0), threshold=None) -> list[Step]:
    """Insert a shrink-wrap step after iteration start, start+every, ... (global count).

    The blur width ramps linearly from sigma[0] at the first to sigma[1] at the last inserted
    update (a narrowing blur); a threshold given as [first, last] ramps the same way (None:
    the shrink-wrap rule's own). Iterating steps are split where a shrink-wrap falls inside them.
    Explicit SW steps already in the schedule are kept as they are. stop=None: up to the end of
    the last non-ER step, so the final error-reduction polishes a fixed support.
    """
    if every is None or every <= 0:
        return list(steps)
    if stop is None:
        done, stop = 0, 0
        for step in steps:
            if step.method in ITERATING:
                done += step.iterations
                if step.method not in NO_FEEDBACK:
                    stop = done
        if stop == 0:
            stop = done
    points = list(range(max(int(start), 1), int(stop) + 1, int(every)))
    if not points:
        return list(steps)
    sigmas = _ramp(sigma, len(points))
    thresholds = None if threshold is None else _ramp(threshold, len(points))
    options = []
    for i in range(len(points)):
        options.append({"sigma": sigmas[i]} if thresholds is None
                       else {"sigma": sigmas[i], "threshold": thresholds[i]})
    return schedule_operation(steps, "SW", points, options)


def _ramp(pair, n):
    if isinstance(pair, (int, float)):
        return [float(pair)] * n
    first, last = float(pair[0]), float(pair[-1])
    if n == 1:
        return [first]
    return [first + (last - first) * i / (n - 1) for i in range(n)]


RAMP_KINDS = ("linear", "exponential")


def is_per_block(spec) -> bool:
    """xFrame's per-block form: a list with one entry per block, some entry a ramp specifier
    (a list) or False. A list of plain numbers is xpr's [first, last] ramp over the whole run."""
    return isinstance(spec, (list, tuple)) and any(isinstance(e, (list, tuple)) or e is False for e in spec)


def ramp_values(spec, n: int, kind: str = "linear", key=None, source=None) -> list:
    """The n values of xpr's ramp specifier, one per iteration (or per operation occurrence):
    a number (constant) or [first, last], a `kind` ramp from value 0 to value n-1: linear, or
    exponential (geometric, first·(last/first)^(i/(n-1)); linear when a value is <= 0)."""
    if n <= 0:
        return []
    if isinstance(spec, bool) or spec is None:
        raise InputError(f"a ramp must be a number or [first, last], got {spec!r}", file=source, key=key)
    if isinstance(spec, (int, float)):
        return [float(spec)] * n
    spec = list(spec)
    if len(spec) == 1:
        return [float(spec[0])] * n
    if len(spec) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
        raise InputError(f"a ramp is a number, [first, last] or xFrame's per-block list, got {spec!r}",
                         file=source, key=key)
    first, last = float(spec[0]), float(spec[1])
    if kind not in RAMP_KINDS:
        raise ValueError(f"unknown ramp kind {kind!r}")
    if n <= 1:
        return [first]
    if kind == "exponential" and first > 0 and last > 0:
        return [first * (last / first) ** (k / (n - 1)) for k in range(n)]
    return [first + (last - first) * k / (n - 1) for k in range(n)]


def xframe_block_values(entry, n: int, false_value=None, key=None, source=None) -> list:
    """The n values (n = 0, 1, ... counted within one block) of one entry of xFrame's per-block
    list, as xFrame's documentation defines them:

    * a number: constant; False: `false_value` (for shrink-wrap sigmas the grid's half-period
      resolution);
    * exponential ramp [start, stop, exponent, stop_argument]: v(n) = A·exp(exponent·n) + B with
      v(0) = start and v(stop_argument) = stop (and the same formula after stop_argument);
    * linear ramp [start, [stop_value, stop_argument], slope]: v(n) = start + A·n with A = slope,
      or, when slope is False, A such that v(stop_argument) = stop_value; v stops at stop_value
      once it reaches it; a False stop_value is `false_value`.
    """
    import math

    def number(value, what):
        if value is False:
            if false_value is None:
                raise InputError(f"{what} False (the grid's resolution) has no meaning here", file=source, key=key)
            return float(false_value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{what} must be a number, got {value!r}", file=source, key=key)
        return float(value)

    if n <= 0:
        return []
    if not isinstance(entry, (list, tuple)):
        return [number(entry, "a block's value")] * n
    entry = list(entry)
    if len(entry) == 3 and isinstance(entry[1], (list, tuple)) and len(entry[1]) == 2:
        start = number(entry[0], "start_value")
        stop = number(entry[1][0], "stop_value")
        slope = entry[2]
        if slope is False or slope is None:
            stop_argument = number(entry[1][1], "stop_argument")
            if stop_argument <= 0:
                raise InputError("stop_argument must be positive", file=source, key=key)
            slope = (stop - start) / stop_argument
        slope = number(slope, "slope")
        values = [start + slope * i for i in range(n)]
        return [max(v, stop) if slope < 0 else min(v, stop) for v in values]
    if len(entry) == 4:
        start, stop = number(entry[0], "start_value"), number(entry[1], "stop_value")
        exponent, stop_argument = number(entry[2], "exponent"), number(entry[3], "stop_argument")
        if exponent == 0 or stop_argument == 0:
            raise InputError(f"exponential ramp {entry!r} needs a non-zero exponent and stop_argument",
                             file=source, key=key)
        scale = (start - stop) / (1.0 - math.exp(exponent * stop_argument))
        offset = start - scale
        return [scale * math.exp(exponent * i) + offset for i in range(n)]
    raise InputError(f"cannot read ramp {entry!r}: expected a number, False, [start, stop, exponent, "
                     "stop_argument] or [start, [stop_value, stop_argument], slope]", file=source, key=key)


def _per_block_groups(steps, chosen, names, key, source):
    """The chosen step indices grouped by block, blocks in schedule order."""
    if names is None or len(names) != len(steps):
        raise InputError("a per-block list needs the schedule's blocks (main_loop)", file=source, key=key)
    groups: dict = {}
    for i in chosen:
        groups.setdefault(names[i], []).append(i)
    order = list(dict.fromkeys(names))
    return [(order.index(name), indices) for name, indices in groups.items()]


def apply_beta_ramp(steps, spec, methods=("HIO",), kind: str = "exponential", key=None,
                    source=None, names=None) -> list[Step]:
    """Compile beta into the iterations of the `methods` steps that have no beta of their own
    (in schedule order; steps with their own beta keep it): xpr's ramp (`ramp_values`) across all
    of them, or, for xFrame's per-block list, entry b for the b-th block of the schedule (the last
    entry for blocks beyond the list), counted over that block's iterations (names: the block of
    each step, as parse_blocks gives them)."""
    chosen = [i for i, step in enumerate(steps) if step.method in methods and not step.own_beta]
    out = list(steps)
    if is_per_block(spec):
        groups = _per_block_groups(steps, chosen, names, key, source)
        for block, indices in groups:
            entry = spec[min(block, len(spec) - 1)]
            values = xframe_block_values(entry, sum(steps[i].iterations for i in indices), key=key, source=source)
            _assign_betas(out, indices, values)
        return out
    values = ramp_values(spec, sum(steps[i].iterations for i in chosen), kind, key, source)
    _assign_betas(out, chosen, values)
    return out


def _assign_betas(out, indices, values):
    done = 0
    for i in indices:
        step = out[i]
        betas = tuple(values[done:done + step.iterations])
        done += step.iterations
        if betas:
            out[i] = replace(step, betas=betas, beta=(betas[0], betas[-1]))


def apply_option_ramp(steps, method: str, option: str, spec, kind: str = "linear", key=None,
                      source=None, names=None, false_value=None) -> list[Step]:
    """Give the i-th `method` operation option = value i of a ramp over their occurrences, unless
    the step sets the option itself: xpr's ramp over the whole run, or xFrame's per-block list
    (entry b for the b-th block, counted over that block's occurrences; False = false_value)."""
    chosen = [i for i, step in enumerate(steps) if step.method == method]
    if is_per_block(spec):
        pairs = []
        for block, indices in _per_block_groups(steps, chosen, names, key, source):
            entry = spec[min(block, len(spec) - 1)]
            pairs += zip(indices, xframe_block_values(entry, len(indices), false_value, key, source))
    else:
        pairs = zip(chosen, ramp_values(spec, len(chosen), kind, key, source))
    out = list(steps)
    for i, value in pairs:
        if option not in out[i].options:
            out[i] = replace(out[i], options={**out[i].options, option: value})
    return out


def describe(steps) -> str:
    """Compact one-line summary of what runs, e.g. '100RAAR(0.95->0.90) SW(sigma=3) 100ER'.
    An iterating step shows its first and last beta; an operation its sigma when it has one."""
    words = []
    for step in steps:
        if step.method not in ITERATING:
            sigma = step.options.get("sigma")
            words.append(step.method if sigma is None else f"{step.method}(sigma={float(sigma):.3g})")
        elif step.method in NO_FEEDBACK:
            words.append(f"{step.iterations}{step.method}")
        else:
            b0, b1 = step.beta_at(0), step.beta_at(step.iterations - 1)
            ramp = f"{b0:.2f}" if abs(b0 - b1) < 1e-9 else f"{b0:.2f}->{b1:.2f}"
            words.append(f"{step.iterations}{step.method}({ramp})")
    return " ".join(words)
