"""Particle stacks and their parameter tables: reading them (checked) and writing refined tables.

Stacks: MRC (.mrcs/.mrc, mrcfile), HDF5 (dataset `images`, (n, ny, nx)) or .npy (n, ny, nx).
Tables: STAR (starfile; RELION 3.1 `particles` block with an optional `optics` block, or a single
block), CSV with the same column names, or HDF5 with one dataset per column.  Columns:

    rlnAngleRot, rlnAngleTilt, rlnAnglePsi        ZYZ Euler angles in degrees (euler.py)
    rlnOriginXAngst, rlnOriginYAngst              origin offsets in Å (RELION ≥ 3.1), or
    rlnOriginX, rlnOriginY                        in pixels (older RELION); absent: zero
    rlnDefocusU, rlnDefocusV, rlnDefocusAngle     Å, Å, degrees            (for CTF correction)
    rlnVoltage, rlnSphericalAberration,           kV, mm                   (per particle or optics group)
    rlnAmplitudeContrast, rlnPhaseShift           fraction, degrees
    rlnImagePixelSize (optics) / rlnDetectorPixelSize+rlnMagnification   pixel size, Å

one row per image, in stack order — or, without a stack, the images the STAR table's rlnImageName
column names (`12@a.mrcs`, `3@b.mrcs`: any number of stacks, any order).  Refined tables keep every input column, replace the angles and
the origin offsets (written in Å as rlnOriginXAngst/YAngst), and never touch the stack.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpr.em.ali3d.ctf import CTFParameters
from xpr.errors import InputError
from xpr.io.checks import check_real
from xpr.io.atomic import atomic_path

ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
SHIFT_COLUMNS_A = ("rlnOriginXAngst", "rlnOriginYAngst")
SHIFT_COLUMNS_PX = ("rlnOriginX", "rlnOriginY")


@dataclass
class Stack:
    images: np.ndarray              # (n, box, box) float32
    pixel_size_A: float | None      # from the file header, when it has one


def read_stack(path, key: str = "input.stack") -> Stack:
    """Images as float32 (n, box, box); InputError for missing, unreadable or non-square stacks."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise InputError("stack file not found", file=path, key=key)
    suffix = path.suffix.lower()
    pixel_size = None
    try:
        if suffix in (".mrcs", ".mrc", ".st"):
            import mrcfile

            with mrcfile.open(path, permissive=True) as mrc:
                images = np.array(mrc.data)
                voxel = float(mrc.voxel_size.x)
                pixel_size = voxel if voxel > 0 else None
        elif suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                if "images" not in f:
                    raise InputError("the HDF5 stack needs a dataset 'images' of shape (n, ny, nx)",
                                     file=path, key=key)
                images = np.asarray(f["images"][()])
                if "pixel_size_A" in f["images"].attrs:
                    pixel_size = float(f["images"].attrs["pixel_size_A"])
        elif suffix == ".npy":
            images = np.load(path, allow_pickle=False)
        else:
            raise InputError(f"unknown stack type '{suffix}' (expected .mrcs .mrc .h5 .npy)", file=path, key=key)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the stack: {err}", file=path, key=key) from None
    return _checked_stack(images, pixel_size, path, key)


