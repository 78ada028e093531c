"""Nested dicts of arrays and scalars <-> HDF5 (h5py), in xFrame's layout.

* dict -> group; numpy array / number / string / bool -> dataset;
* list or tuple of equal-shape numbers -> one dataset; any other list or tuple -> a group with
  attribute `type` = 'list' | 'tuple' and members "0", "1", ... (as xFrame writes them);
* None -> an empty dataset with attribute `type` = 'None'.
Reading inverts all of it (xFrame's files read the same way).
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from xpr.errors import InputError
from xpr.io.atomic import atomic_path


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
