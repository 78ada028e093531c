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
carries its algorithm, its number of iterations and the feedback parameter beta at its first and
last iteration (a linear ramp; equal values for a constant beta). A shrink-wrap step carries the
blur width and threshold to use. Periodic shrink-wrap requested in the settings is woven into the
list by `with_periodic_shrink_wrap`, which splits iterating steps at the shrink-wrap points, so
the engine only ever walks one list.
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
    "SW": "SW",
}
ITERATING = ("ER", "HIO", "DM", "RAAR")

_TOKEN = re.compile(r"^(\d*)([A-Za-z]+)$")


@dataclass(frozen=True)
class Step:
    """One entry of a compiled schedule.

    method: 'ER' | 'HIO' | 'DM' | 'RAAR' | 'SW'.
    iterations: iterations of an algorithm (1 for SW).
    beta: (first, last) feedback parameter across this step's iterations.
    options: extra per-step parameters (for SW: sigma, threshold, support_size).
    """

    method: str
    iterations: int = 1
    beta: tuple = (0.8, 0.8)
    options: dict = field(default_factory=dict)

    def beta_at(self, k: int) -> float:
        """Feedback parameter at iteration k (0-based) of this step: linear ramp first -> last."""
        first, last = self.beta
        if self.iterations <= 1:
            return float(first)
        return float(first + (last - first) * k / (self.iterations - 1))

    def split(self, k: int) -> tuple["Step", "Step"]:
        """The first k iterations and the rest, with the beta ramp cut where it stands."""
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


def _algorithm(name: str, key, source) -> str:
    canonical = ALGORITHM_NAMES.get(str(name).upper())
    if canonical is None:
        known = ", ".join(sorted(ALGORITHM_NAMES))
        raise InputError(f"unknown phasing algorithm '{name}' (known: {known})",
                         file=source, key=key)
    return canonical


def _iterations(value, key, source) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"iterations must be a whole number, got {value!r}", file=source, key=key)
    if value < 0:
        raise InputError(f"iterations must not be negative, got {value}", file=source, key=key)
    return value


def parse_string(text: str, beta=0.8, key="phasing.iters", source=None) -> list[Step]:
    """spipy's schedule string, e.g. '100RAAR 200DM 200ERA', into steps."""
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
        method = _algorithm(name, key, source)
        n = int(count) if count else 1
        if method == "SW":
            steps.extend(Step("SW") for _ in range(n))
        elif n > 0:
            steps.append(Step(method, n, pair))
    if not any(step.method in ITERATING for step in steps):
        raise InputError(f"schedule '{text}' has no iterations", file=source, key=key)
    return ramp_across(steps, pair)


def ramp_across(steps, pair) -> list[Step]:
    """Give the feedback steps (HIO, DM, RAAR) one beta ramp pair[0] -> pair[1] across all of
    their iterations together, in schedule order (ER takes no beta)."""
    feedback = [s for s in steps if s.method in ITERATING and s.method != "ER"]
    total = sum(s.iterations for s in feedback)
    first, last = pair

    def beta(i):
        return first if total <= 1 else first + (last - first) * i / (total - 1)

    out, done = [], 0
    for step in steps:
        if step.method in ITERATING and step.method != "ER":
            step = replace(step, beta=(beta(done), beta(done + step.iterations - 1)))
            done += step.iterations
        out.append(step)
    return out


def parse_blocks(main_loop: dict, beta=0.8, key="phasing.main_loop", source=None) -> list[Step]:
    """xFrame-style `main_loop: {sub_loops: {order: [...], <block>: {...}}}` into steps."""
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
            method = _algorithm(name, f"{block_key}.order", source)
            params = dict(methods.get(name) or {})
            n = _iterations(params.pop("iterations", 1), f"{method_key}.iterations", source)
            if method == "SW":
                one_pass.extend(Step("SW", 1, default_beta, params) for _ in range(n))
            elif n > 0:
                pair = _beta_pair(params.pop("beta", default_beta), f"{method_key}.beta", source)
                one_pass.append(Step(method, n, pair, params))
        steps.extend(one_pass * repeats)
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
                if step.method != "ER":
                    stop = done
        if stop == 0:
            stop = done
    points = list(range(max(int(start), 1), int(stop) + 1, int(every)))
    if not points:
        return list(steps)
    sigmas = _ramp(sigma, len(points))
    thresholds = None if threshold is None else _ramp(threshold, len(points))
    out, done, next_i = [], 0, 0
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
            options = {"sigma": sigmas[next_i]}
            if thresholds is not None:
                options["threshold"] = thresholds[next_i]
            out.append(Step("SW", 1, step.beta, options))
            next_i += 1
            if remaining is None:
                break
        if remaining is not None and remaining.iterations > 0:
            out.append(remaining)
            done += remaining.iterations
    return out


def _ramp(pair, n):
    if isinstance(pair, (int, float)):
        return [float(pair)] * n
    first, last = float(pair[0]), float(pair[-1])
    if n == 1:
        return [first]
    return [first + (last - first) * i / (n - 1) for i in range(n)]


def describe(steps) -> str:
    """Compact one-line summary, e.g. '100RAAR(0.95->0.90) SW 100RAAR ...'."""
    words = []
    for step in steps:
        if step.method == "SW":
            words.append("SW")
        elif step.method == "ER":
            words.append(f"{step.iterations}ER")
        else:
            b0, b1 = step.beta
            ramp = f"{b0:.2f}" if abs(b0 - b1) < 1e-9 else f"{b0:.2f}->{b1:.2f}"
            words.append(f"{step.iterations}{step.method}({ramp})")
    return " ".join(words)
