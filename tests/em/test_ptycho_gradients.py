"""The analytic (Wirtinger) gradients of the ptychographic loss against finite differences."""
import numpy as np
import pytest

from xpr import backend
from xpr.em.ptychography import regularisers
from xpr.em.ptychography.forward import Model


def _problem(slices, modes, seed=0):
    rng = np.random.default_rng(seed)
    n, size, patterns = 16, 36, 6
    model = Model(backend.Backend(False, "double"), n, 0.3, 0.025, 8.0, slices,
                  complex_dtype="complex128")
    shape = (slices, size, size)
    params = {
        "object": np.exp(0.3j * rng.standard_normal(shape)) * (1 + 0.1 * rng.standard_normal(shape)),
        "probe": rng.standard_normal((modes, n, n)) + 1j * rng.standard_normal((modes, n, n)),
        "positions": rng.uniform(0.0, size - n - 1.0, (patterns, 2)),
    }
    counts = rng.poisson(4.0, (patterns, n, n)).astype(np.float64)
    mask = np.ones((n, n))
    mask[:2] = 0.0
    return model, params, counts, mask, rng


def _directional(model, params, counts, mask, loss, name, direction, step=1e-6, batch=4):
    values = []
    for sign in (1.0, -1.0):
        shifted = dict(params)
        shifted[name] = params[name] + sign * step * direction
        values.append(model.loss_and_gradients(shifted, counts, loss, set(), batch, mask)[0])
    return (values[0] - values[1]) / (2 * step)


@pytest.mark.parametrize("loss", ["lsq_sqrt", "ml", "lsq"])
@pytest.mark.parametrize("slices,modes", [(1, 1), (3, 2)])
def test_analytic_gradient_matches_finite_differences(loss, slices, modes):
    model, params, counts, mask, rng = _problem(slices, modes)
    _, gradients = model.loss_and_gradients(params, counts, loss, {"object", "probe", "positions"},
                                            4, mask)
    for name in ("object", "probe", "positions"):
        direction = rng.standard_normal(params[name].shape)
        if name != "positions":
            direction = direction + 1j * rng.standard_normal(direction.shape)
        analytic = float(np.sum((np.conj(gradients[name]) * direction).real))
        numeric = _directional(model, params, counts, mask, loss, name, direction)
        assert abs(numeric - analytic) <= 1e-4 * abs(analytic), (name, numeric, analytic)


@pytest.mark.parametrize("slices,modes", [(1, 1), (2, 2)])
def test_gradient_on_a_raster_with_shared_subpixel_shifts(slices, modes):
    """Raster points share few sub-pixel shifts; the model then shifts the probe once per
    distinct shift and sums gradients per group — the same gradient as point by point."""
    model, params, counts, mask, rng = _problem(slices, modes)
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(-1, 2)
    params["positions"] = 2.0 + grid * np.array([4.5, 4.25])     # 2 × 4 distinct fractions
    counts = rng.poisson(4.0, (16,) + counts.shape[1:]).astype(np.float64)
    unique, _ = model.shift_groups(model.split_positions(params["positions"])[1])
    assert len(unique) == 8                                        # 16 points, 8 shifts
    for loss in ("lsq_sqrt", "ml"):
        _, gradients = model.loss_and_gradients(params, counts, loss, {"object", "probe"}, 16,
                                                mask)
        _, pointwise = model.loss_and_gradients(params, counts, loss,
                                                {"object", "probe", "positions"}, 16, mask)
        for name in ("object", "probe"):
            np.testing.assert_allclose(gradients[name], pointwise[name], rtol=1e-9, atol=1e-9)
            direction = rng.standard_normal(params[name].shape) * (1 + 1j)
            analytic = float(np.sum((np.conj(gradients[name]) * direction).real))
            numeric = _directional(model, params, counts, mask, loss, name, direction, batch=16)
            assert abs(numeric - analytic) <= 1e-4 * abs(analytic)


@pytest.mark.parametrize("prior", ["phase_l1", "total_variation", "probe_window"])
def test_regulariser_gradients_match_finite_differences(prior):
    rng = np.random.default_rng(3)
    z = np.exp(0.5j * rng.standard_normal((2, 12, 12))) * (1 + 0.1 * rng.standard_normal((2, 12, 12)))

    def value_and_gradient(x):
        if prior == "phase_l1":
            return regularisers.phase_l1(x, 0.7, 1e-2, np)
        if prior == "total_variation":
            return regularisers.total_variation(x, 0.7, 1e-2, np)
        return regularisers.probe_window(x, 0.7, 0.5, np)

    _, gradient = value_and_gradient(z)
    direction = rng.standard_normal(z.shape) + 1j * rng.standard_normal(z.shape)
    step = 1e-6
    numeric = (value_and_gradient(z + step * direction)[0]
               - value_and_gradient(z - step * direction)[0]) / (2 * step)
    analytic = float(np.sum((np.conj(gradient) * direction).real))
    assert abs(numeric - analytic) <= 1e-4 * abs(analytic)
