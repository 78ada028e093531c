"""`xpr cdi merge`: merge the repeats of several phase2d / phase3d runs into one result.

Used as the last step of an array job (`xpr jobscript --array N --merge 'cdi merge NAME' ...`),
where each array task phased its own share of the repeats with its own seed, or by hand over any
runs of the same pattern. Method:

1. Collect the runs: every `cdi phase2d|phase3d` run recorded in `input.shares_dir`
   (the `task_<i>.runs` files the array tasks wrote), and every file or run folder in `input.runs`.
2. Read each run's repeats (objects, supports, eMod/eCon, seeds) and check they phased the same
   pattern (same data and mask) with the same schedule length.
3. Select, align (shift, global phase, twin), average and compute the PRTF exactly as a single
   run does (xpr.cdi.phasing.merge_and_write), over all repeats together.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xpr import memory
from xpr.archive import read_run_records
from xpr.cdi.phasing import merge_and_write
from xpr.errors import InputError
from xpr.io import load_tree
from xpr.backend import cpu_only


def main_file(entry) -> Path:
    path = Path(str(entry)).expanduser()
    if path.is_dir():
        found = sorted(path.glob("phase[23]d.h5"))
        if not found:
            raise InputError("run folder holds no phase2d.h5 / phase3d.h5", file=path, key="input.runs")
        return found[0]
    if not path.is_file():
        raise InputError("phasing result not found", file=path, key="input.runs")
    return path


def result_files(settings) -> list:
    """The phasing results to merge: the shares recorded in input.shares_dir, then input.runs."""
    files = []
    if settings.input.shares_dir:
        files += read_run_records(settings.input.shares_dir, "cdi", ("phase2d", "phase3d"))
    files += [main_file(entry) for entry in settings.input.runs]
    if not files:
        raise InputError("nothing to merge: give input.shares_dir or input.runs", key="input.runs")
    return files


def validate(settings):
    """Before the run folder exists: the results exist, and their merge fits in memory (sizes
    from the files' headers)."""
    memory.plan_cdi_merge(result_files(settings))


def run(settings, archive):
    cpu_only(settings, archive.log, "cdi merge", "repeats are aligned and averaged on the host, as after phasing")
    files = result_files(settings)
    memory.plan_cdi_merge(files, log=archive.log)

    shares = [load_tree(path) for path in files]
    reference = shares[0]
    for path, share in zip(files[1:], shares[1:]):
        if share["data"]["intensity"].shape != reference["data"]["intensity"].shape or \
                not np.array_equal(share["data"]["mask"], reference["data"]["mask"]):
            raise InputError(f"this run phased another pattern or mask than {files[0]}", file=path,
                             key="input.runs")
        if share["repeats"]["e_mod"].shape[1] != reference["repeats"]["e_mod"].shape[1]:
            raise InputError(f"this run's schedule has {share['repeats']['e_mod'].shape[1]} iterations, "
                             f"{files[0]}'s {reference['repeats']['e_mod'].shape[1]}", file=path,
                             key="input.runs")
    repeats = {key: np.concatenate([s["repeats"][key] for s in shares])
               for key in ("object", "support", "e_mod", "e_con", "seed")}
    if all("free_deviance" in s["repeats"] for s in shares):   # the same free pixels in every run
        repeats["free_deviance"] = np.concatenate([s["repeats"]["free_deviance"] for s in shares])
    repeats["e_con_iterations"] = reference["repeats"]["e_con_iterations"]
    repeats["failed_seeds"] = np.concatenate([np.asarray(s["repeats"].get("failed_seeds", []), dtype=np.uint64)
                                              for s in shares])
    repeats["share"] = np.concatenate([np.full(len(s["repeats"]["seed"]), i) for i, s in enumerate(shares)])
    if len(np.unique(repeats["seed"])) < len(repeats["seed"]):
        archive.log.warning("some repeats share a seed: were the shares given different seeds?")
    archive.log.info("merging %d repeats from %d runs", len(repeats["seed"]), len(files))
    dimensions = reference["data"]["intensity"].ndim
    return merge_and_write(settings, archive, f"merge{dimensions}d.h5", repeats, reference["data"],
                           attrs={"sources": "\n".join(str(f) for f in files)})
