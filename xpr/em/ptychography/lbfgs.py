"""Limited-memory BFGS with a strong-Wolfe line search, on dicts of real or complex arrays.

Nocedal & Wright, Numerical Optimization (2nd ed.): two-loop recursion (alg. 7.4) with a diagonal
preconditioner D as the initial inverse Hessian, H₀ = γ D with γ = sᵀy / yᵀDy; line search
alg. 3.5 with zoom (alg. 3.6) by safeguarded cubic interpolation. Complex arrays are treated as
pairs of reals: ⟨a, b⟩ = Σ Re(conj(a) b), which makes the Wirtinger gradient 2∂L/∂z̄ the ordinary
gradient. history = 0 is preconditioned steepest descent, history = 1 a memoryless quasi-Newton
(conjugate-gradient-like) method, both with the same line search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def inner(a: dict, b: dict, xp) -> float:
    return float(sum(xp.sum((xp.conj(a[key]) * b[key]).real, dtype=xp.float64) for key in a))


def combine(a: dict, alpha: float, b: dict) -> dict:
    """a + α b, keeping each array's dtype."""
    return {key: (a[key] + alpha * b[key]).astype(a[key].dtype) for key in a}


def scaled(a: dict, alpha: float) -> dict:
    return {key: (alpha * a[key]).astype(a[key].dtype) for key in a}


@dataclass
class LBFGS:
    """Minimise f over the arrays in x; `evaluate(x) -> (f, g)` with g of the same keys, or
    (f, g, info): `info` of the accepted point is kept as `self.info` (e.g. a validation loss)."""

    evaluate: object
    x: dict
    xp: object
    preconditioner: dict            # key -> array or scalar (multiplies the gradient), or a
                                    # symmetric positive (semi-)definite linear map g -> D g
    history: int = 10
    c1: float = 1e-4
    c2: float = 0.9
    first_step: float = 1.0
    max_evaluations: int = 10
    s_list: list = field(default_factory=list)
    y_list: list = field(default_factory=list)
    evaluations: int = 0
    info: object = None

    def __post_init__(self):
        self._infos = {}
        self.f, self.g = self._evaluate(self.x)
        self.info = self._infos.pop(id(self.g), None)

    def _evaluate(self, x):
        self.evaluations += 1
        result = self.evaluate(x)
        if len(result) == 3:
            self._infos[id(result[1])] = result[2]
        return result[0], result[1]

    def reset(self):
        self.s_list.clear()
        self.y_list.clear()

    def _apply_preconditioner(self, q):
        result = {}
        for key in q:
            scaling = self.preconditioner[key]
            result[key] = (scaling(q[key]) if callable(scaling) else scaling * q[key]).astype(
                q[key].dtype)
        return result

    def direction(self):
        q = dict(self.g)
        alphas = []
        for s, y in zip(reversed(self.s_list), reversed(self.y_list)):
            rho = 1.0 / inner(y, s, self.xp)
            a = rho * inner(s, q, self.xp)
            alphas.append((rho, a))
            q = combine(q, -a, y)
        r = self._apply_preconditioner(q)
        if self.y_list:
            s, y = self.s_list[-1], self.y_list[-1]
            r = scaled(r, inner(s, y, self.xp) / inner(y, self._apply_preconditioner(y), self.xp))
        for (rho, a), s, y in zip(reversed(alphas), self.s_list, self.y_list):
            b = rho * inner(y, r, self.xp)
            r = combine(r, a - b, s)
        return scaled(r, -1.0)

    def step(self) -> bool:
        """One iteration; returns False when no step lowering f could be found."""
        d = self.direction()
        slope = inner(self.g, d, self.xp)
        if not slope < 0:
            self.reset()
            d = scaled(self._apply_preconditioner(self.g), -1.0)
            slope = inner(self.g, d, self.xp)
        alpha0 = 1.0 if self.y_list else self.first_step
        found = self._line_search(d, slope, alpha0)
        infos, self._infos = self._infos, {}
        if found is None:
            self.reset()
            return False
        alpha, f_new, g_new = found
        s = scaled(d, alpha)
        y = combine(g_new, -1.0, self.g)
        self.x = combine(self.x, alpha, d)
        self.f, self.g = f_new, g_new
        self.info = infos.get(id(g_new))
        if self.history > 0 and inner(s, y, self.xp) > 1e-12 * math.sqrt(
                inner(s, s, self.xp) * inner(y, y, self.xp)):
            self.s_list.append(s)
            self.y_list.append(y)
            del self.s_list[:-self.history]
            del self.y_list[:-self.history]
        return True

    # strong Wolfe line search ------------------------------------------------------------------
    def _phi(self, d, alpha):
        f, g = self._evaluate(combine(self.x, alpha, d))
        return f, g, inner(g, d, self.xp)

    def _line_search(self, d, slope0, alpha):
        f0 = self.f
        previous = (0.0, f0, self.g, slope0)
        best = None
        for trial in range(self.max_evaluations):
            f, g, slope = self._phi(d, alpha)
            if f < f0 and (best is None or f < best[1]):
                best = (alpha, f, g)
            if f > f0 + self.c1 * alpha * slope0 or (trial > 0 and f >= previous[1]):
                return self._zoom(d, slope0, previous, (alpha, f, g, slope), best,
                                  self.max_evaluations - trial - 1)
            if abs(slope) <= -self.c2 * slope0:
                return alpha, f, g
            if slope >= 0:
                return self._zoom(d, slope0, (alpha, f, g, slope), previous, best,
                                  self.max_evaluations - trial - 1)
            previous = (alpha, f, g, slope)
            alpha *= 2.0
        return best

    def _zoom(self, d, slope0, low, high, best, budget):
        f0 = self.f
        for _ in range(budget):
            alpha = _cubic_minimiser(low, high)
            f, g, slope = self._phi(d, alpha)
            if f < f0 and (best is None or f < best[1]):
                best = (alpha, f, g)
            if f > f0 + self.c1 * alpha * slope0 or f >= low[1]:
                high = (alpha, f, g, slope)
            else:
                if abs(slope) <= -self.c2 * slope0:
                    return alpha, f, g
                if slope * (high[0] - low[0]) >= 0:
                    high = low
                low = (alpha, f, g, slope)
        return best


def _cubic_minimiser(low, high):
    """Minimiser of the cubic through (a, f, f') at both ends, kept inside the bracket."""
    a, fa, _, da = low
    b, fb, _, db = high
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    radicand = d1 * d1 - da * db
    lo, hi = min(a, b), max(a, b)
    if radicand >= 0:
        d2 = math.copysign(math.sqrt(radicand), b - a)
        alpha = b - (b - a) * (db + d2 - d1) / (db - da + 2.0 * d2)
        margin = 0.1 * (hi - lo)
        if lo + margin <= alpha <= hi - margin:
            return alpha
    return 0.5 * (a + b)
