"""Calibration of a 4D-STEM experiment: from PyPty-style `experiment:` settings to physical units.

This is PyPty's `append_exp_params` as a pure function of the settings and the data, shared by
`ptycho` and the direct methods (`dpc`, `wdd`, `tcbf`).

Conventions (xpr.em, see also xpr/em/optics.py):

* Patterns are (N_scan, ky, kx), zero frequency at pixel (n_ky // 2, n_kx // 2) (fftshift
  order), scan points in raster order with y the slow axis: index = iy * nx + ix.
* Reciprocal pixel size `rez_pixel_size_invA` in Å⁻¹ (no 2π); `rez_pixel_size_mrad` converts by
  k = θ / λ. The real-space pixel of the (padded) pattern grid is 1 / (rez · n_padded).
* Aberrations in Krivanek notation [C10, C12a, C12b, C21a, C21b, C23a, C23b, C30, ...] in Å.
  PyPty's `defocus` is extra defocus on top of the list, and defocus = −C10, so the probe's
  effective coefficient is C10_eff = aberrations[0] − defocus (`Experiment.probe_aberrations`).
* PL rotation θ (`PLRotation_deg`): the detector axes are rotated by θ relative to the scan axes.
  A scan point r_scan = (x, y)·step lands in the detector-aligned reconstruction frame at
  r = R(θ) r_scan with R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]] acting on (x, y) — PyPty's
  `get_positions_pixel_size(rot_angle_deg=−PLRotation_deg)`. A vector measured on the detector
  (a centre-of-mass shift) is brought into the scan frame by R(−θ).
* `transposed`: the detector's ky and kx axes are swapped relative to the scan (a mirror that no
  rotation can undo). The prepared patterns are transposed back, so downstream code never sees it.
* Scan positions `scan_positions_px` are, as in PyPty, the top-left corners of the pattern-sized
  probe windows in the reconstruction grid (pixels of `pixel_size_A`), [y, x], minimum 0.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import optimize

from xpr import backend as backends
from xpr.em.optics import electron_wavelength_A, with_defocus
from xpr.em.ptychography import rotation
from xpr.errors import InputError
from xpr.options import options, setting
from xpr.io.checks import check_intensity_frames

# Keys of the `experiment:` group, with PyPty's names. Values missing from the settings (null)
# are taken from the data file's calibration attributes when it has them (simulate_4dstem output).
EXPERIMENT_KEYS = (
    "acc_voltage", "rez_pixel_size_A", "rez_pixel_size_mrad", "conv_semiangle_mrad",
    "scan_size", "scan_step_A", "aberrations", "defocus", "PLRotation_deg", "data_pad",
    "data_bin", "flip_ky", "transposed", "num_slices", "total_thickness",
)

# Keys whose origin (settings or data file) the log reports.
CALIBRATION_REPORTED = ("acc_voltage", "rez_pixel_size_A", "rez_pixel_size_mrad",
                        "conv_semiangle_mrad", "scan_size", "scan_step_A", "aberrations",
                        "defocus", "PLRotation_deg", "transposed")

# Keys that choose how the data are processed, not what they are: never read from the data file.
PROCESSING_KEYS = ("data_pad", "data_bin")

BRIGHT_FIELD_THRESHOLD = 0.5   # fraction of the mean pattern's maximum that counts as bright field

# float32 copies of a batch alive at once while it is prepared (read, flip/transpose/bin, clip,
# roll, pad): a streamed batch holds max_memory_GB / WORK_COPIES of patterns.
WORK_COPIES = 4

# rms curl / divergence above which the PL-rotation fit is reported as unreliable (on abTEM MoS2
# data, 0.5 Å step, C10 = −100 Å: ratio 0.91, fitted 6.8° for a true 0°; well-sampled scans ≲ 0.2)
UNRELIABLE_CURL_RATIO = 0.5


# --------------------------------------------------------------------------------------------
# reading data
# --------------------------------------------------------------------------------------------

def _read_raw(path: Path, dataset=None):
    """All patterns of a 4D-STEM file (xpr.io.stem4d formats), 3-D or 4-D, in memory."""
    from xpr.io.stem4d import open_scan

    with open_scan(path, dataset) as scan:
        return scan.read_all().reshape(scan.shape)


class _LazyStack:
    """The (N, ky, kx) shape of a Scan4D, for the checks before any pattern is read."""

    def __init__(self, scan):
        self.shape = (scan.n_patterns,) + tuple(scan.detector_shape)


def _as_pattern_stack(raw, path=None):
    """(N, ky, kx) patterns and the scan shape a 4-D array carries (None for 3-D)."""
    if raw.ndim == 4:
        return np.asarray(raw).reshape(-1, raw.shape[2], raw.shape[3]), (raw.shape[0], raw.shape[1])
    if raw.ndim == 3:
        return np.asarray(raw), None
    raise InputError(f"patterns must be 3-D (N, ky, kx) or 4-D (ny, nx, ky, kx), got shape "
                     f"{tuple(raw.shape)}", file=path, key="experiment.data_path")


def load_patterns(path) -> np.ndarray:
    """Diffraction patterns (N, ky, kx) from a PyPty .h5 (dataset `data`) or a 3-/4-D .npy."""
    path = Path(path)
    patterns, _ = _as_pattern_stack(_read_raw(path), path)
    return patterns


def read_file_calibration(path, dataset=None) -> dict:
    """Calibration stored with the data, under the `experiment:` key names (xpr.io.stem4d: root
    attributes or an `experiment`/`calibration` group for xpr/PyPty files, py4DSTEM's calibration,
    NeXus axis units, RosettaSciIO metadata; a 4-D array gives `scan_size`)."""
    from xpr.io.stem4d import open_scan

    with open_scan(path, dataset) as scan:
        return dict(scan.calibration)


def _plain(value):
    """HDF5 attribute → plain Python (bytes → str, arrays → lists, numpy scalars → numbers)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------
