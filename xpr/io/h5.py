"""Nested dicts of arrays and scalars <-> HDF5 (h5py), in xFrame's layout.

* dict -> group; numpy array / number / string / bool -> dataset;
* list or tuple of equal-shape numbers -> one dataset; any other list or tuple -> a group with
  attribute `type` = 'list' | 'tuple' and members "0", "1", ... (as xFrame writes them);
* None -> an empty dataset with attribute `type` = 'None'.
Reading inverts all of it (xFrame's files read the same way).

Also the general helpers for HDF5 files users bring (any reader in xpr.io uses them):

* importing this module imports hdf5plugin, which registers the compression filters detectors
  write (bitshuffle-LZ4, LZ4, blosc, Zstd, ...) with HDF5, so h5py opens such files;
* `open_h5` (an InputError instead of an OSError), `list_datasets`;
* `nexus_signal` follows the NeXus `@default` chain to the NXdata group and its `@signal`;
* `cxi_data` finds the pattern and the detector mask where cxidb's CXI files keep them;
* `find_signal` picks the dataset of a file when none is named, or says why it cannot.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the detectors' compression filters with HDF5)
import numpy as np

from xpr.errors import InputError
from xpr.io.atomic import atomic_path

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".cxi", ".nxs", ".nx5", ".nx")


def save_tree(path, tree: dict, attrs: dict | None = None) -> Path:
    """Write `tree` to `path` atomically; `attrs` go on the root group."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            _write_group(f, tree)
    return path


def _is_uniform(seq) -> bool:
    if all(isinstance(item, str) for item in seq):
        return True
    if any(isinstance(item, (str, bytes, dict, type(None))) for item in seq):
        return False
    try:
        arr = np.asarray(seq)
    except (ValueError, TypeError):
        return False
    return arr.dtype.kind in "biufc"


def _write_group(group, tree: dict):
    for key, value in tree.items():
        _write_item(group, str(key), value)


def _write_item(group, key: str, value):
    if isinstance(value, dict):
        _write_group(group.create_group(key), value)
    elif value is None:
        dataset = group.create_dataset(key, data=h5py.Empty("f"))
        dataset.attrs["type"] = "None"
    elif isinstance(value, (list, tuple)) and not (len(value) and _is_uniform(value)):
        sub = group.create_group(key)
        sub.attrs["type"] = type(value).__name__
        for i, item in enumerate(value):
            _write_item(sub, str(i), item)
    elif isinstance(value, str):
        group.create_dataset(key, data=value, dtype=h5py.string_dtype())
    else:
        data = np.asarray(value)
        if data.dtype.kind == "U":
            data = data.astype(h5py.string_dtype())
        group.create_dataset(key, data=data)


def load_tree(path, dataset: str | None = None):
    """The whole file (or one group / dataset path inside it) as nested dicts of numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise InputError("HDF5 file not found", file=path)
    try:
        with h5py.File(path, "r") as f:
            node = f if dataset is None else f.get(dataset)
            if node is None:
                raise InputError(f"no dataset or group '{dataset}' in the file", file=path, key=dataset)
            return _read(node)
    except OSError as err:
        raise InputError(f"not a readable HDF5 file ({err})", file=path) from None


def _read(node):
    if isinstance(node, h5py.Dataset):
        if node.attrs.get("type") == "None" or node.shape is None:
            return None
        value = node[()]
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, np.ndarray) and value.dtype.kind == "O":
            return np.array([v.decode() if isinstance(v, bytes) else v for v in value.ravel()]).reshape(value.shape)
        return value
    kind = node.attrs.get("type")
    if isinstance(kind, bytes):
        kind = kind.decode()
    if kind in ("list", "tuple"):
        items = [_read(node[k]) for k in sorted(node.keys(), key=lambda k: int(k))]
        return items if kind == "list" else tuple(items)
    return {key: _read(node[key]) for key in node.keys()}


# ---------------------------------------------------------------------------------------------
# files users bring: open, list, and find the signal (NeXus, CXI) when no dataset is named


@contextlib.contextmanager
def open_h5(path, key=None):
    """h5py.File(path, "r"), with the detector filters registered; unreadable -> InputError."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise InputError("input file not found", file=path, key=key)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"not a readable HDF5 file ({err})", file=path, key=key) from None
    try:
        yield f
    finally:
        f.close()


def list_datasets(f) -> list[str]:
    """Every dataset path in the file (links followed once), as 'path [shape dtype]' sorted."""
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found.append(f"{name} {list(obj.shape)} {obj.dtype}")
    f.visititems(visit)
    return sorted(found)


