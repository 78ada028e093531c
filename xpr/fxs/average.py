"""fxs average: align many reconstructions, average them, and measure their consistency (PRTF).

1. Read the reconstruct runs' data.h5 files (paths relative to HOME/data/fxs/reconstructions/,
   `{today}` = the date folder) and their common polar/spherical grid.
2. Select reconstructions: the n with the least error (optionally below an error limit), or a
   manual list of (file, reconstruction) pairs; the best or the last density of each.
3. Centre each density (centre of mass to the origin, by a Fourier phase ramp) and normalise it
   (maximum or mean).
4. Align every density to the reference -- the least-error one -- by the rotation (3-D: SO(3)
   correlation of the harmonic coefficients, coarse FFT grid + local refinement; 2-D: correlation
   over the angle) and the point inversion (2-D: mirror), see ``alignment``; drop those whose
   relative L2 distance to the reference stays above l2_error_limit.
5. Average the aligned densities; PRTF(q) of their amplitudes; write average_results.h5 with
   xFrame's groups (input, input_meta, aligned, average, centered_average, alignment,
   resolution_metrics, configuration), PRTF.png, vtk/real_average.vts and
   vtk/reciprocal_average.vts (3-D), average.png (2-D).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xpr.archive import read_run_records
from xpr.backend import Backend
from xpr.errors import InputError
from xpr.fxs import memory_plan
from xpr.fxs.alignment import (WignerD, align, centre, normalise, prtf, relative_error)
from xpr.fxs.grids import PhasingGrid
from xpr.fxs.transforms import FourierTransformPair, blas_threads
from xpr.io.h5 import load_tree


# ----------------------------------------------------------------------------------------------
# 1. the reconstruction files
# ----------------------------------------------------------------------------------------------

def reconstruction_paths(settings, archive) -> list[Path]:
    base = archive.home.data / "fxs" / "reconstructions"
    files = list(settings.reconstruction_files or [])
    shares = settings.input.shares_dir
    recorded = read_run_records(shares, "fxs", ("reconstruct",)) if shares else []
    if not files and not recorded:
        return [archive.home.latest("fxs", "reconstructions", f"{settings.dimensions}d_{settings.structure_name}.h5")]
    paths = list(recorded)
    for i, name in enumerate(files):
        path = Path(str(name)).expanduser()
        if not path.is_absolute():
            # xFrame's paths (<dims>d_<name>/<date>/run_N/data.h5) name runs that xpr keeps under
            # reconstructions/archive/: either form is accepted
            in_archive = base / "archive" / path
            path = base / path if (base / path).exists() or not in_archive.exists() else in_archive
        paths.append(path)
    return paths


def grid_from_configuration(configuration) -> PhasingGrid:
    g = configuration["internal_grid"]
    d = int(configuration["dimensions"])
    return PhasingGrid(d, np.asarray(g["real_radii"]), np.asarray(g["reciprocal_radii"]),
                       int(configuration["max_order"]), np.asarray(g["phis"]),
                       np.asarray(g["thetas"]) if d == 3 else None,
                       np.asarray(g["theta_weights"]) if d == 3 else None)


def read_reconstructions(paths, dimensions: int):
    """[(grid, {id: result dict})] of each file, checked to share one grid of the right dimension."""
    loaded = []
    for i, path in enumerate(paths):
        key = f"reconstruction_files[{i}]"
        if not path.is_file():
            raise InputError(f"reconstruction file {path} does not exist", file=path, key=key)
        try:
            tree = load_tree(path)
        except OSError as error:
            raise InputError(f"cannot read {path} as HDF5: {error}", file=path, key=key) from error
        if "reconstruction_results" not in tree or "configuration" not in tree:
            raise InputError(f"{path.name} is not a reconstruct data.h5 (no reconstruction_results)",
                             file=path, key=key)
        grid = grid_from_configuration(tree["configuration"])
        if grid.dimensions != dimensions:
            raise InputError(f"{path} holds {grid.dimensions}-D reconstructions but dimensions is {dimensions}",
                             file=path, key="dimensions")
        if loaded:
            first = loaded[0][0]
            same = (first.angular_shape == grid.angular_shape and np.allclose(first.real_radii, grid.real_radii))
            if not same:
                raise InputError(f"{path} was reconstructed on another grid than {paths[0]}; "
                                 "average reconstructions of one grid", file=path, key=key)
        loaded.append((grid, tree["reconstruction_results"]))
    return loaded


def to_internal_layout(field, dimensions):
    """xFrame's (N, theta, phi) / (N, phi) -> (phi, theta, N) / (phi, N)."""
    return np.moveaxis(field, 0, -1) if dimensions == 2 else np.transpose(field, (2, 1, 0))


def to_xframe_layout(field, dimensions):
    return np.moveaxis(field, -1, 0) if dimensions == 2 else np.transpose(field, (2, 1, 0))


# ----------------------------------------------------------------------------------------------
# 2. selection
# ----------------------------------------------------------------------------------------------

