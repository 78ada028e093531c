"""The analytic (Wirtinger) gradients of the ptychographic loss against finite differences."""
import numpy as np
import pytest

from xpr import backend
from xpr.em.ptychography import regularisers
from xpr.em.ptychography.forward import Model


def _problem(slices, modes, seed=0, on=None):
    """A random multislice problem (model, params, counts, mask, rng), its arrays on the backend
    `on` (numpy double precision by default; tests/test_devices.py puts it on a device)."""
    on = on or backend.Backend(False, "double")
    rng = np.random.default_rng(seed)
    n, size, patterns = 16, 36, 6
    model = Model(on, n, 0.3, 0.025, 8.0, slices, complex_dtype="complex128")
    shape = (slices, size, size)
    params = {
        "object": np.exp(0.3j * rng.standard_normal(shape)) * (1 + 0.1 * rng.standard_normal(shape)),
        "probe": rng.standard_normal((modes, n, n)) + 1j * rng.standard_normal((modes, n, n)),
        "positions": rng.uniform(0.0, size - n - 1.0, (patterns, 2)),
    }
    counts = rng.poisson(4.0, (patterns, n, n)).astype(np.float64)
    mask = np.ones((n, n))
    mask[:2] = 0.0
    if on.is_gpu:
        params = {k: on.asarray(v) for k, v in params.items()}
        counts, mask = on.asarray(counts), on.asarray(mask)
    return model, params, counts, mask, rng


def _directional(model, params, counts, mask, loss, name, direction, step=1e-6, batch=4):
    values = []
    for sign in (1.0, -1.0):
        shifted = dict(params)
        shifted[name] = params[name] + sign * step * direction
        values.append(model.loss_and_gradients(shifted, counts, loss, set(), batch, mask)[0])
    return (values[0] - values[1]) / (2 * step)


COMPLEX_UNKNOWNS = ("object", "probe")


def _assert_directional_derivatives(model, params, counts, mask, loss, gradients, steps, rng):
    """For each (unknown, step): the analytic gradient along a random direction (complex for the
    object and probe) equals the central difference of the loss to 1e-4."""
    for name, step in steps:
        direction = rng.standard_normal(params[name].shape)
        if name in COMPLEX_UNKNOWNS:
            direction = direction + 1j * rng.standard_normal(direction.shape)
        analytic = float(np.sum((np.conj(gradients[name]) * direction).real))
        numeric = _directional(model, params, counts, mask, loss, name, direction, step=step)
        assert abs(numeric - analytic) <= 1e-4 * abs(analytic), (name, numeric, analytic)


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


@pytest.mark.parametrize("loss", ["lsq_sqrt", "ml"])
@pytest.mark.parametrize("slices,modes,raster", [(1, 1, False), (3, 2, False), (2, 1, True)])
def test_defocus_gradient_matches_finite_differences(loss, slices, modes, raster):
    """With an extra defocus Δf on the probe (P → P·exp(iπλΔf|k|²)), ∂L/∂Δf and the probe and
    object gradients agree with central differences to 1e-4 — point by point and on a raster
    whose sub-pixel shifts are shared."""
    model, params, counts, mask, rng = _problem(slices, modes, seed=5)
    if raster:
        grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(-1, 2)
        params["positions"] = 2.0 + grid * np.array([4.5, 4.25])
        counts = rng.poisson(4.0, (16,) + counts.shape[1:]).astype(np.float64)
    params["defocus"] = np.array([37.0])
    _, gradients = model.loss_and_gradients(params, counts, loss, {"object", "probe", "defocus"},
                                            4, mask)
    assert set(gradients) == {"object", "probe", "defocus"}
    _assert_directional_derivatives(model, params, counts, mask, loss, gradients,
                                    (("defocus", 1e-3), ("probe", 1e-6), ("object", 1e-6)), rng)


def test_defocus_matches_a_probe_defocused_by_the_aperture_phase():
    """Δf on the model equals a probe built with C10 − Δf (optics.probe_real): same intensities."""
    from xpr.em import optics

    n, rez, wavelength = 32, 1.0 / (32 * 0.3), optics.electron_wavelength_A(200.0)
    model = Model(backend.Backend(False, "double"), n, 0.3, wavelength, 2.0, 1,
                  complex_dtype="complex128")
    rng = np.random.default_rng(2)
    obj = np.exp(0.4j * rng.standard_normal((1, 48, 48)))
    positions = rng.uniform(0.0, 14.0, (5, 2))
    focused = optics.probe_real((n, n), rez, wavelength, 25.0, [-40.0]).astype(np.complex128)
    defocused = optics.probe_real((n, n), rez, wavelength, 25.0, [-40.0 - 25.0])
    shifted = model.intensities(obj, focused[None], positions, defocus_A=np.array([25.0]))
    direct = model.intensities(obj, defocused[None].astype(np.complex128), positions)
    np.testing.assert_allclose(shifted, direct, rtol=1e-5, atol=1e-5 * float(direct.max()))


