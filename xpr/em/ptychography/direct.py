"""What the direct 4D-STEM methods (`dpc`, `wdd`, `tcbf`) share as workers: finding the input,
calibrating it, and writing the products (main HDF5 with `phase` and `pixel_size_A`, PNGs).
"""
from __future__ import annotations

import numpy as np

from xpr import backend as backends
from xpr import plot
from xpr.em.ptychography.calibration import load_experiment


def default_data_path(settings, archive):
    """experiment.data_path, or the latest `simulate_4dstem` output of this structure."""
    given = settings["experiment"].get("data_path")
    if given:
        return given
    return archive.home.latest("em", "simulate_4dstem", f"{settings['structure_name']}.h5")


def prepare(settings, archive, memory_GB=None):
    """The compute backend and the calibrated experiment (logged) of a direct-method run; with
    `memory_GB`, data larger than that are streamed from the file (Experiment.streamed)."""
    backend = backends.from_settings(settings)
    data_path = default_data_path(settings, archive)
    experiment, data_path = load_experiment(settings["experiment"], data_path, memory_GB)
    archive.log.info("data %s: %s", data_path, experiment.summary())
    if backend.is_gpu:
        archive.log.info("calibration (centre of mass, rotation fit) ran on the CPU by design (scan-sized "
                         "host arrays); the reconstruction runs on %s", backend)
    for note in experiment.notes:
        archive.log.info(note)
    return backend, experiment, data_path


def calibration_record(experiment, data_path) -> dict:
    """The calibration actually used, for the product file (PyPty's key names where they exist)."""
    return {
        "data_path": str(data_path),
        "acc_voltage": experiment.acc_voltage_kV,
        "wavelength_A": experiment.wavelength_A,
        "rez_pixel_size_A": experiment.rez_pixel_size_invA,
        "conv_semiangle_mrad": np.nan if experiment.conv_semiangle_mrad is None
        else experiment.conv_semiangle_mrad,
        "scan_size": np.asarray(experiment.scan_size),
        "scan_step_A": experiment.scan_step_A,
        "PLRotation_deg": experiment.pl_rotation_deg,
        "transposed": bool(experiment.transposed),
        "aberrations": np.asarray(experiment.probe_aberrations, dtype=float),
        "data_bin": experiment.data_bin,
        "data_pad": experiment.data_pad,
    }


def save_products(archive, command, experiment, data_path, result, pixel_size_A, images,
                  extra=None):
    """Main HDF5 `<command>.h5` (`phase`, `pixel_size_A`, everything in result, calibration) + PNGs."""
    tree = dict(result)
    tree["pixel_size_A"] = float(pixel_size_A)
    tree["calibration"] = calibration_record(experiment, data_path)
    tree.update(extra or {})
    archive.save_h5(f"{command}.h5", tree, main=True)
    fig, axes = plot.figure(1, len(images), size=(4.2, 3.6))
    axes = np.atleast_1d(axes)
    for ax, (name, title) in zip(axes, images.items()):
        image = np.asarray(result[name])
        extent = (0, image.shape[1] * pixel_size_A, 0, image.shape[0] * pixel_size_A) \
            if image.shape[:2] == result["phase"].shape else None
        plot.image(ax, image, title, cmap="gray" if name == "phase" else "RdBu_r", extent=extent)
        if extent:
            ax.set_xlabel("x (Å)")
    archive.savefig(fig, f"{command}.png")
