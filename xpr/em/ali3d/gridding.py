"""Kaiser–Bessel gridding on an oversampled Fourier grid (Jackson et al. 1991; Beatty et al. 2005).

A volume of n³ voxels is padded to (npad·n)³ before its Fourier transform, so its Fourier samples lie
npad times closer than the Nyquist spacing and a short kernel interpolates between them accurately.
The kernel, over a width of W grid cells (|u| ≤ W/2),

    c(u) = β / (W sinh β) · I0(β √(1 − (2u/W)²)),

has the continuous Fourier transform (ξ in cycles per grid cell of the padded box)

    C(ξ) = β / sinh β · sinh(√(β² − (π W ξ)²)) / √(β² − (π W ξ)²),   C(0) = 1,

which is the apodisation that interpolation with c(u) multiplies the real-space object by; dividing
it out (before projecting, after reconstructing) is the gridding correction.  β is Beatty's choice
for width W and oversampling σ = npad:  β = π √((W/σ)² (σ − ½)² − 0.8).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import i0


@dataclass(frozen=True)
class KaiserBessel:
    width: int = 4            # kernel support W in grid cells of the padded Fourier grid
    oversampling: float = 2.0  # npad
    table_size: int = 4096    # samples of c(|u|) on [0, W/2] used by `neighbours` (linear interpolation)
    table: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        samples = np.linspace(0.0, self.width / 2.0, self.table_size + 1)
        object.__setattr__(self, "table", np.append(self.kernel(samples), 0.0).astype(np.float32))

    @property
    def beta(self) -> float:
        sigma, w = float(self.oversampling), float(self.width)
        return float(np.pi * np.sqrt(max((w / sigma) ** 2 * (sigma - 0.5) ** 2 - 0.8, 1.0)))

    def kernel(self, u):
        """c(u) for offsets u in grid cells (zero outside |u| ≤ W/2)."""
        u = np.asarray(u, dtype=float)
        arg = 1.0 - (2.0 * u / self.width) ** 2
        inside = arg >= 0.0
        value = i0(self.beta * np.sqrt(np.where(inside, arg, 0.0))) * (self.beta / (self.width * np.sinh(self.beta)))
        return np.where(inside, value, 0.0)

    def apodization(self, xi):
        """C(ξ), ξ in cycles per padded-grid cell (a real-space position divided by the padded box)."""
        xi = np.asarray(xi, dtype=float)
        s = self.beta ** 2 - (np.pi * self.width * xi) ** 2
        root = np.sqrt(np.abs(s))
        safe = np.where(root > 1e-8, root, 1.0)
        value = np.where(s > 0, np.sinh(safe) / safe, np.sin(safe) / safe)
        value = np.where(root > 1e-8, value, 1.0)
        return value * self.beta / np.sinh(self.beta)

    def neighbours(self, u):
        """First grid index and the W weights of every coordinate u (grid units): arrays (m,), (m, W).

        The neighbours of u are j0, j0 + 1, …, j0 + W − 1 with j0 = ceil(u − W/2)."""
        u = np.asarray(u, dtype=np.float64)
        first = np.ceil(u - self.width / 2.0)
        offset = (u - first).astype(np.float32)            # in [W/2 − 1, W/2): float32 is exact enough
        distance = np.abs(offset[..., None] - np.arange(self.width, dtype=np.float32))
        position = np.minimum(distance * np.float32(2.0 * self.table_size / self.width), np.float32(self.table_size))
        index = position.astype(np.int32)
        fraction = position - np.floor(position)           # float32, as the weights
        return first.astype(np.int64), self.table[index] * (1.0 - fraction) + self.table[index + 1] * fraction


def correction_3d(kb: KaiserBessel, n: int, padded: int):
    """C(x/padded) C(y/padded) C(z/padded) on the n³ box centred at n // 2, float32."""
    c = kb.apodization((np.arange(n) - n // 2) / padded).astype(np.float32)
    return c[:, None, None] * c[None, :, None] * c[None, None, :]


def centred_frequencies(n: int):
    """Integer frequencies of numpy's FFT order (0, 1, …, −1) for an n-box."""
    return np.fft.fftfreq(n, 1.0 / n).round().astype(np.int64)


def rfft2(backend, images):
    """Half-plane 2-D Fourier transform over the last two axes, through the backend's FFTs."""
    return backend.fft(backend.rfft(images, axis=-1), axis=-2)


def irfft2(backend, spectra, box: int):
    """Inverse of rfft2 for real box×box images."""
    return backend.irfft(backend.ifft(spectra, axis=-2), axis=-1, n=box)
