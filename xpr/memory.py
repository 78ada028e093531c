"""Memory a command may use, and its estimated peak, before it allocates.

Each command estimates its peak from its settings (array shapes, repeats done at once, dtype,
working buffers) and compares it with what it may use:

* the cgroup limit (v2 `memory.max` minus `memory.current`, or v1 `memory.limit_in_bytes` minus
  `memory.usage_in_bytes`): what a batch scheduler or container grants the job;
* MemAvailable from /proc/meminfo: what the machine can give without swapping;
* a `max_memory_GB`-style setting, when the command has one;

whichever is smallest. Then it either shrinks what it may (the batch of repeats phased at once)
or stops with an InputError/SettingsError (exit 2) naming the key, the estimate and the limit,
instead of being killed by the kernel (exit 137) with an unmarked run.

The per-element costs are counted from the code (arrays held at the peak, FFT work buffers) and
checked against measured peaks (tests/test_memory.py, benchmarks/bench_memory.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xpr.errors import InputError, SettingsError

GB = 1024 ** 3
# the share of the limit a command plans to fill: room for the interpreter, libraries, plots
# and the allocator's slack
USABLE_FRACTION = 0.85
_UNLIMITED = 1 << 60


def _read_int(path) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _own_cgroup_dirs(root="/sys/fs/cgroup"):
    """The cgroup v2 directory of this process, and the v1 memory controller's directory."""
    v2 = v1 = None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = Path(root) / parts[2].lstrip("/")
        elif "memory" in parts[1].split(","):
            v1 = Path(root) / "memory" / parts[2].lstrip("/")
    return v2, v1


def cgroup_available() -> tuple[int | None, str]:
    """(bytes the cgroup still grants, where that came from); None when unlimited."""
    v2, v1 = _own_cgroup_dirs()
    candidates = []
    for folder in [d for d in (v2, Path("/sys/fs/cgroup")) if d is not None]:
        limit = _read_int(folder / "memory.max")
        if limit is not None:
            used = _read_int(folder / "memory.current") or 0
            candidates.append((max(limit - used, 0), f"cgroup v2 {folder}/memory.max"))
            break
    for folder in [d for d in (v1, Path("/sys/fs/cgroup/memory")) if d is not None]:
        limit = _read_int(folder / "memory.limit_in_bytes")
        if limit is not None:
            used = _read_int(folder / "memory.usage_in_bytes") or 0
            candidates.append((max(limit - used, 0), f"cgroup v1 {folder}/memory.limit_in_bytes"))
            break
    return min(candidates) if candidates else (None, "")


def meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def size(nbytes) -> str:
    """Bytes as GB (two decimals), or MB below 0.1 GB."""
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1024 ** 2:.1f} MB"


@dataclass
class Limit:
    bytes: int
    source: str

    def __str__(self):
        return f"{size(self.bytes)} ({self.source})"


def available(max_memory_GB=None, key=None) -> Limit:
    """The memory this command may use: the smallest of the cgroup's grant, MemAvailable and the
    setting `key` = max_memory_GB (when given)."""
    options = []
    cgroup, where = cgroup_available()
    if cgroup is not None:
        options.append(Limit(cgroup, where))
    free = meminfo_available()
    if free is not None:
        options.append(Limit(free, "MemAvailable in /proc/meminfo"))
    if max_memory_GB is not None:
        options.append(Limit(int(float(max_memory_GB) * GB), f"setting {key or 'max_memory_GB'}"))
    if not options:
        return Limit(_UNLIMITED, "no limit known")
    return min(options, key=lambda limit: limit.bytes)


@dataclass
class Estimate:
    """A peak estimate in stages (the peak is the largest stage): per stage, named fixed parts
    in bytes and parts per item of a batch that can shrink (e.g. repeats phased at once)."""

    stages: dict = field(default_factory=dict)     # stage -> (fixed: dict, per_item: dict)

    def add(self, stage, fixed=None, per_item=None):
        self.stages[stage] = (dict(fixed or {}), dict(per_item or {}))
        return self

    def stage_bytes(self, stage, batch=1) -> int:
        fixed, per = self.stages[stage]
        return int(sum(fixed.values()) + batch * sum(per.values()))

    def bytes(self, batch=1) -> int:
        return max(self.stage_bytes(stage, batch) for stage in self.stages)

    def peak_stage(self, batch=1) -> str:
        return max(self.stages, key=lambda stage: self.stage_bytes(stage, batch))

    def describe(self, batch=1) -> str:
        stage = self.peak_stage(batch)
        fixed, per = self.stages[stage]
        parts = [f"{name} {size(value)}" for name, value in fixed.items()]
        parts += [f"{name} {batch} x {size(value)}" for name, value in per.items()]
        return f"{size(self.bytes(batch))} (peak while {stage}: " + ", ".join(parts) + ")"