def select(loaded, selection) -> list[tuple]:
    """[(file index, reconstruction id, error)] chosen by the selection settings."""
    candidates = [(i, rid, float(result["final_error"]))
                  for i, (_, results) in enumerate(loaded) for rid, result in results.items()]
    if selection.method == "manual":
        chosen = []
        for k, pair in enumerate(selection.manual_specifier):
            if len(pair) != 2:
                raise InputError(f"manual_specifier entries are [file index, reconstruction index], got {pair!r}",
                                 key=f"selection.manual_specifier[{k}]")
            file_id, rid = int(pair[0]), str(int(pair[1]))
            if file_id >= len(loaded) or rid not in loaded[file_id][1]:
                raise InputError(f"no reconstruction {rid} in file {file_id}", key=f"selection.manual_specifier[{k}]")
            chosen.append((file_id, rid, float(loaded[file_id][1][rid]["final_error"])))
        if not chosen:
            raise InputError("selection.method is manual but manual_specifier is empty",
                             key="selection.manual_specifier")
        return chosen
    if selection.error_limit is not None:
        candidates = [c for c in candidates if c[2] <= selection.error_limit]
    candidates.sort(key=lambda c: c[2])
    chosen = candidates[:selection.n_reconstructions]
    if not chosen:
        raise InputError(f"no reconstruction has an error below error_limit {selection.error_limit}",
                         key="selection.error_limit")
    return chosen


# ----------------------------------------------------------------------------------------------
# 3-5. align and average
# ----------------------------------------------------------------------------------------------

def align_set(densities, transform, settings, log=None):
    """Centre, normalise and align a list of densities (internal layout) to the first one.

    Returns (aligned list, alignments, l2 distances to the reference, reference).
    """
    grid = transform.grid
    prepared = []
    for density in densities:
        if settings.normalize_reconstructions.use:
            density = normalise(density, settings.normalize_reconstructions.mode, grid)
        prepared.append(density)
    if settings.center_reconstructions:
        reference, _ = centre(prepared[0], grid, transform)
    else:
        reference = prepared[0]
    wigner = WignerD(grid.max_order) if grid.dimensions == 3 else None
    rotation = settings.find_rotation
    aligned, alignments, distances = [], [], []
    for k, density in enumerate(prepared):
        result, info = align(density, reference, transform, r_limit_ids=rotation.r_limit_ids,
                             consider_inversion=rotation.consider_point_inverse,
                             search_order=rotation.max_order, wigner=wigner,
                             centre_first=settings.center_reconstructions)
        aligned.append(result)
        alignments.append(info)
        distances.append(relative_error(result, reference, grid))
        if log is not None:
            log.info("reconstruction %d: correlation %.4f, L2 distance %.3f%s", k, info.correlation,
                     distances[-1], " (inverted)" if info.inverted else "")
    return aligned, alignments, np.array(distances), reference


def _plots(archive, grid, prtf_values, average, settings):
    from xpr import plot

    if prtf_values is not None:
        fig, ax = plot.figure(size=(5.0, 3.5))
        ax.plot(grid.reciprocal_radii, prtf_values)
        ax.axhline(1 / np.e, color="grey", lw=0.8, ls="--", label="1/e")
        ax.set_xlabel("q (1/Å)")
        ax.set_ylabel("PRTF")
        ax.set_ylim(0, 1.05)
        ax.legend()
        archive.savefig(fig, "PRTF.png")
    extent, planes = central_slices(average, grid)
    fig, axes = plot.figure(1, len(planes), size=(4.5, 4.0))
    for ax, (label, values) in zip(np.atleast_1d(axes), planes):
        plot.image(ax, values, title=f"average, {label}", extent=(-extent, extent, -extent, extent))
        ax.set_xlabel(f"{label[0]} (Å)")
        ax.set_ylabel(f"{label[1]} (Å)")
    archive.savefig(fig, "average.png")


def central_slices(density, grid, n_points: int = 201, extent=None):
    """The density (*angular, N) on the central planes through the origin, sampled on n x n
    Cartesian points over [-extent, extent]² (default: half the grid's radius): 2-D its plane
    ('xy'), 3-D the planes z = 0 ('xy'), y = 0 ('xz') and x = 0 ('yz'). Returns (extent, [(label,
    values (n, n) with axis 0 along the label's second coordinate)])."""
    from xpr.fxs.alignment import resample

    extent = float(grid.real_radii[-1] / 2 if extent is None else extent)
    xs = np.linspace(-extent, extent, n_points)
    a, b = np.meshgrid(xs, xs, indexing="xy")
    zero = np.zeros_like(a)
    if grid.dimensions == 2:
        return extent, [("xy", resample(density, grid, np.stack([a, b], axis=-1)))]
    planes = {"xy": (a, b, zero), "xz": (a, zero, b), "yz": (zero, a, b)}
    return extent, [(label, resample(density, grid, np.stack(xyz, axis=-1))) for label, xyz in planes.items()]