def _text(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        return _text(value.reshape(()).item())
    return None if value is None else str(value)


def _nx_class(obj):
    return _text(obj.attrs.get("NX_class"))


def _is_dataset(f, name):
    try:
        return isinstance(f.get(name), h5py.Dataset)
    except (KeyError, OSError):       # a broken external or soft link
        return False


class SignalNotFound(Exception):
    """Why a file's signal could not be found (turned into an InputError by the caller)."""


def nexus_signal(f) -> str | None:
    """The path of the NeXus plottable signal: the root's `@default` entry (else the only
    NXentry), its `@default` NXdata group (else the only NXdata in it), the group's `@signal`
    dataset (else a dataset with attribute signal=1, else the group's only dataset).
    None when the file has no NeXus structure; SignalNotFound when the chain is broken."""
    entries = [k for k in f if isinstance(f[k], h5py.Group) and _nx_class(f[k]) == "NXentry"]
    default = _text(f.attrs.get("default"))
    if default is not None:
        if not isinstance(f.get(default), h5py.Group):
            raise SignalNotFound(f"NeXus: the root's @default names '{default}', which is not a group in the file")
        entry = default
    elif len(entries) == 1:
        entry = entries[0]
    elif not entries:
        return None
    else:
        raise SignalNotFound(f"NeXus: {len(entries)} NXentry groups ({', '.join(sorted(entries))}) "
                             "and no @default at the root")
    group = f[entry]
    default = _text(group.attrs.get("default"))
    if default is not None:
        if not isinstance(group.get(default), h5py.Group):
            raise SignalNotFound(f"NeXus: /{entry}/@default names '{default}', which is not a group")
        data_name = f"{entry}/{default}"
    else:
        nxdata = [k for k in group if isinstance(group[k], h5py.Group) and _nx_class(group[k]) == "NXdata"]
        if len(nxdata) != 1:
            raise SignalNotFound(f"NeXus: /{entry} has {len(nxdata)} NXdata groups "
                                 f"({', '.join(sorted(nxdata)) or 'none'}) and no @default")
        data_name = f"{entry}/{nxdata[0]}"
    data = f[data_name]
    signal = _text(data.attrs.get("signal"))
    if signal is not None:
        if not _is_dataset(f, f"{data_name}/{signal}"):
            raise SignalNotFound(f"NeXus: /{data_name}/@signal names '{signal}', which is not a "
                                 "readable dataset in that group")
        return f"{data_name}/{signal}"
    flagged = [k for k in data if _is_dataset(data, k) and _text(data[k].attrs.get("signal")) == "1"]
    members = [k for k in data if _is_dataset(data, k)]
    if len(flagged) == 1:
        return f"{data_name}/{flagged[0]}"
    if len(members) == 1:          # e.g. a detector's NXdata with one linked data_000001
        return f"{data_name}/{members[0]}"
    if len(series_members(data)) == len(members) > 1:    # an Eiger series over several files
        return f"{data_name}/{series_members(data)[0]}"
    raise SignalNotFound(f"NeXus: /{data_name} has no @signal attribute and {len(members)} datasets "
                         f"({', '.join(sorted(members)) or 'none'})")


def series_members(group) -> list[str]:
    """The datasets of an Eiger master's NXdata that together hold one series of frames
    (data_000001, data_000002, ..., each linked to its own file), in order."""
    return sorted(k for k in group if re.fullmatch(r"data_\d{6}", k))   # unreadable ones fail on reading


def _numbered(group, prefix):
    names = [k for k in group if k.startswith(prefix) and k[len(prefix):].isdigit()]
    return sorted(names, key=lambda k: int(k[len(prefix):]))


def is_cxi(f, path=None) -> bool:
    """A CXI file: the .cxi suffix, a `cxi_version` dataset, or an `entry_1` group."""
    return (path is not None and str(path).lower().endswith(".cxi")) or "cxi_version" in f \
        or isinstance(f.get("entry_1"), h5py.Group)


def cxi_data(f) -> tuple[str, str | None]:
    """(pattern path, mask path or None) in a CXI file as cxidb writes it: the pattern at
    entry_N/data_M/data (else entry_N/image_M/data), the detector mask (nonzero = bad) at
    entry_N/instrument_1/detector_1/mask (or beside the data). SignalNotFound when absent or
    when several entries hold data."""
    entries = _numbered(f, "entry_")
    if not entries:
        raise SignalNotFound("CXI: no entry_1 group (a CXI file keeps its data in "
                             "entry_1/data_1/data)")
    for kind in ("data_", "image_"):
        found = [f"{e}/{d}/data" for e in entries for d in _numbered(f[e], kind)
                 if _is_dataset(f, f"{e}/{d}/data")]
        if len(found) > 1:
            raise SignalNotFound(f"CXI: several patterns ({', '.join(found)}): name one with input.dataset")
        if found:
            data = found[0]
            break
    else:
        raise SignalNotFound(f"CXI: no dataset entry_N/data_M/data or entry_N/image_M/data "
                             f"(entries: {', '.join(entries)})")
    entry, group = data.split("/")[:2]
    mask = None
    for candidate in (f"{entry}/{group}/mask", f"{entry}/instrument_1/detector_1/mask"):
        if _is_dataset(f, candidate):
            mask = candidate
            break
    return data, mask


def nexus_mask(f, signal: str) -> str | None:
    """The detector mask of a NeXus file (nonzero = bad): an NXdetector's pixel_mask (Eiger:
    detectorSpecific/pixel_mask) in the signal's entry, or a `mask` beside the signal."""
    entry = signal.split("/")[0]
    beside = signal.rsplit("/", 1)[0] + "/mask"
    if _is_dataset(f, beside):
        return beside
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] == "pixel_mask":
            found.append(f"{entry}/{name}")
    if isinstance(f.get(entry), h5py.Group):
        f[entry].visititems(visit)
    return found[0] if len(found) == 1 else None