def refuse(estimate_text: str, limit: Limit, key: str, what: str, hint: str = "", file=None,
           settings=True):
    """The exit-2 error: `what` needs about `estimate_text`, more than the limit."""
    cls = SettingsError if settings else InputError
    raise cls(f"{what} needs about {estimate_text} of memory, more than the "
              f"{USABLE_FRACTION:.0%} of {limit} it may use" + (f"; {hint}" if hint else ""),
              file=file, key=key)


def require(estimate: Estimate, limit: Limit, key: str, what: str, hint: str = "", batch=1, file=None,
            settings=True):
    """Stop (exit 2) unless the estimate at `batch` fits in the usable share of the limit."""
    if estimate.bytes(batch) > USABLE_FRACTION * limit.bytes:
        refuse(estimate.describe(batch), limit, key, what, hint, file=file, settings=settings)


def largest_batch(estimate: Estimate, limit: Limit, wanted: int) -> int:
    """The largest batch <= wanted whose estimate fits (0 when not even one item fits)."""
    usable = USABLE_FRACTION * limit.bytes
    for batch in range(int(wanted), 0, -1):
        if estimate.bytes(batch) <= usable:
            return batch
    return 0


def log_plan(log, what, estimate: Estimate, limit: Limit, batch=1):
    if log is not None:
        log.info("memory: %s needs about %s; may use %.0f%% of %s", what, estimate.describe(batch),
                 100 * USABLE_FRACTION, limit)


# ---------------------------------------------------------------------------------------------
# the commands' estimates (bytes per pixel/voxel counted from their code; see the module doc)