# centre of mass and the PL rotation
# --------------------------------------------------------------------------------------------

def center_of_mass(patterns, xp=np):
    """Centre of mass of each pattern, (com_y, com_x) in detector pixels from the centre pixel.

    patterns: (..., ky, kx) with zero frequency at (ky // 2, kx // 2). Returns two arrays of the
    leading shape. Multiply by the reciprocal pixel size for Å⁻¹.
    """
    n_ky, n_kx = patterns.shape[-2:]
    ky = xp.arange(n_ky, dtype=xp.float32) - n_ky // 2
    kx = xp.arange(n_kx, dtype=xp.float32) - n_kx // 2
    total = patterns.sum(axis=(-2, -1))
    total = xp.where(total > 0, total, 1)
    com_y = (patterns.sum(axis=-1) * ky).sum(axis=-1) / total
    com_x = (patterns.sum(axis=-2) * kx).sum(axis=-1) / total
    return com_y, com_x


def rotate_to_scan_frame(com_y, com_x, pl_rotation_deg, transposed=False):
    """A detector-frame vector field (e.g. the CoM) expressed in the scan frame: R(−θ) g.

    With `transposed` the detector's y/x components are first swapped back.
    """
    if transposed:
        com_y, com_x = com_x, com_y
    theta = math.radians(pl_rotation_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    scan_x = cos * com_x + sin * com_y
    scan_y = -sin * com_x + cos * com_y
    return scan_y, scan_x


def _curl_and_divergence(g_y, g_x):
    """Finite-difference curl and divergence of a 2-D vector field on the scan grid."""
    dgx_dy, dgx_dx = np.gradient(g_x)
    dgy_dy, dgy_dx = np.gradient(g_y)
    return dgy_dx - dgx_dy, dgx_dx + dgy_dy


def _curl_norm(theta_deg, com_y, com_x, transposed):
    g_y, g_x = rotate_to_scan_frame(com_y, com_x, theta_deg, transposed)
    curl, _ = _curl_and_divergence(g_y, g_x)
    return float(np.sum(curl ** 2))


class RotationFit(NamedTuple):
    angle_deg: float      # PL rotation θ in (−180, 180]
    transposed: bool      # detector axes swapped relative to the scan
    curl_ratio: float     # rms curl / rms divergence of the rotated field (≈ 0 for a good fit)


def _integrate_periodic(g_y, g_x):
    """φ with ∇φ ≈ g on the grid (unit step), by Fourier integration with 2× zero padding."""
    ny, nx = g_y.shape
    q_y = np.fft.fftfreq(2 * ny)[:, None]
    q_x = np.fft.fftfreq(2 * nx)[None, :]
    q2 = q_y ** 2 + q_x ** 2
    q2[0, 0] = 1.0
    fft = backends.cpu()
    padded_y = np.zeros((2 * ny, 2 * nx))
    padded_x = np.zeros((2 * ny, 2 * nx))
    padded_y[:ny, :nx] = g_y
    padded_x[:ny, :nx] = g_x
    spectrum = (q_y * fft.fftn(padded_y) + q_x * fft.fftn(padded_x)) / (2j * np.pi * q2)
    spectrum[0, 0] = 0.0
    return fft.ifftn(spectrum).real[:ny, :nx]


def fit_pl_rotation(com_y, com_x, try_transposed=True, dark_field=None) -> RotationFit:
    """PL rotation from the centre-of-mass field: the rotation that makes it curl-free.

    com_y, com_x: (ny, nx) CoM maps on the scan grid (detector frame). The CoM of a phase object
    is (1/2π) |P|² ⋆ ∇φ, a gradient field, so its curl vanishes in the scan frame. The curl
    criterion is blind to θ → θ + 180° (it flips the field's sign). The branch is chosen so that
    the integrated phase correlates positively with the `dark_field` map (counts scattered
    outside the bright-field disk, (ny, nx)): both are |P|² ⋆ (something peaked on the atoms),
    whatever the probe's defocus. Without a usable dark field, the branch whose divergence is
    negatively skewed is taken (∇²φ is sharply negative on atoms, whose phase is positive; this
    can fail for a strongly defocused probe on a crystal).
    With `try_transposed`, the swapped detector axes are tried too and the lower curl wins.
    """
    com_y = np.asarray(com_y, dtype=np.float64)
    com_x = np.asarray(com_x, dtype=np.float64)
    com_y = com_y - com_y.mean()
    com_x = com_x - com_x.mean()
    if dark_field is not None:
        dark_field = np.asarray(dark_field, dtype=np.float64)
        dark_field = dark_field - dark_field.mean()
        if not np.any(dark_field):
            dark_field = None
    candidates = []
    for transposed in ((False, True) if try_transposed else (False,)):
        grid = np.arange(-90.0, 90.0, 2.0)
        costs = [_curl_norm(t, com_y, com_x, transposed) for t in grid]
        start = grid[int(np.argmin(costs))]
        best = optimize.minimize_scalar(_curl_norm, bracket=(start - 2.0, start, start + 2.0),
                                        args=(com_y, com_x, transposed), tol=1e-10)
        theta = float(best.x)
        g_y, g_x = rotate_to_scan_frame(com_y, com_x, theta, transposed)
        curl, divergence = _curl_and_divergence(g_y, g_x)
        if branch_is_flipped(com_y, com_x, theta, transposed, dark_field):
            theta += 180.0
        theta = (theta + 180.0) % 360.0 - 180.0
        ratio = float(np.sqrt(np.mean(curl ** 2) / max(np.mean(divergence ** 2), 1e-300)))
        candidates.append(RotationFit(theta, transposed, ratio))
    return min(candidates, key=lambda fit: fit.curl_ratio)


def branch_is_flipped(com_y, com_x, theta_deg, transposed, dark_field=None) -> bool:
    """Whether θ + 180° rather than θ is the PL rotation, from the CoM field (ny, nx maps,
    detector frame, means removed): the phase integrated from the field rotated by θ must
    correlate positively with the `dark_field` counts (ny, nx, mean removed) — atoms have a
    positive phase and scatter outside the bright field; without a dark field, its divergence
    must be negatively skewed (∇²φ is sharply negative on atoms)."""
    g_y, g_x = rotate_to_scan_frame(com_y, com_x, theta_deg, transposed)
    if dark_field is not None:
        return float(np.sum(_integrate_periodic(g_y, g_x) * dark_field)) < 0
    _, divergence = _curl_and_divergence(g_y, g_x)
    return float(np.mean((divergence - divergence.mean()) ** 3)) > 0


def dark_field_signal(patterns, outer_factor=1.2, threshold=BRIGHT_FIELD_THRESHOLD):
    """Counts of each pattern outside outer_factor × the bright-field disk radius (N,), or None
    when the detector holds no dark field."""
    outside = dark_field_mask(patterns.mean(axis=0), outer_factor, threshold)
    if outside is None:
        return None
    return patterns[:, outside].sum(axis=1)


def dark_field_mask(mean_pattern, outer_factor=1.2, threshold=BRIGHT_FIELD_THRESHOLD):
    """Detector pixels outside outer_factor × the bright-field disk radius of the mean pattern
    (+1 px), or None when fewer than 4 are (no dark field on the detector)."""
    n_ky, n_kx = mean_pattern.shape
    radius = bright_field_radius_px(mean_pattern, threshold)
    ky = np.arange(n_ky)[:, None] - n_ky // 2
    kx = np.arange(n_kx)[None, :] - n_kx // 2
    outside = np.hypot(ky, kx) > outer_factor * radius + 1.0
    return outside if outside.sum() >= 4 else None


def rotation_branch_margin() -> float:
    """Branch score (rotation.ParallaxFit.branch_score) below which the 180° choice is flagged."""
    return rotation.BRANCH_MARGIN


def _parallax(batches, mean_pattern, rez, wavelength_A, conv_semiangle_mrad, scan_size,
              scan_step_A, allow_transposed, known_c10, dark_field):
    """rotation.parallax_fit on the prepared (unpadded) patterns, or None when the scan or the
    bright-field disk is too small for it (fewer than 8 × 8 points or 16 BF pixels). The
    central rotation.MAX_SCAN_SIDE² scan points are used."""
    if min(scan_size) < 8:
        return None
    k_disk = None if conv_semiangle_mrad is None else conv_semiangle_mrad * 1e-3 / wavelength_A
    images, k_yx = rotation.bright_field_stack(batches, mean_pattern, rez, k_disk, scan_size,
                                               BRIGHT_FIELD_THRESHOLD,
                                               max_side=rotation.MAX_SCAN_SIDE)
    if len(k_yx) < 16:
        return None
    if dark_field is not None:          # on the same central scan points as the images
        dark_field = dark_field[rotation.central_window(scan_size, rotation.MAX_SCAN_SIDE)]
    return rotation.parallax_fit(images, k_yx, scan_step_A, wavelength_A, rez, backends.cpu(),
                                 "auto" if allow_transposed else False, known_c10,
                                 dark_field, k_disk)


# --------------------------------------------------------------------------------------------
# reciprocal pixel size from the bright-field disk
# --------------------------------------------------------------------------------------------

def bright_field_radius_px(mean_pattern, threshold=BRIGHT_FIELD_THRESHOLD) -> float:
    """Radius (pixels) of the disk of equal area to the bright field, to a fraction of a pixel.

    Pixels above threshold · max define the disk; its plateau is their median and the dark
    background the median of the pixels below a tenth of the maximum. Every pixel counts with its
    fraction of the way from background to plateau, so edge pixels count in part.
    """
    mean_pattern = np.asarray(mean_pattern, dtype=np.float64)
    peak = mean_pattern.max()
    bright = mean_pattern > threshold * peak
    dark = mean_pattern < 0.1 * peak
    plateau = float(np.median(mean_pattern[bright]))
    background = float(np.median(mean_pattern[dark])) if dark.any() else 0.0
    fraction = np.clip((mean_pattern - background) / max(plateau - background, 1e-300), 0.0, 1.0)
    return math.sqrt(fraction.sum() / math.pi)


def estimate_rez_pixel_size(mean_pattern, conv_semiangle_mrad, wavelength_A,
                            threshold=BRIGHT_FIELD_THRESHOLD) -> float:
    """Reciprocal pixel size (Å⁻¹) from the bright-field disk: k_α = α / λ spans r pixels."""
    radius = bright_field_radius_px(mean_pattern, threshold)
    if radius < 1:
        raise InputError("no bright-field disk found in the mean pattern; give "
                         "rez_pixel_size_A or rez_pixel_size_mrad", key="experiment.rez_pixel_size_A")
    return conv_semiangle_mrad * 1e-3 / (wavelength_A * radius)


# --------------------------------------------------------------------------------------------
# pattern preparation
# --------------------------------------------------------------------------------------------

def bin_patterns(patterns, factor: int):
    """Sum factor × factor detector pixels (the remainder rows/columns are cropped)."""
    if factor == 1:
        return patterns
    n, n_ky, n_kx = patterns.shape
    m_ky, m_kx = n_ky // factor, n_kx // factor
    cropped = patterns[:, :m_ky * factor, :m_kx * factor]
    return cropped.reshape(n, m_ky, factor, m_kx, factor).sum(axis=(2, 4))


def center_patterns(patterns):
    """Roll the patterns by whole pixels so the mean pattern's CoM sits on the centre pixel."""
    com_y, com_x = center_of_mass(patterns.mean(axis=0))
    shift = (-int(round(float(com_y))), -int(round(float(com_x))))
    if shift == (0, 0):
        return patterns, shift
    return np.roll(patterns, shift, axis=(1, 2)), shift


def pad_patterns(patterns, pad: int):
    if pad == 0:
        return patterns
    return np.pad(patterns, ((0, 0), (pad, pad), (pad, pad)))


def raster_positions_A(scan_size, scan_step_A, pl_rotation_deg):
    """Scan points (N, 2) [y, x] in Å in the detector-aligned frame: R(θ) applied to the grid."""
    ny, nx = scan_size
    grid_y, grid_x = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64),
                                 indexing="ij")
    theta = math.radians(pl_rotation_deg)
    x = math.cos(theta) * grid_x - math.sin(theta) * grid_y
    y = math.sin(theta) * grid_x + math.cos(theta) * grid_y
    return np.stack([y.ravel(), x.ravel()], axis=1) * scan_step_A


