"""Walk a compiled schedule over a batch of independent repeats.

The engine knows only the list of steps (xpr.phasing.schedule), the two projections
(xpr.phasing.projections or any stand-ins with the same call signatures) and a shrink-wrap rule.
All repeats advance together as one array of shape (repeats, *grid), so each iteration costs one
batched forward and inverse FFT whatever the number of repeats.

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


def constraint_error(x, support, xp):
    """sqrt(sum_outside |x|^2 / sum |x|^2) per repeat."""
    power = (x.real * x.real + x.imag * x.imag).reshape(x.shape[0], -1)
    outside = power * (~support).reshape(support.shape[0], -1)
    return xp.sqrt(xp.sum(outside, axis=1) / xp.maximum(xp.sum(power, axis=1), 1e-30))


def iterate(steps, x, support, P_M, P_S, shrink_wrap=None, xp=np, progress=None,
            metrics_every=10):
    """Run the steps on the batch x (updated in place). Returns (x, support, History)."""
    history = History()
    done = 0
    for step in steps:
        if step.method == "SW":
            if shrink_wrap is None:
                raise ValueError("schedule asks for shrink-wrap but none was configured")
            support = shrink_wrap(x, support, **step.options)
            history.support_updates.append(done)
            continue
        rule = ALGORITHMS[step.method]
        if rule is error_reduction and P_S.is_plain_support:
            rule = _plain_error_reduction
        for k in range(step.iterations):
            history.e_mod.append(rule(x, support, step.beta_at(k), P_M, P_S, xp))
            done += 1
            if metrics_every and done % metrics_every == 0:
                history.e_con.append((done, constraint_error(x, support, xp)))
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
