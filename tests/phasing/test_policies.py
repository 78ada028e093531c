"""Policies compiled into the schedule (beta ramps, operation options, scheduled operations) and
the engine's generic hooks: what the settings ask for is what runs, and what runs is logged."""
import math

import numpy as np
import pytest

from xpr.errors import InputError
from xpr.phasing import schedule
from xpr.phasing.engine import iterate
from xpr.phasing.projections import SupportProjection


def _blocks(own_beta=None):
    hio = {"iterations": 40} if own_beta is None else {"iterations": 40, "beta": own_beta}
    return {"sub_loops": {"order": ["a", "b"],
                          "a": {"iterations": 2, "order": ["HIO", "SW", "ER"],
                                "methods": {"HIO": {"iterations": 50}, "SW": {}, "ER": {"iterations": 10}}},
                          "b": {"iterations": 1, "order": ["HIO", "ER"],
                                "methods": {"HIO": hio, "ER": {"iterations": 5}}}}}


def test_a_blocks_own_beta_survives_the_global_ramp():
    """Block b declares beta 0.3: its 40 HIO iterations run at 0.3; the 100 HIO iterations of
    block a take the whole global exponential ramp 0.9 -> 0.5."""
    names = []
    steps = schedule.parse_blocks(_blocks(0.3), names=names)
    steps = schedule.apply_beta_ramp(steps, [0.9, 0.5], ("HIO",), "exponential")
    hio = [s for s in steps if s.method == "HIO"]
    assert [s.own_beta for s in hio] == [False, False, True]
    assert all(hio[2].beta_at(k) == 0.3 for k in range(40))
    ramp = [s.beta_at(k) for s in hio[:2] for k in range(s.iterations)]
    assert ramp[0] == pytest.approx(0.9) and ramp[-1] == pytest.approx(0.5)
    assert ramp[50] == pytest.approx(0.9 * (0.5 / 0.9) ** (50 / 99))
    assert names == ["a"] * 6 + ["b"] * 2
    # without an own beta, block b joins the ramp: 140 iterations from 0.9 to 0.5
    plain = schedule.apply_beta_ramp(schedule.parse_blocks(_blocks()), [0.9, 0.5], ("HIO",), "exponential")
    last = [s for s in plain if s.method == "HIO"][-1]
    assert last.beta_at(39) == pytest.approx(0.5) and last.beta_at(0) == pytest.approx(0.9 * (0.5 / 0.9) ** (100 / 139))


class _Recorder:
    """A stand-in modulus projection: identity, eMod 0; the engine's rules then leave x fixed."""

    def __call__(self, x):
        return x.copy(), np.zeros(x.shape[0])


def test_the_logged_schedule_is_what_runs():
    """The engine applies exactly beta_at of the compiled steps, and describe() of those steps
    states the first and last beta of each HIO step as they are applied."""
    steps = schedule.apply_beta_ramp(schedule.parse_blocks(_blocks(0.3)), [0.9, 0.5], ("HIO",), "exponential")
    steps = schedule.apply_option_ramp(steps, "SW", "sigma", [20.0, 5.0])
    seen_sigma = []
    x = np.ones((2, 8))
    support = np.ones((2, 8), bool)
    _, _, history = iterate(steps, x, support, _Recorder(), SupportProjection(), xp=np,
                            operations={"SW": lambda x, s, step: seen_sigma.append(step.options["sigma"])})
    expected = [s.beta_at(k) for s in steps if s.method in schedule.ITERATING for k in range(s.iterations)]
    assert history.betas == expected
    hio_betas = [b for b, s in zip(history.betas, [s for s in steps if s.method in schedule.ITERATING
                                                   for _ in range(s.iterations)]) if s.method == "HIO"]
    words = schedule.describe(steps).split()
    assert words[0] == f"50HIO({hio_betas[0]:.2f}->{hio_betas[49]:.2f})" == "50HIO(0.90->0.67)"
    assert words[-2] == "40HIO(0.30)"
    assert seen_sigma == [20.0, 5.0] and "SW(sigma=20)" in words and "SW(sigma=5)" in words


def test_any_operation_runs_at_chosen_iterations_and_callbacks_see_every_iteration():
    """A registered operation (here one that negates x) inserted after global iterations 3 and 7
    runs exactly there; the callback is called once per iteration with the global count."""
    steps = schedule.schedule_operation(schedule.parse_string("5ER 5HIO"), "FLIP", [3, 7],
                                        [{"factor": -1.0}, {"factor": -1.0}])
    assert [s.method for s in steps] == ["ER", "FLIP", "ER", "HIO", "FLIP", "HIO"]
    assert [s.iterations for s in steps if s.method != "FLIP"] == [3, 2, 2, 3]
    counts, flips = [], []

    def flip(x, support, step):
        x *= step.options["factor"]
        flips.append(len(counts))

    x = np.ones((1, 4))
    _, _, history = iterate(steps, x, np.ones((1, 4), bool), _Recorder(), SupportProjection(), xp=np,
                            operations={"FLIP": flip}, callbacks=(lambda state: counts.append(state.done),))
    assert counts == list(range(1, 11)) and flips == [3, 7]
    assert history.operations == [(3, "FLIP"), (7, "FLIP")]
    assert np.all(x == 1.0)                                # two flips
    # parse_string accepts a registered operation name, and refuses it when not registered
    assert [s.method for s in schedule.parse_string("5ER FLIP 5ER", operations=("FLIP",))] == ["ER", "FLIP", "ER"]
    with pytest.raises(InputError, match="unknown phasing algorithm 'FLIP'"):
        schedule.parse_string("5ER FLIP 5ER")


