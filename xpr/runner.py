"""Running one command: what the command line (xpr.cli) and the Python API (xpr.api) share.

    prepared = prepare(spec, settings, overrides, home_option)   # settings resolved and checked
    outcome = execute(prepared, quiet)                             # run folder, worker, success

`prepare` resolves the settings (a name, a YAML file or a mapping, plus `-o`-style overrides),
finds the home and the run's structure name; every problem is an XprUserError raised before
anything is written. `execute` claims the run folder, calls the worker's `run(settings, archive)`
and marks the run: on success the product's latest-link points at the main file and the run is
recorded for array-job merges; on failure the run is marked FAILED and `RunFailed` carries the run
and the error (a KeyboardInterrupt marks the run and propagates as it is).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from xpr import home as home_module
from xpr import registry
from xpr.archive import Run
from xpr.settings import Resolved, resolve, to_plain


@dataclass
class Prepared:
    spec: registry.CommandSpec
    home: object
    resolved: Resolved
    structure: str
    device_line: str | None = None


@dataclass
class Outcome:
    run: Run
    link: Path | None
    returned: object          # what the worker's run() returned


class RunFailed(Exception):
    """The worker raised: the run folder is marked FAILED; .error is what the worker raised."""

    def __init__(self, run: Run, error: BaseException):
        super().__init__(f"{run.group} {run.command} failed: {type(error).__name__}: {error}")
        self.run = run
        self.error = error


def prepare(spec: registry.CommandSpec, settings, overrides=(), home_option=None) -> Prepared:
    """Settings (name, path or mapping) + overrides -> a Prepared run. Raises XprUserError."""
    from xpr.backend import device_note

    home = home_module.locate(str(home_option) if home_option is not None else None)
    if isinstance(settings, Mapping):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "settings.yaml"
            path.write_text(yaml.safe_dump(to_plain(dict(settings)), sort_keys=False))
            resolved = resolve(spec.group, spec.name, str(path), home, list(overrides))
        resolved = dataclasses.replace(resolved, source="(settings given as a mapping)")
    else:
        resolved = resolve(spec.group, spec.name, str(settings), home, list(overrides))
    structure = spec.structure(resolved.settings)
    device_line = device_note()            # XPR_DEVICE checked here (a user error when wrong)
    return Prepared(spec, home, resolved, structure, device_line)


def execute(prepared: Prepared, quiet: bool = False) -> Outcome:
    """Claim the run folder, run the worker, mark success (or FAILED and raise RunFailed)."""
    spec = prepared.spec
    worker = importlib.import_module(spec.module)
    run = Run(prepared.home, spec.group, spec.product, prepared.structure, prepared.resolved.settings,
              quiet=quiet, command=spec.name)
    run.log.info("settings %s -> run %s", prepared.resolved.source, run.path)
    if prepared.device_line:
        run.log.info(prepared.device_line)
    try:
        returned = worker.run(prepared.resolved.settings, run)
    except KeyboardInterrupt as error:
        run.fail(error)
        raise
    except Exception as error:  # the worker failed: record it in the run, hand it to the caller
        run.fail(error)
        raise RunFailed(run, error) from error
    link = run.succeed()
    record_run(spec, run)
    return Outcome(run, link, returned)


def record_run(spec: registry.CommandSpec, run: Run):
    """Array-job shares: append 'group command run_folder main_file' to $XPR_RUN_RECORD if set."""
    record = os.environ.get("XPR_RUN_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(f"{spec.group} {spec.name} {run.path} {run.main_file or ''}\n")