def image_names(path, key: str = "input.parameters") -> list:
    """The rlnImageName column of a STAR table (InputError if it has none)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise InputError("parameter file not found", file=path, key=key)
    try:
        particles, _ = _read_table(path, key)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot read the parameter table: {err}", file=path, key=key) from None
    if "rlnImageName" not in particles.columns:
        raise InputError("input.stack is null, so the images are those the table's rlnImageName column names, "
                         "but it has none: give input.stack or a STAR table with rlnImageName", file=path,
                         key="input.stack")
    return list(particles["rlnImageName"])


def read_named_images(names, table_path, key: str = "input.parameters") -> Stack:
    """The images a STAR table names, row by row: `rlnImageName` entries `12@a.mrcs` are image 12
    (1-based, RELION's convention) of the MRC stack a.mrcs; rows may point into any number of
    stacks in any order. A relative stack path is looked up beside the table first, then in the
    current folder (RELION writes paths relative to its project folder). Each stack is opened
    once, memory-mapped; InputError names the row and the entry for a malformed name, a missing
    file, an index beyond the stack or images of different sizes."""
    import mrcfile

    table_path = Path(str(table_path)).expanduser()
    requests: dict[Path, list[tuple[int, int]]] = {}
    for row, name in enumerate(names):
        text = str(name).strip()
        index_text, at, file_text = text.partition("@")
        if not at or not index_text.strip().isdigit() or int(index_text) < 1 or not file_text.strip():
            raise InputError(f"row {row + 1}: rlnImageName '{text}' is not 'N@stack.mrcs' (N from 1)",
                             file=table_path, key=key)
        stack_path = Path(file_text.strip()).expanduser()
        if not stack_path.is_absolute():
            beside = table_path.parent / stack_path
            stack_path = beside if beside.is_file() else stack_path
        if not stack_path.is_file():
            raise InputError(f"row {row + 1}: the stack '{file_text.strip()}' of rlnImageName '{text}' is not "
                             f"found (looked beside the table and in {Path.cwd()})", file=table_path, key=key)
        requests.setdefault(stack_path, []).append((row, int(index_text) - 1))
    images, pixel_size, shape = None, None, None
    for stack_path, wanted in requests.items():
        try:
            with mrcfile.mmap(stack_path, mode="r", permissive=True) as mrc:
                data = mrc.data
                if data is None:
                    raise InputError("not a readable MRC stack", file=stack_path, key=key)
                data = data[None] if data.ndim == 2 else data
                voxel = float(mrc.voxel_size.x)
                if pixel_size is None and voxel > 0:
                    pixel_size = voxel
                if shape is None:
                    shape = data.shape[1:]
                    images = np.empty((len(names), *shape), np.float32)
                elif data.shape[1:] != shape:
                    raise InputError(f"images of {list(data.shape[1:])} pixels where the other stacks hold "
                                     f"{list(shape)}", file=stack_path, key=key)
                for row, index in wanted:
                    if index >= len(data):
                        raise InputError(f"row {row + 1} asks for image {index + 1} of a stack of {len(data)}",
                                         file=stack_path, key=key)
                    images[row] = data[index]
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read the stack: {err}", file=stack_path, key=key) from None
    if images is None:
        raise InputError("the table names no images", file=table_path, key=key)
    return _checked_stack(images, pixel_size, table_path, key)


def _checked_stack(images, pixel_size, path, key) -> Stack:
    images = check_real(images, file=path, key=key, what="particle image values").astype(np.float32, copy=False)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise InputError(f"a stack must be (n, ny, nx); got shape {list(images.shape)}", file=path, key=key)
    if images.shape[1] != images.shape[2]:
        raise InputError(f"images are {images.shape[2]}×{images.shape[1]} pixels (x×y); "
                         "local_ali3d needs square images", file=path, key=key)
    if images.shape[1] < 8:
        raise InputError(f"images of {images.shape[1]} pixels are too small (at least 8)", file=path, key=key)
    return Stack(images, pixel_size)


@dataclass
class ParticleTable:
    angles: np.ndarray          # (n, 3) degrees
    shifts_px: np.ndarray       # (n, 2) origin offsets in pixels
    ctf: CTFParameters | None
    pixel_size_A: float | None  # from the table, when it has one
    particles: object           # the pandas DataFrame as read (kept for writing)
    optics: object              # the optics DataFrame or None


def _read_table(path, key):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".star":
        import starfile

        blocks = starfile.read(path, always_dict=True)
        blocks = {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
        optics = blocks.get("optics")
        particles = blocks.get("particles")
        if particles is None:
            candidates = [b for b in blocks.values() if "rlnAngleRot" in b.columns]
            if not candidates:
                raise InputError("no data block with rlnAngleRot in the STAR file", file=path, key=key)
            particles = candidates[0]
        return particles.reset_index(drop=True), optics
    if suffix == ".csv":
        return pd.read_csv(path), None
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            columns = {name: f[name][()] for name in f if isinstance(f[name], h5py.Dataset)}
        columns = {k: (v.astype(str) if v.dtype.kind in "SO" else v) for k, v in columns.items()}
        return pd.DataFrame(columns), None
    raise InputError(f"unknown parameter table type '{suffix}' (expected .star .csv .h5)", file=path, key=key)


def _column(particles, optics, name):
    """A per-particle column, taken from the optics group when the particle block lacks it."""
    if name in particles.columns:
        return particles[name].to_numpy(dtype=float)
    if optics is not None and name in optics.columns:
        if "rlnOpticsGroup" in particles.columns and "rlnOpticsGroup" in optics.columns:
            lookup = dict(zip(optics["rlnOpticsGroup"].astype(int), optics[name].astype(float)))
            return np.array([lookup[int(g)] for g in particles["rlnOpticsGroup"]], dtype=float)
        return np.full(len(particles), float(optics[name].iloc[0]))
    return None


def read_parameters(path, n_images: int | None, pixel_size_A: float | None, need_ctf: bool,
                    key: str = "input.parameters") -> ParticleTable:
    """The parameter table, checked against the stack (one row per image; n_images None: the
    images are those its rlnImageName column names, see `read_named_images`)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise InputError("parameter file not found", file=path, key=key)
    try:
        particles, optics = _read_table(path, key)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot read the parameter table: {err}", file=path, key=key) from None
    missing = [c for c in ANGLE_COLUMNS if c not in particles.columns]
    if missing:
        raise InputError(f"the table lacks the column(s) {missing}", file=path, key=key)
    if n_images is not None and len(particles) != n_images:
        raise InputError(f"the table has {len(particles)} rows but the stack holds {n_images} images "
                         "(one row per image, in stack order)", file=path, key=key)
    table_pixel = _column(particles, optics, "rlnImagePixelSize")
    if table_pixel is None:
        detector = _column(particles, optics, "rlnDetectorPixelSize")
        magnification = _column(particles, optics, "rlnMagnification")
        if detector is not None and magnification is not None:
            table_pixel = detector * 1e4 / magnification
    table_pixel = None if table_pixel is None else float(table_pixel[0])
    pixel = pixel_size_A or table_pixel
    angles = np.stack([particles[c].to_numpy(dtype=float) for c in ANGLE_COLUMNS], axis=1)
    if all(c in particles.columns for c in SHIFT_COLUMNS_A):
        if not pixel:
            raise InputError("origin offsets are in Å but no pixel size is known: set input.pixel_size_A",
                             file=path, key="input.pixel_size_A")
        shifts = np.stack([particles[c].to_numpy(dtype=float) for c in SHIFT_COLUMNS_A], axis=1) / pixel
    elif all(c in particles.columns for c in SHIFT_COLUMNS_PX):
        shifts = np.stack([particles[c].to_numpy(dtype=float) for c in SHIFT_COLUMNS_PX], axis=1)
    else:
        shifts = np.zeros((len(particles), 2))
    if not (np.all(np.isfinite(angles)) and np.all(np.isfinite(shifts))):
        raise InputError("the table has non-numeric or missing angles or offsets", file=path, key=key)
    ctf = None
    if need_ctf:
        names = {"defocus_u": "rlnDefocusU", "defocus_v": "rlnDefocusV", "defocus_angle": "rlnDefocusAngle",
                 "voltage": "rlnVoltage", "cs_mm": "rlnSphericalAberration",
                 "amplitude_contrast": "rlnAmplitudeContrast"}
        values = {field: _column(particles, optics, column) for field, column in names.items()}
        absent = [names[f] for f, v in values.items() if v is None]
        if absent:
            raise InputError(f"CTF correction needs the column(s) {absent}", file=path, key="alignment.CTF")
        phase = _column(particles, optics, "rlnPhaseShift")
        ctf = CTFParameters(phase_shift=np.zeros(len(particles)) if phase is None else phase, **values)
    return ParticleTable(angles, shifts, ctf, table_pixel, particles, optics)


def write_parameters(path, table: ParticleTable | None, angles, shifts_px, pixel_size_A: float,
                     ctf: CTFParameters | None = None):
    """A STAR file with the refined angles and offsets (Å); other input columns are kept."""
    import pandas as pd
    import starfile

    if table is not None:
        particles = table.particles.copy()
        optics = table.optics
    else:
        particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(len(angles))]})
        optics = None
    for column, values in zip(ANGLE_COLUMNS, np.asarray(angles).T):
        particles[column] = values
    for column, values in zip(SHIFT_COLUMNS_A, np.asarray(shifts_px).T):
        particles[column] = values * pixel_size_A
    particles = particles.drop(columns=[c for c in SHIFT_COLUMNS_PX if c in particles.columns])
    if table is None and ctf is not None:
        for column, field in (("rlnDefocusU", "defocus_u"), ("rlnDefocusV", "defocus_v"),
                              ("rlnDefocusAngle", "defocus_angle"), ("rlnVoltage", "voltage"),
                              ("rlnSphericalAberration", "cs_mm"), ("rlnAmplitudeContrast", "amplitude_contrast"),
                              ("rlnPhaseShift", "phase_shift")):
            particles[column] = getattr(ctf, field)
    if optics is None and table is None:
        optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [pixel_size_A]})
        particles["rlnOpticsGroup"] = 1
    blocks = {"optics": optics, "particles": particles} if optics is not None else {"particles": particles}
    path = Path(path)
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f")
    return path


def write_mrc(path, array, pixel_size_A: float, stack: bool = False):
    """An MRC volume (or image stack) written under a temporary name and renamed."""
    import mrcfile

    path = Path(path)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.asarray(array, dtype=np.float32))
            if stack:
                mrc.set_image_stack()
            mrc.voxel_size = pixel_size_A
    return path
