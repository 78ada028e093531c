"""The CLI contract: home set-up, chaining, overrides, exit codes, help from the defaults."""
from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from xpr import __version__
from xpr.io import load_tree


def test_version(run_xpr):
    result = run_xpr(["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_setup_home_tree_and_no_overwrite(tmp_path, run_xpr):
    home = tmp_path / "h"
    assert run_xpr(["--setup_home", home]).exit_code == 0
    from xpr import registry, resources

    for spec in registry.COMMANDS:
        if (resources.defaults_dir() / spec.group / f"{spec.name}.yaml").is_file():
            assert (home / "settings/projects" / spec.group / spec.name / f"default_{__version__}.yaml").is_file()
    assert (home / "data").is_dir()
    # a user's edit survives a second set-up
    some = next((home / "settings/projects").rglob("default_*.yaml"), None)
    if some is not None:
        some.write_text("# mine\n")
        assert run_xpr(["--setup_home", home]).exit_code == 0
        assert some.read_text() == "# mine\n"
    # the last set-up home is recorded, and found without --home or XPR_HOME
    config = os.path.expanduser("~/.xpr/config.yaml")
    assert yaml.safe_load(open(config))["home"] == str(home.resolve())
    from xpr.home import locate

    assert locate().root == home.resolve()


def test_missing_home_is_a_clear_error(tmp_path, run_xpr, test_group):
    result = run_xpr(["--home", tmp_path / "nowhere", "test", "square", "tutorial"])
    assert result.exit_code == 2
    assert "xpr --setup_home" in result.output and "Traceback" not in result.output


def test_chain_runs_in_order_and_links_latest(test_group, home, run_xpr):
    result = run_xpr(["test", "square", "tutorial", "-o", "n=3", "square", "tutorial", "-o", "power.exponent=3"])
    assert result.exit_code == 0, result.output
    runs = sorted((home / "data/test/square/archive/tut").rglob("run_*"))
    assert [r.name for r in runs] == ["run_0", "run_1"]
    first = load_tree(runs[0] / "square.h5")["values"]
    second = load_tree(runs[1] / "square.h5")["values"]
    np.testing.assert_array_equal(first, [0, 1, 4])
    np.testing.assert_array_equal(second, [0, 1, 8, 27, 64])
    link = home / "data/test/square/tut.h5"
    assert link.is_symlink() and link.resolve() == (runs[1] / "square.h5").resolve()
    saved = yaml.safe_load((runs[1] / "settings.yaml").read_text())
    assert saved["power"]["exponent"] == 3 and saved["n"] == 5
    assert "squares of 5 numbers" in (runs[1] / "run.log").read_text()


def test_failure_stops_chain_keeps_earlier_run_and_link(test_group, home, run_xpr):
    assert run_xpr(["test", "square", "tutorial"]).exit_code == 0
    result = run_xpr(["test", "square", "tutorial", "fail", "tutorial", "square", "tutorial"])
    assert result.exit_code == 1
    assert "the computation diverged" in result.output
    square_runs = sorted((home / "data/test/square/archive/tut").rglob("run_*"))
    assert len(square_runs) == 2          # the third square never ran
    failed = next((home / "data/test/fail/archive").rglob("run_0"))
    assert (failed / "FAILED").is_file()
    assert "Traceback" in (failed / "run.log").read_text()
    assert not (home / "data/test/fail/tut.h5").exists()   # a failed run is never linked


def test_worker_input_error_exits_2(test_group, home, run_xpr):
    result = run_xpr(["test", "bad_input", "tutorial"])
    assert result.exit_code == 2
    assert "mask.npy" in result.output and "input.mask_path" in result.output
    assert "Traceback" not in result.output
    # the worker found the error before computing: neither its run folder nor the empty
    # archive/<name>/<date>/ folders claimed for it are left behind
    product = home / "data/test/bad_input"
    assert not product.exists() or not list(product.rglob("*")), list(product.rglob("*"))


def test_claim_survives_a_discard_removing_the_parent(tmp_path, monkeypatch):
    """Another job's discard may remove the empty date folder between our mkdir of it and the
    claim of run_N: the claim makes the folder again instead of failing."""
    from pathlib import Path

    from xpr import archive

    parent = tmp_path / "archive" / "tut" / "03_12_2026"
    real_mkdir, calls = Path.mkdir, []

    def racing_mkdir(self, *args, **kwargs):
        if self.name == "run_0" and not calls:
            calls.append(self)
            archive.remove_empty_parents(parent / "run_x", tmp_path)   # the other job's discard
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    folder = archive.claim_run_folder(parent)
    assert calls and folder == parent / "run_0" and folder.is_dir()


def test_help_lists_settings_with_defaults(run_xpr, test_group):
    result = run_xpr(["test", "square", "--help"])
    assert result.exit_code == 0
    assert "exponent = 2" in result.output and "exponent applied" in result.output
    assert "choices: fast, exact" in result.output


def test_settings_command_prints_resolved(test_group, home, run_xpr):
    result = run_xpr(["settings", "test", "square", "tutorial", "-o", "scale={command: '2*pi'}"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["n"] == 5 and abs(resolved["scale"] - 2 * np.pi) < 1e-12


def test_save_symlink_false_keeps_old_link(test_group, home, run_xpr):
    assert run_xpr(["test", "square", "tutorial"]).exit_code == 0
    link = home / "data/test/square/tut.h5"
    before = link.resolve()
    assert run_xpr(["test", "square", "tutorial", "-o", "save_symlink=false"]).exit_code == 0
    assert link.resolve() == before


def test_quiet_prints_nothing_on_success(test_group, home, run_xpr):
    result = run_xpr(["-q", "test", "square", "tutorial"])
    assert result.exit_code == 0 and result.output.strip() == ""


@pytest.mark.parametrize("group, command, override, words", [
    # each of these passed the settings check and ended in a traceback or a failed run
    ("em", "simulate_4dstem", "experiment.scan_size=[]", ["list of 2 items, got 0"]),
    ("fxs", "simulate_patterns", "detector.image_dimensions=[]", ["list of 2 items, got 0"]),
    ("cdi", "phase2d", "phasing_parameters.shrink_wrap.threshold=[]", ["1 to 2 items, got 0"]),
    ("fxs", "reconstruct", "random_seed=-1", ["out of range [0, null]"]),
    ("fxs", "reconstruct", "particle_radius=0", ["out of range (0.0, null]"]),
])
def test_bad_values_of_real_commands_exit_2_naming_the_key(home, run_xpr, group, command,
                                                           override, words):
    """Values a user can type that the commands cannot use stop before any work, with exit 2
    and the key (they were found by trying boundary values on every key)."""
    result = run_xpr([group, command, "tutorial", "-o", override])
    assert result.exit_code == 2, result.output
    key = override.split("=")[0]
    assert f"key:     {key}" in result.output
    for word in words:
        assert word in result.output
    assert "Traceback" not in result.output
    assert not any((home / "data").rglob("run_*"))          # no run was claimed
