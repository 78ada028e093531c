"""simulate_4dstem: a multislice 4D-STEM data set of a thin crystal, with its ground truth.

1. Specimen. Atoms of a built-in cell (MoS2, graphene, SrTiO3) tiled over the scanned area plus a
   margin; projected potential of each slab of `slice_thickness_A` from Peng's scattering factors
   (xpr.em.ptychography.potentials), scaled by `phase_scale` (e.g. 0.1 for a weak phase object), on a grid
   `oversampling` times finer than the reconstruction pixel 1 / (n_detector · Δk).
2. Probe. Circular aperture of `conv_semiangle_mrad`, aberrations (Krivanek, Å) with the extra
   `defocus` folded in (C10 − defocus), unit intensity; a Gaussian focal spread gives probe modes.
3. Scan. Raster of scan_size [ny, nx] (y slow) with step scan_step_A; for each point the probe
   (shifted by Fourier ramps to the exact position) is propagated through the slices (Fresnel,
   2/3 band limit) and the far-field intensity is taken. The fine grid's wider angular range is
   cropped to the detector: scattering beyond the detector is lost, as in an experiment, and the
   model differs from the reconstruction's (no inverse crime).
4. Dose. Poisson counts with `electrons_per_pattern` incident electrons (null: noise-free).
5. Output (main file `<structure_name>.h5`): `data` (N, ky, kx) float32 with zero frequency at
   the centre — PyPty's layout — the calibration as root attributes named like `experiment:`
   keys, `positions_A` and `positions_px` (window corners on the reconstruction grid, as
   calibration.Experiment computes them), and the truth: `true_phase` (y, x) = σ Σ_s v_s on the
   reconstruction grid, with `true_phase_corner_px`, the truth-grid pixel of the first window's
   corner.
"""
from __future__ import annotations

import math

import numpy as np

from xpr import backend as backends
from xpr.em import optics
from xpr.em.ptychography import memory_estimate, potentials
from xpr.em.ptychography.forward import Model
from xpr.errors import InputError


def simulate(crystal="MoS2", layers=1, phase_scale=1.0, slice_thickness_A=2.0,
             acc_voltage=200.0, conv_semiangle_mrad=25.0, aberrations=(), defocus=0.0,
             scan_size=(32, 32), scan_step_A=0.5, detector_size=64, rez_pixel_size_A=None,
             pixel_size_A=0.3, oversampling=2, electrons_per_pattern=None, focal_spread_A=0.0,
             probe_modes=1, seed=0, batch_size=128, backend=None, progress=None):
    """Return a dict with data (N, n, n), positions and the truth (see module docstring)."""
    be = backend or backends.cpu()
    xp = be.xp
    if crystal not in potentials.CRYSTALS:
        raise InputError(f"unknown crystal {crystal!r}; choose one of {sorted(potentials.CRYSTALS)}",
                         key="specimen.crystal")
    n = int(detector_size)
    rez = float(rez_pixel_size_A) if rez_pixel_size_A else 1.0 / (n * pixel_size_A)
    pixel = 1.0 / (n * rez)                           # reconstruction grid
    fine = pixel / oversampling
    n_fine = n * oversampling
    wavelength = optics.electron_wavelength_A(acc_voltage)

    # 1. the specimen on the fine grid: scan area + one window of margin on every side
    ny, nx = (int(s) for s in scan_size)
    corners_A = np.stack(np.meshgrid(np.arange(ny) * scan_step_A, np.arange(nx) * scan_step_A,
                                     indexing="ij"), axis=-1).reshape(-1, 2)
    margin_px = n // 2                                 # coarse pixels before the first corner
    box_coarse = (int(math.ceil(corners_A[:, 0].max() / pixel)) + n + 2 * margin_px,
                  int(math.ceil(corners_A[:, 1].max() / pixel)) + n + 2 * margin_px)
    box_fine = (box_coarse[0] * oversampling, box_coarse[1] * oversampling)
    symbols, atoms = potentials.crystal_atoms(crystal, (box_fine[0] * fine, box_fine[1] * fine),
                                              layers)
    slices = potentials.sliced_projected_potential(symbols, atoms, box_fine, fine,
                                                   slice_thickness_A, be) * phase_scale
    sigma = optics.interaction_constant(acc_voltage)
    transmission = xp.exp(1j * sigma * slices).astype(xp.complex64)
    thickness = slices.shape[0] * slice_thickness_A

    # 2. the probe (modes for a focal spread), unit total intensity, on the fine window
    probe_aberrations = optics.with_defocus(list(aberrations), defocus)
    if focal_spread_A > 0 and probe_modes > 1:
        probe = optics.defocus_spread_modes((n_fine, n_fine), rez, wavelength, conv_semiangle_mrad,
                                            probe_aberrations, focal_spread_A, probe_modes, be)
    else:
        probe = optics.probe_real((n_fine, n_fine), rez, wavelength, conv_semiangle_mrad,
                                  probe_aberrations, be)[None]

    # 3. the raster scan through the multislice model, far field cropped to the detector
    model = Model(be, n_fine, fine, wavelength, slice_thickness_A, slices.shape[0])
    corners_px = corners_A / pixel + margin_px          # coarse window corners in the box
    fine_corners = corners_px * oversampling
    data = np.empty((ny * nx, n, n), dtype=np.float32)
    low = n_fine // 2 - n // 2
    starts = range(0, ny * nx, batch_size)
    for start in (progress(starts, desc="multislice") if progress else starts):
        batch = slice(start, start + batch_size)
        intensity = model.intensities(transmission, probe, fine_corners[batch])
        centred = be.fftshift(intensity, axes=(-2, -1))[:, low:low + n, low:low + n]
        data[batch] = be.asnumpy(centred)

    # 4. dose
    if electrons_per_pattern:
        rng = np.random.default_rng(seed)
        data = rng.poisson(data * float(electrons_per_pattern)).astype(np.float32)

    # 5. truth on the reconstruction grid: Fourier crop of the fine projected phase
    phase_fine = be.asnumpy(sigma * xp.sum(slices, axis=0)).astype(np.float64)
    spectrum = np.fft.fftshift(np.fft.fft2(phase_fine))
    cy, cx = box_fine[0] // 2, box_fine[1] // 2
    hy, hx = box_coarse[0] // 2, box_coarse[1] // 2
    cropped = spectrum[cy - hy:cy - hy + box_coarse[0], cx - hx:cx - hx + box_coarse[1]]
    true_phase = np.fft.ifft2(np.fft.ifftshift(cropped)).real / oversampling ** 2
    return {
        "data": data,
        "positions_A": corners_A,
        "positions_px": corners_px - corners_px.min(axis=0),
        "true_phase": true_phase.astype(np.float32),
        "true_phase_corner_px": corners_px[0],
        "probe": be.asnumpy(probe),
        "calibration": {
            "acc_voltage": float(acc_voltage), "conv_semiangle_mrad": float(conv_semiangle_mrad),
            "rez_pixel_size_A": rez, "scan_size": [ny, nx], "scan_step_A": float(scan_step_A),
            "aberrations": [float(c) for c in aberrations] or [0.0], "defocus": float(defocus),
            "PLRotation_deg": 0.0, "data_pad": 0, "data_bin": 1, "flip_ky": False,
            "transposed": False, "num_slices": int(slices.shape[0]),
            "total_thickness": float(thickness),
        },
        "pixel_size_A": pixel,
    }


