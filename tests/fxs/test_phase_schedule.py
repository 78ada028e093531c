"""fxs phasing runs on the shared engine: a block's own HIO beta is applied, the global ramp
covers the other HIO iterations, and the logged schedule is the one that runs."""
from __future__ import annotations

import numpy as np
import pytest

from xpr.backend import Backend
from xpr.fxs.grids import build_grid, gaussian_blobs
from xpr.fxs.iterate import RealSpaceOptions, compile_policies, phase
from xpr.fxs.real_space import radial_field
from xpr.fxs.reciprocal_projection import InvariantProjection, constraint_from_density
from xpr.fxs.transforms import FourierTransformPair
from xpr.phasing import schedule

MAIN_LOOP = {"sub_loops": {"order": ["main", "own"],
                           "main": {"iterations": 2, "order": ["HIO", "SW", "ER"],
                                    "methods": {"HIO": {"iterations": 6}, "SW": {}, "ER": {"iterations": 3}}},
                           "own": {"iterations": 1, "order": ["HIO", "ER"],
                                   "methods": {"HIO": {"iterations": 4, "beta": 0.3}, "ER": {"iterations": 2}}}}}


def test_block_beta_and_global_ramp_are_what_phase_applies():
    backend = Backend(False, "double")
    grid = build_grid(2, 16, 0.3, 6)
    transform = FourierTransformPair(grid, backend)
    particle = gaussian_blobs(grid, [(0.0, 0.0), (25.0, 10.0)], [12.0, 8.0], [1.0, 0.6])
    constraint, _ = constraint_from_density(particle, transform)
    options = RealSpaceOptions(hio_betas=(0.9, 0.5), sw_sigmas=(20.0, 5.0))
    steps = compile_policies(schedule.parse_blocks(MAIN_LOOP, key="main_loop"), options)
    rng = np.random.default_rng(1)
    density = np.abs(particle[:, None, :] * (1 + 0.3 * rng.standard_normal(grid.angular_shape + (2, grid.n_radial))))
    support = radial_field(grid, grid.real_radii < 60, 2).astype(bool)
    result = phase(transform, InvariantProjection(transform, constraint), schedule.parse_blocks(MAIN_LOOP, key="main_loop"),
                   density, support, options)
    betas = result["betas"]
    assert len(betas) == 2 * 9 + 6 == result["errors_main"].shape[1]
    hio_main = np.r_[betas[0:6], betas[9:15]]
    assert hio_main[0] == pytest.approx(0.9) and hio_main[-1] == pytest.approx(0.5)
    assert np.allclose(hio_main, 0.9 * (0.5 / 0.9) ** (np.arange(12) / 11))
    assert np.all(betas[18:22] == 0.3)                  # the block's own beta (was the ramp's before)
    # what the log shows (describe of the compiled steps) is what ran
    words = schedule.describe(steps).split()
    assert words == ["6HIO(0.90->0.69)", "SW(sigma=20)", "3ER", "6HIO(0.65->0.50)", "SW(sigma=5)", "3ER",
                     "4HIO(0.30)", "2ER"]
    assert f"{betas[5]:.2f}" == "0.69" and f"{betas[9]:.2f}" == "0.65"
    assert np.all(np.isfinite(result["errors_main"])) and np.all(result["best_error"] <= result["errors_main"].min(1))


def test_error_figure_marks_the_shrink_wraps_where_they_run():
    """error_metrics.png draws a shrink-wrap line after global iterations 6 and 15 of MAIN_LOOP
    (6 HIO, SW, 3 ER, 6 HIO, SW, ...)."""
    from xpr.fxs.reconstruct import shrink_wrap_iterations

    assert shrink_wrap_iterations(schedule.parse_blocks(MAIN_LOOP)) == [6, 15]
