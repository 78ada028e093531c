"""Guided repeats (xpr.phasing.genetic): breeding sees through the ambiguities of phasing (shift,
global phase, twin), the geometric-mean child is what its formula says, and the generations rank,
cull and keep the best-ever parent."""
import numpy as np
import pytest

from xpr.backend import cpu
from xpr.cdi.objects import model_object
from xpr.phasing import genetic, merge


@pytest.fixture(scope="module")
def backend():
    return cpu()


@pytest.fixture(scope="module")
def parents():
    """Two imperfect reconstructions of one complex object: the truth with different smooth
    errors of ~20 % inside it (phase +-0.8 rad), as two repeats that both roughly succeeded."""
    truth = model_object("shapes", (64, 64), 24, seed=4, max_phase=0.8).astype(np.complex64)
    rng = np.random.default_rng(1)
    inside = np.abs(truth) > 0
    a = truth * (1 + 0.2 * rng.standard_normal(truth.shape)) * inside
    b = truth * np.exp(0.3j * rng.standard_normal(truth.shape)) * inside
    return a.astype(np.complex64), b.astype(np.complex64)


def _moved(x, shift, phase, twin):
    """An equivalent reconstruction: a whole-pixel (periodic) shift, a global phase, the twin."""
    y = np.roll(x, shift, axis=(0, 1)) * np.complex64(np.exp(1j * phase))
    return merge.twin(y) if twin else y


