"""Test-session guard: records every file the tests (and the processes they start) open, list or
copy outside the checkout but beside it -- a data folder, a sibling clone -- so the session fails.

Installed by tests/conftest.py in the pytest process; in child processes (the CLI run as a
subprocess, spawn workers of process pools) this file is imported as `sitecustomize` because
conftest puts its folder first on PYTHONPATH. The environment says what to watch:

    XPR_TEST_CHECKOUT       the checkout's root (reads inside it are fine)
    XPR_TEST_FORBID_UNDER   folders (os.pathsep-separated) whose contents outside the checkout are
                            off limits; the checkout's parent is always one of them
    XPR_TEST_ALLOW_UNDER    folders that stay allowed even so (pytest's temporary folders)
    XPR_TEST_OUTSIDE_LOG    file the offending accesses are appended to ("event path" per line)

Python-level opens are seen through audit hooks (open, os.listdir, os.scandir, glob, shutil copies);
h5py files through a wrapper of h5py.File in the pytest process. A C library opening a file by
itself is not seen here: .ci/run therefore also runs the suite from a copy with nothing beside it.
"""
from __future__ import annotations

import os
import sys
import tempfile

EVENTS = {"open", "os.listdir", "os.scandir", "glob.glob", "shutil.copyfile", "shutil.copytree",
          "os.chdir", "os.walk"}


def _folders(text: str | None) -> list[str]:
    return [os.path.abspath(p) for p in (text or "").split(os.pathsep) if p]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def install(checkout: str, forbid_under: list[str], allow_under: list[str], log: str):
    """Add the audit hook (once per process)."""
    if getattr(sys, "_xpr_outside_guard", False):
        return
    sys._xpr_outside_guard = True
    checkout = os.path.abspath(checkout)
    # Never the system temp folder or a folder holding it (a checkout cloned straight into /tmp):
    # pytest's, dask's and tempfile's scratch lives there. .ci/run's copy in a fresh folder with
    # nothing beside it still catches reads beside the checkout in that case.
    temp = os.path.abspath(tempfile.gettempdir())
    forbid = [f for f in [os.path.dirname(checkout)] + forbid_under
              if f != os.sep and not _inside(temp, f)]
    interpreter = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    allow = [checkout, os.path.abspath(log)] + allow_under + sorted(interpreter)   # a venv beside it
    busy = []

    def offending(path) -> bool:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return False
        for candidate in {os.path.abspath(path), os.path.realpath(path)}:
            if any(_inside(candidate, f) for f in forbid) and not any(_inside(candidate, a) for a in allow):
                return True
        return False

    def hook(event, args):
        if event not in EVENTS or busy or not args:
            return
        busy.append(1)
        try:
            path = args[0]
            if offending(path):
                with open(log, "a") as f:
                    f.write(f"{event} {os.path.abspath(os.fsdecode(path))}\n")
        finally:
            busy.pop()

    sys.addaudithook(hook)


def install_from_environment():
    checkout, log = os.environ.get("XPR_TEST_CHECKOUT"), os.environ.get("XPR_TEST_OUTSIDE_LOG")
    if checkout and log:
        install(checkout, _folders(os.environ.get("XPR_TEST_FORBID_UNDER")),
                _folders(os.environ.get("XPR_TEST_ALLOW_UNDER")), log)


install_from_environment()
