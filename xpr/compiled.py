"""numba's njit as xpr's compiled loops use it (xpr.em.ali3d.spreading, xpr.phasing.loops).

Loops run without the GIL, so threads of one process may run them side by side. Their machine
code is cached beside the module or in the user's cache (NUMBA_CACHE_DIR); where neither can be
written (a read-only install) they are compiled in each process instead (about 1 s) rather than
failing.
"""
from __future__ import annotations

import numba


def compiled(function=None, **options):
    """@compiled or @compiled(error_model="numpy", ...): numba.njit(nogil=True, cache=True, **options).

    error_model="numpy" lets numba vectorise loops that divide (a float division by 0 gives
    inf/nan as in numpy instead of raising), which the elementwise loops need to be fast."""
    if function is None:
        return lambda f: compiled(f, **options)
    try:
        return numba.njit(nogil=True, cache=True, **options)(function)
    except RuntimeError:        # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, **options)(function)
