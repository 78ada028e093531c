"""Iterative-projection algorithms as update rules on the two projections.

Notation: x is the current iterate (a batch of real-space objects), P_M the modulus projection,
P_S the support projection, and F(y) the region where y satisfies the real-space constraints (the
support, and positivity / a value threshold when asked). With pm = P_M x:

    ER   (error reduction, Gerchberg-Saxton-Fienup)   x' = P_S pm
    HIO  (hybrid input-output, Fienup 1982)            x' = P_S pm            on F(pm)
                                                       x' = x - beta pm       elsewhere
    RAAR (relaxed averaged alternating reflections,    x' = P_S pm            on F(pm)
          Luke 2005)                                   x' = beta x + (1 - 2 beta) pm elsewhere
    DM   (difference map, Elser 2003, with
          gamma_S = -1/beta, gamma_M = 1/beta)         x' = x + beta [P_S f_M - P_M f_S],
                                                       f_M = P_M x + (P_M x - x)/beta,
                                                       f_S = P_S x - (P_S x - x)/beta

RAAR's pointwise form equals beta/2 (R_S R_M + I) x + (1 - beta) P_M x for a support-type P_S.
    ML   (Poisson maximum likelihood, PyNX's ML      x' = P_S [x - 0.5 grad L(x)],
          in projected-gradient form; Thibault &        L = sum_fitted (|F|^2 - I ln |F|^2)
          Guizar-Sicairos 2012)                        (P_M.poisson_step; beta unused)

ML is a refinement after the projections: it fits the counts' Poisson likelihood instead of
their square roots, so the many counts of 0 and 1 of a sparse pattern pull |F| toward their
maximum-likelihood value rather than onto sqrt(I) (docs/cdi.md: 512^2 issue class, repeats
0.19-0.21 -> 0.13-0.16 after 100 ML iterations).
DM needs a second modulus projection per iteration; the others one. Every rule updates x in
place and returns the modulus error of its first P_M (no extra transforms for metrics).
Each rule has the signature rule(x, support, beta, P_M, P_S, xp) -> eMod per repeat.
"""
from __future__ import annotations


def error_reduction(x, support, beta, P_M, P_S, xp):
    pm, e_mod = P_M(x)
    P_S.combine(x, pm, support, 0.0, 0.0, xp)                   # P_S pm, in place
    return e_mod


def hybrid_input_output(x, support, beta, P_M, P_S, xp):
    pm, e_mod = P_M(x)
    P_S.combine(x, pm, support, 1.0, -beta, xp)                 # x - beta pm outside
    return e_mod


def relaxed_averaged_alternating_reflections(x, support, beta, P_M, P_S, xp):
    pm, e_mod = P_M(x)
    P_S.combine(x, pm, support, beta, 1.0 - 2.0 * beta, xp)     # beta x + (1 - 2 beta) pm outside
    return e_mod


def difference_map(x, support, beta, P_M, P_S, xp):
    pm, e_mod = P_M(x)
    ps = P_S(x, support, xp)
    f_M = pm + (pm - x) / beta
    f_S = ps - (ps - x) / beta
    pm_of_f_S, _ = P_M(f_S)
    x += beta * (P_S(f_M, support, xp) - pm_of_f_S)
    return e_mod


def poisson_maximum_likelihood(x, support, beta, P_M, P_S, xp):
    step = getattr(P_M, "poisson_step", None)
    if step is None:
        raise ValueError("the ML algorithm needs a modulus projection of measured counts "
                         "(cdi phase2d/phase3d)")
    y, e_mod = step(x)
    P_S.combine(x, y, support, 0.0, 0.0, xp)                    # P_S y, in place
    return e_mod


ALGORITHMS = {
    "ER": error_reduction,
    "HIO": hybrid_input_output,
    "RAAR": relaxed_averaged_alternating_reflections,
    "DM": difference_map,
    "ML": poisson_maximum_likelihood,
}