def validate(settings):
    """Before a run folder exists: when every reconstruction file is given by an absolute path
    (and no shares_dir), whether reading and aligning them fits in memory
    (memory_plan.plan_average, from the files' headers; exit 2). Otherwise the worker checks,
    before it reads them."""
    files = [Path(str(name)).expanduser() for name in settings.reconstruction_files or []]
    if files and all(f.is_absolute() for f in files) and not settings.input.shares_dir:
        memory_plan.plan_average(settings, [f for f in files if f.is_file()])


def run(settings, archive):
    """Align and average reconstructions; PRTF."""
    with blas_threads(1):
        return _run(settings, archive)


def _run(settings, archive):
    paths = reconstruction_paths(settings, archive)
    # from the files' headers, before they are read whole
    memory_plan.plan_average(settings, [p for p in paths if p.is_file()], log=archive.log)
    loaded = read_reconstructions(paths, settings.dimensions)
    grid = loaded[0][0]
    backend = Backend.from_settings(settings)
    transform = FourierTransformPair(grid, backend)
    chosen = select(loaded, settings.selection)
    field = "real_density" if settings.selection.used_reconstruction == "best" else "last_real_density"
    d = grid.dimensions
    densities = [to_internal_layout(np.asarray(loaded[f][1][rid][field], float), d) for f, rid, _ in chosen]
    archive.log.info("%d reconstructions selected from %d file(s); reference: file %d, reconstruction %s "
                     "(error %.2e)", len(chosen), len(paths), chosen[0][0], chosen[0][1], chosen[0][2])

    aligned, alignments, distances, reference = align_set(densities, transform, settings, archive.log)
    keep = np.ones(len(aligned), bool)
    if settings.l2_error_limit is not None:
        keep = distances <= settings.l2_error_limit
        keep[0] = True
    kept = [a for a, k in zip(aligned, keep) if k]
    archive.log.info("%d of %d aligned reconstructions within l2_error_limit %s", len(kept), len(aligned),
                     settings.l2_error_limit)
    average = np.mean(kept, axis=0)
    centred_average, _ = centre(average, grid, transform)
    xp = backend.xp
    amplitudes = backend.asnumpy(transform.forward(xp.asarray(np.stack(kept, axis=-2))))
    average_amplitude = amplitudes.mean(axis=-2)
    prtf_values = prtf(amplitudes, grid) if settings.resolution_metrics.PRTF else None

    configuration = {"internal_grid": {"real_radii": grid.real_radii, "reciprocal_radii": grid.reciprocal_radii,
                                       "phis": grid.phis,
                                       **({"thetas": grid.thetas, "theta_weights": grid.theta_weights}
                                          if d == 3 else {})},
                     "dimensions": d, "max_order": grid.max_order}
    tree = {
        "configuration": configuration,
        "input": {str(k): to_xframe_layout(x, d) for k, x in enumerate(densities)},
        "input_meta": {"files": [str(p) for p in paths],
                       "file_ids": np.array([c[0] for c in chosen]),
                       "reconstruction_ids": np.array([int(c[1]) for c in chosen]),
                       "errors": np.array([c[2] for c in chosen]),
                       "used_reconstruction": field},
        "aligned": {str(k): to_xframe_layout(x, d) for k, x in enumerate(aligned)},
        "alignment": {"rotations": np.array([a.rotation for a in alignments]),
                      "inverted": np.array([a.inverted for a in alignments]),
                      "shifts": np.array([a.shift for a in alignments]),
                      "correlations": np.array([a.correlation for a in alignments]),
                      "l2_distance_to_reference": distances,
                      "used_in_average": keep},
        "average": {"real_density": to_xframe_layout(average, d),
                    "reciprocal_density": to_xframe_layout(average_amplitude, d),
                    "n_averaged": int(len(kept))},
        "centered_average": {"real_density": to_xframe_layout(centred_average, d)},
        "reference": {"real_density": to_xframe_layout(reference, d)},
    }
    if prtf_values is not None:
        tree["resolution_metrics"] = {"PRTF": prtf_values, "q": grid.reciprocal_radii}
    archive.set_link_name(f"{settings.dimensions}d_{settings.structure_name}.h5")
    archive.save_h5("average_results.h5", tree, main=True)
    if settings.output.plots:
        _plots(archive, grid, prtf_values, average, settings)
    if settings.output.vtk and d == 3:
        archive.save_vts("vtk/real_average.vts", {"density": to_xframe_layout(average, d)}, grid="spherical",
                         axes=[grid.real_radii, grid.thetas, grid.phis])
        archive.save_vts("vtk/reciprocal_average.vts", {"amplitude": to_xframe_layout(average_amplitude, d)},
                         grid="spherical", axes=[grid.reciprocal_radii, grid.thetas, grid.phis])
    return {"average": average, "aligned": aligned, "alignments": alignments, "prtf": prtf_values,
            "grid": grid, "distances": distances}
