"""4D-STEM data as microscopes and peers write it, opened lazily, with the calibration it carries.

`open_scan(path, dataset=None)` returns a `Scan4D`: the patterns stay in the file (an h5py
dataset, a .npy read slab by slab or a dask array) and are read in batches of whole patterns; the
calibration found in the file's metadata is returned under the `experiment:` key names
(`acc_voltage` kV, `scan_step_A`, `rez_pixel_size_A` Å⁻¹ or `rez_pixel_size_mrad`,
`conv_semiangle_mrad`, `PLRotation_deg`, `scan_size`) with, for every value, where it came from.

Formats:

* `.npy` 3-D (N, ky, kx) or 4-D (ny, nx, ky, kx): read slab by slab (NpyFile).
* HDF5 (`.h5 .hdf5 .nxs .emd .cxi`), in this order of preference:
  `dataset` when given (any path in the file); the root dataset `data` (xpr's simulate_4dstem and
  PyPty; calibration in root attributes or an `experiment`/`calibration` group named as the
  settings keys); an EMD 1.0 file written by py4DSTEM (a 4-D `datacube` array node; the
  calibration from its `metadatabundle/calibration` group: R_pixel_size/units, Q_pixel_size/units,
  QR_rotation, QR_flip); NeXus (the `@default` chain to an NXdata group, its `@signal` dataset,
  axis units from `@axes`); otherwise the only 3-D/4-D dataset in the file. Compressed
  datasets (bitshuffle/LZ4, Blosc, Zstd… as detectors write them) are read through the
  `hdf5plugin` filters that xpr.io.h5 registers; the NeXus signal is xpr.io.h5.nexus_signal.
* Through RosettaSciIO (`rosettasciio`, lazily, as dask arrays): Gatan `.dm3/.dm4`, Quantum
  Detectors Merlin `.mib`, EMPAD `.xml` (+ its `.raw`), Velox/NCEM `.emd` that are not EMD 1.0,
  `.tif/.tiff`. Axes with length units give the scan step, reciprocal or angular units the
  detector pixel; `Acquisition_instrument.TEM` gives the beam energy and convergence angle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xpr.errors import InputError
from xpr.io.checks import check_intensity_frames

KEY = "experiment.data_path"
HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs", ".cxi", ".emd", ".hdf")
RSCIIO_SUFFIXES = {".dm3": "digitalmicrograph", ".dm4": "digitalmicrograph",
                   ".mib": "quantumdetector", ".xml": "empad", ".emd": "emd",
                   ".tif": "tiff", ".tiff": "tiff"}
CALIBRATION_KEYS = (
    "acc_voltage", "rez_pixel_size_A", "rez_pixel_size_mrad", "conv_semiangle_mrad",
    "scan_size", "scan_step_A", "aberrations", "defocus", "PLRotation_deg", "data_pad",
    "data_bin", "flip_ky", "transposed", "num_slices", "total_thickness",
)

# length units → Å; reciprocal length units → Å⁻¹ (no 2π); angles → mrad
LENGTH_A = {"a": 1.0, "å": 1.0, "angstrom": 1.0, "angstroms": 1.0, "nm": 10.0, "pm": 0.01,
            "um": 1e4, "µm": 1e4, "μm": 1e4, "m": 1e10}
RECIPROCAL_INV_A = {"1/a": 1.0, "1/å": 1.0, "a^-1": 1.0, "å^-1": 1.0, "a-1": 1.0, "1/angstrom": 1.0,
                    "1/nm": 0.1, "nm^-1": 0.1, "nm-1": 0.1, "1/pm": 100.0, "1/m": 1e-10}
ANGLE_MRAD = {"mrad": 1.0, "rad": 1e3, "urad": 1e-3, "µrad": 1e-3}


def _unit(value) -> str:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return str(value or "").strip().lower().replace(" ", "")


def _plain(value):
    """HDF5 attribute → plain Python (bytes → str, arrays → lists, numpy scalars → numbers)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "S":
            value = value.astype(str)
        return value.tolist() if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


