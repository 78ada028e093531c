"""`xpr em wdd`: Wigner-distribution deconvolution ptychography (Rodenburg & Bates 1992).

Method. The exit wave at scan point r_p is P(r − r_p)·O(r); its far-field amplitude is

    Ψ(k; r_p) = Σ_k' P̃(k') e^{−2πi k'·r_p} Õ(k − k') ,

(k in Å⁻¹ without 2π, P̃ the probe in the aperture plane, A(k) e^{−iχ(k)}). Fourier transforming
the intensities over the scan positions (r_p → Q) gives

    G(k, Q) = Σ_p I(k; r_p) e^{−2πi Q·r_p} = Σ_b χ_P(k − b; Q) · χ_O(b; Q),
    χ_P(u; Q) = P̃(u − Q) P̃*(u),      χ_O(b; Q) = Õ(b + Q) Õ*(b),

a convolution over the detector coordinate for every Q. Fourier transforming over k (k → ρ) makes
it a product, H(ρ, Q) = W_P(ρ, Q) · W_O(ρ, Q), which is deconvolved with a Wiener filter

    W_O = H · W_P* / (|W_P|² + ε · max|W_P|²)       (ε: `wiener_epsilon`).

Transforming back to b and taking b = 0 gives χ_O(0; Q) = Õ(Q) Õ*(0) — the object spectrum up to
a constant, fixed by |Õ(0)|² = χ_O(0; 0). The object on the scan grid is the inverse transform over
Q. Only the b = 0 plane is needed, so the back transform is the mean over ρ:

    Õ(Q) Õ*(0) = mean_ρ W_O(ρ, Q).

Everything is vectorised over chunks of spatial frequencies Q (`chunk_frequencies`). Scans
larger than `max_memory_GB` (Experiment.streamed) never sit in memory: G(k, Q) is built in a
scratch HDF5 file, in three passes that each hold one block — (1) the prepared patterns, batch
by batch as calibration.StreamedPatterns reads them, written as rows (scan position × detector
pixel); (2) blocks of detector pixels, all scan positions each, Fourier transformed over the scan
axes in place; (3) chunks of spatial frequencies read back as rows for the deconvolution. Q is
measured on the scan grid (scan frame); the probe function is evaluated at Q rotated into the
detector frame, R(θ) Q, θ the PL rotation. The probe is the calibrated aperture with the given
aberrations (xpr.em.optics conventions), evaluated off-grid at u − Q.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import h5py
import numpy as np

from xpr.em.ptychography import direct, memory_estimate
from xpr.em.ptychography.memory_estimate import FREQUENCY_WORK_BYTES
from xpr.em.ptychography.calibration import unpadded_batches
from xpr.em.ptychography.bright_field import probe_spectrum_at
from xpr.errors import InputError


def scan_frequencies(scan_size, step_A, pl_rotation_deg, xp=np):
    """Spatial frequencies of the scan grid, flattened (ny·nx,), in the detector frame: R(θ)Q."""
    ny, nx = scan_size
    q_y, q_x = xp.meshgrid(xp.fft.fftfreq(ny, step_A), xp.fft.fftfreq(nx, step_A), indexing="ij")
    theta = math.radians(pl_rotation_deg)
    det_x = math.cos(theta) * q_x - math.sin(theta) * q_y
    det_y = math.sin(theta) * q_x + math.cos(theta) * q_y
    return det_y.ravel(), det_x.ravel()




def _scan_transform_in_memory(experiment, backend):
    """G(k, Q) of patterns held in memory, (n_scan, ky, kx) complex, detector zero at index 0."""
    xp = backend.xp
    patterns = xp.asarray(experiment.unpadded_patterns, dtype=backend.real_dtype)
    n_scan, n_ky, n_kx = patterns.shape
    ny, nx = experiment.scan_size
    # G(k, Q): intensities transformed over the scan, detector zero frequency moved to index 0
    # so that the convolution over k is the cyclic one the FFT computes
    stack = patterns.reshape(ny, nx, n_ky, n_kx) / patterns.sum(axis=(-2, -1)).mean()
    stack = backend.ifftshift(stack, axes=(-2, -1))
    return backend.fftn(stack.astype(backend.complex_dtype), axes=(0, 1)).reshape(n_scan, n_ky, n_kx)


def _scan_transform_streamed(experiment, backend, memory_GB, scratch):
    """G(k, Q) of a streamed scan in the HDF5 file `scratch`: a dataset (n_scan, ky·kx)
    complex, written batch by batch, transformed over the scan axes block by block of
    detector pixels (each block: all scan positions) within `memory_GB`."""
    xp = backend.xp
    ny, nx = experiment.scan_size
    n_scan = ny * nx
    n_ky, n_kx = experiment.mean_pattern.shape
    n_k = n_ky * n_kx
    norm = float(experiment.mean_pattern.sum())     # mean counts per pattern
    item = np.dtype(backend.complex_dtype).itemsize
    # pass 2 holds a block of detector pixels with all scan positions, read, transformed and
    # written back (≈ 3 complex copies), in half the budget (the chunk cache takes the rest)
    block = max(1, min(n_k, int(memory_GB * 1e9) // (2 * 3 * item * n_scan)))
    # HDF5 chunks of ≤ 1 MB that pass 1 writes whole (rows) and pass 2 reads whole (columns)
    rows = max(1, min(n_scan, 64))
    columns = max(1, min(block, (1 << 20) // (item * rows)))
    block = block // columns * columns
    handle = h5py.File(scratch, "w", rdcc_nbytes=max(1 << 20, int(memory_GB * 1e9) // 8))
    G = handle.create_dataset("G", shape=(n_scan, n_k), dtype=backend.complex_dtype,
                              chunks=(rows, columns))
    # pass 1: each streamed batch (≤ max_memory_GB / WORK_COPIES of float32) is written a few
    # rows at a time, so its shifted complex copy stays small
    for start, batch in unpadded_batches(experiment):
        for r0 in range(0, len(batch), rows):
            part = np.fft.ifftshift(batch[r0:r0 + rows], axes=(-2, -1)).reshape(-1, n_k)
            G[start + r0:start + r0 + len(part)] = (part / np.float32(norm)).astype(backend.complex_dtype)
    for c0 in range(0, n_k, block):
        c1 = min(c0 + block, n_k)
        values = xp.asarray(G[:, c0:c1]).reshape(ny, nx, c1 - c0)
        G[:, c0:c1] = backend.asnumpy(backend.fftn(values, axes=(0, 1))).reshape(n_scan, c1 - c0)
    return handle, G


def reconstruct(experiment, backend, wiener_epsilon=0.01, chunk_frequencies=256, progress=None,
                method="wdd", memory_GB=2.0, scratch_dir=None):
    """WDD (or SSB) of a calibrated experiment → dict(object (complex, scan grid), phase, amplitude).

    A streamed experiment is transformed through a scratch HDF5 file in `scratch_dir` (default:
    the system's temporary folder), removed afterwards, within `memory_GB`."""
    if experiment.aperture_radius_invA is None:
        raise InputError("WDD needs the probe aperture: give experiment.conv_semiangle_mrad",
                         key="experiment.conv_semiangle_mrad")
    if not experiment.streamed:
        G = _scan_transform_in_memory(experiment, backend)
        return _deconvolve(experiment, backend, lambda a, b: G[a:b], G.shape[1:], wiener_epsilon,
                           chunk_frequencies, progress, method)
    n_k = int(np.prod(experiment.mean_pattern.shape))
    chunk = max(1, min(int(chunk_frequencies), int(memory_GB * 1e9) // (FREQUENCY_WORK_BYTES * n_k)))
    with tempfile.TemporaryDirectory(prefix="wdd-scratch-", dir=scratch_dir) as folder:
        handle, G = _scan_transform_streamed(experiment, backend, memory_GB,
                                             Path(folder) / "scan_transform.h5")
        with handle:
            shape = experiment.mean_pattern.shape
            return _deconvolve(
                experiment, backend,
                lambda a, b: backend.xp.asarray(G[a:b]).reshape((b - a,) + shape), shape,
                wiener_epsilon, chunk, progress, method)


def frequency_chunks(q_y, q_x, chunk_frequencies, progress=None, desc="frequencies"):
    """(start, stop, Qy, Qx) over the scan frequencies in chunks; Qy, Qx shaped (stop - start,
    1, 1) to broadcast against detector arrays (ky, kx)."""
    starts = range(0, len(q_y), chunk_frequencies)
    for start in (progress(starts, desc=desc) if progress else starts):
        stop = min(start + chunk_frequencies, len(q_y))
        yield start, stop, q_y[start:stop, None, None], q_x[start:stop, None, None]


def _deconvolve(experiment, backend, G_rows, detector_shape, wiener_epsilon, chunk_frequencies,
                progress, method):
    """WDD/SSB from G(k, Q), read as G_rows(start, stop) → (stop − start, ky, kx) complex."""
    xp = backend.xp
    n_ky, n_kx = detector_shape
    ny, nx = experiment.scan_size
    n_scan = ny * nx
    rez = experiment.rez_pixel_size_invA

    # detector coordinates (index 0 = zero frequency: G was ifftshifted over k)
    u_y = xp.asarray(backend.fftfreq(n_ky, 1.0 / (rez * n_ky)))[:, None]
    u_x = xp.asarray(backend.fftfreq(n_kx, 1.0 / (rez * n_kx)))[None, :]
    q_y, q_x = scan_frequencies((ny, nx), experiment.scan_step_A, experiment.pl_rotation_deg, xp)
    spectrum_args = dict(wavelength_A=experiment.wavelength_A,
                         aperture_radius_invA=experiment.aperture_radius_invA,
                         edge_width_invA=rez, aberrations=experiment.probe_aberrations, xp=xp)
    probe_here = probe_spectrum_at(u_y, u_x, **spectrum_args)
    # |W_P(ρ, 0)|² peaks at ρ = 0 with (Σ|P̃|²)²: the scale of the Wiener floor
    peak_power = float(xp.sum(xp.abs(probe_here) ** 2)) ** 2

    if method == "ssb":
        return _single_side_band(G_rows, probe_here, u_y, u_x, q_y, q_x, spectrum_args, (ny, nx),
                                 wiener_epsilon, chunk_frequencies, backend, progress)

    object_x_zero = xp.zeros(n_scan, dtype=backend.complex_dtype)
    for start, stop, Qy, Qx in frequency_chunks(q_y, q_x, chunk_frequencies, progress, "WDD frequencies"):
        chi_probe = probe_spectrum_at(u_y[None] - Qy, u_x[None] - Qx, **spectrum_args) \
            * xp.conj(probe_here)[None]
        W_P = backend.fftn(chi_probe.astype(backend.complex_dtype), axes=(-2, -1))
        H = backend.fftn(G_rows(start, stop), axes=(-2, -1))
        power = xp.abs(W_P) ** 2
        floor = wiener_epsilon * peak_power
        W_O = H * xp.conj(W_P) / (power + floor + 1e-30)
        object_x_zero[start:stop] = W_O.mean(axis=(-2, -1))

    object_spectrum = object_x_zero / xp.sqrt(xp.abs(object_x_zero[0]))
    obj = backend.ifftn(object_spectrum.reshape(ny, nx)) * math.sqrt(n_scan)
    phase = xp.angle(obj)
    phase = phase - phase.mean()
    return {"object": backend.asnumpy(obj).astype(np.complex64),
            "phase": backend.asnumpy(phase).astype(np.float32),
            "amplitude": backend.asnumpy(xp.abs(obj)).astype(np.float32)}


def _single_side_band(G_rows, probe_here, u_y, u_x, q_y, q_x, spectrum_args, scan_size, epsilon,
                      chunk_frequencies, backend, progress):
    """Weak-phase-object (SSB) estimate from the same G(k, Q).

    For t = 1 + iφ, to first order G(k, Q) = s N φ̃(Q) Γ(k, Q) for Q ≠ 0, with
    Γ(k, Q) = i[P̃*(k)P̃(k − Q) − P̃(k)P̃*(k + Q)] — non-zero where the disks at ±Q overlap the
    central one once (the "trotters"; the aberration phases included, so this is aberration-
    corrected SSB) — and G(k, 0) = s N |P̃(k)|². The least-squares φ̃(Q) is
    Σ_k Γ* G / (Σ_k |Γ|² + ε max Σ_k |Γ|²) / (s N).
    """
    xp = backend.xp
    ny, nx = scan_size
    n_scan = ny * nx
    scale = float(xp.real(G_rows(0, 1).sum())) / float(xp.sum(xp.abs(probe_here) ** 2))   # s N
    numerator = xp.zeros(n_scan, dtype=backend.complex_dtype)
    denominator = xp.zeros(n_scan, dtype=backend.real_dtype)
    for start, stop, Qy, Qx in frequency_chunks(q_y, q_x, chunk_frequencies, progress, "SSB frequencies"):
        gamma = 1j * (xp.conj(probe_here)[None] * probe_spectrum_at(u_y[None] - Qy, u_x[None] - Qx, **spectrum_args)
                      - probe_here[None] * xp.conj(probe_spectrum_at(u_y[None] + Qy, u_x[None] + Qx, **spectrum_args)))
        numerator[start:stop] = (xp.conj(gamma) * G_rows(start, stop)).sum(axis=(-2, -1))
        denominator[start:stop] = (xp.abs(gamma) ** 2).sum(axis=(-2, -1))
    phase_series = numerator / (denominator + epsilon * float(denominator.max()) + 1e-30) / scale
    phase_series[0] = 0.0
    phase = backend.ifftn(phase_series.reshape(ny, nx)).real * n_scan
    obj = xp.exp(1j * phase)
    return {"object": backend.asnumpy(obj).astype(np.complex64),
            "phase": backend.asnumpy(phase).astype(np.float32),
            "amplitude": backend.asnumpy(xp.abs(obj)).astype(np.float32)}


def validate(settings):
    """Exit 2 before the run folder exists when the scan could not fit even streamed."""
    memory_estimate.validate_direct("wdd", settings)


def run(settings, archive):
    """Calibrate, deconvolve the Wigner distribution, save object/phase on the scan grid."""
    options = settings.wdd
    plan = memory_estimate.plan_direct("wdd", settings, direct.default_data_path(settings, archive),
                                       log=archive.log)
    memory_GB = plan["memory_GB"]
    backend, experiment, data_path = direct.prepare(settings, archive, memory_GB)
    # the scratch file of a streamed scan lives in the run folder (beside the data the user
    # chose to write), removed when the reconstruction ends
    result = reconstruct(experiment, backend, wiener_epsilon=float(options.wiener_epsilon),
                         chunk_frequencies=plan["chunk"] or int(options.chunk_frequencies),
                         progress=archive.progress, method=str(options.method),
                         memory_GB=memory_GB, scratch_dir=archive.path)
    archive.log.info("%s phase: range %.3f rad on a %s scan", options.method.upper(),
                     float(np.ptp(result["phase"])), experiment.scan_size)
    direct.save_products(archive, "wdd", experiment, data_path, result,
                         pixel_size_A=experiment.scan_step_A,
                         images={"phase": "WDD phase (rad)", "amplitude": "WDD amplitude"})
    return result