def validate(settings):
    """Exit 2 before the run folder exists when not even one probe position at a time fits."""
    memory_estimate.plan_simulate_4dstem(settings)


def run(settings, archive):
    """Simulate, then write the data file, the truth and two figures."""
    from xpr import plot

    be = backends.from_settings(settings)
    batch_size = memory_estimate.plan_simulate_4dstem(settings, archive.log)
    sp, ex = settings.specimen, settings.experiment
    result = simulate(
        crystal=sp.crystal, layers=sp.layers, phase_scale=sp.phase_scale,
        slice_thickness_A=sp.slice_thickness_A, acc_voltage=ex.acc_voltage,
        conv_semiangle_mrad=ex.conv_semiangle_mrad, aberrations=list(ex.aberrations),
        defocus=ex.defocus, scan_size=list(ex.scan_size), scan_step_A=ex.scan_step_A,
        detector_size=ex.detector_size, rez_pixel_size_A=ex.rez_pixel_size_A,
        pixel_size_A=ex.pixel_size_A, oversampling=settings.simulation.oversampling,
        electrons_per_pattern=ex.electrons_per_pattern, focal_spread_A=ex.focal_spread_A,
        probe_modes=ex.probe_modes, seed=settings.simulation.seed,
        batch_size=batch_size, backend=be, progress=archive.progress)
    name = f"{settings.structure_name}.h5"
    archive.set_link_name(name)
    attrs = dict(result["calibration"])
    attrs["electrons_per_pattern"] = float(ex.electrons_per_pattern or 0.0)
    attrs["pixel_size_A"] = result["pixel_size_A"]
    archive.save_h5(name, {
        "data": result["data"], "positions_A": result["positions_A"],
        "positions_px": result["positions_px"], "true_phase": result["true_phase"],
        "true_phase_corner_px": result["true_phase_corner_px"], "probe": result["probe"],
        "pixel_size_A": result["pixel_size_A"],
    }, main=True, attrs=attrs)
    archive.log.info("%d patterns %s, pixel %.4g Å, %d slices", result["data"].shape[0],
                     result["data"].shape[1:], result["pixel_size_A"],
                     result["calibration"]["num_slices"])
    fig, axes = plot.figure(1, 2)
    plot.image(axes[0], result["true_phase"], title="true phase (rad)", cmap="gray")
    plot.image(axes[1], np.log1p(result["data"].mean(axis=0)), title="log mean pattern")
    archive.savefig(fig, "simulation.png")
    return {"data": result["data"], "true_phase": result["true_phase"]}
