"""Small 4D-STEM data sets for the direct-method tests: a known phase object, a single slice.

Forward model (the same as ptycho's single-slice model, far field):

    ψ_p(r) = P(r − r_p) · exp(iφ(r)),   I_p(k) = |FFT ψ_p|²  (fftshift: zero frequency at centre)

with the probe from xpr.em.optics on the pattern grid, the scan positions from
xpr.em.ptychography.calibration (top-left corners of the probe windows, PL rotation applied) and sub-pixel
positions applied to the probe by a Fourier phase ramp. Optional Poisson noise.
"""
from __future__ import annotations

import math

import numpy as np

from xpr.em import optics
from xpr.em.ptychography.calibration import Experiment

KV = 200.0
CONV_MRAD = 20.0


def random_atoms_phase(shape, pixel_size_A, n_atoms, sigma_A=0.45, peak_rad=0.25, seed=0):
    """A phase object: Gaussian 'atoms' at random positions (≥ 1.2 Å apart), phase ≥ 0."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    y, x = np.meshgrid(np.arange(ny) * pixel_size_A, np.arange(nx) * pixel_size_A, indexing="ij")
    centres = []
    while len(centres) < n_atoms:
        c = rng.uniform(0, [ny * pixel_size_A, nx * pixel_size_A])
        if all(np.hypot(*(c - d)) > 1.2 for d in centres):
            centres.append(c)
    phase = np.zeros(shape)
    for cy, cx in centres:
        phase += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma_A ** 2))
    return peak_rad * phase


def experiment_settings(scan_size, scan_step_A, n_detector, rez_pixel_size_A, **extra):
    settings = dict(acc_voltage=KV, conv_semiangle_mrad=CONV_MRAD, rez_pixel_size_A=rez_pixel_size_A,
                    scan_size=list(scan_size), scan_step_A=scan_step_A, aberrations=[0.0],
                    defocus=0.0, PLRotation_deg=0.0, data_pad=0, data_bin=1, flip_ky=False,
                    transposed=False)
    settings.update(extra)
    return settings


def simulate(scan_size=(24, 24), scan_step_A=0.4, n_detector=32, disk_radius_px=8.0,
             defocus_A=0.0, pl_rotation_deg=0.0, transposed=False, dose=None, seed=0,
             atom_density_per_A2=0.25, aberrations=(0.0,)):
    """Patterns (N, ky, kx), the settings that describe them, the true phase and its grid.

    Returns dict(patterns, settings, phase, probe_centres_px) where phase is on the object grid
    (pixel size = 1/(rez·n)) and probe_centres_px are the (y, x) object-grid coordinates of the
    probe centre at each scan point (for sampling the truth on the scan grid).
    """
    wavelength = optics.electron_wavelength_A(KV)
    rez = CONV_MRAD * 1e-3 / wavelength / disk_radius_px
    settings = experiment_settings(scan_size, scan_step_A, n_detector, rez, defocus=defocus_A,
                                   PLRotation_deg=pl_rotation_deg, aberrations=list(aberrations))
    # calibration positions (patterns are a placeholder: only the geometry is used here)
    geometry = Experiment.from_settings(settings, np.ones((scan_size[0] * scan_size[1], n_detector,
                                                             n_detector), np.float32))
    pixel = geometry.pixel_size_A
    positions = geometry.scan_positions_px
    object_shape = geometry.object_shape_px
    area = object_shape[0] * object_shape[1] * pixel ** 2
    phase = random_atoms_phase(object_shape, pixel, int(area * atom_density_per_A2), seed=seed)
    transmission = np.exp(1j * phase)

    probe = optics.probe_real((n_detector, n_detector), rez, wavelength, CONV_MRAD,
                              geometry.probe_aberrations)
    ky = np.fft.fftfreq(n_detector)[:, None]
    kx = np.fft.fftfreq(n_detector)[None, :]
    probe_k = np.fft.fft2(probe)
    patterns = np.empty((len(positions), n_detector, n_detector), np.float32)
    for index, (py, px) in enumerate(positions):
        iy, ix = int(math.floor(py)), int(math.floor(px))
        fy, fx = py - iy, px - ix
        shifted = np.fft.ifft2(probe_k * np.exp(-2j * np.pi * (ky * fy + kx * fx)))
        exit_wave = shifted * transmission[iy:iy + n_detector, ix:ix + n_detector]
        patterns[index] = np.fft.fftshift(np.abs(np.fft.fft2(exit_wave)) ** 2)
    if dose is not None:
        rng = np.random.default_rng(seed + 1)
        patterns = rng.poisson(patterns / patterns.sum(axis=(1, 2), keepdims=True) * dose).astype(np.float32)
    if transposed:
        patterns = np.ascontiguousarray(np.swapaxes(patterns, 1, 2))
    centres = positions + n_detector // 2
    return dict(patterns=patterns, settings=settings, phase=phase, probe_centres_px=centres,
                pixel_size_A=pixel, rez=rez, wavelength=wavelength)


def truth_on_scan_grid(data, scan_size):
    """The true phase at the probe centres, as a (ny, nx) map on the scan grid."""
    from scipy.ndimage import map_coordinates

    values = map_coordinates(data["phase"], data["probe_centres_px"].T, order=1)
    return values.reshape(scan_size)


def correlation(a, b):
    a = np.asarray(a, float).ravel() - np.mean(a)
    b = np.asarray(b, float).ravel() - np.mean(b)
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def write_pypty_h5(path, data, calibration_in_file=True):
    """A PyPty-style data file: dataset `data` (N, ky, kx); calibration as root attributes."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.create_dataset("data", data=data["patterns"])
        if calibration_in_file:
            for key, value in data["settings"].items():
                if key not in ("data_pad", "data_bin", "flip_ky", "transposed"):
                    handle.attrs[key] = value
    return path


def write_settings(path, command, data_path, **sections):
    """A user settings YAML for `xpr em <command> PATH`."""
    import yaml

    tree = {"structure_name": "test", "experiment": {"data_path": str(data_path)},
            "GPU": {"use": False}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(tree))
    return path


def truth_on_fine_scan_grid(data, experiment, upsample):
    """The true phase on the scan-frame grid `upsample` × finer than the scan (tcBF's grid)."""
    from scipy.ndimage import map_coordinates

    ny, nx = experiment.scan_size
    gy, gx = np.meshgrid(np.arange(ny * upsample) / upsample, np.arange(nx * upsample) / upsample,
                         indexing="ij")
    theta = math.radians(experiment.pl_rotation_deg)
    x = (math.cos(theta) * gx - math.sin(theta) * gy) * experiment.scan_step_A
    y = (math.sin(theta) * gx + math.cos(theta) * gy) * experiment.scan_step_A
    origin = experiment.scan_positions_A.min(axis=0)
    half = experiment.pattern_shape[0] // 2
    rows = (y - origin[0]) / experiment.pixel_size_A + half
    cols = (x - origin[1]) / experiment.pixel_size_A + half
    return map_coordinates(data["phase"], [rows.ravel(), cols.ravel()], order=1).reshape(rows.shape)