class NpyFile:
    """A .npy array read slab by slab along its first axis with plain file reads.

    Unlike a memory map, the pages read do not stay mapped into the process (a memmap's
    touched pages count in its resident memory until the kernel drops them), so streaming a
    file larger than memory keeps the resident set at one batch.
    """

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran and len(shape) > 1:
            raise ValueError("Fortran-ordered .npy arrays cannot be streamed; save in C order")
        if dtype.hasobject:
            raise ValueError("the .npy file holds Python objects, not numbers")
        self.shape, self.dtype = tuple(shape), dtype
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("NpyFile reads contiguous slabs along the first axis only")
        start, stop, _ = index.indices(self.shape[0])
        stop = max(start, stop)
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with open(self.path, "rb") as handle:
            handle.seek(self.offset + start * row)
            values = np.fromfile(handle, dtype=self.dtype, count=(stop - start) * row
                                 // self.dtype.itemsize)
        return values.reshape((stop - start,) + self.shape[1:])


@dataclass
class Scan4D:
    """Lazily opened 4D-STEM patterns and the calibration the file carries.

    data: (ny, nx, ky, kx) or (N, ky, kx), sliceable along the first axis without reading the
    rest (h5py dataset, memmap, dask array). calibration: {experiment key: value}; sources:
    {experiment key: where it was read}.
    """

    path: Path
    data: object
    where: str
    calibration: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    handle: object = None

    # ------------------------------------------------------------------ shape
    @property
    def shape(self) -> tuple:
        return tuple(int(s) for s in self.data.shape)

    @property
    def scan_shape(self):
        return self.shape[:2] if len(self.shape) == 4 else None

    @property
    def n_patterns(self) -> int:
        return int(np.prod(self.shape[:-2]))

    @property
    def detector_shape(self) -> tuple:
        return self.shape[-2:]

    @property
    def nbytes_float32(self) -> int:
        return self.n_patterns * int(np.prod(self.detector_shape)) * 4

    # ------------------------------------------------------------------ reading
    def read(self, start: int, stop: int) -> np.ndarray:
        """Patterns start..stop-1 in raster order (y slow) as float32 (B, ky, kx)."""
        stop = min(int(stop), self.n_patterns)
        try:
            if len(self.shape) == 3:
                block = self.data[start:stop]
                offset = 0
            else:
                nx = self.shape[1]
                first, last = start // nx, -(-stop // nx)
                block = self.data[first:last]
                offset = start - first * nx
            block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        except OSError as err:
            raise InputError(f"cannot read the patterns ({self.where}): {err}"
                             + _filter_hint(err), file=self.path, key=KEY) from None
        block = block.reshape((-1,) + self.detector_shape)[offset:offset + stop - start]
        if block.dtype.kind not in "iuf":     # complex or not numbers: refused, never cast
            check_intensity_frames(block, file=self.path, key=KEY, what="diffraction intensities")
        return block.astype(np.float32, copy=False)

    def batches(self, size: int):
        """(start, patterns) for consecutive batches of at most `size` patterns."""
        size = max(1, int(size))
        for start in range(0, self.n_patterns, size):
            yield start, self.read(start, start + size)

    def read_all(self) -> np.ndarray:
        """Every pattern, (N, ky, kx) float32 (in memory)."""
        return self.read(0, self.n_patterns)

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> list:
        """One line per calibration value read from the file: `key = value (source)`."""
        return [f"{key} = {self.calibration[key]!r} (from the data file: {self.sources[key]})"
                for key in self.calibration]


def _filter_hint(err) -> str:
    text = str(err).lower()
    if "filter" in text or "plugin" in text:
        return (" — the dataset is compressed with a filter h5py lacks: install `hdf5plugin`"
                " (pip install hdf5plugin)")
    return ""


def _pattern_array_check(array, path, where):
    if array.ndim not in (3, 4):
        raise InputError(f"{where} has shape {list(array.shape)}: 4D-STEM patterns must be 3-D "
                         "(N, ky, kx) or 4-D (ny, nx, ky, kx); name another dataset with "
                         "experiment.dataset", file=path, key=KEY)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def open_scan(path, dataset: str | None = None, scan_size=None) -> Scan4D:
    """Open a 4D-STEM file lazily (see the module docstring for the formats).

    scan_size [ny, nx], when known, shapes formats that do not record it (Merlin .mib without
    its .hdr: RosettaSciIO otherwise guesses the line length from the frame time stamps).
    """
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise InputError(f"data file does not exist: {path}", file=path, key=KEY)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = NpyFile(path)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read {path.name}: {err}", file=path, key=KEY) from None
        _pattern_array_check(array, path, path.name)
        scan = Scan4D(path, array, path.name)
    elif suffix in HDF5_SUFFIXES and _is_hdf5(path):
        scan = _open_hdf5(path, dataset)
    elif suffix in RSCIIO_SUFFIXES or suffix == ".raw":
        scan = _open_rsciio(path, scan_size)
    else:
        raise InputError(f"unsupported 4D-STEM data format {suffix!r} (expected .npy, HDF5/NeXus/"
                         "EMD (.h5 .hdf5 .nxs .emd), .dm3/.dm4, .mib, EMPAD .xml/.raw, .tif)",
                         file=path, key=KEY)
    if scan.scan_shape is not None:
        scan.calibration.setdefault("scan_size", list(scan.scan_shape))
        scan.sources.setdefault("scan_size", f"shape of {scan.where}")
    return scan


def _is_hdf5(path) -> bool:
    import h5py

    return h5py.is_hdf5(path)


# --------------------------------------------------------------------------------------------
# HDF5: xpr / PyPty, py4DSTEM (EMD 1.0), NeXus, a named dataset
# --------------------------------------------------------------------------------------------

def _open_hdf5(path: Path, dataset: str | None) -> Scan4D:
    import h5py

    import xpr.io.h5  # noqa: F401  (importing it registers hdf5plugin's detector filters)
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"cannot open {path.name} as HDF5: {err}", file=path, key=KEY) from None
    try:
        calibration, sources = {}, {}
        if dataset:
            if dataset not in handle or not isinstance(handle[dataset], h5py.Dataset):
                raise InputError(f"no dataset {dataset!r} in {path.name} (3-D/4-D datasets: "
                                 f"{_candidates(handle) or 'none'})", file=path, key="experiment.dataset")
            node = handle[dataset]
            _nexus_axes(node, calibration, sources)
        elif isinstance(handle.get("data"), h5py.Dataset):
            node = handle["data"]
        elif (found := _py4dstem_datacube(handle)) is not None:
            node = found["data"]
            _py4dstem_calibration(handle, found, calibration, sources)
        elif (found := _nexus_signal(handle, path)) is not None:
            node = found
            _nexus_axes(node, calibration, sources)
        else:
            candidates = _candidates(handle)
            if len(candidates) != 1:
                raise InputError(f"{path.name} holds {len(candidates)} 3-D/4-D datasets "
                                 f"({', '.join(candidates) or 'none'}): name one with "
                                 "experiment.dataset", file=path, key="experiment.dataset")
            node = handle[candidates[0]]
            _nexus_axes(node, calibration, sources)
        _pattern_array_check(node, path, f"{path.name}:{node.name}")
        _xpr_attributes(handle, calibration, sources)
        return Scan4D(path, node, f"{path.name}:{node.name}", calibration, sources, handle)
    except BaseException:
        handle.close()
        raise


