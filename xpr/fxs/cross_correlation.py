"""The ccd.h5 and proj_data.h5 files of the fxs workflow (xFrame's layout) and their figures.

ccd.h5 (written by ``simulate_ccd`` and ``correlate``, read by ``extract``):
    radial_points (N_q, Å⁻¹), angular_points (Δ in [0, 2π)), xray_wavelength (Å),
    average_intensity (N_q), cross_correlation/I1I1 (N_q, N_q, n_Δ) on Δ_k = 2πk/n_Δ,
    number_of_particles; simulate_ccd adds the exact deg_2_invariant/I1I1 (L+1, N_q, N_q).
xFrame's 2-D files may list one more angular point than the cross-correlation has columns; the
data's own shape defines Δ_k.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from xpr.errors import InputError
from xpr.io.atomic import atomic_path


def write_xframe_h5(path, tree: dict) -> Path:
    """Write a nested dict like xFrame: tuples/lists become groups with attribute ``type`` and
    members "0", "1", … (always, even when their arrays share a shape); dicts become groups."""
    path = Path(path)

    def put(group, key, value):
        if isinstance(value, dict):
            sub = group.create_group(key)
            for k, v in value.items():
                put(sub, str(k), v)
        elif isinstance(value, (list, tuple)):
            sub = group.create_group(key)
            sub.attrs["type"] = "tuple" if isinstance(value, tuple) else "list"
            for i, v in enumerate(value):
                put(sub, str(i), v)
        elif isinstance(value, str):
            group.create_dataset(key, data=value, dtype=h5py.string_dtype())
        else:
            group.create_dataset(key, data=np.asarray(value))

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for k, v in tree.items():
                put(f, str(k), v)
    return path


def read_ccd(path, dataset: str = "I1I1") -> dict:
    """Read a ccd.h5 (xpr's or xFrame's); errors name the file and the missing field."""
    path = Path(path)
    if not path.exists():
        raise InputError("cross-correlation file not found (run `xpr fxs simulate_ccd` or "
                         "`xpr fxs correlate` first, or set input.ccd_file)", file=path, key="input.ccd_file")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"not a readable HDF5 file ({err})", file=path, key="input.ccd_file") from None
    with f:
        for field in ("radial_points", "cross_correlation", "xray_wavelength"):
            if field not in f:
                raise InputError(f"no '{field}' in the cross-correlation file", file=path, key=field)
        if dataset not in f["cross_correlation"]:
            raise InputError(f"no cross_correlation/{dataset} in the file", file=path,
                             key=f"cross_correlation/{dataset}")
        data = {
            "radial_points": np.asarray(f["radial_points"][()], float),
            "cross_correlation": np.asarray(f["cross_correlation"][dataset][()]),
            "xray_wavelength": float(np.asarray(f["xray_wavelength"][()])),
            "angular_points": np.asarray(f["angular_points"][()], float) if "angular_points" in f else None,
            "average_intensity": np.asarray(f["average_intensity"][()], float) if "average_intensity" in f else None,
            "number_of_particles": int(np.asarray(f["number_of_particles"][()])) if "number_of_particles" in f else 1,
            "dimensions": int(np.asarray(f["dimensions"][()])) if "dimensions" in f else None,
        }
        if "deg_2_invariant" in f and dataset in f["deg_2_invariant"]:
            data["deg_2_invariant"] = np.asarray(f["deg_2_invariant"][dataset][()])
        if "cross_correlation_mask" in f and dataset in f["cross_correlation_mask"]:
            data["cross_correlation_mask"] = np.asarray(f["cross_correlation_mask"][dataset][()], bool)
    cc = data["cross_correlation"]
    n_q = len(data["radial_points"])
    if cc.ndim != 3 or cc.shape[0] != n_q or cc.shape[1] != n_q:
        raise InputError(f"cross_correlation/{dataset} has shape {cc.shape}; expected "
                         f"({n_q}, {n_q}, n_angles) for {n_q} radial points", file=path,
                         key=f"cross_correlation/{dataset}")
    if not np.all(np.isfinite(cc)):
        raise InputError("the cross-correlation contains NaN or infinite values", file=path,
                         key=f"cross_correlation/{dataset}")
    return data


def ccd_tree(q, cc, xray_wavelength, average_intensity, n_particles=1, invariants=None,
             dimensions=None, cc_counts=None) -> dict:
    n_delta = cc.shape[-1]
    tree = {
        "radial_points": np.asarray(q, float),
        "angular_points": 2 * np.pi * np.arange(n_delta) / n_delta,
        "xray_wavelength": float(xray_wavelength),
        "average_intensity": np.asarray(average_intensity, float),
        "cross_correlation": {"I1I1": np.asarray(cc)},
        "number_of_particles": int(n_particles),
    }
    if invariants is not None:
        tree["deg_2_invariant"] = {"I1I1": np.asarray(invariants, np.complex128)}
    if dimensions is not None:
        tree["dimensions"] = int(dimensions)
    if cc_counts is not None:
        tree["number_of_patterns"] = int(cc_counts)
    return tree


# ------------------------------------------------------------- figures

def _plain_figure(nrows, ncols, size):
    """A figure without constrained layout (cheap to draw with many panels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(left=0.07, right=0.95, bottom=0.1, top=0.88, wspace=0.6, hspace=0.45)
    return fig, axes


def invariant_figure(b, q, orders, title: str, mode: str = "abs", mask=None):
    """Panels of B_l(q1, q2) for the given orders: |B_l| (log), arg B_l or a mask."""
    orders = [l for l in orders if l < len(b)][:8]
    ncols = min(4, max(1, len(orders)))
    nrows = int(np.ceil(len(orders) / ncols))
    fig, axes = _plain_figure(nrows, ncols, (3.2, 2.8))
    extent = [q[0], q[-1], q[0], q[-1]]
    for ax, l in zip(axes.ravel(), orders):
        if mode == "abs":
            values = np.abs(b[l])
            top = values.max()
            values = np.log10(np.maximum(values, top * 1e-12) if top > 0 else values + 1e-300)
            label = "log10 |B|"
        elif mode == "arg":
            values = np.angle(b[l])
            label = "arg B"
        else:
            values = np.asarray(mask[l], float)
            label = "mask"
        im = ax.imshow(values, origin="lower", extent=extent, cmap="viridis" if mode != "arg" else "twilight")
        ax.set_title(f"l = {l}")
        ax.set_xlabel("q2 [1/Å]")
        ax.set_ylabel("q1 [1/Å]")
        fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    for ax in axes.ravel()[len(orders):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def cc_figure(cc, q, title: str):
    """C(q, q, Δ) and C(q1, q2, 0)."""
    fig, axes = _plain_figure(1, 2, (4.5, 3.5))
    axes = axes[0]
    n_delta = cc.shape[-1]
    diag = np.real(cc[np.arange(len(q)), np.arange(len(q))])
    im = axes[0].imshow(diag, origin="lower", aspect="auto", extent=[0, 360 * (n_delta - 1) / n_delta, q[0], q[-1]])
    axes[0].set_xlabel("Δ [deg]")
    axes[0].set_ylabel("q [1/Å]")
    axes[0].set_title("C(q, q, Δ)")
    fig.colorbar(im, ax=axes[0])
    im = axes[1].imshow(np.real(cc[..., 0]), origin="lower", extent=[q[0], q[-1], q[0], q[-1]])
    axes[1].set_title("C(q1, q2, 0)")
    axes[1].set_xlabel("q2 [1/Å]")
    axes[1].set_ylabel("q1 [1/Å]")
    fig.colorbar(im, ax=axes[1])
    fig.suptitle(title)
    return fig
