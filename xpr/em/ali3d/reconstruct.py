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
    rows, cols, kx, ky = padded_points(box, npad)
    phase = np.exp((2j * np.pi / padded_box) * (kx[None, :] * shifts_px[:, :1] + ky[None, :] * shifts_px[:, 1:]))
    return spectra[:, rows, cols] * phase


QUEUE_FLUSH = 4_000_000   # kernel contributions queued (over all threads) before they are summed
THREADED_ABOVE = 2 * QUEUE_FLUSH   # kernel contributions of a batch above which its threads share it


def insert_batch(batch: InsertionBatch, backend=None, into: FourierGrid | None = None) -> FourierGrid:
    """Kernel-weighted sums D, T, N of a batch of images (module-level: a parallel.map task),
    added to the grid `into` when one is given (and returned), else to a new one.

    A large batch is split between this process's threads (`insertion_threads`), each summing its
    share into its own arrays with np.bincount (which runs without the GIL); the shares are added
    in turn.  A small one (a chunk's put-back within its band) is summed by one thread straight into
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
    with_ctf = batch.ctf is not None and batch.ctf_mode != "none"
    targets = {"real": [grid.data.real], "imag": [grid.data.imag]}
    if batch.weights:   # without a CTF, T is N
        targets["count"] = [grid.count] if with_ctf else [grid.count, grid.ctf_weight]
        if with_ctf:
            targets["ctf"] = [grid.ctf_weight]
    contributions = len(batch.images) * len(batch.group) * len(kx) * batch.kernel_width ** 3
    threads = insertion_threads(len(batch.images)) if contributions > THREADED_ABOVE else 1
    parts = [part for part in np.array_split(np.arange(len(batch.images)), threads) if len(part)]
    queue = QUEUE_FLUSH // len(parts)  # the threads' queues together hold what one thread's did
    if len(parts) == 1:
        _spread(batch, grid, values, kx, ky, parts[0], queue, targets)
        return grid
    from concurrent.futures import ThreadPoolExecutor

    shares = [{name: [np.zeros(grid.count.size)] for name in targets} for _ in parts]   # each thread's own
    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(lambda part, share: _spread(batch, grid, values, kx, ky, part, queue, share), parts, shares))
    for share in shares:
        for name, arrays in targets.items():
            for array in arrays:
                array += share[name][0]
    return grid


def insertion_threads(n_images: int) -> int:
    """Threads for one insertion: this process's CPU share (XPR_FFT_WORKERS under xpr.parallel, else
    the available cores), at most one per image."""
    import os

    from xpr.parallel import available_cpus

    share = os.environ.get("XPR_FFT_WORKERS")
    cores = int(share) if share and int(share) > 0 else available_cpus()
    return max(1, min(cores, n_images))


def _spread(batch: InsertionBatch, grid: FourierGrid, values, kx, ky, images, queue_limit, targets):
    """The bincount sums (D real, D imag, N, T) of the images `images` of a batch (see insert_batch),
    the kernel contributions queued until more than `queue_limit` values wait, added to the arrays
    `targets` ({"real", "imag"[, "count"[, "ctf"]]: [arrays]}).

    The queue is a set of buffers allocated once (flat indices int64, weights float64 as bincount
    takes them) that every piece is written into in place: collecting per-image arrays and joining
    them cost as much as the sums themselves (fresh pages to fault in, then copies and float32 →
    float64 conversions inside bincount).  Each flush sums only over the range of grid points the
    queued indices span."""
    kb, half, box = grid.kernel, grid.half, batch.images.shape[-1]
    side = 2 * half + 1
    size = side ** 3
    t = np.arange(kb.width)
    offsets = ((t[:, None, None] * side + t[None, :, None]) * side + t[None, None, :]).ravel()
    estimate = batch.estimate
    if estimate is not None:  # the estimate's cube is smaller: the same neighbours at its own offsets
        estimate_side = 2 * estimate.half + 1
        estimate_offsets = ((t[:, None, None] * estimate_side + t[None, :, None]) * estimate_side
                            + t[None, None, :]).ravel()
        shift = estimate.half - half
    signs = np.ones(len(batch.images)) if batch.signs is None else batch.signs
    with_ctf = batch.ctf is not None and batch.ctf_mode != "none"
    names = list(targets)
    m, w3 = len(kx), kb.width ** 3
    piece = m * w3                                   # one (image, rotation) insertion
    capacity = min(len(images) * len(batch.group) * piece, queue_limit + piece)
    index_queue = np.empty(capacity, dtype=np.int64)
    queues = {name: np.empty(capacity) for name in names}
    queued, reach = 0, [size, -1]          # lowest and highest grid point the queued pieces reach

    def flush(queued):
        # one bincount per quantity for many images, over the span of grid points they reach
        if not queued:
            return
        index = index_queue[:queued]
        low = reach[0]
        span = reach[1] - low + 1
        reach[:] = [size, -1]
        if low:
            index -= low
        for name in names:
            part = np.bincount(index, queues[name][:queued], span)
            for array in targets[name]:
                array[low:low + span] += part

    for i in images:
        weight_t = None
        if with_ctf:
            weight_t = ctf_model.projection_weight(
                ctf_model.ctf_values(batch.ctf, i, kx, ky, batch.pixel_size_A, batch.npad * box), batch.ctf_mode)
        for g in batch.group:
            rows = batch.matrices[i] @ g  # (A g): its first two rows carry (kx, ky) into the volume frame
            fx, wx = kb.neighbours(kx * rows[0, 0] + ky * rows[1, 0] + half)
            fy, wy = kb.neighbours(kx * rows[0, 1] + ky * rows[1, 1] + half)
            fz, wz = kb.neighbours(kx * rows[0, 2] + ky * rows[1, 2] + half)
            c = (wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]).reshape(m, -1)
            sample = values[i] if weight_t is None else values[i] * weight_t
            if estimate is not None:  # what the current volume leaves unexplained
                base = ((fz + shift) * estimate_side + fy + shift) * estimate_side + fx + shift
                neighbours = estimate.cube.take(base[:, None] + estimate_offsets[None, :])
                predicted = np.matmul(c[:, None, :], neighbours.view(np.float32).reshape(m, -1, 2))
                predicted = predicted.reshape(m, 2).view(np.complex64).ravel()
                sample = values[i] - predicted if weight_t is None else (values[i] - weight_t * predicted) * weight_t
            end = queued + piece
            first = (fz * side + fy) * side + fx
            np.add(first[:, None], offsets[None, :], out=index_queue[queued:end].reshape(m, w3))
            reach[0], reach[1] = min(reach[0], int(first.min())), max(reach[1], int(first.max()) + int(offsets[-1]))
            # float32 products stored as float64 (the values bincount would have converted them to);
            # the sign ±1 goes on the per-sample factor (exact), not on the W³ weights
            sign = np.float32(signs[i])
            np.multiply(c, (sample.real.astype(np.float32) * sign)[:, None], out=queues["real"][queued:end].reshape(m, w3))
            np.multiply(c, (sample.imag.astype(np.float32) * sign)[:, None], out=queues["imag"][queued:end].reshape(m, w3))
            if batch.weights:
                if sign < 0:
                    np.negative(c, out=queues["count"][queued:end].reshape(m, w3))
                else:
                    queues["count"][queued:end] = c.ravel()
                if with_ctf:
                    np.multiply(c, ((weight_t ** 2).astype(np.float32) * sign)[:, None],
                                out=queues["ctf"][queued:end].reshape(m, w3))
            queued = end
            if queued > queue_limit:
                flush(queued)
                queued = 0
    flush(queued)


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