def test_batch_axis_metrics_are_per_repeat():
    """eCon with the repeats on axis -2 equals eCon of the same data with repeats first."""
    from xpr.phasing.engine import constraint_error

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4, 6))            # repeats on axis 2 (= -2)
    support = rng.random((3, 5, 4, 6)) > 0.5
    first = constraint_error(np.moveaxis(x, 2, 0), np.moveaxis(support, 2, 0), np, 0)
    assert np.allclose(constraint_error(x, support, np, -2), first)
    outside = [np.sum((x[:, :, b] * ~support[:, :, b]) ** 2) / np.sum(x[:, :, b] ** 2) for b in range(4)]
    assert np.allclose(first, np.sqrt(outside))


def test_xframe_ramp_specifiers_per_block():
    """xFrame's documented specifiers, one entry per block of the schedule:
    HIO beta [[0.5,0.4,-1/250,500],[0.01,0.002,-1/200,200]] is A exp(n exponent) + B from 0.5 at
    n = 0 to 0.4 at n = 500 in the first block, 0.01 -> 0.002 at n = 200 in the second;
    sigmas [[20,[False,5],-2],False] is 20 - 2n stopping at the resolution (False) in the first
    block and the resolution itself in the second."""
    main_loop = {"sub_loops": {"order": ["main", "refinement"],
                               "main": {"iterations": 5, "order": ["HIO", "SW", "ER"],
                                        "methods": {"HIO": {"iterations": 120}, "SW": {}, "ER": {"iterations": 4}}},
                               "refinement": {"iterations": 1, "order": ["SW", "HIO"],
                                              "methods": {"SW": {}, "HIO": {"iterations": 300}}}}}
    names = []
    steps = schedule.parse_blocks(main_loop, names=names)
    beta = schedule.apply_beta_ramp(steps, [[0.5, 0.4, -1 / 250, 500], [0.01, 0.002, -1 / 200, 200]],
                                    names=names)
    main = [s.beta_at(k) for s in beta[:15] if s.method == "HIO" for k in range(s.iterations)]
    refinement = [beta[-1].beta_at(k) for k in range(300)]
    a = 0.1 / (1 - math.exp(-2))
    assert main[0] == pytest.approx(0.5) and main[499] == pytest.approx(a * math.exp(-499 / 250) + 0.5 - a)
    assert len(main) == 600 and main[-1] == pytest.approx(a * math.exp(-599 / 250) + 0.5 - a)   # formula goes on
    assert refinement[0] == pytest.approx(0.01) and refinement[200] == pytest.approx(0.002)
    sw = schedule.apply_option_ramp(steps, "SW", "sigma", [[20, [False, 5], -2], False], names=names,
                                    false_value=14.0)
    assert [s.options["sigma"] for s in sw if s.method == "SW"] == [20.0, 18.0, 16.0, 14.0, 14.0, 14.0]
    # a slope of False: the ramp reaches stop_value at stop_argument
    assert schedule.xframe_block_values([20, [10, 5], False], 7) == pytest.approx([20, 18, 16, 14, 12, 10, 10])
    # xpr's own [first, last] stays one ramp over the whole run
    plain = schedule.apply_option_ramp(steps, "SW", "sigma", [20.0, 5.0])
    assert [s.options["sigma"] for s in plain if s.method == "SW"] == pytest.approx([20, 17, 14, 11, 8, 5])
    with pytest.raises(InputError, match="cannot read ramp") as info:
        schedule.apply_beta_ramp(steps, [[1, 2]], names=names, key="projections.real.HIO.beta")
    assert info.value.key == "projections.real.HIO.beta"
    with pytest.raises(InputError, match="resolution"):
        schedule.apply_beta_ramp(steps, [False], names=names)


def test_support_threshold_is_per_repeat_on_any_batch_axis():
    """The value threshold compares each repeat with its own peak: repeats on axis 0 or on
    axis -2 (fxs's layout) give the same feasible set."""
    rng = np.random.default_rng(3)
    y = rng.random((4, 3, 5)) * np.array([1.0, 10.0, 100.0])[None, :, None]   # repeats on axis 1 (= -2)
    support = np.ones_like(y, bool)
    ok_last = SupportProjection(threshold=0.5, batch_axis=-2).feasible(y, support, np)
    ok_first = SupportProjection(threshold=0.5).feasible(np.moveaxis(y, 1, 0), np.moveaxis(support, 1, 0), np)
    assert np.array_equal(np.moveaxis(ok_last, 1, 0), ok_first)
    for b in range(3):
        assert np.array_equal(ok_last[:, b], y[:, b] >= 0.5 * y[:, b].max())
