"""Peak-memory estimates of `simulate_focal` and `tie`, checked before the run folder exists.

Neither command has a batch to shrink: every image of the series is formed (or read) and
transformed at once, so a series that would not fit stops with exit 2 naming the key, the
estimate and the limit (xpr.memory). The bytes per pixel are counted from the code and checked
against tracemalloc peaks (tests/em/test_memory_em.py, benchmarks/bench_memory.py).
"""
from __future__ import annotations

from pathlib import Path

from xpr import memory

# simulate_focal, bytes per image pixel: the electrostatic and magnetic phases and the amplitude
# (float64), the exit wave and its spectrum (complex128) -- 68 measured; per image of the series
# its transfer function (complex64), the image (float64) and its noisy and misaligned copies,
# the float32 copy written -- 51 measured (both with the flipped series of the tutorial, whose
# images are formed after the first series' copies are gone: it adds nothing to the peak)
FOCAL_FIXED, FOCAL_PER_IMAGE = 72, 52
# tie, bytes per image pixel with its default refinement: the solver's spectra and work arrays
# (complex128), the phases and intensities it keeps -- 184 measured; per image of each series: the
# images as read (float32), their registered copies -- 11.4 measured (on the tutorial's series and
# its flipped twin, 3 and 5 images each: 23 per pixel and defocus; the two are retrieved one after
# the other, so the solver's work is not held twice)
TIE_FIXED, TIE_PER_IMAGE = 184, 12


def simulate_focal(settings) -> memory.Estimate:
    imaging = settings["imaging"]
    pixels = int(imaging["image_size"]) ** 2
    images = len(list(imaging["defocus_m"]))
    per_image = FOCAL_PER_IMAGE
    return memory.Estimate().add("forming the focal series", {
        "specimen, exit wave and spectrum": FOCAL_FIXED * pixels,
        f"{images} images, transfer functions and copies": per_image * images * pixels})


def validate_simulate_focal(settings, log=None, limit=None):
    """Exit 2 (key imaging.image_size) when the series would not fit; logs the plan with `log`."""
    estimate = simulate_focal(settings)
    limit = limit or memory.available()
    n = int(settings["imaging"]["image_size"])
    what = f"simulating {len(list(settings['imaging']['defocus_m']))} images of {n}x{n} px"
    memory.require(estimate, limit, "imaging.image_size", what, "smaller images or fewer defocus values")
    memory.log_plan(log, what, estimate, limit)


def tie(n_images, shape, flipped=False) -> memory.Estimate:
    pixels = int(shape[-2]) * int(shape[-1])
    series = 2 if flipped else 1
    return memory.Estimate().add("retrieving the phase", {
        "solver work and results": TIE_FIXED * pixels,
        f"{series} x {n_images} images and their copies": TIE_PER_IMAGE * n_images * pixels * series})


def series_shape(path):
    """(images, ny, nx, flipped) of an HDF5 focal-series file from its header, else None (image
    files, lists of files and unreadable files are read and checked by the worker)."""
    import h5py

    if not isinstance(path, (str, Path)) or Path(str(path)).suffix.lower() not in (".h5", ".hdf5"):
        return None
    try:
        with h5py.File(Path(str(path)).expanduser(), "r") as handle:
            images = handle.get("images")
            if not isinstance(images, h5py.Dataset) or images.ndim != 3:
                return None
            n, ny, nx = images.shape
            return int(n), int(ny), int(nx), "images_flipped" in handle
    except OSError:
        return None


def validate_tie(settings, shape=None, log=None, limit=None):
    """Exit 2 (key input.focal_series) when the series (its size from the file's header) would
    not fit; logs the plan with `log`."""
    shape = shape or series_shape(settings["input"]["focal_series"])
    if shape is None:
        return
    n, ny, nx, flipped = shape
    estimate = tie(n, (ny, nx), flipped)
    limit = limit or memory.available()
    what = f"tie on {n} images of {ny}x{nx} px" + (" and the flipped series" if flipped else "")
    memory.require(estimate, limit, "input.focal_series", what, "a cropped or binned series",
                   settings=False)
    memory.log_plan(log, what, estimate, limit)