# --------------------------------------------------------------------------------------------
# the calibrated experiment
# --------------------------------------------------------------------------------------------

@options("em", "ptycho")
class DetectorProcessing:
    """How the patterns are prepared before calibration: experiment.data_pad, data_bin, flip_ky
    and transposed, documented alike for ptycho, dpc, wdd and tcbf (read from ptycho's file;
    tests/test_options.py checks the others agree)."""

    data_pad: int | None = setting("experiment.data_pad")      # px per side; null = a quarter of the width
    data_bin: int = setting("experiment.data_bin")
    flip_ky: bool = setting("experiment.flip_ky")
    transposed: bool | str = setting("experiment.transposed")


def detector_processing(values) -> tuple:
    """(data_bin ≥ 1, data_pad) of experiment settings `values` (a mapping), each at its
    documented default where missing; a null data_bin too, while a null data_pad stays null
    (pad_px: a quarter of the width). For estimates before the calibration checks the values."""
    documented = DetectorProcessing()
    return (max(1, int(values.get("data_bin") or documented.data_bin)),
            values.get("data_pad", documented.data_pad))


def pad_px(data_pad, width: int) -> int:
    """experiment.data_pad in pixels per side of patterns `width` pixels wide: null = a quarter
    of the width, rounded up."""
    return int(math.ceil(width / 4)) if data_pad is None else int(data_pad)