@pytest.mark.parametrize("slices,modes", [(1, 1), (2, 2)])
def test_near_field_gradients_match_finite_differences(slices, modes):
    """Near-field geometry (Fresnel propagation to the detector instead of the far field):
    object, probe, position and defocus gradients agree with central differences to 1e-4."""
    _, params, counts, mask, rng = _problem(slices, modes, seed=7)
    model = Model(backend.Backend(False, "double"), 16, 0.3, 0.025, 8.0, slices,
                  complex_dtype="complex128", geometry="near_field", detector_distance_A=60.0)
    params["defocus"] = np.array([-20.0])
    refine = {"object", "probe", "positions", "defocus"}
    for loss in ("lsq_sqrt", "ml"):
        _, gradients = model.loss_and_gradients(params, counts, loss, refine, 4, mask)
        for name in sorted(refine):
            direction = rng.standard_normal(params[name].shape)
            if name in ("object", "probe"):
                direction = direction + 1j * rng.standard_normal(direction.shape)
            analytic = float(np.sum((np.conj(gradients[name]) * direction).real))
            numeric = _directional(model, params, counts, mask, loss, name, direction,
                                   step=1e-3 if name == "defocus" else 1e-6)
            assert abs(numeric - analytic) <= 1e-4 * abs(analytic), (loss, name, numeric, analytic)


def test_near_field_image_is_the_fresnel_propagated_exit_wave():
    """One pattern, one slice: the near-field intensity equals |IFFT[FFT[p·O] K_z]|² computed
    directly with multislice.fresnel_propagator (no band limit), and conserves Σ|p·O|²."""
    from xpr.em.ptychography import multislice

    rng = np.random.default_rng(4)
    n, pixel, wavelength, z = 24, 0.5, 0.025, 400.0
    model = Model(backend.Backend(False, "double"), n, pixel, wavelength, 1.0, 1,
                  complex_dtype="complex128", geometry="near_field", detector_distance_A=z)
    obj = np.exp(0.5j * rng.standard_normal((1, 40, 40)))
    probe = rng.standard_normal((1, n, n)) + 1j * rng.standard_normal((1, n, n))
    corner = np.array([[7.0, 11.0]])                      # integer: no sub-pixel ramp
    image = model.intensities(obj, probe, corner)[0]
    exit_wave = probe[0] * obj[0, 7:7 + n, 11:11 + n]
    kernel = multislice.fresnel_propagator((n, n), pixel, wavelength, z, np,
                                           band_limit_fraction=2.0).astype(np.complex128)
    expected = np.abs(np.fft.ifft2(np.fft.fft2(exit_wave) * kernel)) ** 2
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-6 * expected.max())
    assert image.sum() == pytest.approx(np.sum(np.abs(exit_wave) ** 2), rel=1e-5)


def test_batching_does_not_change_loss_or_gradients():
    """Batches of 16, 5 and 1 patterns on a raster with shared shifts (probe gradients summed
    per shift across batches, object gradients scattered per batch), shared out over 1, 2 or
    3 threads, give the same loss and gradients to 1e-10 relative (complex128)."""
    model, params, counts, mask, rng = _problem(2, 2, seed=9)
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(-1, 2)
    params["positions"] = 2.0 + grid * np.array([4.5, 4.25])
    params["defocus"] = np.array([15.0])
    counts = rng.poisson(4.0, (16,) + counts.shape[1:]).astype(np.float64)
    refine = {"object", "probe", "defocus"}
    reference = model.loss_and_gradients(params, counts, "lsq_sqrt", refine, 16, mask)
    for batch, lanes in ((5, 1), (5, 2), (1, 3), (1, 1)):
        model.lanes = lambda: lanes
        value, gradients = model.loss_and_gradients(params, counts, "lsq_sqrt", refine, batch, mask)
        assert value == pytest.approx(reference[0], rel=1e-10)
        for name in refine:
            np.testing.assert_allclose(gradients[name], reference[1][name], rtol=1e-10,
                                       atol=1e-10 * float(np.abs(reference[1][name]).max()))


@pytest.mark.parametrize("loss", ["lsq_sqrt", "ml"])
@pytest.mark.parametrize("slices,modes", [(1, 1), (2, 2)])
def test_aberration_gradient_matches_finite_differences(loss, slices, modes):
    """Changes δC of C12a, C12b, C21a, C30 on the probe (P → P·exp(−iΣδC_c B_c)) together with a
    defocus: ∂L/∂δC and the probe gradient agree with central differences to 1e-4."""
    import dataclasses

    model, params, counts, mask, rng = _problem(slices, modes, seed=9)
    model = dataclasses.replace(model, aberration_names=("C12a", "C12b", "C21a", "C30"))
    params["defocus"] = np.array([12.0])
    params["aberrations"] = np.array([5.0, -3.0, 40.0, 900.0])
    refine = {"object", "probe", "defocus", "aberrations"}
    _, gradients = model.loss_and_gradients(params, counts, loss, refine, 4, mask)
    assert set(gradients) == refine
    _assert_directional_derivatives(model, params, counts, mask, loss, gradients,
                                    (("aberrations", 1e-3), ("defocus", 1e-3), ("probe", 1e-6)), rng)


