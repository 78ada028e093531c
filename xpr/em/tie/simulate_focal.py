"""xpr em simulate_focal: a through-focal series of a specimen, the input of `xpr em tie`.

Method.
1. Specimen. A sphere, random convex polyhedra or ellipsoids, a uniformly magnetised disk, or a
   projected potential from a file gives the projected thickness t(x, y) (or ∫V dz directly).
   Electrostatic phase φ_e = σ V_r t and amplitude exp(−σ V_i t) with the relativistic interaction
   constant σ (xpr.em.optics). The magnetic disk adds the Aharonov–Bohm phase φ_m of its
   in-plane magnetisation (Fourier-space formula, xpr.em.tie.specimens).
2. Exit wave ψ = amplitude · exp(i(φ_e + φ_m)).
3. Images I_j = |F⁻¹[F[ψ] T_Δf_j]|² with T = exp(+iπλΔf q² − i(π/2)C_sλ³q⁴) and the partial-
   coherence envelopes (xpr.em.tie.focal_series), relativistic λ.
4. Optional flip series: the specimen turned over about the y axis; its images are recorded
   mirrored (x → −x) and its magnetic phase is reversed: ψ_flip(x, y) = amplitude(−x, y) ·
   exp(i(φ_e − φ_m)(−x, y)).
5. Shot (or gaussian) noise, then a random rotation / magnification / shift of every image except
   the one nearest focus, which stays the reference (all images of the flipped series move).
6. One HDF5 file with exactly what `tie` reads: `images` (n, y, x), `defocus_m` (n,),
   `exact_phase` (and its electrostatic/magnetic parts), `images_flipped` when asked; optics as
   file attributes `accelerating_voltage_kV`, `pixel_size_m`, `spherical_aberration_m`.
"""
from __future__ import annotations

import math

import numpy as np

from xpr import backend as backends
from xpr import plot
from xpr.em.tie import focal_series, memory_estimate, specimens
from xpr.em.optics import electron_wavelength_A
from xpr.errors import InputError, SettingsError
from xpr.io.readers import read_array

DEFOCUS_CONVENTION = "T = exp(+i pi lambda defocus |q|^2), q in cycles/m; positive defocus = underfocus"


def validate(settings):
    """Exit 2 before the run folder exists when the series would not fit in memory."""
    memory_estimate.validate_simulate_focal(settings)


def run(settings, archive):
    backend = backends.from_settings(settings)
    memory_estimate.validate_simulate_focal(settings, archive.log)
    imaging = settings.imaging
    shape = (int(imaging.image_size), int(imaging.image_size))
    pixel_size_m = float(imaging.pixel_size_m)
    defocus_m = np.asarray([float(d) for d in imaging.defocus_m])
    if defocus_m.size < 2:
        raise SettingsError("a focal series needs at least two defocus values", key="imaging.defocus_m")
    if len(np.unique(defocus_m)) != defocus_m.size:
        raise SettingsError("defocus values must be distinct", key="imaging.defocus_m")
    kV = float(imaging.accelerating_voltage_kV)
    wavelength_m = electron_wavelength_A(kV) * 1e-10
    rng = np.random.default_rng(int(settings.seed))

    # 1–2. the specimen and its exit wave
    phase_electrostatic, phase_magnetic, amplitude = specimen_phases(settings, backend, shape, rng)
    archive.log.info("specimen %s: electrostatic phase %.3f..%.3f rad, magnetic ±%.3f rad, "
                     "amplitude ≥ %.3f", settings.specimen.kind, phase_electrostatic.min(),
                     phase_electrostatic.max(), np.abs(phase_magnetic).max(), amplitude.min())

    # 3. images at each defocus
    transfers = [focal_series.transfer_function(
        backend, shape, pixel_size_m, wavelength_m, d,
        spherical_aberration_m=float(imaging.spherical_aberration_m),
        convergence_semi_angle_rad=float(imaging.convergence_semi_angle_rad),
        defocus_spread_m=float(imaging.defocus_spread_m)) for d in defocus_m]
    series = {"images": exit_wave_images(backend, amplitude, phase_electrostatic + phase_magnetic,
                                         transfers)}
    # 4. the flipped specimen, recorded mirrored
    if settings.flip_series:
        series["images_flipped"] = exit_wave_images(
            backend, np.flip(amplitude, axis=1), np.flip(phase_electrostatic - phase_magnetic, axis=1),
            transfers)

    # 5. noise and misalignment
    reference = int(np.argmin(np.abs(defocus_m)))
    misalignments = {}
    for name in list(series):
        noisy = focal_series.add_noise(series[name], settings.noise.kind, float(settings.noise.level), rng)
        # the turned-over specimen is re-inserted: all its images move, its reference too
        series[name], misalignments[name] = misalign_series(
            noisy, reference if name == "images" else None, settings.misalignment, rng)
    archive.log.info("%d images at defocus %s µm, %s noise %.3g", len(defocus_m),
                     np.round(defocus_m * 1e6, 3).tolist(), settings.noise.kind, settings.noise.level)

    # 6. the file tie reads
    tree = {"images": series["images"].astype(np.float32),
            "defocus_m": defocus_m,
            "exact_phase": (phase_electrostatic + phase_magnetic).astype(np.float32),
            "exact_phase_electrostatic": phase_electrostatic.astype(np.float32),
            "exact_phase_magnetic": phase_magnetic.astype(np.float32),
            "exact_amplitude": amplitude.astype(np.float32),
            "misalignment": misalignments}
    if "images_flipped" in series:
        tree["images_flipped"] = series["images_flipped"].astype(np.float32)
    attrs = {"accelerating_voltage_kV": kV, "pixel_size_m": pixel_size_m,
             "spherical_aberration_m": float(imaging.spherical_aberration_m),
             "wavelength_m": wavelength_m, "defocus_convention": DEFOCUS_CONVENTION,
             "flip_axis": "x", "specimen": str(settings.specimen.kind)}
    archive.save_h5("simulate_focal.h5", tree, main=True, attrs=attrs)
    archive.savefig(overview_figure(tree, defocus_m), "focal_series.png")
    return tree