def _candidates(handle) -> list:
    import h5py

    names = []
    handle.visititems(lambda name, obj: names.append(name)
                      if isinstance(obj, h5py.Dataset) and obj.ndim in (3, 4) else None)
    return names


def _xpr_attributes(handle, calibration, sources):
    """Attributes named like the `experiment:` keys (xpr's simulate_4dstem, PyPty)."""
    import h5py

    places = [("/", handle.attrs)]
    for name in ("experiment", "calibration"):
        if isinstance(handle.get(name), h5py.Group):
            group = handle[name]
            places.append((f"/{name} attributes", group.attrs))
            places.append((f"/{name}", {k: group[k][()] for k in group
                                        if isinstance(group[k], h5py.Dataset)}))
    for where, source in places:
        for key in CALIBRATION_KEYS:
            if key in source:
                calibration[key] = _plain(source[key])
                sources[key] = f"{where} {key}"


def _py4dstem_datacube(handle):
    """The 4-D array node of an EMD 1.0 file (py4DSTEM / emdfile), or None.

    Layout (emdfile 0.0.x, as py4DSTEM 0.14 writes it): root attribute emd_group_type = 'file';
    a root group (emd_group_type 'root') holding the DataCube as a group with
    emd_group_type 'array' (python_class 'DataCube'), its `data` dataset (Rx, Ry, Qx, Qy) and
    dim1..dim4 vectors; the calibration in <root>/metadatabundle/calibration.
    """
    import h5py

    if _plain(handle.attrs.get("emd_group_type")) != "file":
        return None
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and _plain(obj.attrs.get("emd_group_type")) == "array" \
                and isinstance(obj.get("data"), h5py.Dataset) and obj["data"].ndim == 4:
            found.append(obj)
    handle.visititems(visit)
    if not found:
        return None
    cubes = [g for g in found if _plain(g.attrs.get("python_class")) == "DataCube"] or found
    return cubes[0]


