"""Direct Fourier inversion with Kaiser–Bessel gridding, padding and point-group symmetry.

Every image I_i (orientation A_i, origin offset o_i, CTF weight t_i(k)) is padded npad times and
Fourier transformed; its half-plane samples within the Nyquist radius are centred,
Î_i(k) exp(+2πi k·o_i / n'), and spread onto the padded 3-D Fourier grid at Aᵀ(kx, ky, 0) — once for
every rotation g of the point group, at (A g)ᵀ(kx, ky, 0) — with the kernel weights c:

    D(j)  += c · t · Î,      T(j) += c · t²,      N(j) += c.

The grid is made Hermitian (D(j) + conj D(−j), …), and the volume's transform is the kernel-weighted
Wiener estimate V̂(j) = D(j) / (T(j) + 1/snr)  with CTF, D(j) / N(j) without (a kernel-weighted
average of the samples around j).  The kernel weights of one sample sum to 1 (within 0.1 %), so T
counts samples times CTF²: the regulariser 1/snr is one image's worth (snr: the spectral SNR of one
image), as in RELION's V̂ = Σ CTF·Î / (Σ CTF² + 1/τ²), and its bias fades as images accumulate.
(A regulariser N/snr, one per sample, never fades: with snr = 1 it kept every frequency shrunk by
⟨CTF²⟩/(⟨CTF²⟩ + 1), the low ones — CTF ≈ Q = 0.1 — almost to nothing; exact CTF projections then
reconstructed with correlation 0.81 to the phantom instead of 0.99.)  Because the samples are averaged with the kernel, the result is the
volume times the apodisation C; the inverse transform is divided by it (gridding correction) and
cropped to n³.  D, T and N are sums over images, so the reference can be updated chunk by chunk by
taking a chunk's old insertions out and putting its refined ones in (`sign = −1`, then `+1`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpr.em.ali3d import ctf as ctf_model
from xpr.em.ali3d.gridding import KaiserBessel, centred_frequencies, correction_3d, rfft2


@dataclass
class FourierGrid:
    """The three accumulators D, T, N on a (2h+1)³ centred Fourier grid of the padded box."""
    box: int
    npad: int
    kernel: KaiserBessel
    half: int
    data: np.ndarray        # complex128, flat
    ctf_weight: np.ndarray  # float64, flat: Σ c t²
    count: np.ndarray       # float64, flat: Σ c

    @classmethod
    def empty(cls, box: int, npad: int = 2, kernel_width: int = 4) -> "FourierGrid":
        half = npad * box // 2 + kernel_width // 2 + 1
        size = (2 * half + 1) ** 3
        return cls(box, npad, KaiserBessel(kernel_width, float(npad)), half,
                   np.zeros(size, np.complex128), np.zeros(size), np.zeros(size))

    def add(self, other: "FourierGrid"):
        self.data += other.data
        self.ctf_weight += other.ctf_weight
        self.count += other.count

    def combined(self, other: "FourierGrid") -> "FourierGrid":
        """The grid of the union of two image sets (e.g. the two half sets)."""
        return FourierGrid(self.box, self.npad, self.kernel, self.half, self.data + other.data,
                           self.ctf_weight + other.ctf_weight, self.count + other.count)


@dataclass
class InsertionBatch:
    """Everything a worker needs to insert a batch of images (see `insert_batch`)."""
    images: np.ndarray       # (b, n, n) float32, CTF-phase-flipped already if that is the mode
    matrices: np.ndarray     # (b, 3, 3) orientations
    shifts_px: np.ndarray    # (b, 2) origin offsets
    group: np.ndarray        # (g, 3, 3) point group
    npad: int = 2
    kernel_width: int = 4
    signs: np.ndarray | None = None  # per image: +1 insert (default), −1 take out
    ctf: object = None       # ctf.CTFParameters of these images, or None
    ctf_mode: str = "none"   # none | phase_flip | wiener
    pixel_size_A: float = 1.0
    estimate: object = None  # project.Projector of the current volume at the padded points: insert residuals
    max_radius: float | None = None  # only frequencies up to this (pixels of the n-box) are inserted
    weights: bool = True     # also sum N and T (False: D only, for residuals whose N, T the caller has)


def padded_points(box: int, npad: int):
    """Rows, columns and integer frequencies (padded units) of the padded rfft within Nyquist."""
    padded = npad * box
    radius = padded // 2 - 1
    ky_all = centred_frequencies(padded)
    kx_all = np.arange(padded // 2 + 1)
    ky, kx = np.meshgrid(ky_all, kx_all, indexing="ij")
    rows, cols = np.meshgrid(np.arange(padded), kx_all, indexing="ij")
    inside = kx * kx + ky * ky <= radius * radius
    return rows[inside], cols[inside], kx[inside].astype(np.float64), ky[inside].astype(np.float64)


def padded_transforms(images, shifts_px, npad: int, backend):
    """Centred half-plane transforms of the images padded npad times, at `padded_points`."""
    b, box, _ = images.shape
    padded_box = npad * box
    padded = np.zeros((b, padded_box, padded_box), dtype=np.float32)
    start = padded_box // 2 - box // 2
    padded[:, start:start + box, start:start + box] = images
    # origin of the transform at the box centre, then undo the origin offset: exp(+2πi k·o/n')
    spectra = backend.asnumpy(rfft2(backend, backend.ifftshift(backend.asarray(padded), axes=(-2, -1))))
    rows, cols, _, _ = padded_points(box, npad)
    # exp(2πi (kx ox + ky oy)/n') as a kx factor times a ky factor, made on the integer frequencies
    # of the padded rfft's columns and rows and gathered (no complex exponential per sample)
    angle = (2j * np.pi / padded_box) * np.asarray(shifts_px, dtype=np.float64)
    x_factor = np.exp(angle[:, :1] * np.arange(padded_box // 2 + 1)[None, :])
    y_factor = np.exp(angle[:, 1:] * centred_frequencies(padded_box)[None, :])
    return spectra[:, rows, cols] * (x_factor[:, cols] * y_factor[:, rows])


THREADED_PER_POINT = 32   # kernel contributions per grid point above which a batch's threads share it


def threaded(contributions: int, grid_points: int) -> bool:
    """Whether an insertion of this many kernel contributions is split between threads: each
    thread's grid of its own costs about as much as 16–32 contributions per grid point (measured:
    250 images of 64², 17 per point, 0.46 s with two threads, 0.40 s with one; 1000 images, 68 per
    point, 1.1 s against 1.55 s; 100 of 128², 4 per point, 2.1 s against 0.76 s)."""
    return contributions > THREADED_PER_POINT * grid_points


def insert_batch(batch: InsertionBatch, backend=None, into: FourierGrid | None = None) -> FourierGrid:
    """Kernel-weighted sums D, T, N of a batch of images (module-level: a parallel.map task),
    added to the grid `into` when one is given (and returned), else to a new one.

    A large batch is split between this process's threads (`insertion_threads`), each summing its
    share into a grid of its own (the compiled loops run without the GIL); the shares are added in
    turn.  A small one (a chunk's put-back within its band) is summed by one thread straight into
    the grid: whole-grid arrays per thread would cost more than its kernel contributions.
    With an estimate, each sample's prediction is gathered through the same W³ neighbours and
    weights the sample is then spread to."""
    if backend is None:
        from xpr.backend import cpu
        backend = cpu()
    box = batch.images.shape[-1]
    grid = into if into is not None else FourierGrid.empty(box, batch.npad, batch.kernel_width)
    values = padded_transforms(batch.images, batch.shifts_px, batch.npad, backend)
    _, _, kx, ky = padded_points(box, batch.npad)
    if batch.max_radius is not None:
        keep = kx * kx + ky * ky <= (batch.npad * batch.max_radius) ** 2
        values, kx, ky = values[:, keep], kx[keep], ky[keep]
    contributions = len(batch.images) * len(batch.group) * len(kx) * batch.kernel_width ** 3
    threads = insertion_threads(len(batch.images)) if threaded(contributions, grid.count.size) else 1
    parts = [part for part in np.array_split(np.arange(len(batch.images)), threads) if len(part)]
    if len(parts) == 1:
        _spread(batch, grid, values, kx, ky, parts[0])
        return grid
    from concurrent.futures import ThreadPoolExecutor

    shares = [FourierGrid.empty(box, batch.npad, batch.kernel_width) for _ in parts]   # each thread's own
    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(lambda part, share: _spread(batch, share, values, kx, ky, part), parts, shares))
    for share in shares:
        grid.add(share)
    return grid


def insertion_threads(n_images: int) -> int:
    """Threads for one insertion: this process's CPU share (XPR_FFT_WORKERS under xpr.parallel, else
    the available cores), at most one per image."""
    import os

    from xpr.parallel import available_cpus

    share = os.environ.get("XPR_FFT_WORKERS")
    cores = int(share) if share and int(share) > 0 else available_cpus()
    return max(1, min(cores, n_images))


def _spread(batch: InsertionBatch, grid: FourierGrid, values, kx, ky, images):
    """Add the kernel-weighted sums (D, and N, T where batch.weights) of the batch's images `images`
    (indices) to `grid`, one (image, point-group rotation) at a time, through the compiled loop
    spreading.spread.  With an estimate, the sample is first replaced by its residual: the value
    less the estimate's prediction, interpolated (spreading.slices) at the same point, so through
    the same neighbours and weights."""
    from xpr.em.ali3d import spreading

    kernel = spreading.table_arguments(grid.kernel)
    half, box = grid.half, batch.images.shape[-1]
    side = 2 * half + 1
    estimate = batch.estimate
    if estimate is not None:  # the estimate's cube is smaller: the same neighbours, moved by `shift`
        shift = estimate.half - half
        predicted = np.empty((1, len(kx)), np.complex64)
    signs = np.ones(len(batch.images)) if batch.signs is None else batch.signs
    with_ctf = batch.ctf is not None and batch.ctf_mode != "none"
    mode = spreading.WEIGHTS_NONE if not batch.weights else spreading.WEIGHTS_CTF if with_ctf else spreading.WEIGHTS_COUNT
    data = grid.data.view(np.float64)
    no_ctf = np.zeros(0, np.float32)
    for i in images:
        weight_t = None
        if with_ctf:
            weight_t = ctf_model.projection_weight(
                ctf_model.ctf_values(batch.ctf, i, kx, ky, batch.pixel_size_A, batch.npad * box), batch.ctf_mode)
        sign = np.float32(signs[i])
        ctf_squared = no_ctf if weight_t is None else (weight_t ** 2).astype(np.float32) * sign
        for g in batch.group:
            rows = batch.matrices[i] @ g  # (A g): its first two rows carry (kx, ky) into the volume frame
            coordinates = np.stack([kx * rows[0, j] + ky * rows[1, j] + half for j in range(3)])  # x, y, z
            sample = values[i] if weight_t is None else values[i] * weight_t
            if estimate is not None:  # what the current volume leaves unexplained
                spreading.slices(estimate.cube, 2 * estimate.half + 1, (coordinates + shift)[None], *kernel,
                                 predicted)
                sample = (values[i] - predicted[0] if weight_t is None
                          else (values[i] - weight_t * predicted[0]) * weight_t)
            # the float32 sample times the sign ±1 (exact), times the float32 kernel weights
            spreading.spread(coordinates, *kernel, sample.real.astype(np.float32) * sign,
                             sample.imag.astype(np.float32) * sign, ctf_squared, float(sign), side,
                             data, grid.count, grid.ctf_weight, mode)


def grid_to_volume(grid: FourierGrid, backend, snr: float | None = None):
    """V = IFT[D / (T + 1/snr)] / C with CTF (snr given), IFT[D / N] / C without; cropped to n³.

    The centred spectrum S (zero frequency at P/2 of the padded box P) is transformed as it is: for
    even P, IFT[S](x) = (−1)^x · IFT[ifftshift S](x) on each axis, so the centred volume's voxel m
    is (−1)^(m − n//2) · IFT[S]((m − n//2) mod P) — the two half-box shifts of the whole cube are a
    sign on the n³ crop."""
    shape = (2 * grid.half + 1,) * 3
    padded_box = grid.npad * grid.box
    lo = grid.half - padded_box // 2
    crop = (slice(lo, lo + padded_box),) * 3        # only the padded box's frequencies are transformed

    def hermitian(values):                          # a(j) + a(−j) on the cropped cube
        values = values.reshape(shape)
        return values[crop], values[::-1, ::-1, ::-1][crop]

    # the sums are float64 (chunks are added and taken out many times); their Hermitian parts
    # D(j) + conj D(−j) and 1 / (T(j) + T(−j)) are formed straight into single precision
    data, mirrored = hermitian(grid.data)
    spectrum = np.empty(data.shape, np.complex64)
    np.add(data.real, mirrored.real, out=spectrum.real, casting="same_kind")
    np.subtract(data.imag, mirrored.imag, out=spectrum.imag, casting="same_kind")
    scale = np.empty(data.shape, np.float32)
    np.add(*hermitian(grid.ctf_weight), out=scale, casting="same_kind")
    if snr:
        scale += np.float32(1.0 / snr)
    np.maximum(scale, np.float32(1e-6), out=scale)
    np.reciprocal(scale, out=scale)
    scale[np.add(*hermitian(grid.count)) <= 1e-3] = 0.0
    spectrum *= scale
    del scale
    box = grid.box
    correction = correction_3d(grid.kernel, box, padded_box)
    if padded_box % 2:
        padded = backend.asnumpy(backend.fftshift(backend.ifftn(backend.ifftshift(backend.asarray(spectrum)))).real)
        start = padded_box // 2 - box // 2
        volume = padded[start:start + box, start:start + box, start:start + box]
        return (volume / correction).astype(np.float32)
    full = backend.ifftn(backend.asarray(spectrum), overwrite_x=True)
    index = backend.asarray((np.arange(box) - box // 2) % padded_box)
    volume = backend.asnumpy(full[index][:, index][:, :, index].real)
    sign = 1.0 - 2.0 * ((np.arange(box) - box // 2) % 2)
    return (volume * ((sign[:, None, None] * sign[None, :, None] * sign[None, None, :]) / correction)).astype(np.float32)


def sample_projector(volume, npad: int, kernel_width: int, backend, max_radius: float | None = None):
    """Projector of a volume at the reconstruction's padded sample points (for residual insertion),
    optionally only those up to max_radius (pixels of the n-box), as `InsertionBatch.max_radius`."""
    from xpr.em.ali3d.project import prepare_projector

    box = volume.shape[0]
    _, _, kx, ky = padded_points(box, npad)
    if max_radius is not None:
        keep = kx * kx + ky * ky <= (npad * max_radius) ** 2
        kx, ky = kx[keep], ky[keep]
    return prepare_projector(volume, backend, npad, kernel_width, frequencies=np.stack([kx, ky]) / npad)