# ---------------------------------------------------------------------------------------------
# Specimen
# ---------------------------------------------------------------------------------------------

def specimen_phases(settings, backend, shape, rng):
    """(φ_e, φ_m, amplitude) of the specimen named by settings.specimen.kind."""
    specimen = settings.specimen
    pixel_size_m = float(settings.imaging.pixel_size_m)
    kV = float(settings.imaging.accelerating_voltage_kV)
    phase_magnetic = np.zeros(shape)
    kind = specimen.kind
    if kind == "file":
        phase_electrostatic, amplitude = _potential_from_file(specimen, shape, kV)
        return phase_electrostatic, phase_magnetic, amplitude
    if kind == "sphere":
        thickness = specimens.sphere_thickness_m(shape, pixel_size_m, float(specimen.radius_m))
    elif kind == "particles":
        thickness = specimens.random_particles_thickness_m(
            shape, pixel_size_m, specimen.particles.shape, int(specimen.particles.count),
            float(specimen.radius_m), rng)
    else:   # magnetic_disk
        disk = specimen.disk
        profile = specimens.disk_profile(shape, pixel_size_m, float(specimen.radius_m),
                                         float(disk.edge_width_m))
        thickness = float(disk.thickness_m) * profile
        m_x, m_y = specimens.uniformly_magnetised_disk(profile, float(disk.magnetisation_A_per_m),
                                                       math.radians(float(disk.angle_deg)))
        phase_magnetic = specimens.magnetic_phase_from_magnetisation(
            backend, m_x, m_y, float(disk.thickness_m), pixel_size_m)
    phase_electrostatic, amplitude = specimens.electrostatic_phase_and_amplitude(
        thickness, float(specimen.mean_inner_potential_V), float(specimen.absorption_potential_V), kV)
    return phase_electrostatic, phase_magnetic, amplitude


def _potential_from_file(specimen, shape, kV):
    if specimen.potential_file is None:
        raise SettingsError("specimen.kind is 'file' but no potential_file is given",
                            key="specimen.potential_file")
    projected = read_array(specimen.potential_file, dataset=specimen.potential_dataset,
                           key="specimen.potential_file")
    if projected.ndim != 2 or tuple(projected.shape) != shape:
        raise InputError(f"projected potential has shape {list(projected.shape)}, expected "
                         f"{list(shape)} (imaging.image_size)", file=specimen.potential_file,
                         key="specimen.potential_file")
    if not np.all(np.isfinite(projected)):
        raise InputError("projected potential holds NaN or infinite values",
                         file=specimen.potential_file, key="specimen.potential_file")
    return specimens.phase_from_projected_potential(projected, kV)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def exit_wave_images(backend, amplitude, phase, transfers):
    """|ψ_Δf|² for ψ = amplitude · exp(iφ), on the host as float64."""
    xp = backend.xp
    wave = xp.asarray(amplitude * np.exp(1j * phase), dtype=backend.complex_dtype)
    return backend.asnumpy(focal_series.focal_series_images(backend, wave, transfers)).astype(np.float64)


def misalign_series(images, reference, misalignment, rng):
    """Misalign every image but `reference`; returns the images and the transforms applied."""
    rotation, scale, shift = (float(misalignment.rotation_deg), float(misalignment.scale),
                              float(misalignment.shift_px))
    n = len(images)
    applied = {"rotation_deg": np.zeros(n), "scale": np.ones(n), "shift_px": np.zeros((n, 2))}
    if rotation == 0 and scale == 0 and shift == 0:
        return images, applied
    moved = images.copy()
    for index in range(n):
        if index == reference:
            continue
        angle, factor, offset = focal_series.random_misalignment(
            rng, misalignment.distribution, rotation, scale, shift)
        moved[index] = focal_series.similarity_transform(images[index], angle, factor, offset)
        applied["rotation_deg"][index], applied["scale"][index] = angle, factor
        applied["shift_px"][index] = offset
    return moved, applied


def overview_figure(tree, defocus_m):
    images = tree["images"]
    n = len(images)
    fig, axes = plot.figure(1, n + 1, size=(3.2, 3.0))
    for index in range(n):
        plot.image(axes[index], images[index], f"Δf = {defocus_m[index] * 1e6:.3g} µm", cmap="gray")
    plot.image(axes[n], tree["exact_phase"], "exact phase (rad)")
    return fig
