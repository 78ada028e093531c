"""Running one command: what the command line (xpr.cli) and the Python API (xpr.api) share.

    prepared = prepare(spec, settings, overrides, home_option)   # settings resolved and checked
    outcome = execute(prepared, quiet)                             # run folder, worker, success

`prepare` resolves the settings (a name, a YAML file or a mapping, plus `-o`-style overrides),
finds the home and the run's structure name, and lets the worker check its setting values (an
optional `validate(settings)` in the worker module); every problem is an XprUserError raised
before anything is written. `execute` claims the run folder, calls the worker's
`run(settings, archive)` and marks the run:

* success: the product's latest-link points at the main file, the run is recorded for array-job
  merges;
* a user error found by the worker before it wrote anything: the folder is removed (no litter);
* any other failure: the run is marked FAILED and `RunFailed` carries the run (None when the
  folder itself could not be made: read-only home, full disk), the error and whether the marker
  could be written;
* SIGTERM / SIGINT: the worker processes are stopped, the run is marked FAILED with the signal
  named, and `Interrupted` propagates (the command line exits 128 + the signal number).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml

from xpr import home as home_module
from xpr import parallel, registry
from xpr.archive import Run
from xpr.errors import XprUserError
from xpr.settings import Resolved, resolve, to_plain


@dataclass
class Prepared:
    spec: registry.CommandSpec
    home: object
    resolved: Resolved
    structure: str
    worker: ModuleType
    device_line: str | None = None


@dataclass
class Outcome:
    run: Run
    link: Path | None
    returned: object          # what the worker's run() returned


class RunFailed(Exception):
    """The run failed. .run: the Run (None if its folder could not be made); .error: what was
    raised; .marked: whether the FAILED marker was written (False for a removed folder)."""

    def __init__(self, run: Run | None, error: BaseException, marked: bool = True):
        where = f"{run.group} {run.command}" if run is not None else "run"
        super().__init__(f"{where} failed: {type(error).__name__}: {error}")
        self.run = run
        self.error = error
        self.marked = marked


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived while a worker ran (a BaseException, so no `except Exception`
    in a worker swallows it). .run is the run it stopped, .marked whether FAILED was written."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.run: Run | None = None
        self.marked = False
        super().__init__(f"stopped by {self.name}")


@contextlib.contextmanager
def signals_raise():
    """SIGTERM and SIGINT raise Interrupted in the main thread while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
    worker = importlib.import_module(spec.module)
    validate_settings(worker, resolved)
    device_line = device_note()            # XPR_DEVICE checked here (a user error when wrong)
    return Prepared(spec, home, resolved, structure, worker, device_line)


def validate_settings(worker, resolved: Resolved):
    """The worker's own checks of setting values (its optional `validate(settings)`), before a run
    folder exists; an error without a file gets the file its key came from."""
    validate = getattr(worker, "validate", None)
    if validate is None:
        return
    try:
        validate(resolved.settings)
    except XprUserError as error:
        if error.file is None and error.key:
            error.file = resolved.origin(error.key)
        raise


def execute(prepared: Prepared, quiet: bool = False, verbose: bool = False,
            console: bool | None = None) -> Outcome:
    """Claim the run folder, run the worker, mark success (or FAILED and raise RunFailed).

    console: log to the terminal (None: only when no handler above `xpr` exists, as in a
    notebook whose own handlers then receive the records)."""
    spec = prepared.spec
    try:
        run = Run(prepared.home, spec.group, spec.product, prepared.structure,
                  prepared.resolved.settings, quiet=quiet, command=spec.name, console=console,
                  level=logging.DEBUG if verbose else logging.INFO)
    except OSError as error:           # read-only home, full disk
        raise RunFailed(None, error, marked=False) from error
    run.log.info("settings %s -> run %s", prepared.resolved.source, run.path)
    if prepared.device_line:
        run.log.info(prepared.device_line)
    try:
        with signals_raise():
            returned = prepared.worker.run(prepared.resolved.settings, run)
    except Interrupted as error:
        parallel.stop_child_processes()
        error.run = run
        error.marked = run.fail(error, reason=f"interrupted by signal {error.name} ({error.signum})") is not None
        raise
    except XprUserError as error:
        if run.started_work():
            raise RunFailed(run, error, marked=run.fail(error) is not None) from error
        run.discard()                  # nothing was computed: no run folder is left behind
        raise RunFailed(run, error, marked=False) from error
    except Exception as error:         # the worker failed: record it in the run, hand it on
        raise RunFailed(run, error, marked=run.fail(error) is not None) from error
    try:
        link = run.succeed()
        record_run(spec, run)
    except OSError as error:
        raise RunFailed(run, error, marked=run.fail(error) is not None) from error
    return Outcome(run, link, returned)


def record_run(spec: registry.CommandSpec, run: Run):
    """Array-job shares: append 'group command run_folder main_file' to $XPR_RUN_RECORD if set."""
    record = os.environ.get("XPR_RUN_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(f"{spec.group} {spec.name} {run.path} {run.main_file or ''}\n")