def test_aberration_changes_match_a_probe_built_with_them():
    """δC12a, δC12b, δC21b, δC30 on the model equal a probe built with those coefficients
    (optics.probe_real, the Krivanek list): the same intensities — the basis's axes, azimuth
    and sign are the probe's."""
    import dataclasses

    from xpr.em import optics

    n, rez, wavelength = 32, 1.0 / (32 * 0.3), optics.electron_wavelength_A(200.0)
    model = Model(backend.Backend(False, "double"), n, 0.3, wavelength, 2.0, 1,
                  complex_dtype="complex128")
    model = dataclasses.replace(model, aberration_names=("C12a", "C12b", "C21b", "C30"))
    rng = np.random.default_rng(4)
    obj = np.exp(0.4j * rng.standard_normal((1, 48, 48)))
    positions = rng.uniform(0.0, 14.0, (5, 2))
    changes = np.array([20.0, -35.0, 400.0, 3.0e4])
    krivanek = [-40.0, 20.0, -35.0, 0.0, 400.0, 0.0, 0.0, 3.0e4]
    start = optics.probe_real((n, n), rez, wavelength, 25.0, [-40.0]).astype(np.complex128)
    built = optics.probe_real((n, n), rez, wavelength, 25.0, krivanek).astype(np.complex128)
    shifted = model.intensities(obj, start[None], positions, aberrations_A=changes)
    direct = model.intensities(obj, built[None], positions)
    np.testing.assert_allclose(shifted, direct, rtol=1e-5, atol=1e-5 * float(direct.max()))
    wrong = model.intensities(obj, start[None], positions, aberrations_A=changes * [1, -1, 1, 1])
    assert np.abs(wrong - direct).max() > 0.05 * float(direct.max())   # the test can fail


@pytest.mark.parametrize("loss", ["lsq_sqrt", "ml"])
def test_scan_affine_gradient_matches_finite_differences(loss):
    """Positions mapped by c + (I + A)(r − c): ∂L/∂A and ∂L/∂r (free positions under the map)
    from reconstruct.objective agree with central differences to 1e-4."""
    from xpr.em.ptychography.reconstruct import Options, mapped_positions, objective

    model, params, counts, mask, rng = _problem(1, 1, seed=11)
    params["positions"] = params["positions"] * 0.8 + 2.0          # mapped windows stay inside
    params["scan_affine"] = np.array([0.03, -0.02, 0.01, -0.04])
    params["scan_centre"] = params["positions"].mean(axis=0)
    names = ("scan_affine", "positions")
    options = Options(loss=loss, batch_size=4, validation_fraction=0.0)
    fixed = {key: value for key, value in params.items() if key not in names}
    evaluate = objective(model, counts, fixed, names, options, mask=mask)
    _, gradients, _ = evaluate({key: params[key] for key in names})
    assert set(gradients) == set(names)
    for name, step in (("scan_affine", 1e-5), ("positions", 1e-5)):
        direction = rng.standard_normal(params[name].shape)
        analytic = float(np.sum(gradients[name] * direction))
        values = []
        for sign in (1.0, -1.0):
            moved = dict(params)
            moved[name] = params[name] + sign * step * direction
            values.append(model.loss_and_gradients(dict(moved, positions=mapped_positions(moved)),
                                                   counts, loss, set(), 4, mask)[0])
        numeric = (values[0] - values[1]) / (2 * step)
        assert abs(numeric - analytic) <= 1e-4 * abs(analytic), (name, numeric, analytic)


@pytest.mark.parametrize("loss", ["lsq_sqrt", "ml"])
@pytest.mark.parametrize("slices,modes", [(2, 1), (3, 2)])
def test_tilt_gradient_matches_finite_differences(loss, slices, modes):
    """A specimen tilt θ (mrad) in the multislice propagator: ∂L/∂θ, and the object and probe
    gradients under the tilt, agree with central differences to 1e-4."""
    model, params, counts, mask, rng = _problem(slices, modes, seed=13)
    params["tilt"] = np.array([6.0, -4.0])
    refine = {"object", "probe", "tilt"}
    _, gradients = model.loss_and_gradients(params, counts, loss, refine, 4, mask)
    assert set(gradients) == refine
    _assert_directional_derivatives(model, params, counts, mask, loss, gradients,
                                    (("tilt", 1e-3), ("probe", 1e-6), ("object", 1e-6)), rng)