def _distance(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.mark.parametrize("mode", ["sqrt_ab", "avg_ab"])
def test_child_does_not_depend_on_the_frame_of_the_best(backend, parents, mode):
    """The best (alpha) is moved into each repeat's frame before crossing: any shift, global
    phase or twin of the alpha gives the same child."""
    a, b = parents
    child = genetic.breed(b[None], a, mode, backend)[0]
    for shift, phase, twin in [((5, -3), 0.7, False), ((-11, 4), -2.5, True), ((0, 0), 3.0, True)]:
        other = genetic.breed(b[None], _moved(a, shift, phase, twin), mode, backend)[0]
        assert _distance(other, child) < 1e-4


@pytest.mark.parametrize("mode", ["sqrt_ab", "avg_ab"])
def test_child_follows_the_frame_of_the_repeat(backend, parents, mode):
    """Round trip: breeding a shifted / phase-rotated / twinned repeat gives the same shift,
    phase and twin of the child; undoing them returns the child exactly."""
    a, b = parents
    child = genetic.breed(b[None], a, mode, backend)[0]
    for shift, phase, twin in [((7, 2), 1.2, False), ((-4, 9), -0.4, True)]:
        bred = genetic.breed(_moved(b, shift, phase, twin)[None], a, mode, backend)[0]
        assert _distance(bred, _moved(child, shift, phase, twin)) < 1e-4
        back = merge.twin(bred) if twin else bred
        back = np.roll(back * np.complex64(np.exp(-1j * phase)), (-shift[0], -shift[1]), axis=(0, 1))
        assert _distance(back, child) < 1e-4


def test_geometric_mean_child(backend, parents):
    """sqrt_ab: |child| = sqrt(|a||b|) and its phase halfway between the parents' along the
    shorter arc (across the branch cut: pi - 0.1 and -(pi - 0.1) meet at pi, not at 0); breeding
    a repeat with itself returns it; the child of two equivalent repeats is the repeat."""
    a = np.array([4.0 * np.exp(1j * (np.pi - 0.1)), 1.0 * np.exp(0.2j), 0.0], dtype=np.complex64)
    b = np.array([1.0 * np.exp(-1j * (np.pi - 0.1)), 9.0 * np.exp(0.6j), 5.0], dtype=np.complex64)
    child = genetic.cross(a, b, "sqrt_ab")
    assert np.allclose(np.abs(child), [2.0, 3.0, 0.0], atol=1e-6)
    assert np.allclose(np.exp(1j * np.angle(child[:2])), np.exp(1j * np.array([np.pi, 0.4])), atol=1e-6)
    first, _ = parents
    assert _distance(genetic.breed(first[None], first, "sqrt_ab", backend)[0], first) < 1e-5
    equivalent = _moved(first, (3, -8), 2.0, True)
    assert _distance(genetic.breed(equivalent[None], first, "sqrt_ab", backend)[0], equivalent) < 1e-4


def test_generations_rank_cull_and_breed_with_the_best_ever(backend):
    """A stand-in run: each generation's score per repeat is given. After generation 0 the two
    worst of six are culled and everyone is bred with the best; in generation 1 the best scores
    worse than generation 0's best, which stays the parent (the alpha)."""
    shape = (16, 16)
    objects = {s: np.full(shape, s, dtype=np.complex64) for s in range(10, 16)}   # seed -> object
    planned = {0: {10: 5.0, 11: 1.0, 12: 9.0, 13: 2.0, 14: 8.0, 15: 3.0},
               1: {10: 4.0, 11: 6.0, 13: 5.0, 15: 7.0}, 2: {10: 1.0, 11: 1.0, 13: 1.0, 15: 1.0}}
    seen = []

    def run_generation(g, seeds, start):
        seen.append((g, list(seeds), None if start is None else start["object"].copy()))
        return {"object": np.stack([objects[s] for s in seeds]),
                "support": np.ones((len(seeds),) + shape, dtype=bool),
                "e_mod": np.zeros((len(seeds), 3), dtype=np.float32),
                "free_deviance": np.array([planned[g][s] for s in seeds]),
                "seed": np.asarray(seeds, dtype=np.uint64)}

    plan = genetic.Plan(generations=3, breed="sqrt_ab", cull=2)
    result = genetic.evolve(run_generation, list(range(10, 16)), plan, backend,
                            shrink_wrap=lambda x, support: np.abs(x) > 0)
    assert [g for g, _, _ in seen] == [0, 1, 2]
    assert seen[1][1] == [10, 11, 13, 15] and seen[2][1] == [10, 13]
    # generation 0's best is seed 11 (value 11 everywhere): each child is sqrt(11 * own value)
    assert np.allclose(seen[1][2][:, 0, 0].real, np.sqrt(11.0 * np.array([10, 11, 13, 15])), rtol=1e-5)
    # generation 1's best (seed 10, 4.0) is worse than 1.0: seed 11's object of generation 0 stays the alpha
    assert np.allclose(seen[2][2][:, 0, 0].real, np.sqrt(11.0 * np.array([10, 13])), rtol=1e-5)
    scores = result["generation_scores"]
    assert scores.shape == (3, 6)
    assert np.isnan(scores[1, [2, 4]]).all() and np.isnan(scores[2, [1, 2, 4, 5]]).all()
    assert scores[0, 1] == 1.0 and scores[1, 0] == 4.0


def test_the_best_object_found_survives_generations_that_made_every_repeat_worse(backend):
    """Elitism: generation 0's best (seed 11, deviance 1.0) is better than every repeat of the last
    generation (7-9): it takes the place of its own descendant (seed 11's row) with its object,
    support, score and the last columns of its eMod history (an empty eCon history stays empty);
    the other rows stay the last generation's. Where the last generation holds a better repeat, nothing is replaced."""
    shape = (8, 8)
    planned = {0: {10: 5.0, 11: 1.0, 12: 3.0}, 1: {10: 6.0, 11: 7.0, 12: 8.0}, 2: {10: 9.0, 11: 8.0, 12: 7.0}}

    def run(planned):
        def run_generation(g, seeds, start):
            iterations = 5 if g == 0 else 3
            return {"object": np.stack([np.full(shape, s + 100 * g, dtype=np.complex64) for s in seeds]),
                    "support": np.stack([np.eye(8, dtype=bool) if g == 0 else np.ones(shape, bool) for _ in seeds]),
                    "e_mod": np.stack([np.arange(iterations, dtype=np.float32) + 10 * g + s for s in seeds]),
                    "e_con": np.zeros((0, 0), dtype=np.float32),     # no eCon recorded (metrics_every 0)
                    "free_deviance": np.array([planned[g][s] for s in seeds], dtype=np.float32),
                    "seed": np.asarray(seeds, dtype=np.uint64)}
        return genetic.evolve(run_generation, [10, 11, 12], genetic.Plan(generations=3, breed="avg_ab"),
                              backend, shrink_wrap=lambda x, support: np.abs(x) > 0)

    result = run(planned)
    assert [int(s) for s in result["seed"]] == [10, 11, 12]
    assert np.allclose(result["object"][:, 0, 0].real, [210, 11, 212])
    assert np.array_equal(result["support"][1], np.eye(8, dtype=bool)) and result["support"][0].all()
    assert np.allclose(result["free_deviance"], [9.0, 1.0, 7.0])
    assert np.allclose(result["e_mod"][1], [13, 14, 15]) and np.allclose(result["e_mod"][0], [30, 31, 32])
    assert result["e_con"].shape == (0, 0)
    planned[2][12] = 0.5                                  # the last generation found better: kept
    result = run(planned)
    assert np.allclose(result["object"][:, 0, 0].real, [210, 211, 212])


def test_low_pass_weight_is_a_gaussian_of_the_given_width():
    """exp(-q^2 / w^2) with w a fraction of Nyquist: 1 at q = 0, 1/e at q = w / 2 cycles/px."""
    weight = genetic.low_pass_weight((64, 64), 0.5)       # 1/e at q = 0.25 = 16 px of 64
    assert weight[0, 0] == 1.0
    assert weight[16, 0] == pytest.approx(np.exp(-1.0)) and weight[0, 48] == pytest.approx(np.exp(-1.0))
    assert weight[8, 8] == pytest.approx(np.exp(-0.5))


def test_plan_keeps_two_and_refuses_unknown_modes():
    plan = genetic.Plan(generations=4, cull=3, resolution=(0.3, 0.6))
    assert [plan.survivors(g, n) for g, n in [(0, 8), (1, 5), (2, 2)]] == [5, 2, 2]
    assert [plan.low_pass(g) for g in range(4)] == [0.3, 0.6, None, None]
    with pytest.raises(ValueError, match="breeding mode"):
        genetic.Plan(breed="pixel_switch")