def _voxels(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def cdi_simulate(shape, complex_object=False) -> Estimate:
    """`cdi simulate`. Stages (bytes per voxel; measured with tracemalloc, tests/test_memory.py):
    the model object -- xpr.cdi.objects builds each ellipsoid from an int64 coordinate grid per
    axis, their float64 offsets, two rotated ones and the squared-radius sum: 16 d + 32, plus
    the envelope; the far field -- the object, its shifted copy, the complex128 spectrum and its
    modulus: 48 (64 complex); the 2-D figures -- three full-size images drawn by matplotlib
    while the pattern, the object and the mask are held: 120 (3-D draws central slices only)."""
    n, d = _voxels(shape), len(shape)
    estimate = Estimate()
    estimate.add("building the model object", {"coordinate grids and offsets": (16 * d + 34) * n})
    estimate.add("computing the far field", {"object, spectrum and modulus": (64 if complex_object else 48) * n})
    if d == 2:
        estimate.add("drawing the figures", {"full-size images": 120 * n})
    return estimate


def cdi_phase(shape, repeats, workers=1, double=False, dimensions=None, generations=1,
              rescue=False) -> Estimate:
    """`cdi phase2d/3d`, items = repeats per batch. Stages (bytes per voxel; measured with
    tracemalloc, tests/test_memory.py): phasing -- per repeat of a batch, the iterate (complex64),
    its support, the engine's working copies (Fourier transform, projection, reflection) and
    shrink-wrap's blurred amplitude: 46 (x 2 for the complex parts in double precision), in
    each of `workers` concurrent batches, beside the pattern each holds (8) and the finished
    repeats' results (9 per repeat); merging -- the results of all repeats stacked and their
    concatenation (18 per repeat), with the pattern's preparation, alignment and the PRTF: 80,
    and 110 in 2-D where the figures draw full-size images. With the genetic algorithm
    (generations > 1): every batch of a later generation also holds the bred starts of all
    repeats (9 per repeat), and between generations this process holds every repeat's result,
    its bred child, the aligned parents and the best-ever object: 55 per repeat and 24 more
    (tracemalloc, 96^3, 8 and 16 repeats in batches of 2: 463 and 903 bytes per voxel).
    rescue: the run is a rescue (phasing.rescue), during which the first run's results are held
    too (9 per repeat) in phasing and breeding."""
    n = _voxels(shape)
    dimensions = dimensions or len(shape)
    scale = 2 if double else 1
    repeats, workers = int(repeats), max(int(workers), 1)
    estimate = Estimate()
    held = {"finished results": 9 * scale * n * repeats, "pattern per batch": 8 * n * workers}
    first_run = {"the first run's results (rescue)": 9 * scale * n * repeats} if rescue else {}
    if int(generations) > 1:
        held["bred starts"] = 9 * scale * n * repeats
    estimate.add("phasing", dict(held, **first_run), {"repeat at work": (45 * scale + 1) * n * workers})
    if int(generations) > 1:
        estimate.add("breeding (genetic algorithm)",
                     {"results, children, parents, best-ever": (55 * scale * repeats + 24) * n, **first_run})
    estimate.add("merging", {"results of all repeats": 18 * scale * n * repeats,
                             "pattern, alignment, PRTF" + (", figures" if dimensions == 2 else ""):
                                 (110 if dimensions == 2 else 80) * n})
    return estimate


def plan_cdi_phase(shape, repeats, workers, n_tasks, double=False, log=None, limit=None,
                   generations=1, rescue=False) -> int:
    """The number of batches to phase `repeats` in: `n_tasks` when it fits, more (smaller
    batches) when it does not; a SettingsError (exit 2) when even one repeat at a time does not
    fit, naming phasing.repeats or multi_process.n_processes where fewer would fit."""
    limit = limit or available()
    repeats, n_tasks = int(repeats), max(int(n_tasks), 1)
    workers = max(1, min(int(workers), n_tasks))
    batch = -(-repeats // n_tasks)
    estimate = cdi_phase(shape, repeats, workers, double, generations=generations, rescue=rescue)
    size = "x".join(map(str, shape))
    if estimate.bytes(batch) <= USABLE_FRACTION * limit.bytes:
        log_plan(log, f"phasing {repeats} repeats of {size} in batches of {batch}", estimate, limit, batch)
        return n_tasks
    fitting = largest_batch(estimate, limit, batch)
    if fitting == 0:
        breeding = "breeding (genetic algorithm)"
        one_fits = cdi_phase(shape, 1, 1, double, generations=generations,
                             rescue=rescue).bytes(1) <= USABLE_FRACTION * limit.bytes
        if (one_fits and breeding in estimate.stages
                and estimate.stage_bytes(breeding) > USABLE_FRACTION * limit.bytes):
            key = "phasing.repeats"
            hint = ("fewer repeats (the genetic algorithm's breeding holds every repeat at once), or "
                    "ga.generations: 1")
        elif estimate.stage_bytes("merging") > USABLE_FRACTION * limit.bytes:
            key = "phasing.repeats" if one_fits else "input.data_path"
            hint = "fewer repeats (or merge several runs with `cdi merge`)" if key == "phasing.repeats" \
                else f"a {size} pattern is too large for this machine even with one repeat"
        elif workers > 1:
            key, hint = "multi_process.n_processes", f"fewer processes than {workers}"
        else:
            key, hint = "input.data_path", f"a {size} pattern is too large for this machine"
        refuse(estimate.describe(1), limit, key, f"phasing {repeats} repeats of {size}", hint,
               settings=key != "input.data_path")
    tasks = -(-repeats // fitting)
    if log is not None:
        log.warning("memory: batches of %d repeats (%s) would exceed %.0f%% of %s: phasing in %d "
                    "batches of <= %d instead", batch, estimate.describe(batch), 100 * USABLE_FRACTION,
                    limit, tasks, fitting)
    return max(tasks, n_tasks)


def h5_bytes(path) -> int:
    """The bytes of every dataset in an HDF5 file (what reading it whole allocates)."""
    import h5py

    total = 0

    def visit(_, item):
        nonlocal total
        if isinstance(item, h5py.Dataset):
            total += int(item.size) * item.dtype.itemsize

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return total


def cdi_merge(file_bytes, shape, repeats) -> Estimate:
    """`cdi merge` of `repeats` repeats of `shape` from runs whose HDF5 trees hold `file_bytes`
    (all their datasets, read whole by xpr.io.load_tree). Stages: reading the runs; merging --
    the runs' trees held, the repeats concatenated (object complex64 + support: 9 per voxel
    and repeat) and merge_and_write's merging stage (cdi_phase's)."""
    n, repeats = _voxels(shape), int(repeats)
    merging = cdi_phase(shape, repeats).stages["merging"][0]
    estimate = Estimate()
    estimate.add("reading the runs", {"the runs' results": int(file_bytes)})
    estimate.add("merging", dict(merging, **{"the runs' results": int(file_bytes),
                                             "repeats concatenated": 9 * n * repeats}))
    return estimate


def plan_cdi_merge(files, log=None, limit=None):
    """Stop (exit 2, key input.runs) before reading phasing results whose merge would not fit;
    sizes from the files' headers."""
    import h5py

    total, shape, repeats = 0, None, 0
    for path in files:
        try:
            total += h5_bytes(path)
            with h5py.File(path, "r") as f:
                if "repeats/object" in f:
                    shape = tuple(f["repeats/object"].shape[1:])
                    repeats += int(f["repeats/object"].shape[0])
        except OSError:
            return                      # the worker reads the file and says what is wrong with it
    if shape is None:
        return
    limit = limit or available()
    estimate = cdi_merge(total, shape, repeats)
    what = f"merging {repeats} repeats of {'x'.join(map(str, shape))} from {len(files)} runs"
    require(estimate, limit, "input.runs", what, "merge fewer runs at once", settings=False)
    log_plan(log, what, estimate, limit)


def plan_cdi_simulate(shape, complex_object=False, log=None, limit=None):
    """Stop (exit 2, key `shape`) when `cdi simulate` of this shape would not fit."""
    limit = limit or available()
    estimate = cdi_simulate(shape, complex_object)
    size = "x".join(map(str, shape))
    require(estimate, limit, "shape", f"simulating a {size} pattern",
            "a smaller shape (or dimensions: 2)")
    log_plan(log, f"simulating a {size} pattern", estimate, limit)


def pattern_shape(path, dataset=None, shape=None):
    """The shape of a pattern file from its header alone (.npy, HDF5/CXI/NeXus, .bin with the
    given shape); None where only reading the file would tell (then the worker checks)."""
    from xpr.io.readers import HDF5_SUFFIXES

    text = str(path).lower()
    try:
        if shape is not None:
            return tuple(int(n) for n in shape)
        if text.endswith(".npy"):
            import numpy as np
            return tuple(np.load(str(path), mmap_mode="r", allow_pickle=False).shape)
        if text.endswith(HDF5_SUFFIXES):
            from xpr.io.h5 import find_signal, open_h5
            with open_h5(path) as f:
                name, _ = find_signal(f, path, dataset=dataset)
                return tuple(f[name].shape)
    except (OSError, ValueError, InputError):
        return None          # the worker reads the file and says what is wrong with it
    return None


def validate_cdi_phase(settings, dimensions):
    """Before a run folder exists: refuse (exit 2) a `cdi phase2d/3d` whose pattern, read from
    the file's header, could not be phased in memory even one repeat per batch. Batches that
    merely need shrinking are left to the worker (plan_cdi_phase, logged in the run)."""
    from xpr import parallel
    from xpr.backend import gpu_options
    from xpr.phasing.genetic import ga_generations

    inp = settings.input
    if inp.data_path is None:
        return                     # the latest `cdi simulate` result: its size was checked there
    shape = pattern_shape(inp.data_path, inp.get("dataset"), inp.shape)
    if shape is None:
        return
    shape = tuple(n for n in shape if n != 1) if len(shape) > dimensions else shape
    if len(shape) == dimensions + 1 and inp.get("frames") == "sum":
        shape = shape[1:]                       # the frames are added up
    if len(shape) != dimensions:
        return
    from xpr.cdi.frame import shape_bound
    shape = shape_bound(shape, inp, dimensions)   # centring, cropping or padding, binning
    if inp.padd_to_pow2:
        shape = tuple(1 << (int(n) - 1).bit_length() for n in shape)
    repeats = int(settings.phasing.repeats)
    spread = settings.get("multi_process")
    workers = parallel.n_workers(spread, repeats)
    double = gpu_options(settings).precision == "double"
    rescue = (settings.phasing.get("rescue") or {}).get("fit_above") is not None   # may run: counted up front
    plan_cdi_phase(shape, repeats, workers, workers, double=double, generations=ga_generations(settings),
                   rescue=rescue)
