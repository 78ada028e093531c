"""The backend the phasing kernels run on: xpr.backend, with an `overwrite_x` keyword on its FFTs.

Kernels call `backend.xp`, `backend.fftn(a, axes=...)`, `backend.ifftn(a, axes=...,
overwrite_x=...)`, `backend.real_dtype`, `backend.complex_dtype`, `backend.asnumpy`. The kernels
say where an FFT may overwrite its input; `ensure` passes that on when xpr.backend's FFTs take
the keyword and drops it when they do not, so the kernels are right either way.
"""
from __future__ import annotations

import inspect

from xpr.backend import Backend


class _WithOverwrite:
    """Adds an ignored `overwrite_x` keyword to a backend whose FFTs do not take one."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def fftn(self, a, axes=None, overwrite_x=False):
        return self._backend.fftn(a, axes=axes)

    def ifftn(self, a, axes=None, overwrite_x=False):
        return self._backend.ifftn(a, axes=axes)


def _takes_overwrite(backend) -> bool:
    try:
        return "overwrite_x" in inspect.signature(backend.fftn).parameters
    except (TypeError, ValueError):
        return False


def ensure(backend=None):
    """The phasing-kernel interface for this xpr.backend.Backend (a CPU one when None)."""
    if backend is None:
        backend = Backend(False, "single")
    if isinstance(backend, _WithOverwrite) or _takes_overwrite(backend):
        return backend
    return _WithOverwrite(backend)
