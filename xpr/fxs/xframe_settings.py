"""xFrame-style reconstruct settings read as xpr's: the keys xFrame users write that xpr spells
differently are folded into xpr's keys before the run (`fold`), so a settings file written for
xFrame's `fxs reconstruct` runs as it is.

* `projections.real.projections.{apply, support, value_threshold, limit_imag}` (xFrame nests the
  real-space constraints one level deeper) -> `projections.real.<key>`; a key spelled both ways
  takes xFrame's nested value (it is the one an xFrame user wrote);
* `value_threshold.threshold: [0, False]` -> [0.0, null] (False = no bound);
* `grid.n_radial_points` -> grid.n_radial_grid_points; `fourier_transform.reciprocity_coefficient`
  -> grid.reciprocity_coefficient;
* `multi_process.n_parallel_reconstructions`: a number -> n_reconstructions; True -> one
  reconstruction per physical core (xFrame starts as many as the machine has cores);
* `IO` (xFrame's folders and files): `IO.files.<invariants|proj_data|projection_matrices>` with
  `name` and `folder` (a key of `IO.folders`, or a path) -> input.invariants_file, unless
  input.invariants_file is set; `IO.files.reconstructions.options`: `generate_vtk_files` ->
  output.vtk, `plot_error_metrics` / `plot_first_used_invariants` /
  `plot_reconstructed_deg2_invariants` (any true) -> output.plots;
* shrink-wrap `sigmas` / `thresholds` and HIO `beta` accept xFrame's per-block ramp specifiers
  as they are (xpr.phasing.schedule.xframe_block_values); nothing to fold.

Unknown keys inside these blocks are InputErrors naming the key.
"""
from __future__ import annotations

from pathlib import Path

from xpr.errors import InputError
from xpr.settings import Frozen

REAL_NESTED = ("apply", "support", "value_threshold", "limit_imag")
INPUT_FILE_KEYS = ("invariants", "proj_data", "projection_matrices")
PLOT_OPTIONS = ("plot_error_metrics", "plot_first_used_invariants", "plot_reconstructed_deg2_invariants")


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def fold(settings, cores=None) -> tuple:
    """(settings with xFrame's spellings folded into xpr's keys, list of notes for the log)."""
    tree = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
    notes = []
    real = tree["projections"]["real"]
    nested = real.pop("projections", None) or {}
    if not isinstance(nested, dict):
        raise InputError(f"projections.real.projections must be a mapping (xFrame's real-space constraints), "
                         f"got {nested!r}", key="projections.real.projections")
    unknown = [k for k in nested if k not in REAL_NESTED]
    if unknown:
        raise InputError(f"unknown keys {unknown} in projections.real.projections (known: {', '.join(REAL_NESTED)})",
                         key="projections.real.projections")
    for key, value in nested.items():
        real[key] = _deep_merge(real[key], value) if isinstance(value, dict) and isinstance(real.get(key), dict) \
            else value
        notes.append(f"projections.real.projections.{key} read as projections.real.{key}")
    threshold = real["value_threshold"]["threshold"]
    if isinstance(threshold, (list, tuple)):
        real["value_threshold"]["threshold"] = [None if v is False else v for v in threshold]

    radial = tree["grid"].pop("n_radial_points", None)
    if radial is not None:
        tree["grid"]["n_radial_grid_points"] = radial
        notes.append(f"grid.n_radial_points read as grid.n_radial_grid_points = {radial}")
    transform = tree.pop("fourier_transform", None) or {}
    unknown = [k for k in transform if k != "reciprocity_coefficient"] if isinstance(transform, dict) else [transform]
    if unknown:
        raise InputError(f"unknown keys {unknown} in fourier_transform (known: reciprocity_coefficient)",
                         key="fourier_transform")
    if "reciprocity_coefficient" in transform:
        tree["grid"]["reciprocity_coefficient"] = float(transform["reciprocity_coefficient"])
        notes.append("fourier_transform.reciprocity_coefficient read as grid.reciprocity_coefficient")

    parallel = tree["multi_process"].pop("n_parallel_reconstructions", None)
    if parallel is not None and parallel is not False:
        if parallel is True:
            from xpr.parallel import physical_cores
            parallel = int(cores or physical_cores())
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise InputError(f"multi_process.n_parallel_reconstructions must be a positive whole number or true, "
                             f"got {parallel!r}", key="multi_process.n_parallel_reconstructions")
        tree["n_reconstructions"] = parallel
        notes.append(f"multi_process.n_parallel_reconstructions: {parallel} reconstructions")

    io = tree.pop("IO", None) or {}
    if not isinstance(io, dict):
        raise InputError(f"IO must be a mapping (xFrame's folders and files), got {io!r}", key="IO")
    unknown = [k for k in io if k not in ("folders", "files")]
    if unknown:
        raise InputError(f"unknown keys {unknown} in IO (known: folders, files)", key="IO")
    folders, files = io.get("folders") or {}, io.get("files") or {}
    for name in INPUT_FILE_KEYS:
        entry = files.get(name)
        if entry is None or tree["input"]["invariants_file"]:
            continue
        if not isinstance(entry, dict) or "name" not in entry:
            raise InputError(f"IO.files.{name} needs a 'name' (and a 'folder')", key=f"IO.files.{name}")
        folder = entry.get("folder", "")
        folder = folders.get(folder, folder) if isinstance(folders, dict) else folder
        tree["input"]["invariants_file"] = str(Path(str(folder)).expanduser() / str(entry["name"]))
        notes.append(f"IO.files.{name} read as input.invariants_file = {tree['input']['invariants_file']}")
        break
    options = (files.get("reconstructions") or {}).get("options") or {}
    if "generate_vtk_files" in options:
        tree["output"]["vtk"] = bool(options["generate_vtk_files"])
    plots = [options[k] for k in PLOT_OPTIONS if k in options]
    if plots:
        tree["output"]["plots"] = any(bool(p) for p in plots)
    return Frozen(tree), notes
