"""Walk a compiled schedule over a batch of independent repeats: the one loop of cdi and fxs.

The engine knows only the list of steps (xpr.phasing.schedule), the two projections
(xpr.phasing.projections or any stand-ins with the same call signatures) and the operations the
schedule names (SW = shrink-wrap, or any other, as cohere's op_flow). All repeats advance together
as one array, so each iteration costs one batched transform pair whatever the number of repeats.
The repeats lie along `batch_axis` of the iterate and the support: 0 for cdi's (repeats, *grid),
-2 for fxs's (*angular, repeats, r); every per-repeat quantity the engine makes is an array over
that axis.

Everything that varies during a run is compiled into the steps beforehand (beta of every
iteration, each operation's options); the engine does not decide anything. Callers watch the run
through callbacks: `callbacks` are called after every iteration with an `Iteration` (metrics,
best-iterate tracking, progress), `on_step` before each iterating step (e.g. to switch a
projection's mode per algorithm). An operation is called as op(x, support, step) and returns the
new support (or None to keep it); it may also change x in place.

Per iteration it records eMod (from the modulus projection, no extra transform) and, every
`metrics_every` iterations, eCon: the fraction of the iterate's norm that lies outside the support,
sqrt(sum_outside |x|^2 / sum |x|^2) (zero after an ER step; it measures how far HIO/RAAR/DM
iterates still are from the real-space constraint).

Starting points are drawn per repeat from that repeat's own seed, so a repeat's result does not
depend on how repeats are grouped into batches or spread over processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xpr.backend import to_host
from xpr.phasing.algorithms import ALGORITHMS, error_reduction
from xpr.phasing.schedule import ITERATING


@dataclass
class History:
    """Error metrics of a batch: e_mod[i] is an array over repeats after global iteration i."""

    e_mod: list = field(default_factory=list)
    e_con: list = field(default_factory=list)         # (iteration, array over repeats)
    support_updates: list = field(default_factory=list)  # iterations after which SW ran
    operations: list = field(default_factory=list)   # (iteration, name) of every operation run
    betas: list = field(default_factory=list)        # beta applied at each iteration

    def e_mod_array(self):
        """eMod as a (repeats, iterations) numpy array."""
        if not self.e_mod:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([_to_numpy(e) for e in self.e_mod], axis=1).astype(np.float32)

    def e_con_array(self):
        """(iterations, eCon as (repeats, n)) numpy arrays."""
        if not self.e_con:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        its = np.array([i for i, _ in self.e_con], dtype=np.int64)
        values = np.stack([_to_numpy(e) for _, e in self.e_con], axis=1).astype(np.float32)
        return its, values


def _to_numpy(a):
    return to_host(a)


def constraint_error(x, support, xp, batch_axis=0):
    """sqrt(sum_outside |x|^2 / sum |x|^2) per repeat (repeats along batch_axis)."""
    power = x.real * x.real + x.imag * x.imag if xp.iscomplexobj(x) else x * x
    outside = power * ~xp.broadcast_to(support, power.shape)
    axes = tuple(a for a in range(power.ndim) if a != batch_axis % power.ndim)
    return xp.sqrt(xp.sum(outside, axis=axes) / xp.maximum(xp.sum(power, axis=axes), 1e-30))


@dataclass
class Iteration:
    """What a callback sees after one iteration: the global count (1 after the first), the step
    and the iteration within it, the beta applied, the iterate and support, eMod per repeat."""

    done: int
    step: object
    k: int
    beta: float
    x: object
    support: object
    e_mod: object


def iterate(steps, x, support, P_M, P_S, shrink_wrap=None, xp=np, progress=None,
            metrics_every=10, batch_axis=0, operations=None, callbacks=(), on_step=None):
    """Run the steps on the batch x (updated in place). Returns (x, support, History).

    shrink_wrap(x, support, **step.options) serves SW steps unless `operations` names its own SW;
    operations: name -> op(x, support, step) for every non-iterating step of the schedule.
    """
    history = History()
    ops = dict(operations or {})
    if shrink_wrap is not None and "SW" not in ops:
        ops["SW"] = lambda x, support, step: shrink_wrap(x, support, **step.options)
    done = 0
    for step in steps:
        if step.method not in ALGORITHMS:
            operation = ops.get(step.method)
            if operation is None:
                if step.method == "SW":
                    raise ValueError("schedule asks for shrink-wrap but none was configured")
                raise ValueError(f"schedule asks for operation {step.method!r} but none was configured")
            new_support = operation(x, support, step)
            if new_support is not None:
                support = new_support
            if step.method == "SW":
                history.support_updates.append(done)
            history.operations.append((done, step.method))
            continue
        if on_step is not None:
            on_step(step)
        rule = ALGORITHMS[step.method]
        if rule is error_reduction and P_S.is_plain_support:
            rule = _plain_error_reduction
        for k in range(step.iterations):
            beta = step.beta_at(k)
            e_mod = rule(x, support, beta, P_M, P_S, xp)
            history.e_mod.append(e_mod)
            history.betas.append(beta)
            done += 1
            if metrics_every and done % metrics_every == 0:
                history.e_con.append((done, constraint_error(x, support, xp, batch_axis)))
            if callbacks:
                state = Iteration(done, step, k, beta, x, support, e_mod)
                for callback in callbacks:
                    callback(state)
            if progress is not None:
                progress.update(1)
                if done % 10 == 0 and hasattr(progress, "set_postfix"):
                    progress.set_postfix(eMod=f"{float(history.e_mod[-1].min()):.4f}",
                                         refresh=False)
    return x, support, history


def _plain_error_reduction(x, support, beta, P_M, P_S, xp):
    """ER when P_S is a bare support mask: one fused multiply instead of a select."""
    pm, e_mod = P_M(x)
    xp.multiply(pm, support, out=x)
    return e_mod


def random_starts(backend, amplitude, support, seeds):
    """Each repeat's start: measured amplitudes with random phases, back-transformed, P_S'd.

    amplitude: sqrt(I) in FFT order (0 where unmeasured); support: (repeats, *grid) bool;
    seeds: one integer per repeat (the start depends on the seed only).
    """
    xp = backend.xp
    axes = tuple(range(-amplitude.ndim, 0))
    amplitude_host = backend.asnumpy(amplitude)
    spectra = np.empty((len(seeds),) + amplitude_host.shape, dtype=backend.complex_dtype)
    for i, seed in enumerate(seeds):
        phase = np.random.default_rng(seed).uniform(0.0, 2.0 * np.pi, amplitude_host.shape)
        spectra[i] = amplitude_host * np.exp(1j * phase)
    x = backend.ifftn(xp.asarray(spectra), axes=axes, overwrite_x=True)
    return (x * support).astype(backend.complex_dtype)


def count_iterations(steps) -> int:
    return sum(step.iterations for step in steps if step.method in ITERATING)
