"""One place decides numpy or cupy, and every FFT goes through here.

    backend = Backend.from_settings(settings)    # reads settings.GPU.use: auto | true | false
    xp = backend.xp                               # numpy or cupy
    F = backend.fftn(x, axes=(-2, -1))             # scipy.fft (all cores) or cupyx.scipy.fft

Kernels take a Backend (or its xp) and never import numpy/cupy for arrays that may live on a GPU.
Complex64 / float32 by default; `precision: double` in the GPU group gives complex128.
FFT normalisation is numpy's "backward" everywhere (forward unscaled, inverse 1/N); kernels may
pass `overwrite_x=True` where the input is no longer needed, saving a copy per transform.
"""
from __future__ import annotations

import os

import numpy as np

from xpr.errors import SettingsError


def gpu_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "no GPU" here
        return False


def default_fft_workers() -> int:
    """Threads per FFT: all cores (-1), or what xpr.parallel gives each worker process."""
    value = os.environ.get("XPR_FFT_WORKERS")
    return int(value) if value else -1


class Backend:
    def __init__(self, use_gpu: bool = False, precision: str = "single", fft_workers: int | None = None):
        """fft_workers: CPU threads per FFT (default: all, or this process's share under
        xpr.parallel); 1 suits many tiny transforms, where thread start-up dominates."""
        if precision not in ("single", "double"):
            raise SettingsError(f"precision must be 'single' or 'double', not {precision!r}", key="GPU.precision")
        self.is_gpu = bool(use_gpu)
        self.precision = precision
        if self.is_gpu:
            import cupy
            import cupyx.scipy.fft as gpu_fft

            self.xp = cupy
            self._fft = gpu_fft
            self._fft_kwargs = {}
        else:
            import scipy.fft as cpu_fft

            self.xp = np
            self._fft = cpu_fft
            self._fft_kwargs = {"workers": fft_workers if fft_workers is not None else default_fft_workers()}
        self.complex_dtype = self.xp.complex64 if precision == "single" else self.xp.complex128
        self.real_dtype = self.xp.float32 if precision == "single" else self.xp.float64

    @classmethod
    def from_settings(cls, settings=None) -> "Backend":
        """From a settings mapping with an optional `GPU: {use: auto|true|false, precision}` group."""
        gpu = settings.get("GPU") if settings is not None and hasattr(settings, "get") else None
        use = gpu.get("use", "auto") if gpu is not None else False
        precision = gpu.get("precision", "single") if gpu is not None else "single"
        if use in ("auto", None):
            use_gpu = gpu_available()
        elif use is True or use in ("true", "True"):
            if not gpu_available():
                raise SettingsError("GPU.use is true but no CUDA device with cupy was found "
                                    "(install xpr[gpu] or set GPU.use: auto)", key="GPU.use")
            use_gpu = True
        else:
            use_gpu = False
        return cls(use_gpu, precision)

    def __repr__(self):
        return f"Backend({'cupy' if self.is_gpu else 'numpy'}, {self.precision})"

    # --- arrays -------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def asnumpy(self, a):
        if self.is_gpu:
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def rng(self, seed=None):
        """A seeded Generator on the device (numpy.random.Generator or cupy's)."""
        return self.xp.random.default_rng(seed)

    # --- FFTs -----------------------------------------------------------------------------
    def fftn(self, a, axes=None, overwrite_x=False):
        return self._fft.fftn(a, axes=axes, overwrite_x=overwrite_x, **self._fft_kwargs)

    def ifftn(self, a, axes=None, overwrite_x=False):
        return self._fft.ifftn(a, axes=axes, overwrite_x=overwrite_x, **self._fft_kwargs)

    def fft2(self, a, axes=(-2, -1), overwrite_x=False):
        return self._fft.fft2(a, axes=axes, overwrite_x=overwrite_x, **self._fft_kwargs)

    def ifft2(self, a, axes=(-2, -1), overwrite_x=False):
        return self._fft.ifft2(a, axes=axes, overwrite_x=overwrite_x, **self._fft_kwargs)

    def fft(self, a, axis=-1, n=None, overwrite_x=False):
        return self._fft.fft(a, n=n, axis=axis, overwrite_x=overwrite_x, **self._fft_kwargs)

    def ifft(self, a, axis=-1, n=None, overwrite_x=False):
        return self._fft.ifft(a, n=n, axis=axis, overwrite_x=overwrite_x, **self._fft_kwargs)

    def rfft(self, a, axis=-1, n=None):
        return self._fft.rfft(a, n=n, axis=axis, **self._fft_kwargs)

    def irfft(self, a, axis=-1, n=None):
        return self._fft.irfft(a, n=n, axis=axis, **self._fft_kwargs)

    def fftshift(self, a, axes=None):
        return self._fft.fftshift(a, axes=axes)

    def ifftshift(self, a, axes=None):
        return self._fft.ifftshift(a, axes=axes)

    def fftfreq(self, n, d=1.0):
        return self._fft.fftfreq(n, d=d)


def from_settings(settings=None) -> Backend:
    return Backend.from_settings(settings)


def cpu() -> Backend:
    return Backend(False)
