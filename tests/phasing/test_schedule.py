"""Schedules: spipy strings and xFrame blocks compile to the same steps; bad ones are refused."""
import pytest

from xpr.errors import InputError
from xpr.phasing import schedule


def test_spipy_string_compiles_to_steps_in_order():
    steps = schedule.parse_string("100RAAR 200DM 200ERA", beta=0.8)
    assert [(s.method, s.iterations) for s in steps] == [("RAAR", 100), ("DM", 200), ("ER", 200)]
    assert schedule.total_iterations(steps) == 500
    assert steps[0].beta_at(0) == pytest.approx(0.8) and steps[1].beta_at(199) == pytest.approx(0.8)


def test_beta_ramp_spans_all_feedback_iterations():
    steps = schedule.parse_string("100HIO 100RAAR 50ER", beta=[0.95, 0.75])
    hio, raar = steps[0], steps[1]
    assert hio.beta_at(0) == pytest.approx(0.95)
    assert raar.beta_at(99) == pytest.approx(0.75)
    # one linear ramp over 200 iterations: iteration 100 (RAAR's first) sits at 100/199 of it
    assert raar.beta_at(0) == pytest.approx(0.95 - 0.2 * 100 / 199)


def test_xframe_blocks_repeat_their_method_order():
    main_loop = {"sub_loops": {
        "order": ["start", "polish"],
        "start": {"iterations": 3, "order": ["HIO", "SW", "ER"],
                  "methods": {"HIO": {"iterations": 60, "beta": 0.9},
                              "SW": {"sigma": 2.0, "threshold": 0.15},
                              "ER": {"iterations": 5}}},
        "polish": {"iterations": 1, "methods": {"ER": {"iterations": 20}}},
    }}
    steps = schedule.compile_schedule(main_loop=main_loop)
    assert [s.method for s in steps] == ["HIO", "SW", "ER"] * 3 + ["ER"]
    assert schedule.total_iterations(steps) == 3 * 65 + 20
    assert steps[0].beta == (0.9, 0.9)
    assert steps[1].options == {"sigma": 2.0, "threshold": 0.15}


def test_periodic_shrink_wrap_falls_on_global_iterations_with_narrowing_blur():
    steps = schedule.parse_string("300HIO 300RAAR 100ER", beta=[0.95, 0.75])
    woven = schedule.with_periodic_shrink_wrap(steps, start=100, every=20, sigma=(3.0, 1.0))
    assert schedule.total_iterations(woven) == 700
    done, at, sigmas = 0, [], []
    for step in woven:
        if step.method == "SW":
            at.append(done)
            sigmas.append(step.options["sigma"])
        else:
            done += step.iterations
    assert at == list(range(100, 601, 20))        # stops with the last feedback step
    assert sigmas[0] == pytest.approx(3.0) and sigmas[-1] == pytest.approx(1.0)
    # the beta ramp is unchanged by the splitting
    feedback = [s for s in woven if s.method in ("HIO", "RAAR")]
    assert feedback[0].beta_at(0) == pytest.approx(0.95)
    assert feedback[-1].beta_at(feedback[-1].iterations - 1) == pytest.approx(0.75)


@pytest.mark.parametrize("text, words", [
    ("100RAAR 50FOO", "unknown phasing algorithm 'FOO'"),
    ("-5HIO 100ER", "must not be negative"),
    ("100 RAAR", "cannot read"),
    ("SW", "no iterations"),
])
def test_bad_schedule_strings_are_refused(text, words):
    with pytest.raises(InputError, match=words):
        schedule.parse_string(text)


def test_negative_block_iterations_are_refused():
    main_loop = {"sub_loops": {"a": {"iterations": 2, "methods": {"HIO": {"iterations": -3}}}}}
    with pytest.raises(InputError, match="must not be negative") as info:
        schedule.compile_schedule(main_loop=main_loop)
    assert info.value.key == "phasing.main_loop.sub_loops.a.methods.HIO.iterations"
