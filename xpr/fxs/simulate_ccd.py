"""fxs simulate_ccd: model particle → rotational invariants → averaged angular cross-correlation.

1. Build the model (spheres, cubes, tetrahedra at given centres; ``models``).
2. Sample its exact intensity |F(q)|² on each radial shell q_k = (k+½)·max_q/N of the reciprocal
   grid and expand it in spherical harmonics I_lm(q) (3-D) or a Fourier series I_n(q) (2-D), up
   to max_order L (``invariants.model_intensity_coefficients``).
3. Invariants B_l = Σ_m I_lm(q1) I*_lm(q2) (3-D) or B_n = I_n(q1) I*_n(q2) (2-D). For N particles
   per shot B_l → N·B_l for l > 0 and B_0 → N²·B_0 (xFrame's convention).
4. Cross-correlation C(q1, q2, Δ_k) on Δ_k = 2πk/n_Δ, n_Δ = 2(L+1): 3-D with the Ewald curvature
   θ(q) = arccos(qλ/4π) (``back_substitution``: through C_n; ``lstsq``: the direct Legendre
   sum; ``legendre``: flat Ewald sphere), 2-D C = Σ_n B_n e^{inΔ}.
5. Write ccd.h5 (xFrame's fields plus the exact invariants), model_density.vts and figures.
"""
from __future__ import annotations

import numpy as np

from xpr.errors import InputError
from xpr.backend import cpu_only
from . import cross_correlation as ccd_file
from . import memory_plan
from .grids import n_phi_for_order, reciprocal_radial_points
from .invariants import (average_intensity_from_invariants, deg2_invariants_2d, deg2_invariants_3d,
                         invariants_to_cc, model_intensity_coefficients)
from .models import model_from_settings


def check_grid(settings):
    grid = settings.grid
    if grid.max_q <= 0:
        raise InputError("grid.max_q must be positive", key="grid.max_q")
    wavelength = settings.cross_correlation.xray_wavelength
    if settings.dimensions == 3 and wavelength and grid.max_q * wavelength / (4 * np.pi) >= 1:
        raise InputError(f"max_q = {grid.max_q} 1/Å is beyond the Ewald sphere of λ = {wavelength} Å "
                         f"(q < 4π/λ = {4 * np.pi / wavelength:.4g})", key="grid.max_q")


def validate(settings):
    """Before a run folder exists: the grid's values, and the memory the invariants and the
    cross-correlation of this grid need (memory_plan.simulate_ccd; exit 2 naming
    grid.n_radial_points, the estimate and the limit)."""
    check_grid(settings)
    memory_plan.plan_simulate_ccd(settings)


def model_invariants(settings, model, progress=None):
    """(q, B (L+1, N, N), Ī(q)) of the model on the settings' grid, for n_particles per shot."""
    q = reciprocal_radial_points(settings.grid.max_q, settings.grid.n_radial_points)
    coefficients = model_intensity_coefficients(model, q, settings.grid.max_order, progress=progress)
    b = deg2_invariants_3d(coefficients) if settings.dimensions == 3 else deg2_invariants_2d(coefficients)
    n = settings.n_particles
    b = b * n
    b[0] *= n
    return q, b, average_intensity_from_invariants(b[0], settings.dimensions)


def density_preview(model, n: int = 64):
    """The model density on a Cartesian cube (3-D) or square (2-D) of n points per axis."""
    half = 1.1 * model.extent
    axis = np.linspace(-half, half, n)
    points = np.stack(np.meshgrid(*([axis] * model.dimensions), indexing="ij"), axis=-1)
    return axis, model.density(points)


def run(settings, archive):
    """Model → B_l → C(q1, q2, Δ); writes ccd.h5 and the model density."""
    cpu_only(settings, archive.log, "fxs simulate_ccd", "one analytic model's invariants, small transforms")
    check_grid(settings)
    memory_plan.plan_simulate_ccd(settings, log=archive.log)
    rng = np.random.default_rng(settings.random_seed)
    model = model_from_settings(settings.shapes, settings.dimensions, rng)
    archive.log.info("model: %d shapes, extent %.1f Å", len(model.shapes), model.extent)

    q, b, average_intensity = model_invariants(settings, model, progress=archive.progress)
    n_delta = n_phi_for_order(settings.grid.max_order)
    method = settings.cross_correlation.method
    cc = invariants_to_cc(b, q, settings.dimensions, n_delta,
                          settings.cross_correlation.xray_wavelength, method)
    archive.log.info("cross-correlation %s (%s), B_l for l ≤ %d", cc.shape, method, settings.grid.max_order)

    tree = ccd_file.ccd_tree(q, cc, settings.cross_correlation.xray_wavelength, average_intensity,
                             settings.n_particles, invariants=b, dimensions=settings.dimensions)
    ccd_file.write_xframe_h5(archive.file("ccd.h5"), tree)
    archive.set_main("ccd.h5")

    axis, density = density_preview(model)
    if settings.save_vtk_density:
        field = density if settings.dimensions == 3 else density[:, :, None]
        axes = [axis] * 3 if settings.dimensions == 3 else [axis, axis, np.zeros(1)]
        archive.save_vts("model_density.vts", {"density": field}, grid="cartesian", axes=axes)
    from xpr import plot
    fig, ax = plot.figure(1, 1)
    image = density if settings.dimensions == 2 else density.sum(axis=2)
    plot.image(ax, image.T, title="model density" + (" (projected along z)" if settings.dimensions == 3 else ""),
               extent=[axis[0], axis[-1], axis[0], axis[-1]])
    archive.savefig(fig, "model_density.png")
    archive.savefig(ccd_file.cc_figure(cc, q, "simulated cross-correlation"), "cross_correlation.png")
    archive.savefig(ccd_file.invariant_figure(b, q, list(range(0, min(len(b), 16), 2)),
                                              "model invariants |B_l|"), "invariants.png")
    return {"radial_points": q, "cross_correlation": cc, "invariants": b,
            "average_intensity": average_intensity, "model": model}
