"""Run any xpr command from Python (a script, a notebook) and get its outputs back.

    from xpr import api
    sim = api.run("cdi", "simulate", "tutorial")
    ph = api.run("cdi", "phase2d", "tutorial", overrides={"phasing.repeats": 4})
    ph.path            # the run folder;   ph.main_file, ph.link, ph.files
    ph.data["merged"]["object"]            # the main HDF5 file as a dict of arrays (when small)
    ph.returned        # what the worker's run() returned (arrays, grids, ...)

`settings` is a settings name (HOME/settings/projects/<group>/<command>/NAME.yaml, as on the
command line), a path to a YAML file, or a mapping holding what differs from the documented
defaults; `overrides` is a mapping {"dotted.key": value} or a list of "dotted.key=value" strings
(the command line's -o). The run goes through exactly what `xpr <group> <command>` does
(xpr.runner: settings resolved and checked before anything is written, a dated run folder with
settings.yaml and run.log, the latest-link moved on success only). Bad settings raise
xpr.errors.SettingsError / InputError; a failed worker raises xpr.runner.RunFailed (its run
folder is marked FAILED, the worker's exception is `.error`). Progress bars use tqdm.auto, so
they render as notebook widgets under Jupyter.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xpr import registry, runner
from xpr.runner import RunFailed
from xpr.errors import SettingsError
from xpr.settings import resolve, to_plain

__all__ = ["run", "settings", "commands", "Result", "RunFailed"]

#: main files up to this size are loaded into Result.data (bigger ones: Result.load())
MAX_LOAD_BYTES = 256 * 2 ** 20


@dataclass
class Result:
    """What one command run produced."""

    group: str
    command: str
    path: Path                        # the run folder
    main_file: Path | None            # the run's main output (HDF5), if it writes one
    link: Path | None                 # the product's latest-link, moved to main_file
    settings: dict                    # the resolved settings the run used
    returned: object = None           # the worker's return value
    data: dict | None = None          # main_file as nested dicts of arrays (None when too big / none)
    files: list = field(default_factory=list)   # every file the run wrote

    def load(self) -> dict:
        """The main file as nested dicts of numpy arrays (whatever its size)."""
        from xpr.io.h5 import load_tree

        if self.main_file is None:
            raise FileNotFoundError(f"{self.group} {self.command} wrote no main file in {self.path}")
        return load_tree(self.main_file)

    def __repr__(self):
        return (f"Result({self.group} {self.command}: {self.path}, main_file={self.main_file}, "
                f"data={'loaded' if self.data is not None else None})")


def _override_strings(overrides) -> list:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(to_plain(value))}" for key, value in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return [str(o) for o in overrides]


def _spec(group: str, command: str) -> registry.CommandSpec:
    try:
        return registry.find(group, command)
    except KeyError:
        known = ", ".join(f"{g} {c}" for g, c in commands())
        raise SettingsError(f"no command '{group} {command}' (known: {known})") from None


def commands() -> list:
    """Every (group, command) the API and the command line can run."""
    return [(spec.group, spec.name) for spec in registry.COMMANDS]


def settings(group: str, command: str, settings="tutorial", overrides=None, home=None) -> dict:
    """The resolved, checked settings a run would use (nothing is run or written)."""
    from xpr import home as home_module

    spec = _spec(group, command)
    if isinstance(settings, Mapping):
        return to_plain(runner.prepare(spec, settings, _override_strings(overrides), home).resolved.settings)
    return to_plain(resolve(spec.group, spec.name, str(settings), home_module.locate(
        str(home) if home is not None else None), _override_strings(overrides)).settings)


def run(group: str, command: str, settings="tutorial", overrides=None, home=None, quiet: bool = True,
        load: bool = True) -> Result:
    """Run `xpr <group> <command> settings -o overrides` and return its Result.

    home: an xpr home folder (default: as the command line finds it: XPR_HOME, the recorded home,
    ~/.xpr). quiet: no log lines or progress bars on the console (the run.log is written
    either way). load: read the main file into Result.data when it is at most MAX_LOAD_BYTES.
    """
    spec = _spec(group, command)
    prepared = runner.prepare(spec, settings, _override_strings(overrides), home)
    outcome = runner.execute(prepared, quiet=quiet)
    folder = outcome.run.path
    result = Result(group=spec.group, command=spec.name, path=folder, main_file=outcome.run.main_file,
                    link=outcome.link, settings=to_plain(prepared.resolved.settings), returned=outcome.returned,
                    files=sorted(p for p in folder.rglob("*") if p.is_file()))
    if load and result.main_file is not None and result.main_file.suffix in (".h5", ".hdf5", ".cxi") \
            and result.main_file.stat().st_size <= MAX_LOAD_BYTES:
        result.data = result.load()
    return result