def _py4dstem_calibration(handle, cube, calibration, sources):
    import h5py

    group = None
    parent = cube
    while parent is not None and parent.name != "/":        # nearest metadatabundle/calibration
        candidate = parent.get("metadatabundle/calibration")
        if isinstance(candidate, h5py.Group):
            group = candidate
            break
        parent = parent.parent
    if group is None:
        return
    values = {k: _plain(group[k][()]) for k in group if isinstance(group[k], h5py.Dataset)}
    values.update({k: _plain(v) for k, v in group.attrs.items()})
    where = group.name
    r_size, r_units = values.get("R_pixel_size"), _unit(values.get("R_pixel_units"))
    if r_size is not None and r_units in LENGTH_A:
        calibration["scan_step_A"] = float(np.ravel(r_size)[0]) * LENGTH_A[r_units]
        sources["scan_step_A"] = f"{where} R_pixel_size [{r_units}]"
    q_size, q_units = values.get("Q_pixel_size"), _unit(values.get("Q_pixel_units"))
    if q_size is not None:
        q_size = float(np.ravel(q_size)[0])
        if q_units in RECIPROCAL_INV_A:
            calibration["rez_pixel_size_A"] = q_size * RECIPROCAL_INV_A[q_units]
            sources["rez_pixel_size_A"] = f"{where} Q_pixel_size [{q_units}]"
        elif q_units in ANGLE_MRAD:
            calibration["rez_pixel_size_mrad"] = q_size * ANGLE_MRAD[q_units]
            sources["rez_pixel_size_mrad"] = f"{where} Q_pixel_size [{q_units}]"
    rotation = values.get("QR_rotation_degrees", values.get("QR_rotation"))
    if rotation is not None:
        degrees = float(rotation) if "QR_rotation_degrees" in values else math.degrees(float(rotation))
        calibration["PLRotation_deg"] = degrees
        sources["PLRotation_deg"] = f"{where} QR_rotation"
    semiangle = values.get("convergence_semiangle_mrad")
    if semiangle is not None:
        calibration["conv_semiangle_mrad"] = float(semiangle)
        sources["conv_semiangle_mrad"] = f"{where} convergence_semiangle_mrad"
    if values.get("QR_flip") is not None:
        calibration["transposed"] = bool(values["QR_flip"])
        sources["transposed"] = f"{where} QR_flip"
    # py4DSTEM arrays are (Rx, Ry, Qx, Qy): x first. xpr reads (ny, nx, ky, kx) with y slow;
    # the first two axes are taken as the slow/fast scan axes as stored.


def _nexus_signal(handle, path):
    """The NXdata @signal dataset (xpr.io.h5.nexus_signal: the @default chain), or None."""
    from xpr.io.h5 import SignalNotFound, nexus_signal

    try:
        name = nexus_signal(handle)
    except SignalNotFound as err:
        raise InputError(f"{err}; or name the dataset with experiment.dataset", file=path,
                         key="experiment.dataset") from None
    return None if name is None else handle[name]


def _nexus_axes(node, calibration, sources):
    """Scan step and detector pixel from NXdata axes (@axes; uniform axis vectors with @units)."""
    import h5py

    group = node.parent
    axes = _plain(group.attrs.get("axes"))
    if axes is None:
        return
    axes = [axes] if isinstance(axes, str) else list(axes)
    if len(axes) != node.ndim:
        return
    for index, name in enumerate(axes):
        vector = group.get(name) if name not in (".", None) else None
        if not isinstance(vector, h5py.Dataset) or vector.ndim != 1 or vector.shape[0] < 2:
            continue
        step = float(np.median(np.diff(vector[()])))
        units = _unit(vector.attrs.get("units"))
        scan_axis = index < node.ndim - 2
        where = f"{group.name}/{name} [{units}]"
        if scan_axis and units in LENGTH_A:
            calibration["scan_step_A"] = abs(step) * LENGTH_A[units]
            sources["scan_step_A"] = where
        elif not scan_axis and units in RECIPROCAL_INV_A:
            calibration["rez_pixel_size_A"] = abs(step) * RECIPROCAL_INV_A[units]
            sources["rez_pixel_size_A"] = where
        elif not scan_axis and units in ANGLE_MRAD:
            calibration["rez_pixel_size_mrad"] = abs(step) * ANGLE_MRAD[units]
            sources["rez_pixel_size_mrad"] = where


