"""fxs extract: averaged cross-correlation (ccd.h5) → invariants B_l and projection data.

1. Read the cross-correlation C(q1, q2, Δ_k) (xpr's or xFrame's ccd.h5; Δ_k = 2πk/n_Δ from the
   data's own shape) and check that n_Δ ≥ 2·max_order.
2. Optionally subtract Ī(q1)Ī(q2), mask Δ samples, and extract B_l (3-D: back_substitution,
   lstsq or the flat-Ewald legendre method; 2-D: B_n = C_n), odd orders set to zero if assumed
   (``extraction``).
3. Per-order q limits → masks and q ranges; eigendecomposition of each B_l on its q range →
   projection matrices V_l (3-D, rank ≤ 2l+1) or vectors v_n (2-D), with B_l ≈ V_l V_l†.
4. Write proj_data.h5 with xFrame's field names (the input of ``reconstruct``) and figures of
   |B_l|, arg B_l, V_l V_l† and the mask.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xpr.errors import InputError
from xpr.backend import cpu_only
from . import cross_correlation as ccd_file
from . import memory_plan
from .extraction import (extract_from_cc, invariants_from_projection, max_supported_order,
                         pixel_custom_cc_mask, projection_error_estimates, projection_matrices_3d,
                         projection_vectors_2d, q_limit_masks)
from .invariants import average_intensity_from_invariants


def input_path(settings, archive) -> Path:
    given = settings.input.ccd_file
    if given:
        return Path(str(given)).expanduser()
    link = f"{settings.dimensions}d_{settings.structure_name}.h5"
    return archive.home.data / "fxs" / "ccd" / link


def _line(limit_settings, key):
    if limit_settings.type == "none":
        return None
    line = [list(map(float, p)) for p in limit_settings.line]
    if len(line) != 2 or any(len(p) != 2 for p in line):
        raise InputError("a q-limit line is two points [[order, q], [order, q]]", key=key)
    return line


def cc_mask_from_settings(dataset_settings, data) -> np.ndarray | None:
    mask = data.get("cross_correlation_mask")
    kind = dataset_settings.cc_mask.type
    if kind == "pixel_custom":
        custom = pixel_custom_cc_mask(data["cross_correlation"].shape,
                                      dataset_settings.cc_mask.pixel_custom.n_masked_pixels_phi)
        mask = custom if mask is None else (mask & custom)
    return mask


def extract_dataset(settings, data, log):
    """B (L+1, N, N), masks, q_id_limits and projection data of one cross-correlation."""
    opt = settings.cross_correlation.datasets.I1I1
    dims, max_order = settings.dimensions, settings.max_order
    cc = data["cross_correlation"]
    average_intensity = data["average_intensity"]
    subtract = opt.modify_cc.subtract_average_intensity
    if subtract and average_intensity is None:
        log.warning("the ccd file has no average_intensity: nothing subtracted")
        subtract = False
    method = opt.bl_extraction_method if dims == 3 else "fourier"
    b = extract_from_cc(cc, data["radial_points"], dims, max_order,
                        method if dims == 3 else "back_substitution", data["xray_wavelength"],
                        opt.assume_zero_odd_orders, average_intensity, subtract,
                        cc_mask_from_settings(opt, data))
    log.info("extracted B_l, l ≤ %d, by %s from C %s", max_order, method, cc.shape)
    masks, limits = q_limit_masks(data["radial_points"], max_order,
                                  _line(opt.bl_q_limits.min, "cross_correlation.datasets.I1I1.bl_q_limits.min"),
                                  _line(opt.bl_q_limits.max, "cross_correlation.datasets.I1I1.bl_q_limits.max"))
    if opt.masked_values_to_zero:
        b = np.where(masks, b, 0)
    projection = projection_matrices_3d(b, limits) if dims == 3 else projection_vectors_2d(b, limits)
    return b, masks, limits, projection


def validate(settings):
    """Before a run folder exists: when input.ccd_file is given, whether extracting from it fits
    in memory (memory_plan.plan_extract, from the file's header; exit 2). The latest ccd.h5 of
    the home is checked by the worker, before it is read."""
    if settings.input.ccd_file:
        memory_plan.plan_extract(settings, Path(str(settings.input.ccd_file)).expanduser())


def run(settings, archive):
    """ccd.h5 → proj_data.h5."""
    cpu_only(settings, archive.log, "fxs extract", "per-order eigen-decompositions of small matrices")
    path = input_path(settings, archive)
    memory_plan.plan_extract(settings, path, log=archive.log)     # from the file's header, before reading it
    data = ccd_file.read_ccd(path)
    archive.log.info("cross-correlation from %s", path)
    if settings.extraction_mode != "cross_correlation":
        raise InputError("only extraction_mode 'cross_correlation' is available", key="extraction_mode")
    if data["dimensions"] is not None and data["dimensions"] != settings.dimensions:
        raise InputError(f"the cross-correlation was made for {data['dimensions']}-D, the settings ask for "
                         f"{settings.dimensions}-D", file=path, key="dimensions")
    n_delta = data["cross_correlation"].shape[-1]
    if settings.max_order > max_supported_order(n_delta):
        raise InputError(f"max_order {settings.max_order} is larger than the {n_delta} angular points of "
                         f"the cross-correlation support (at most {max_supported_order(n_delta)})",
                         file=path, key="max_order")
    dims = settings.dimensions
    b, masks, limits, projection = extract_dataset(settings, data, archive.log)

    average_intensity = data["average_intensity"]
    if average_intensity is None:
        average_intensity = average_intensity_from_invariants(b[0], dims)
    q = data["radial_points"]
    rebuilt = invariants_from_projection(projection)
    angular = data["angular_points"] if data["angular_points"] is not None \
        else 2 * np.pi * np.arange(n_delta) / n_delta
    tree = {
        "dimensions": int(dims),
        "xray_wavelength": float(data["xray_wavelength"]),
        "max_order": int(settings.max_order),
        "average_intensity": np.asarray(average_intensity, float),
        "data_radial_points": q,
        "data_angular_points": angular,
        "data_min_q": float(q.min()),
        "number_of_particles": int(data["number_of_particles"]),
        "deg_2_invariant": {"I1I1": b},
        "deg_2_invariant_masks": {"I1I1": masks},
        "deg_2_invariant_q_id_limits": {"I1I1": limits},
        "data_projection_matrices": {"I1I1": tuple(projection)},
        "data_projection_matrices_q_id_limits": {"I1I1": limits[:, 0]},
        "data_projection_matrix_error_estimates": {"I1I1": projection_error_estimates(b, projection, rebuilt)},
    }
    if dims == 3:
        low = min(settings.max_order, settings.low_resolution_intensity_approximation.max_order)
        tree["data_low_resolution_intensity_coefficients"] = tuple(projection[:low + 1])
    ccd_file.write_xframe_h5(archive.file("proj_data.h5"), tree)
    archive.set_main("proj_data.h5")

    orders = list(range(0, min(len(b), 16), 2 if settings.cross_correlation.datasets.I1I1.assume_zero_odd_orders else 1))
    archive.savefig(ccd_file.invariant_figure(b, q, orders, "extracted |B_l|"), "invariants_abs.png")
    archive.savefig(ccd_file.invariant_figure(b, q, orders, "extracted arg B_l", mode="arg"), "invariants_arg.png")
    archive.savefig(ccd_file.invariant_figure(rebuilt, q, orders,
                                              "B_l rebuilt from projection matrices V_l V_l†"),
                    "invariants_from_projection.png")
    archive.savefig(ccd_file.invariant_figure(b, q, orders, "mask of B_l", mode="mask", mask=masks),
                    "invariants_mask.png")
    return {"invariants": b, "projection_matrices": projection, "masks": masks, "q_id_limits": limits}
