"""`xpr em dpc`: differential phase contrast — the phase from the centre of mass of each pattern.

Method. For a phase object t(r) = exp(iφ(r)) and any probe P, the centre of mass of the
diffraction pattern recorded at scan point r_p is (Ehrenfest; Müller-Caspary et al. 2017, Lazić
et al. 2016, "integrated DPC")

    ⟨k⟩(r_p) = (1/2π) ∫ |P(r − r_p)|² ∇φ(r) dr + ⟨k⟩_probe ,

with k in Å⁻¹ (no 2π). So 2π⟨k⟩, after removing the constant probe term (its mean over the
scan), is the probe-intensity-weighted phase gradient. The CoM is measured in the detector
frame and rotated into the scan frame by R(−θ) (θ the PL rotation, fitted as the curl-free
rotation when `PLRotation_deg: auto`, see xpr.em.ptychography.calibration). The phase follows by Fourier
integration on the (zero-padded) scan grid: with ∂/∂x ↔ 2πi q_x,

    φ̂(q) = (q_x ĝ_x + q_y ĝ_y) / (2πi (|q|² + q_hp²)) ,

where q_hp (`high_pass_invA`) suppresses the unreliable lowest frequencies. A Gaussian low-pass
(`low_pass_invA`) is optional.
"""
from __future__ import annotations

import math

import numpy as np

from xpr.em.ptychography import direct, memory_estimate
from xpr.em.ptychography.calibration import center_of_mass, rotate_to_scan_frame


def phase_gradient_from_com(experiment, xp=np):
    """2π⟨k⟩ in the scan frame, rad/Å, as two (ny, nx) maps (g_y, g_x); mean (probe term) removed."""
    if experiment.com_px is not None:               # streamed: measured batch by batch
        com_y, com_x = (xp.asarray(c) for c in experiment.com_px)
    else:
        com_y, com_x = center_of_mass(xp.asarray(experiment.patterns), xp)
    to_rad_per_A = 2.0 * math.pi * experiment.rez_pixel_size_invA
    g_y, g_x = rotate_to_scan_frame(com_y * to_rad_per_A, com_x * to_rad_per_A,
                                    experiment.pl_rotation_deg)
    g_y = (g_y - g_y.mean()).reshape(experiment.scan_size)
    g_x = (g_x - g_x.mean()).reshape(experiment.scan_size)
    return g_y, g_x


def integrate_gradient(g_y, g_x, step_A, backend, high_pass_invA=0.0, low_pass_invA=0.0,
                       pad_factor=2):
    """The potential φ with ∇φ = g on a regular grid (step in Å), by Fourier integration."""
    xp = backend.xp
    ny, nx = g_y.shape
    my, mx = int(ny * pad_factor), int(nx * pad_factor)
    padded_y = xp.zeros((my, mx), dtype=backend.complex_dtype)
    padded_x = xp.zeros((my, mx), dtype=backend.complex_dtype)
    padded_y[:ny, :nx] = g_y
    padded_x[:ny, :nx] = g_x
    q_y = xp.asarray(backend.fftfreq(my, step_A))[:, None]
    q_x = xp.asarray(backend.fftfreq(mx, step_A))[None, :]
    q2 = q_y ** 2 + q_x ** 2
    denominator = 2j * math.pi * (q2 + high_pass_invA ** 2)
    denominator[0, 0] = 1.0
    spectrum = (q_y * backend.fftn(padded_y) + q_x * backend.fftn(padded_x)) / denominator
    spectrum[0, 0] = 0.0
    if low_pass_invA > 0:
        spectrum = spectrum * xp.exp(-q2 / (2 * low_pass_invA ** 2))
    phase = backend.ifftn(spectrum).real[:ny, :nx]
    return phase - phase.mean()


def reconstruct(experiment, backend, high_pass_invA=0.0, low_pass_invA=0.0, pad_factor=2):
    """DPC of a calibrated experiment: dict with the phase and the CoM field on the scan grid."""
    xp = backend.xp
    g_y, g_x = phase_gradient_from_com(experiment, xp)
    phase = integrate_gradient(g_y, g_x, experiment.scan_step_A, backend, high_pass_invA,
                               low_pass_invA, pad_factor)
    to_invA = 1.0 / (2.0 * math.pi)
    return {"phase": backend.asnumpy(phase).astype(np.float32),
            "com_y_invA": backend.asnumpy(g_y * to_invA).astype(np.float32),
            "com_x_invA": backend.asnumpy(g_x * to_invA).astype(np.float32)}


def validate(settings):
    """Exit 2 before the run folder exists when the scan could not fit even streamed."""
    memory_estimate.validate_direct("dpc", settings)


def run(settings, archive):
    """Calibrate, take the CoM, rotate into the scan frame, integrate; save phase and CoM maps."""
    options = settings["dpc"]
    plan = memory_estimate.plan_direct("dpc", settings, direct.default_data_path(settings, archive),
                                       log=archive.log)
    backend, experiment, data_path = direct.prepare(settings, archive, plan["memory_GB"])
    result = reconstruct(experiment, backend, high_pass_invA=float(options["high_pass_invA"]),
                         low_pass_invA=float(options["low_pass_invA"]),
                         pad_factor=float(options["pad_factor"]))
    archive.log.info("DPC phase: range %.3f rad on a %s scan", float(np.ptp(result["phase"])),
                     experiment.scan_size)
    direct.save_products(archive, "dpc", experiment, data_path, result,
                         pixel_size_A=experiment.scan_step_A,
                         images={"phase": "DPC phase (rad)", "com_x_invA": "CoM x (Å⁻¹)",
                                 "com_y_invA": "CoM y (Å⁻¹)"})
    return result