def find_signal(f, path, key=None, dataset=None, prefer=("data",)) -> tuple[str, str | None]:
    """(dataset path, mask path or None) of the array to read from an open file.

    dataset: named by the user (input.dataset): used as is, no mask guessed.
    Else, in order: a CXI file's pattern and detector mask; the NeXus signal (and pixel_mask);
    a root dataset named in `prefer` (xpr's own files: `data`, with `mask` beside it); the
    file's only dataset. Anything else is an InputError naming the file and listing its datasets.
    """
    if dataset is not None:
        if not _is_dataset(f, dataset):
            raise InputError(f"no dataset '{dataset}' in the file; it holds: "
                             + "; ".join(list_datasets(f)), file=path, key=key)
        return dataset, None
    try:
        if is_cxi(f, path):
            return cxi_data(f)
        signal = nexus_signal(f)
    except SignalNotFound as why:
        raise InputError(f"{why}; the file holds: " + "; ".join(list_datasets(f) or ["no datasets"])
                         + " (or name the dataset with input.dataset)", file=path, key=key) from None
    if signal is not None:
        return signal, nexus_mask(f, signal)
    for name in prefer:
        if _is_dataset(f, name):
            return name, ("mask" if _is_dataset(f, "mask") else None)
    names = list_datasets(f)
    if len(names) == 1:
        return names[0].split(" ")[0], None
    raise InputError(f"the HDF5 file holds {len(names)} datasets and none is marked as the "
                     "signal (no CXI entry_1/data_1/data, no NeXus NXdata @signal): name one with "
                     "input.dataset; it holds: " + ("; ".join(names) or "nothing"), file=path, key=key)


def read_dataset(path, dataset=None, key=None, prefer=("data",)):
    """(array, mask array or None, dataset path) of a user's HDF5/CXI/NeXus file; see find_signal."""
    with open_h5(path, key) as f:
        name, mask_name = find_signal(f, path, key=key, dataset=dataset, prefer=prefer)
        parent, _, leaf = name.rpartition("/")
        series = series_members(f[parent] if parent else f) if dataset is None else []
        try:
            if len(series) > 1 and leaf in series:       # the whole series, frames in order
                name = f"{parent}/{series[0]}..{series[-1]}"
                parts = [f[f"{parent}/{k}"][()] for k in series]
                array = np.concatenate([a if a.ndim >= 3 else a[None] for a in parts])
            else:
                array = f[name][()]
            mask = None if mask_name is None else f[mask_name][()]
        except (OSError, KeyError) as err:   # e.g. a filter HDF5 cannot apply, a missing external file
            raise InputError(f"cannot read dataset '{name}': {err}", file=path, key=key) from None
    return array, mask, name


