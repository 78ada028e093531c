"""Electron imaging, one subpackage per workflow; each holds its workers beside its own math.

    optics.py      shared electron optics: wavelengths, probes, aberrations (Krivanek), modes
    ptychography/  4D-STEM: workers simulate_4dstem, ptycho, dpc, wdd, tcbf; library forward,
                   multislice, potentials, losses, lbfgs, reconstruct, calibration, direct, ...
    tie/           through-focal series: workers simulate_focal, tie; library focal_series,
                   solvers, specimens, learned
    ali3d/         single-particle projection alignment: worker local_ali3d; library euler, ctf,
                   gridding, project, reconstruct, refine, symmetry, fsc, particles, phantom

A worker module is named after the command it runs (`xpr em <command>`, see xpr.registry) and
exposes `run(settings, archive)`; every other module is library code named after its physics.

Shared conventions of the package (see xpr.em.optics): lengths in Å, reciprocal lengths in Å⁻¹
without 2π, Fourier-space arrays centred (zero frequency at index n // 2), probes normalised to
unit total intensity, aberrations as a Krivanek list in Å with C10 = −defocus.
"""