def experiment_dict(experiment_settings) -> dict:
    """The `experiment` settings block as a plain dict ({} when absent), for the calibration,
    the ptycho worker and its memory estimate alike."""
    if experiment_settings is None:
        return {}
    if hasattr(experiment_settings, "to_dict"):
        return dict(experiment_settings.to_dict())
    if isinstance(experiment_settings, Mapping):
        return dict(experiment_settings)
    raise TypeError("experiment settings must be a mapping")


def unpadded_batches(experiment):
    """(start, unpadded prepared patterns) batch by batch — one batch of everything when the
    experiment is in memory."""
    p = experiment.data_pad
    if not experiment.streamed:
        yield 0, experiment.unpadded_patterns
        return
    for start, batch in experiment.patterns.batches():
        yield start, batch if p == 0 else batch[:, p:-p, p:-p]


class StreamedPatterns:
    """Prepared patterns of a file larger than the memory budget, read batch by batch.

    The preparation of Experiment.from_settings (flip ky → transpose → bin → clip → roll by the
    centring shift → pad) is applied to each batch as it is read from the xpr.io.stem4d.Scan4D.
    `np.asarray` of it reads everything (methods that do not stream yet).
    """

    def __init__(self, scan, flip_ky, transposed, data_bin, batch_size):
        self.scan, self.flip_ky, self.transposed, self.data_bin = scan, flip_ky, transposed, data_bin
        self.batch_size = max(1, int(batch_size))
        self.shift, self.pad = (0, 0), 0

    @property
    def shape(self) -> tuple:
        ky, kx = self.scan.detector_shape
        if self.transposed:
            ky, kx = kx, ky
        b = self.data_bin
        return (self.scan.n_patterns, ky // b + 2 * self.pad, kx // b + 2 * self.pad)

    def prepare(self, raw):
        batch = raw[:, ::-1, :] if self.flip_ky else raw
        if self.transposed:
            batch = np.swapaxes(batch, 1, 2)
        batch = np.clip(bin_patterns(batch, self.data_bin), 0, None)
        if self.shift != (0, 0):
            batch = np.roll(batch, self.shift, axis=(1, 2))
        return np.ascontiguousarray(pad_patterns(batch, self.pad), dtype=np.float32)

    def batches(self):
        for start, raw in self.scan.batches(self.batch_size):
            yield start, self.prepare(raw)

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, dtype=np.float32)
        for start, batch in self.batches():
            out[start:start + len(batch)] = batch
        return out if dtype is None else out.astype(dtype)


