"""One place decides numpy, cupy or the emulated device, and every FFT goes through here.

    spec = BackendSpec.from_settings(settings)   # GPU.use, GPU.precision, XPR_DEVICE: read once
    backend = spec.create()                       # in this process or in a worker (the spec pickles)
    backend = Backend.from_settings(settings)     # both at once
    xp = backend.xp                               # numpy, cupy, or the emulated device's namespace
    F = backend.fftn(x, axes=(-2, -1))             # scipy.fft (this process's cores) or cupyx.scipy.fft

Devices: "cpu" (numpy + scipy.fft), "cuda" (cupy + cupyx.scipy.fft) and "emulated" (xpr.emulated:
arrays on the CPU that refuse implicit conversion to numpy as cupy's do, so the device path of
every kernel is exercised without a GPU). `XPR_DEVICE=emulated` in the environment makes the
emulated device stand in for the CUDA device: `GPU.use: auto` and `true` resolve to it, `false`
stays on numpy. Kernels take a Backend (or its xp) and never import numpy/cupy for arrays that may
live on a device; they move data with `asarray`/`asnumpy` and scatter-add with `scatter_add`.

Complex64 / float32 by default; `precision: double` in the GPU group gives complex128.
FFT normalisation is numpy's "backward" everywhere (forward unscaled, inverse 1/N); kernels may
pass `overwrite_x=True` where the input is no longer needed, saving a copy per transform.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from xpr.errors import SettingsError
from xpr.options import options, setting

DEVICES = ("cpu", "cuda", "emulated")


def gpu_available() -> bool:
    """A CUDA device with cupy (the real one; see `device_available` for the emulated one)."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "no GPU" here
        return False


