"""Projections of a volume by central-slice extraction with Kaiser–Bessel gridding.

Preparation (once per reference): divide the volume by the gridding apodisation C, pad it npad
times, Fourier transform it and keep the cube of frequencies the slices can reach.  Projection
(once per orientation A and shift o): for every frequency k = (kx, ky) of the image's half plane
within the chosen radius, interpolate V̂ at Aᵀ(kx, ky, 0) (padded-grid units: npad · that) with the
W³ kernel weights, multiply by exp(−2πi k·(o + c)/n) (shift by o, origin at the box centre c = n//2)
and by the CTF if any, and inverse-transform.  Frequencies beyond the radius are set to zero, which
is a sharp low-pass: the radius is chosen from the reference's resolution.

With `method="nufft"` the slices are instead exact evaluations of the volume's discrete-time Fourier
transform V̂(q) = Σ_r v(r) exp(−2πi q·(r − c)/n) at q = Aᵀ(kx, ky, 0) (r the voxel index, c = n//2),
by ducc0's type-2 non-uniform FFT (`ducc0.nufft.u2nu`) to a relative accuracy `epsilon`: no padding
cube, no apodisation correction, and no interpolation error (the W = 3 kernel's is ≈ 0.5 % on the blob
phantom, and it cost 0.06° of the SNR-1 angular error against the true volume, docs/local_ali3d.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xpr.em.ali3d.gridding import KaiserBessel, centred_frequencies, correction_3d, irfft2


@dataclass
class Projector:
    box: int                 # n, the image and volume box in pixels
    npad: int
    kernel: KaiserBessel
    radius: float            # highest frequency of the slices, in pixels of the n-box (< n/2)
    cube: np.ndarray         # flattened (2h+1)³ centred Fourier cube of the padded, corrected volume
    half: int                # h: index of frequency 0 in the cube
    rows: np.ndarray         # row (ky) index of each slice point in the image's rfft array
    cols: np.ndarray         # column (kx) index
    kx: np.ndarray           # integer frequencies of the slice points
    ky: np.ndarray
    frequencies: np.ndarray  # (2, m): kx, ky of the slice points, float64
    method: str = "gridding"  # gridding (the W³ kernel on the padded cube) | nufft (ducc0, exact to epsilon)
    grid: np.ndarray | None = None  # nufft: the volume, complex128 [z, y, x]
    epsilon: float = 1e-5     # nufft: requested relative accuracy of the slice values

    def nufft_plan(self):
        """A ducc0 plan that transforms the (oversampled) volume once and then evaluates any points
        (`experimental.incremental_u2nu`; None where this ducc0 lacks it: each call of
        `nufft_slices` then transforms the volume again — measured 5× slower per simplex step at 64³).
        Not shareable between threads: one per search (refine.BatchedCriterion)."""
        import ducc0

        experimental = getattr(ducc0.nufft, "experimental", None)
        if self.method != "nufft" or not hasattr(experimental, "incremental_u2nu"):
            return None
        return experimental.incremental_u2nu(grid=self.grid, forward=True, epsilon=self.epsilon,
                                             nthreads=nufft_threads())

    def slice(self, matrix):
        """V̂ on the central slice of orientation `matrix` (3×3): complex64 values at (kx, ky)."""
        if self.method == "nufft":
            return nufft_slices(self, np.asarray(matrix)[None])[0]
        rows = np.asarray(matrix, dtype=np.float64)[:2] * float(self.npad)
        coordinates = rows.T @ self.frequencies + self.half          # (3, m): x, y, z in cube cells
        return gridded_slices(self, coordinates[None])[0]

    def shift_phase(self, shift_px):
        """exp(−2πi k·(o + c)/n): translate by the origin offset o and put the origin at c = n//2."""
        c = self.box // 2
        return np.exp((-2j * np.pi / self.box) * (self.kx * (shift_px[0] + c) + self.ky * (shift_px[1] + c)))

    def to_image(self, values, backend):
        """Real n×n image from half-plane Fourier values at the slice points."""
        spectrum = np.zeros((self.box, self.box // 2 + 1), dtype=np.complex64)
        spectrum[self.rows, self.cols] = values
        return backend.asnumpy(irfft2(backend, backend.asarray(spectrum), self.box)).astype(np.float32)

    def project(self, matrix, backend, shift_px=(0.0, 0.0), weight=None):
        """Projection image in orientation `matrix`, translated by shift_px (x, y), times `weight` (CTF)."""
        values = self.slice(matrix) * self.shift_phase(shift_px)
        if weight is not None:
            values = values * weight
        return self.to_image(values, backend)


def gridded_slices(projector: Projector, coordinates):
    """V̂ at the points `coordinates` (b, 3, m) — x, y, z in cube cells of the projector's padded
    cube — interpolated with the W³ Kaiser–Bessel kernel: complex64 (b, m).  The weights are made
    as KaiserBessel.neighbours makes them and the W³ sum is taken in float64 by the compiled loop
    spreading.slices (its numpy form, np.take of the W³ neighbours and two matmuls, took two thirds
    of a simplex step's criterion)."""
    from xpr.em.ali3d import spreading

    coordinates = np.ascontiguousarray(coordinates, dtype=np.float64)
    out = np.empty((coordinates.shape[0], coordinates.shape[2]), np.complex64)
    spreading.slices(projector.cube, 2 * projector.half + 1, coordinates, *spreading.table_arguments(projector.kernel),
                     out)
    return out


def nufft_threads() -> int:
    """ducc0's threads: this process's CPU share (XPR_FFT_WORKERS under xpr.parallel, else all
    cores), as the insertion's threads (reconstruct.insertion_threads)."""
    import os

    from xpr.parallel import available_cpus

    share = os.environ.get("XPR_FFT_WORKERS")
    return int(share) if share and int(share) > 0 else available_cpus()


def nufft_slices(projector: Projector, matrices, frequencies=None, plan=None):
    """V̂ on the central slices of orientations (b, 3, 3) at the points `frequencies` (2, m) (default
    the projector's), by ducc0's type-2 NUFFT: complex64 (b, m).  ducc0's grid index i stands for
    the position i − n//2 (fftorder False) and forward=True is exp(−i x·coord), so coord = 2π q / n
    with q's components in the volume's axis order (z, y, x).  plan: Projector.nufft_plan() (the
    volume's transform made once), else ducc0.nufft.u2nu transforms it on every call."""
    import ducc0

    frequencies = projector.frequencies if frequencies is None else frequencies
    rows = np.asarray(matrices, dtype=np.float64)[:, :2, :]                        # (b, 2, 3)
    q = np.einsum("bji,jm->bmi", rows, frequencies)                               # (b, m, 3): x, y, z
    coordinates = np.ascontiguousarray((2.0 * np.pi / projector.box) * q[..., ::-1].reshape(-1, 3))
    if plan is not None:
        values = plan.get_points(coord=coordinates)
    else:
        values = ducc0.nufft.u2nu(grid=projector.grid, coord=coordinates, forward=True,
                                  epsilon=projector.epsilon, nthreads=nufft_threads())
    return values.reshape(q.shape[:2]).astype(np.complex64)


def half_plane_points(box: int, radius: float):
    """Rows, columns and integer frequencies (kx ≥ 0) of an n-box rfft array within `radius`."""
    ky_all = centred_frequencies(box)
    kx_all = np.arange(box // 2 + 1)
    ky, kx = np.meshgrid(ky_all, kx_all, indexing="ij")
    rows, cols = np.meshgrid(np.arange(box), kx_all, indexing="ij")
    inside = (kx * kx + ky * ky) <= radius * radius
    return rows[inside], cols[inside], kx[inside].astype(np.float64), ky[inside].astype(np.float64)


def prepare_projector(volume, backend, npad: int = 2, kernel_width: int = 4, radius: float | None = None,
                      frequencies=None, method: str = "gridding", epsilon: float = 1e-5):
    """Projector of a cubic volume (n³): slices reach `radius` pixels in frequency (default n/2 − 1).

    frequencies: optional (2, m) array of (kx, ky) in pixels of the n-box at which `slice` samples
    instead of the image's own half plane (the reconstruction's padded sample points).
    method: `gridding` (W³ Kaiser–Bessel kernel on the padded transform) or `nufft` (ducc0, exact
    to `epsilon`; npad and kernel_width are then unused)."""
    volume = np.asarray(volume, dtype=np.float32)
    box = volume.shape[0]
    padded_box = npad * box
    kb = KaiserBessel(kernel_width, float(npad))
    if frequencies is not None:
        radius = float(np.sqrt((np.asarray(frequencies) ** 2).sum(axis=0)).max())
    radius = float(box // 2 - 1 if radius is None else min(radius, box // 2 - 1)) if frequencies is None else radius
    if method == "nufft":
        if frequencies is None:
            rows, cols, kx, ky = half_plane_points(box, radius)
        else:
            kx, ky = (np.asarray(f, dtype=np.float64) for f in frequencies)
            rows = cols = np.zeros(0, dtype=np.int64)
        return Projector(box=box, npad=npad, kernel=kb, radius=radius, cube=np.zeros(0, np.complex64), half=0,
                         rows=rows, cols=cols, kx=kx, ky=ky,
                         frequencies=np.stack([kx, ky]), method="nufft",
                         grid=np.ascontiguousarray(volume, dtype=np.complex128), epsilon=float(epsilon))
    if method != "gridding":
        raise ValueError(f"projector method {method!r}: gridding or nufft")
    corrected = volume / correction_3d(kb, box, padded_box)
    padded = np.zeros((padded_box,) * 3, dtype=np.float32)
    start = padded_box // 2 - box // 2
    padded[start:start + box, start:start + box, start:start + box] = corrected
    spectrum = backend.asnumpy(backend.fftshift(backend.fftn(backend.ifftshift(backend.asarray(padded)))))
    half = int(math.ceil(npad * radius)) + kernel_width // 2 + 2
    index = (padded_box // 2 + np.arange(-half, half + 1)) % padded_box
    cube = spectrum[np.ix_(index, index, index)].astype(np.complex64)
    if frequencies is None:
        rows, cols, kx, ky = half_plane_points(box, radius)
    else:
        kx, ky = (np.asarray(f, dtype=np.float64) for f in frequencies)
        rows = cols = np.zeros(0, dtype=np.int64)
    return Projector(box=box, npad=npad, kernel=kb, radius=radius, cube=cube.ravel(), half=half,
                     rows=rows, cols=cols, kx=kx, ky=ky, frequencies=np.stack([kx, ky]))