def streamed_statistics(patterns: StreamedPatterns):
    """One pass: the mean pattern and every pattern's centre of mass (pixels from the centre)."""
    total = np.zeros(patterns.shape[1:], dtype=np.float64)
    com_y = np.empty(patterns.shape[0], dtype=np.float64)
    com_x = np.empty(patterns.shape[0], dtype=np.float64)
    for start, batch in patterns.batches():
        total += batch.sum(axis=0, dtype=np.float64)
        cy, cx = center_of_mass(batch)
        com_y[start:start + len(batch)] = cy
        com_x[start:start + len(batch)] = cx
    return total / patterns.shape[0], com_y, com_x


def streamed_dark_field(patterns: StreamedPatterns, mean_pattern, outer_factor=1.2,
                        threshold=BRIGHT_FIELD_THRESHOLD):
    """dark_field_signal batch by batch (the disk radius from the mean pattern), or None."""
    outside = dark_field_mask(mean_pattern, outer_factor, threshold)
    if outside is None:
        return None
    signal = np.empty(patterns.shape[0], dtype=np.float64)
    for start, batch in patterns.batches():
        signal[start:start + len(batch)] = batch[:, outside].sum(axis=1)
    return signal


@dataclass
class Experiment:
    """A calibrated 4D-STEM data set (all lengths in Å, reciprocal lengths in Å⁻¹)."""

    patterns: np.ndarray                 # (N, ky, kx) float32, prepared, zero frequency at centre
    scan_size: tuple                     # (ny, nx), y slow
    scan_step_A: float
    acc_voltage_kV: float
    wavelength_A: float
    rez_pixel_size_invA: float           # of the prepared (binned, padded) pattern grid
    pixel_size_A: float                  # real-space pixel of the padded pattern grid
    pl_rotation_deg: float
    transposed: bool
    conv_semiangle_mrad: float | None
    aberrations: list                    # as given (Krivanek, Å)
    defocus_A: float                     # extra defocus (PyPty's `defocus`)
    data_pad: int
    data_bin: int
    num_slices: int = 1
    total_thickness_A: float = 1.0
    scan_positions_A: np.ndarray = field(default=None, repr=False)
    scan_positions_px: np.ndarray = field(default=None, repr=False)
    pl_rotation_fit: RotationFit | None = None     # the CoM fit (PLRotation_deg: auto)
    parallax_fit: rotation.ParallaxFit | None = None   # the bright-field parallax fit (auto)
    c10_from_parallax: bool = False      # aberrations were not calibrated: C10 is the parallax's
    center_shift_px: tuple = (0, 0)
    notes: list = field(default_factory=list)
    com_px: tuple | None = None          # (com_y, com_x) of the prepared patterns when streamed
    mean_pattern: np.ndarray | None = field(default=None, repr=False)   # unpadded, when streamed

    # ---------------------------------------------------------------- derived quantities
    @property
    def n_scan(self) -> int:
        return int(self.patterns.shape[0])

    @property
    def pattern_shape(self) -> tuple:
        return tuple(self.patterns.shape[1:])

    @property
    def probe_aberrations(self) -> list:
        """Krivanek list for the probe with the extra defocus folded in: C10 −= defocus."""
        return with_defocus(self.aberrations or [], self.defocus_A)

    @property
    def aperture_radius_invA(self) -> float | None:
        if self.conv_semiangle_mrad is None:
            return None
        return self.conv_semiangle_mrad * 1e-3 / self.wavelength_A

    @property
    def streamed(self) -> bool:
        return isinstance(self.patterns, StreamedPatterns)

    @property
    def unpadded_patterns(self) -> np.ndarray:
        p = self.data_pad
        patterns = np.asarray(self.patterns)
        return patterns if p == 0 else patterns[:, p:-p, p:-p]

    @property
    def object_shape_px(self) -> tuple:
        """Smallest reconstruction grid holding every probe window."""
        top = np.ceil(self.scan_positions_px.max(axis=0)).astype(int)
        return int(top[0]) + self.pattern_shape[0] + 1, int(top[1]) + self.pattern_shape[1] + 1

    def scan_maps(self, values):
        """Per-pattern values (N, ...) as maps on the scan grid (ny, nx, ...)."""
        return values.reshape(self.scan_size + values.shape[1:])

    def summary(self) -> str:
        return (f"{self.n_scan} patterns {self.pattern_shape}, scan {self.scan_size} × "
                f"{self.scan_step_A:g} Å, {self.acc_voltage_kV:g} kV (λ = {self.wavelength_A:.5f} Å), "
                f"rez {self.rez_pixel_size_invA:.5g} Å⁻¹, pixel {self.pixel_size_A:.4g} Å, "
                f"PL rotation {self.pl_rotation_deg:.2f}°{' (transposed)' if self.transposed else ''}")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_settings(cls, experiment_settings, patterns, file_calibration=None, data_file=None,
                      file_sources=None, memory_GB=None):
        """Calibrate `patterns` ((N, ky, kx) or (ny, nx, ky, kx)) with the `experiment:` settings.

        Settings values that are null fall back to `file_calibration` (from the data file;
        `file_sources` says where in it each was found). Errors in the user's input raise
        InputError naming the `experiment.<key>`. The notes say where each calibration value
        came from (settings or the data file).

        `patterns` may be an opened xpr.io.stem4d.Scan4D: with `memory_GB` given and the data
        (as float32) larger than that, the patterns stay in the file (StreamedPatterns) and the
        mean pattern, centres of mass and dark-field counts are computed batch by batch.
        """
        settings = experiment_dict(experiment_settings)
        given = {k: v for k, v in (file_calibration or {}).items()
                 if v is not None and k not in PROCESSING_KEYS}
        from_file = set(given)
        given.update({k: v for k, v in settings.items() if v is not None})
        origins = []
        for key in CALIBRATION_REPORTED:
            if key in given:
                if key in settings and settings[key] is not None:
                    where = "settings" + (" (overrides the data file)" if key in from_file else "")
                else:
                    where = "data file" + (f": {file_sources[key]}" if file_sources
                                           and key in file_sources else "")
                origins.append(f"{key} = {given[key]!r} from {where}")

        def need(key, why):
            if given.get(key) is None:
                raise InputError(f"experiment.{key} is needed ({why}) and is neither in the settings "
                                 "nor in the data file", file=data_file, key=f"experiment.{key}")
            return given[key]

        scan = patterns if hasattr(patterns, "batches") else None
        if scan is not None:
            stack = _LazyStack(scan)
            shape_in_data = scan.scan_shape
            stream = memory_GB is not None and scan.nbytes_float32 > memory_GB * 1e9
            if not stream:
                raw = check_intensity_frames(scan.read_all().reshape(scan.shape), file=data_file,
                                             key="experiment.data_path",
                                             what="diffraction intensities")
                stack, shape_in_data = _as_pattern_stack(raw, data_file)
        else:
            stream = False
            stack, shape_in_data = _as_pattern_stack(np.asarray(patterns), data_file)
        notes = ["calibration: " + "; ".join(origins)] if origins else []

        # scan grid
        scan_size = given.get("scan_size", shape_in_data)
        if scan_size is None:
            raise InputError("experiment.scan_size [ny, nx] is needed for a 3-D pattern stack",
                             file=data_file, key="experiment.scan_size")
        try:
            scan_size = tuple(int(n) for n in scan_size)
        except (TypeError, ValueError) as err:
            raise InputError(f"scan_size must be two integers [ny, nx], got {scan_size!r}",
                             file=data_file, key="experiment.scan_size") from err
        if len(scan_size) != 2 or min(scan_size) < 1:
            raise InputError(f"scan_size must be two positive integers [ny, nx], got {list(scan_size)}",
                             file=data_file, key="experiment.scan_size")
        if scan_size[0] * scan_size[1] != stack.shape[0]:
            raise InputError(f"scan_size {list(scan_size)} has {scan_size[0] * scan_size[1]} points but "
                             f"the data hold {stack.shape[0]} patterns", file=data_file,
                             key="experiment.scan_size")
        if shape_in_data is not None and tuple(shape_in_data) != scan_size:
            raise InputError(f"scan_size {list(scan_size)} disagrees with the 4-D data's scan shape "
                             f"{list(shape_in_data)}", file=data_file, key="experiment.scan_size")
        scan_step_A = float(need("scan_step_A", "the scan step in Å"))
        if scan_step_A <= 0:
            raise InputError(f"scan_step_A must be positive, got {scan_step_A}", file=data_file,
                             key="experiment.scan_step_A")

        # beam
        acc_voltage = float(need("acc_voltage", "the accelerating voltage in kV"))
        if acc_voltage <= 0:
            raise InputError(f"acc_voltage must be positive (kV), got {acc_voltage}", file=data_file,
                             key="experiment.acc_voltage")
        wavelength_A = electron_wavelength_A(acc_voltage)
        conv_semiangle = given.get("conv_semiangle_mrad")
        conv_semiangle = None if conv_semiangle is None else float(conv_semiangle)

        # detector preparation: flip, transpose, bin, centre (documented values for the keys
        # neither the settings nor the file give: a partial mapping from a script or a test)
        documented = DetectorProcessing()
        data_bin = int(given.get("data_bin") or documented.data_bin)
        if data_bin < 1:
            raise InputError(f"data_bin must be ≥ 1, got {data_bin}", key="experiment.data_bin")
        transposed_setting = given.get("transposed", documented.transposed)
        if isinstance(transposed_setting, str) and transposed_setting.lower() != "auto":
            raise InputError(f"transposed must be true, false or auto, got {transposed_setting!r}",
                             key="experiment.transposed")
        transposed = transposed_setting is True
        stream_com = None
        if stream:
            pattern_bytes = 4 * int(np.prod(scan.detector_shape))
            prepared = StreamedPatterns(scan, bool(given.get("flip_ky", documented.flip_ky)), transposed,
                                        data_bin, memory_GB * 1e9 // (WORK_COPIES * pattern_bytes))
            mean_pattern, com_y0, com_x0 = streamed_statistics(prepared)
            centre_y, centre_x = center_of_mass(mean_pattern)
            center_shift = (-int(round(float(centre_y))), -int(round(float(centre_x))))
            prepared.shift = center_shift
            mean_pattern = np.roll(mean_pattern, center_shift, axis=(0, 1))
            stream_com = (com_y0 + center_shift[0], com_x0 + center_shift[1])
            notes.append(f"{scan.n_patterns} patterns streamed from the file in batches of "
                         f"{prepared.batch_size} ({scan.nbytes_float32 / 1e9:.3g} GB as float32 > the "
                         f"budget of {memory_GB:.3g} GB)")
        else:
            prepared = np.asarray(stack, dtype=np.float32)
            if bool(given.get("flip_ky", documented.flip_ky)):
                prepared = prepared[:, ::-1, :]
            if transposed:
                prepared = np.swapaxes(prepared, 1, 2)
            prepared = bin_patterns(prepared, data_bin)
            prepared = np.clip(prepared, 0, None)
            prepared, center_shift = center_patterns(prepared)
            mean_pattern = None
        if center_shift != (0, 0):
            notes.append(f"patterns re-centred by {center_shift} px (mean CoM off the centre pixel)")

        # reciprocal pixel size of the binned detector
        if given.get("rez_pixel_size_A") is not None:
            rez = float(given["rez_pixel_size_A"]) * data_bin
        elif given.get("rez_pixel_size_mrad") is not None:
            rez = float(given["rez_pixel_size_mrad"]) * 1e-3 / wavelength_A * data_bin
        elif conv_semiangle is not None:
            rez = estimate_rez_pixel_size(prepared.mean(axis=0) if mean_pattern is None
                                          else mean_pattern, conv_semiangle, wavelength_A)
            notes.append(f"reciprocal pixel size {rez:.5g} Å⁻¹ estimated from the bright-field disk")
        else:
            raise InputError("the detector is not calibrated: give rez_pixel_size_A, "
                             "rez_pixel_size_mrad or conv_semiangle_mrad", file=data_file,
                             key="experiment.rez_pixel_size_A")
        if rez <= 0:
            raise InputError(f"reciprocal pixel size must be positive, got {rez}",
                             key="experiment.rez_pixel_size_A")

        # PL rotation (and, when asked, transposition): from the bright-field parallax when the
        # probe is defocused enough, else from the curl-free CoM field
        pl_setting = given.get("PLRotation_deg", "auto")
        rotation_fit = parallax = None
        known_c10 = None
        if given.get("aberrations") is not None or given.get("defocus") is not None:
            known_c10 = with_defocus([float(c) for c in np.ravel(given.get("aberrations") or [])],
                                     float(given.get("defocus") or 0.0))[0]
        fitted_c10 = None
        if isinstance(pl_setting, str):
            if pl_setting.lower() != "auto":
                raise InputError(f"PLRotation_deg must be a number or auto, got {pl_setting!r}",
                                 key="experiment.PLRotation_deg")
            if stream:
                com_y, com_x = stream_com
                dark_field = streamed_dark_field(prepared, mean_pattern)
                bright_mean, batches = mean_pattern, prepared.batches()
            else:
                com_y, com_x = center_of_mass(prepared)
                dark_field = dark_field_signal(prepared)
                bright_mean, batches = prepared.mean(axis=0), [(0, prepared)]
            com_y, com_x = com_y.reshape(scan_size), com_x.reshape(scan_size)
            if dark_field is not None:
                dark_field = dark_field.reshape(scan_size) - dark_field.mean()
                dark_field = dark_field if np.any(dark_field) else None
            rotation_fit = fit_pl_rotation(com_y, com_x,
                                           try_transposed=transposed_setting == "auto",
                                           dark_field=dark_field)
            parallax = _parallax(batches, bright_mean, rez, wavelength_A, conv_semiangle,
                                 scan_size, scan_step_A, transposed_setting == "auto", known_c10,
                                 dark_field)
            com_note = (f"centre-of-mass fit {rotation_fit.angle_deg:.2f}°"
                        f"{' transposed' if rotation_fit.transposed else ''} (rms curl / "
                        f"divergence {rotation_fit.curl_ratio:.3f})")
            com_reliable = rotation_fit.curl_ratio <= UNRELIABLE_CURL_RATIO
            if parallax is not None and (parallax.reliable
                                         or (parallax.usable and not com_reliable)):
                if known_c10 is None or abs(known_c10) < 1e-6:
                    if known_c10 is None:
                        fitted_c10 = parallax.c10_A
                    else:
                        notes.append(f"WARNING: the calibrated C10 is 0 but the bright-field "
                                     f"parallax says {parallax.c10_A:.1f} Å")
                pl_rotation_deg, swap = parallax.angle_deg, parallax.transposed
                notes.append(
                    f"PL rotation from the bright-field parallax: {pl_rotation_deg:.2f}° "
                    f"± {parallax.uncertainty_deg:.2f}°{', detector transposed' if swap else ''} "
                    f"({parallax.n_bright_field} BF images, parallax {parallax.edge_shift_steps:.1f}"
                    f" scan steps at the disk edge, misfit {parallax.misfit_steps:.2f}; C10 "
                    f"{parallax.c10_A:.1f} Å; 180° branch from "
                    f"{'the calibrated C10' if known_c10 else 'the tcBF phase against the dark field' if dark_field is not None else 'the tcBF phase skewness'}); "
                    f"{com_note}")
                if not known_c10 and parallax.branch_score < rotation_branch_margin():
                    notes.append(f"WARNING: the 180° branch of the PL rotation is uncertain "
                                 f"(the two branches' scores differ by "
                                 f"{parallax.branch_score:.3f}); give the sign of C10 "
                                 "(experiment.aberrations or defocus) or PLRotation_deg")
                if not parallax.reliable:
                    notes.append("WARNING: the bright-field parallax is noisy and the centre-of-"
                                 "mass field far from curl-free: the fitted PL rotation is "
                                 "uncertain; give experiment.PLRotation_deg if it is known")
            else:
                pl_rotation_deg, swap = rotation_fit.angle_deg, rotation_fit.transposed
                why = ("no bright-field disk" if parallax is None else
                       f"parallax {parallax.edge_shift_steps:.1f} scan steps at the disk edge, "
                       f"misfit {parallax.misfit_steps:.2f} steps, θ ± {parallax.uncertainty_deg:.1f}°")
                notes.append(f"PL rotation fitted from the curl-free CoM field: "
                             f"{pl_rotation_deg:.2f}°{', detector transposed' if swap else ''} "
                             f"(rms curl / divergence {rotation_fit.curl_ratio:.3f}; the "
                             f"bright-field parallax is not usable: {why})")
                if rotation_fit.curl_ratio > UNRELIABLE_CURL_RATIO:
                    notes.append(f"WARNING: the centre-of-mass field is far from curl-free at "
                                 f"every angle (ratio {rotation_fit.curl_ratio:.2f} > "
                                 f"{UNRELIABLE_CURL_RATIO}) and the bright-field parallax "
                                 "unusable (probe near focus, or noise): the fitted PL rotation "
                                 "is unreliable; give experiment.PLRotation_deg")
            if swap:
                if stream:
                    prepared.transposed = not prepared.transposed
                    stream_com = stream_com[::-1]
                    mean_pattern = np.ascontiguousarray(mean_pattern.T)
                else:
                    prepared = np.ascontiguousarray(np.swapaxes(prepared, 1, 2))
                transposed = True
            if fitted_c10 is not None:
                notes.append(f"aberrations not calibrated: C10 = {fitted_c10:.1f} Å (defocus "
                             f"{-fitted_c10:.1f} Å) taken from the bright-field parallax")
        else:
            pl_rotation_deg = float(pl_setting)
            if transposed_setting == "auto":
                notes.append("transposed: auto is decided by the PL-rotation fit, which is off "
                             "(PLRotation_deg is a number); the detector is taken as not transposed")

        # padding and the real-space grid
        pad = pad_px(settings.get("data_pad", documented.data_pad), prepared.shape[-1])
        if pad < 0:
            raise InputError(f"data_pad must be ≥ 0, got {pad}", key="experiment.data_pad")
        if stream:
            prepared.pad = pad
        else:
            prepared = np.ascontiguousarray(pad_patterns(prepared, pad), dtype=np.float32)
        n_padded = prepared.shape[-1]
        pixel_size_A = 1.0 / (rez * n_padded)

        positions_A = raster_positions_A(scan_size, scan_step_A, pl_rotation_deg)
        positions_px = (positions_A - positions_A.min(axis=0)) / pixel_size_A

        aberrations = given.get("aberrations") or []
        aberrations = [float(c) for c in np.ravel(aberrations)]
        if fitted_c10 is not None:
            aberrations = [fitted_c10]
        return cls(
            patterns=prepared, scan_size=scan_size, scan_step_A=scan_step_A,
            acc_voltage_kV=acc_voltage, wavelength_A=wavelength_A, rez_pixel_size_invA=rez,
            pixel_size_A=pixel_size_A, pl_rotation_deg=pl_rotation_deg, transposed=transposed,
            conv_semiangle_mrad=conv_semiangle, aberrations=aberrations,
            defocus_A=float(given.get("defocus", 0.0) or 0.0), data_pad=pad, data_bin=data_bin,
            num_slices=int(given.get("num_slices", 1) or 1),
            total_thickness_A=float(given.get("total_thickness", 1.0) or 1.0),
            scan_positions_A=positions_A, scan_positions_px=positions_px,
            pl_rotation_fit=rotation_fit, parallax_fit=parallax,
            c10_from_parallax=fitted_c10 is not None, center_shift_px=center_shift,
            notes=notes,
            com_px=stream_com, mean_pattern=mean_pattern if stream else None)


def load_experiment(experiment_settings, default_data_path=None, memory_GB=None):
    """Read the data named by `experiment.data_path` (or the default) and calibrate it.

    `experiment.dataset` names the HDF5 dataset when the file's layout does not say
    (xpr.io.stem4d); the file's calibration fills the settings left null. With `memory_GB`, data
    larger than that stay in the file and are streamed (Experiment.patterns is then a
    StreamedPatterns; the file stays open until the experiment is garbage-collected)."""
    from xpr.io.stem4d import open_scan

    settings = experiment_dict(experiment_settings)
    data_path = settings.get("data_path") or default_data_path
    if data_path is None:
        raise InputError("no input data: set experiment.data_path", key="experiment.data_path")
    data_path = Path(data_path).expanduser()
    scan = open_scan(data_path, settings.get("dataset"), settings.get("scan_size"))
    try:
        experiment = Experiment.from_settings(settings, scan, dict(scan.calibration),
                                              data_file=data_path, file_sources=dict(scan.sources),
                                              memory_GB=memory_GB)
    finally:
        if memory_GB is None or not scan.nbytes_float32 > memory_GB * 1e9:
            scan.close()
    return experiment, data_path
