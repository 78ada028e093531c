"""Settings written for xFrame's `fxs reconstruct` run in xpr as they are: xFrame's key spellings
are folded into xpr's, its ramp specifiers are compiled into the schedule, and one `-o` override
inside main_loop changes one number instead of wiping the schedule."""
from __future__ import annotations


import numpy as np
import pytest

from xpr import resources, settings
from xpr.errors import InputError
from xpr.fxs.xframe_settings import fold
from xpr.io.h5 import load_tree

XFRAME_STYLE = resources.tutorials_dir() / "fxs" / "reconstruct" / "tutorial_xframe_style.yaml"


def test_an_override_inside_main_loop_merges_into_the_schedule():
    resolved = settings.resolve("fxs", "reconstruct", str(XFRAME_STYLE),
                                overrides=["main_loop.sub_loops.main.iterations=2",
                                           "main_loop.sub_loops.refinement.methods.ER.iterations=7"])
    loops = resolved.settings.main_loop.sub_loops.to_dict()
    assert loops["order"] == ["main", "refinement"]
    assert loops["main"] == {"methods": {"HIO": {"iterations": 60}, "ER": {"iterations": 40}, "SW": {"iterations": 1}},
                             "iterations": 2, "order": ["HIO", "SW", "ER"]}
    assert loops["refinement"]["methods"] == {"ER": {"iterations": 7}, "SW": {"iterations": 1}}
    # a user file still replaces the default schedule whole (its own blocks only)
    default = settings.resolve("fxs", "reconstruct", str(XFRAME_STYLE)).settings.main_loop.sub_loops.to_dict()
    assert set(default) == {"order", "main", "refinement"} and default["main"]["iterations"] == 5


def test_xframe_keys_fold_into_xpr_keys(tmp_path):
    resolved = settings.resolve("fxs", "reconstruct", str(XFRAME_STYLE), overrides=[
        "IO.folders.mine=" + str(tmp_path),
        "IO.files.proj_data.name=proj.h5", "IO.files.proj_data.folder=mine",
        "IO.files.reconstructions.options.generate_vtk_files=false",
        "multi_process.n_parallel_reconstructions=true", "grid.n_radial_points=40",
        "fourier_transform.reciprocity_coefficient=2.0"])
    folded, notes = fold(resolved.settings, cores=6)
    real = folded.projections.real
    assert list(real.apply) == ["support", "value_threshold", "limit_imag"]
    assert list(real.value_threshold.threshold) == [0, None]
    assert real.support.enforce_initial_support.if_error_bigger_than == pytest.approx(6e-3)
    assert real.limit_imag.threshold == 2
    assert folded.n_reconstructions == 6                     # true: one per physical core
    assert folded.grid.n_radial_grid_points == 40 and folded.grid.reciprocity_coefficient == 2.0
    assert "n_radial_points" not in folded.grid and "fourier_transform" not in folded
    assert folded.input.invariants_file == str(tmp_path / "proj.h5")
    assert folded.output.vtk is False and folded.output.plots is True
    assert any("IO.files.proj_data" in n for n in notes)
    bad = settings.resolve("fxs", "reconstruct", str(XFRAME_STYLE), overrides=["projections.real.projections.positivity=1"])
    with pytest.raises(InputError, match="positivity") as info:
        fold(bad.settings)
    assert info.value.key == "projections.real.projections"


@pytest.mark.slow
def test_xframe_style_settings_run_on_the_3d_tutorial_invariants(home, run_xpr):
    """xFrame's tutorial settings (its per-block HIO beta and sigma specifiers, nested real-space
    projections, n_parallel_reconstructions) run on xpr's 3-D tutorial invariants: the log shows the
    compiled ramps (beta A e^(-n/250) + B from 0.5; sigma 20 - 2n stopped at the half-period
    resolution pi/0.15 = 20.9 Å), and the reconstructions reproduce the data's invariants as the
    tutorial's own settings do (median mismatch over orders > 0 measured 0.21 and 0.27 for the two;
    the positivity floor of this grid is 0.30, test_tutorial_chain)."""
    result = run_xpr(["-q", "fxs", "simulate_ccd", "tutorial", "extract", "tutorial"])
    assert result.exit_code == 0, result.output
    result = run_xpr(["fxs", "reconstruct", XFRAME_STYLE, "-o", "multi_process.n_parallel_reconstructions=2"])
    assert result.exit_code == 0, result.output
    log = next((home / "data" / "fxs" / "reconstructions" / "archive").rglob("*.log")).read_text()
    assert "schedule: 60HIO(0.50->0.48) SW(sigma=20.9) 40ER 60HIO(0.48->0.46)" in log
    assert "SW(sigma=20.9) 100ER" in log
    results = load_tree(home / "data" / "fxs" / "reconstructions" / "3d_tutorial.h5")["reconstruction_results"]
    assert len(results) == 2
    mismatch = [np.nanmedian(r["invariant_mismatch"][1:]) for r in results.values()]
    assert min(mismatch) < 0.3, mismatch
