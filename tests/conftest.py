"""Shared fixtures: a temporary home, a CLI runner, and a small test-only command group."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

HERE = Path(__file__).resolve().parent
# Files written by xFrame itself, for compatibility tests; they ship with the tests (see its README.md).
XFRAME_DATA = HERE / "data" / "xframe"


@pytest.fixture
def xframe_data() -> Path:
    """The folder of xFrame-written reference files (tests/data/xframe, in the checkout)."""
    assert XFRAME_DATA.is_dir(), f"xFrame reference files expected at {XFRAME_DATA}"
    return XFRAME_DATA


GUARD = HERE / "outside_guard"
CHECKOUT = HERE.parent


def pytest_configure(config):
    """Watch for files read outside the checkout beside it (a data folder, a sibling clone): they fail
    the session (tests/outside_guard/sitecustomize.py), here and in every process tests start."""
    import getpass
    import importlib.util
    import os
    import tempfile

    handle, log = tempfile.mkstemp(prefix="xpr-outside-", suffix=".log")
    os.close(handle)
    pytest_temp = Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}"
    # HOME for the whole session too: module-scoped fixtures run before _isolated_user_home, and
    # `--setup_home` records its home in ~/.xpr/config.yaml (test_magnetic's wrote the user's)
    user = tempfile.mkdtemp(prefix="xpr-test-user-")
    environment = {"HOME": user, "XPR_TEST_CHECKOUT": str(CHECKOUT), "XPR_TEST_OUTSIDE_LOG": log,
                   "XPR_TEST_ALLOW_UNDER": os.pathsep.join(filter(None, [str(pytest_temp),
                                                                         os.environ.get("XPR_TEST_ALLOW_UNDER")])),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(GUARD), os.environ.get("PYTHONPATH")]))}
    config._xpr_outside = {"log": log, "saved": {k: os.environ.get(k) for k in environment}}
    os.environ.update(environment)
    spec = importlib.util.spec_from_file_location("xpr_outside_guard", GUARD / "sitecustomize.py")
    guard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guard)              # installs the audit hook in this process

    import h5py                                  # HDF5 opens files in C: announce them to the hook

    original = h5py.File.__init__

    def announced(self, name, *args, **kwargs):
        if isinstance(name, (str, bytes, os.PathLike)):
            import sys

            sys.audit("open", os.fspath(name), "h5py", 0)
        original(self, name, *args, **kwargs)

    h5py.File.__init__ = announced


def pytest_sessionfinish(session, exitstatus):
    import os

    state = getattr(session.config, "_xpr_outside", None)
    if state is None:
        return
    for key, value in state["saved"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        lines = sorted(set(Path(state["log"]).read_text().splitlines()))
    finally:
        os.unlink(state["log"])
    if lines:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = ("tests read outside the checkout (ship the data in tests/ instead):\n  "
                   + "\n  ".join(lines[:20]))
        if reporter is not None:
            reporter.write("\n")
            reporter.write_line(message, red=True)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    """GPU tests skip only when cupy or a CUDA device is absent."""
    from xpr.backend import gpu_available

    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs cupy and a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """A device for device/CPU parity tests: the emulated one always, cupy where present."""
    return request.param


@pytest.fixture(autouse=True)
def _isolated_user_home(tmp_path_factory, monkeypatch):
    """Never touch the real ~/.xpr: HOME points at a temporary folder, XPR_HOME is unset."""
    fake_user = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("HOME", str(fake_user))
    monkeypatch.delenv("XPR_HOME", raising=False)
    yield


def invoke(args, **kwargs):
    from xpr.cli import main

    runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


@pytest.fixture
def run_xpr():
    """run_xpr(args) -> click Result (exit_code, output, stderr) of `xpr args...`."""
    return invoke


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A freshly set-up xpr home (its path); XPR_HOME points at it."""
    path = tmp_path / "home"
    result = invoke(["--setup_home", path])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("XPR_HOME", str(path))
    return path


@pytest.fixture
def test_group(tmp_path, monkeypatch):
    """Adds `xpr test square|fail|bad_input` (workers in tests/fake_workers) to the CLI."""
    import shutil

    from xpr import registry, resources
    from xpr.cli import build_group, main

    defaults = tmp_path / "settings_defaults"
    shutil.copytree(resources.defaults_dir(), defaults)
    shutil.copytree(HERE / "fake_settings" / "test", defaults / "test")
    tutorials = tmp_path / "tutorials"
    shutil.copytree(resources.tutorials_dir(), tutorials)
    for name in ("square", "fail", "bad_input"):
        (tutorials / "test" / name).mkdir(parents=True)
        shutil.copy(HERE / "fake_settings" / "tutorial_square.yaml", tutorials / "test" / name / "tutorial.yaml")
    monkeypatch.setattr(resources, "defaults_dir", lambda: defaults)
    monkeypatch.setattr(resources, "tutorials_dir", lambda: tutorials)
    specs = tuple(registry.CommandSpec("test", name, f"fake_workers.{name}", name, f"test worker {name}")
                  for name in ("square", "fail", "bad_input"))
    monkeypatch.setattr(registry, "COMMANDS", registry.COMMANDS + specs)
    main.add_command(build_group("test"))
    yield
    main.commands.pop("test", None)
