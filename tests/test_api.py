"""xpr.api runs commands from Python exactly as the command line does and hands back their
outputs: the cdi tutorial chain from Python recovers the simulated object."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from xpr import api, resources
from xpr.backend import cpu
from xpr.errors import SettingsError
from xpr.phasing import merge


def test_cdi_chain_from_python_recovers_the_object(home):
    """simulate (settings name) then phase2d (the tutorial's settings as a mapping, overrides as a mapping):
    the merged object of the returned data matches the simulated truth to the tutorial's 0.15,
    the run folder holds settings.yaml and run.log, the latest-link points at the main file."""
    simulated = api.run("cdi", "simulate", "tutorial", home=home)
    assert simulated.link.resolve() == simulated.main_file and simulated.main_file.parent == simulated.path
    truth = simulated.data["truth"]["object"]
    tutorial = yaml.safe_load((resources.tutorials_dir() / "cdi" / "phase2d" / "tutorial.yaml").read_text())
    phased = api.run("cdi", "phase2d", tutorial, overrides={"phasing.repeats": 4}, home=home)
    assert phased.settings["phasing"]["repeats"] == 4
    assert {"settings.yaml", "run.log"} <= {p.name for p in phased.files}
    merged = phased.data["merged"]["object"]
    assert merged.shape == truth.shape
    assert merge.real_space_error(merged, truth, cpu()) < 0.15
    assert np.array_equal(phased.load()["merged"]["object"], merged)


def test_settings_and_errors_are_the_command_lines(home):
    resolved = api.settings("fxs", "reconstruct", "tutorial", overrides=["main_loop.sub_loops.main.iterations=2"],
                            home=home)
    assert resolved["main_loop"]["sub_loops"]["main"]["iterations"] == 2
    assert resolved["main_loop"]["sub_loops"]["refinement"]["methods"]["ER"]["iterations"] == 60
    with pytest.raises(SettingsError, match="no command 'cdi phase4d'"):
        api.run("cdi", "phase4d", home=home)
    with pytest.raises(SettingsError, match="unknown key"):
        api.run("cdi", "simulate", "tutorial", overrides={"no_such_key": 1}, home=home)
    assert ("fxs", "average") in api.commands()


def test_a_failing_worker_raises_run_failed_and_marks_the_run(test_group, run_xpr, tmp_path):
    """The worker's exception reaches the caller as RunFailed; its run folder holds FAILED with the
    reason and the latest-link is not moved (the command line's exit 1, the same runner)."""
    result = run_xpr(["--setup_home", tmp_path / "home"])
    assert result.exit_code == 0
    with pytest.raises(api.RunFailed, match="the computation diverged") as info:
        api.run("test", "fail", "tutorial", home=tmp_path / "home")
    assert isinstance(info.value.error, RuntimeError)
    assert (info.value.run.path / "FAILED").read_text().startswith("RuntimeError: the computation diverged")
    assert not (tmp_path / "home" / "data" / "test" / "fail" / "tutorial.h5").exists()