_METRES = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "microns": 1e-6}
_LENGTHS = dict(_METRES, nm=1e-9, angstrom=1e-10, angstroms=1e-10, a=1e-10, å=1e-10)
_ENERGIES = {"j": 1.0, "ev": 1.602176634e-19, "kev": 1.602176634e-16}
_HC = 6.62607015e-34 * 299792458.0        # Planck constant x speed of light (J m)
_PIXELS = ("", "pixel", "pixels", "px")


def _scalar_with_unit(dataset, table, default_unit):
    """A scalar dataset times the factor of its @units in `table` (default_unit without one);
    None for a unit the table does not know."""
    units = (_text(dataset.attrs.get("units")) or default_unit).strip().lower()
    factor = table.get(units)
    if factor is None:
        return None
    return float(np.asarray(dataset[()], dtype=float).reshape(-1)[0]) * factor


def recorded_beam_centre(path) -> tuple[float, float] | None:
    """(row, column) of the direct beam on the detector in pixels, as a NeXus file records it:
    an NXdetector's `beam_center_y` and `beam_center_x` (Eiger master files: in pixels), in pixels
    or, with length @units, divided by `y_pixel_size` / `x_pixel_size`. None when the file is not
    HDF5, records none, or several detectors record different ones."""
    if not str(path).lower().endswith(HDF5_SUFFIXES):
        return None
    found = set()
    with open_h5(path) as f:
        def visit(name, obj):
            if not isinstance(obj, h5py.Group) or not all(
                    _is_dataset(obj, k) for k in ("beam_center_x", "beam_center_y")):
                return
            centre = []
            for axis in ("y", "x"):
                value = obj[f"beam_center_{axis}"]
                units = (_text(value.attrs.get("units")) or "").strip().lower()
                if units in _PIXELS:
                    centre.append(float(np.asarray(value[()]).reshape(-1)[0]))
                    continue
                pixel = obj.get(f"{axis}_pixel_size")
                length = _scalar_with_unit(value, _LENGTHS, "")       # no unit: unknown
                size = _scalar_with_unit(pixel, _LENGTHS, "") if isinstance(pixel, h5py.Dataset) else None
                if length is None or not size:
                    return
                centre.append(length / size)
            found.add(tuple(centre))
        f.visititems(visit)
    return found.pop() if len(found) == 1 else None


def recorded_geometry(path) -> dict:
    """The experiment's geometry as a NeXus or CXI file records it, in SI units:
    {"wavelength": m, "distance": m, "pixel_size": (row, column) m}; a quantity the file does not
    record, or records with different values in several places, is None.

    NeXus: `incident_wavelength` (or `wavelength`; default unit angstrom), `incident_energy`
    (keV) where no wavelength is given, an NXdetector's `detector_distance` (or `distance`) and
    `y_pixel_size` / `x_pixel_size` (default unit m). CXI: `source_1/energy` (J), `detector_1/
    distance`, `x_pixel_size`, `y_pixel_size` (m)."""
    found = {"wavelength": set(), "energy": set(), "distance": set(), "x": set(), "y": set()}
    if not str(path).lower().endswith(HDF5_SUFFIXES):
        return {"wavelength": None, "distance": None, "pixel_size": None}
    with open_h5(path) as f:
        def visit(name, obj):
            if not isinstance(obj, h5py.Dataset) or obj.size != 1 or obj.dtype.kind not in "iuf":
                return
            leaf = name.rsplit("/", 1)[-1]
            value = None
            if leaf in ("incident_wavelength", "wavelength"):
                value, key = _scalar_with_unit(obj, _LENGTHS, "angstrom"), "wavelength"
            elif leaf in ("incident_energy", "energy") and ("source" in name or "beam" in name):
                value, key = _scalar_with_unit(obj, _ENERGIES, "j" if "source_1" in name else "kev"), "energy"
            elif leaf in ("detector_distance", "distance") and "detector" in name:
                value, key = _scalar_with_unit(obj, _LENGTHS, "m"), "distance"
            elif leaf in ("x_pixel_size", "y_pixel_size") and "detector" in name:
                value, key = _scalar_with_unit(obj, _LENGTHS, "m"), leaf[0]
            if value is not None and value > 0:
                found[key].add(round(value, 15))
        f.visititems(visit)

    def one(key):
        return next(iter(found[key])) if len(found[key]) == 1 else None
    wavelength = one("wavelength")
    if wavelength is None and one("energy"):
        wavelength = _HC / one("energy")
    pixel = (one("y"), one("x"))
    return {"wavelength": wavelength, "distance": one("distance"),
            "pixel_size": pixel if None not in pixel else None}