def gpu_ids() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them ([] without)."""
    if not gpu_available():
        return []
    import cupy

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = cupy.cuda.runtime.getDeviceCount()
    if visible:
        return [name.strip() for name in visible.split(",") if name.strip()][:count]
    return [str(i) for i in range(count)]


def emulated_requested() -> bool:
    """True when XPR_DEVICE=emulated (SettingsError for another non-empty value)."""
    value = os.environ.get("XPR_DEVICE", "").strip().lower()
    if value not in ("", "emulated"):
        raise SettingsError(f"XPR_DEVICE must be 'emulated' or unset, not {value!r}", key="XPR_DEVICE")
    return value == "emulated"


def device_available() -> bool:
    """A device for `GPU.use`: the emulated one under XPR_DEVICE=emulated, else a CUDA one."""
    return emulated_requested() or gpu_available()


def device_note() -> str | None:
    """The line every run logs under XPR_DEVICE=emulated (None otherwise)."""
    if emulated_requested():
        return ("device: emulated device (XPR_DEVICE=emulated): GPU.use auto/true run on CPU arrays that "
                "refuse implicit numpy conversion as cupy's do")
    return None


def default_fft_workers() -> int:
    """Threads per FFT: all cores (-1), or what xpr.parallel gives each worker process."""
    value = os.environ.get("XPR_FFT_WORKERS")
    return int(value) if value else -1


@options(None)
class GpuOptions:
    """The documented `GPU` group every command shares (xpr.settings.COMMON_DEFAULTS)."""

    use: bool | str = setting("GPU.use")
    precision: str = setting("GPU.precision")


def gpu_options(settings) -> GpuOptions:
    """The GPU group of a settings mapping; a mapping without one runs on the CPU."""
    gpu = settings.get("GPU") if settings is not None and hasattr(settings, "get") else None
    return GpuOptions(use=False) if gpu is None else GpuOptions.from_block(gpu)


@dataclass(frozen=True)
class BackendSpec:
    """What a backend is, resolved once from the settings, and sent to worker processes.

    device: cpu | cuda | emulated; precision: single | double; fft_workers: CPU threads per FFT
    (None: this process's share, XPR_FFT_WORKERS or all cores, read where the backend is made);
    device_id: the CUDA device to use (None: the current one, i.e. the first visible).
    """

    device: str = "cpu"
    precision: str = "single"
    fft_workers: int | None = None
    device_id: int | None = None

    def __post_init__(self):
        if self.device not in DEVICES:
            raise SettingsError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.precision not in ("single", "double"):
            raise SettingsError(f"precision must be 'single' or 'double', not {self.precision!r}",
                                key="GPU.precision")

    @property
    def on_device(self) -> bool:
        """True for the CUDA and the emulated device (arrays that are not numpy's)."""
        return self.device != "cpu"

    @classmethod
    def from_settings(cls, settings=None) -> "BackendSpec":
        """From a settings mapping with an optional `GPU: {use: auto|true|false, precision}` group
        (the only place GPU.use and GPU.precision are read)."""
        gpu = gpu_options(settings)
        use, precision = gpu.use, gpu.precision
        emulated = emulated_requested()
        if use in ("auto", None):
            device = "emulated" if emulated else ("cuda" if gpu_available() else "cpu")
        elif use is True or use in ("true", "True"):
            if emulated:
                device = "emulated"
            elif gpu_available():
                device = "cuda"
            else:
                raise SettingsError("GPU.use is true but no CUDA device with cupy was found "
                                    "(install xpr[gpu] or set GPU.use: auto)", key="GPU.use")
        elif use is False or use in ("false", "False"):
            device = "cpu"
        else:
            raise SettingsError(f"GPU.use must be auto, true or false, not {use!r}", key="GPU.use")
        return cls(device, precision)

    def gpus(self) -> list[str] | None:
        """The CUDA devices to spread work over (one worker each), or None off cupy."""
        return gpu_ids() or None if self.device == "cuda" else None

    def create(self) -> "Backend":
        return Backend(device=self.device, precision=self.precision, fft_workers=self.fft_workers,
                       device_id=self.device_id)


class Backend:
    def __init__(self, use_gpu: bool = False, precision: str = "single", fft_workers: int | None = None,
                 device: str | None = None, device_id: int | None = None):
        """device: cpu | cuda | emulated (default: cuda if use_gpu else cpu).
        fft_workers: CPU threads per FFT (default: all, or this process's share under
        xpr.parallel); 1 suits many tiny transforms, where thread start-up dominates."""
        device = device or ("cuda" if use_gpu else "cpu")
        self.spec = BackendSpec(device, precision, fft_workers, device_id)
        self.device = device
        self.precision = precision
        self.is_gpu = device != "cpu"        # the device path (cupy or its emulation)
        self.emulated = device == "emulated"
        self._fft_kwargs = {}
        self._cpu_loops = None
        if device == "cuda":
            import cupy
            import cupyx.scipy.fft as gpu_fft

            if device_id is not None:
                cupy.cuda.Device(int(device_id)).use()
            self.xp = cupy
            self._fft = gpu_fft
        else:
            import scipy.fft as cpu_fft

            self._fft = cpu_fft
            self._fft_kwargs = {"workers": fft_workers if fft_workers is not None else default_fft_workers()}
            if device == "emulated":
                from xpr.emulated import Device

                self.emulator = Device()
                self.xp = self.emulator.xp
            else:
                self.xp = np
        self.complex_dtype = np.complex64 if precision == "single" else np.complex128
        self.real_dtype = np.float32 if precision == "single" else np.float64

    @classmethod
    def from_settings(cls, settings=None) -> "Backend":
        """From a settings mapping with an optional `GPU: {use: auto|true|false, precision}` group."""
        return BackendSpec.from_settings(settings).create()

    def __repr__(self):
        name = {"cpu": "numpy", "cuda": "cupy", "emulated": "emulated device"}[self.device]
        return f"Backend({name}, {self.precision})"

    @property
    def compiled_loops(self):
        """The phasing iteration's compiled elementwise loops: numba's on the CPU, on as many
        threads as the FFTs (xpr.phasing.loops.ThreadedLoops, one per backend), CUDA elementwise kernels on cupy (xpr.phasing.device_loops); None on
        the emulated device, where the kernels keep their array expressions."""
        if self.device == "cpu":
            if self._cpu_loops is None:
                from xpr.parallel import available_cpus
                from xpr.phasing.loops import ThreadedLoops

                workers = self._fft_kwargs["workers"]
                self._cpu_loops = ThreadedLoops(workers if workers > 0 else available_cpus())
            return self._cpu_loops
        if self.device == "cuda":
            from xpr.phasing import device_loops

            return device_loops.for_module(self.xp)
        return None

    # --- arrays -------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        """To this backend's device (a copy when host data goes to a device)."""
        return self.xp.asarray(a, dtype=dtype)

    def asnumpy(self, a):
        """To a numpy array on the host (a copy from a device; numpy arrays pass through)."""
        if self.device == "cuda":
            return self.xp.asnumpy(a)
        if self.emulated:
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def rng(self, seed=None):
        """A seeded Generator on the device (numpy.random.Generator or cupy's)."""
        return self.xp.random.default_rng(seed)

    def scatter_add(self, target, indices, values):
        """target[indices] += values, adding every repeated index (numpy's add.at).

        On cupy through cupy.add.at (cupyx.scatter_add is deprecated), whose atomic adds serve
        real types only: a complex target is added to as its real and imaginary parts (views of
        the same memory)."""
        if self.device == "cuda":
            xp = self.xp
            if xp.iscomplexobj(target):
                parts = target.view(target.real.dtype).reshape(target.shape + (2,))
                values = xp.asarray(values, dtype=target.dtype)
                xp.add.at(parts[..., 0], indices, values.real)
                xp.add.at(parts[..., 1], indices, values.imag)
            else:
                xp.add.at(target, indices, values)
            return target
        if self.emulated:
            np.add.at(self.emulator.unwrap(target, "scatter_add"), self.emulator.unwrap(indices, "scatter_add"),
                      self.emulator.unwrap(values, "scatter_add"))
            return target
        np.add.at(target, indices, values)
        return target

    # --- FFTs -----------------------------------------------------------------------------
    def _call(self, name, a, **kwargs):
        if self.emulated:   # cupyx.scipy.fft takes device arrays only
            device = self.emulator
            return device.wrap(getattr(self._fft, name)(device.unwrap(a, f"backend.{name}"), **kwargs))
        return getattr(self._fft, name)(a, **kwargs)

    def fftn(self, a, axes=None, overwrite_x=False):
        return self._call("fftn", a, axes=axes, overwrite_x=overwrite_x, **self._fft_kwargs)

    def ifftn(self, a, axes=None, overwrite_x=False):
        return self._call("ifftn", a, axes=axes, overwrite_x=overwrite_x, **self._fft_kwargs)

    def fft2(self, a, axes=(-2, -1), overwrite_x=False):
        return self._call("fft2", a, axes=axes, overwrite_x=overwrite_x, **self._fft_kwargs)

    def ifft2(self, a, axes=(-2, -1), overwrite_x=False):
        return self._call("ifft2", a, axes=axes, overwrite_x=overwrite_x, **self._fft_kwargs)

    def fft(self, a, axis=-1, n=None, overwrite_x=False):
        return self._call("fft", a, n=n, axis=axis, overwrite_x=overwrite_x, **self._fft_kwargs)

    def ifft(self, a, axis=-1, n=None, overwrite_x=False):
        return self._call("ifft", a, n=n, axis=axis, overwrite_x=overwrite_x, **self._fft_kwargs)

    def rfft(self, a, axis=-1, n=None):
        return self._call("rfft", a, n=n, axis=axis, **self._fft_kwargs)

    def irfft(self, a, axis=-1, n=None):
        return self._call("irfft", a, n=n, axis=axis, **self._fft_kwargs)

    def fftshift(self, a, axes=None):
        return self._call("fftshift", a, axes=axes)

    def ifftshift(self, a, axes=None):
        return self._call("ifftshift", a, axes=axes)

    def fftfreq(self, n, d=1.0):
        """Sample frequencies, on the device (as cupyx.scipy.fft.fftfreq gives them)."""
        if self.emulated:
            return self.emulator.wrap(self._fft.fftfreq(n, d=d))
        return self._fft.fftfreq(n, d=d)


def from_settings(settings=None) -> Backend:
    return Backend.from_settings(settings)


def spec_from_settings(settings=None) -> BackendSpec:
    return BackendSpec.from_settings(settings)


def cpu_only(settings, log, what: str, reason: str) -> Backend:
    """The numpy backend of a path that runs on the CPU by design, saying so.

    GPU.use is checked as everywhere (true without a device: SettingsError, exit 2); when it
    would give a device (true, or auto with one present or emulated) the run's log states that
    `what` runs on the CPU and why, as a warning when the settings asked for the GPU (true)."""
    spec = BackendSpec.from_settings(settings)
    if spec.on_device:
        asked = gpu_options(settings).use in (True, "true", "True")
        (log.warning if asked else log.info)(
            "%s runs on the CPU by design (%s)%s", what, reason,
            "; GPU.use: true has no effect here" if asked else f"; the {spec.device} device is not used")
    return cpu(spec.precision)


def cpu(precision: str = "single") -> Backend:
    """numpy, whatever the settings and XPR_DEVICE say: for paths that are CPU-only by design."""
    return Backend(False, precision)


def to_host(a):
    """A numpy array of `a`, wherever it lives (for code holding an array but no Backend;
    kernels with a backend call `backend.asnumpy`)."""
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy.asnumpy(a)
    from xpr.emulated import DeviceArray

    if isinstance(a, DeviceArray):
        return a.get()
    return np.asarray(a)