# --------------------------------------------------------------------------------------------
# RosettaSciIO: Gatan, Merlin, EMPAD, Velox EMD, TIFF
# --------------------------------------------------------------------------------------------

def _open_rsciio(path: Path, scan_size=None) -> Scan4D:
    import importlib

    suffix = path.suffix.lower()
    if suffix == ".raw":                 # EMPAD: the .xml next to the .raw describes it
        xml = sorted(path.parent.glob("*.xml"))
        if not xml:
            raise InputError("an EMPAD .raw needs its .xml file next to it (give the .xml)",
                             file=path, key=KEY)
        path, suffix = xml[0], ".xml"
    plugin = RSCIIO_SUFFIXES[suffix]
    try:
        module = importlib.import_module(f"rsciio.{plugin}")
    except ImportError:
        raise InputError(f"reading {suffix} files needs RosettaSciIO: pip install rosettasciio "
                         "(or xpr[formats])", file=path, key=KEY) from None
    try:
        extra = {}
        if plugin == "quantumdetector" and scan_size is not None:
            extra["navigation_shape"] = (int(scan_size[1]), int(scan_size[0]))   # (x, y) order
        signals = module.file_reader(str(path), lazy=True, **extra)
    except Exception as err:  # noqa: BLE001 — any reader failure is a bad file for the user
        raise InputError(f"RosettaSciIO ({plugin}) cannot read {path.name}: "
                         f"{type(err).__name__}: {err}", file=path, key=KEY) from None
    signals = [s for s in signals if np.ndim(s["data"]) in (3, 4)] if isinstance(signals, list) else []
    if not signals:
        raise InputError(f"{path.name} holds no 3-D/4-D data set", file=path, key=KEY)
    signal = max(signals, key=lambda s: np.ndim(s["data"]))
    data = signal["data"]
    calibration, sources = {}, {}
    axes = sorted(signal.get("axes", []), key=lambda a: a.get("index_in_array", 0))
    where = f"{path.name} ({plugin})"
    if len(axes) == np.ndim(data):
        for index, axis in enumerate(axes):
            units = _unit(axis.get("units"))
            scale = axis.get("scale")
            if scale is None or units in ("", "<undefined>"):
                continue
            scan_axis = index < np.ndim(data) - 2
            label = f"{where} axis {axis.get('name', index)} [{units}]"
            if scan_axis and units in LENGTH_A:
                calibration["scan_step_A"] = abs(float(scale)) * LENGTH_A[units]
                sources["scan_step_A"] = label
            elif not scan_axis and units in RECIPROCAL_INV_A:
                calibration["rez_pixel_size_A"] = abs(float(scale)) * RECIPROCAL_INV_A[units]
                sources["rez_pixel_size_A"] = label
            elif not scan_axis and units in ANGLE_MRAD:
                calibration["rez_pixel_size_mrad"] = abs(float(scale)) * ANGLE_MRAD[units]
                sources["rez_pixel_size_mrad"] = label
    tem = signal.get("metadata", {}).get("Acquisition_instrument", {}).get("TEM", {})
    if tem.get("beam_energy"):
        calibration["acc_voltage"] = float(tem["beam_energy"])
        sources["acc_voltage"] = f"{where} metadata Acquisition_instrument.TEM.beam_energy [keV]"
    if tem.get("convergence_angle"):
        calibration["conv_semiangle_mrad"] = float(tem["convergence_angle"])
        sources["conv_semiangle_mrad"] = f"{where} metadata Acquisition_instrument.TEM.convergence_angle"
    for name in ("scan_rotation", "rotation"):
        if tem.get(name) is not None:
            calibration["PLRotation_deg"] = float(tem[name])
            sources["PLRotation_deg"] = f"{where} metadata Acquisition_instrument.TEM.{name}"
            break
    return Scan4D(path, data, where, calibration, sources)
