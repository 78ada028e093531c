"""The projections, the algorithms and the engine on known objects."""
import itertools

import numpy as np
import pytest
import yaml

from xpr.cdi.objects import far_field_intensity, model_object
from xpr.backend import BackendSpec, cpu
from xpr.phasing import engine, merge, schedule
from xpr.phasing.algorithms import ALGORITHMS
from xpr.phasing.projections import ModulusProjection, SupportProjection, centred_radius
from xpr.phasing.shrinkwrap import ShrinkWrap
from xpr.resources import defaults_dir


@pytest.fixture(scope="module")
def backend():
    return cpu()


def _pattern(shape, diameter, seed=3, max_phase=0.0):
    truth = model_object("random_smooth", shape, diameter, seed=seed, max_phase=max_phase)
    return truth, np.fft.ifftshift(far_field_intensity(truth))


def test_modulus_projection_sets_measured_moduli_and_lets_masked_pixels_float(backend):
    rng = np.random.default_rng(0)
    shape = (32, 32)
    intensity = rng.uniform(0.5, 2.0, shape)
    measured = rng.uniform(size=shape) > 0.2
    x = (rng.standard_normal((2,) + shape) + 1j * rng.standard_normal((2,) + shape)).astype(np.complex64)
    P_M = ModulusProjection(backend, intensity, measured, repeats=2)
    pm, e_mod = P_M(x)
    F, G = np.fft.fftn(x, axes=(1, 2)), np.fft.fftn(pm, axes=(1, 2))
    assert np.allclose(np.abs(G)[:, measured], np.sqrt(intensity)[measured], rtol=1e-4)
    assert np.allclose(G[:, ~measured], F[:, ~measured], rtol=1e-4, atol=1e-3)
    assert np.allclose(np.angle(G[:, measured]), np.angle(F[:, measured]), atol=1e-3)
    expected = np.sqrt(((np.abs(F) - np.sqrt(intensity)) ** 2 * measured).sum(axis=(1, 2))
                       / (intensity * measured).sum())
    assert np.allclose(e_mod, expected, rtol=1e-4)
    again, e_again = P_M(pm)                      # a projection: P_M P_M = P_M
    assert np.allclose(again, pm, atol=1e-4 * np.abs(pm).max())
    assert np.all(e_again < 1e-5)


def test_background_stays_radially_symmetric(backend):
    shape = (32, 32)
    truth, intensity = _pattern(shape, 12)
    P_M = ModulusProjection(backend, intensity, np.ones(shape, bool), background=True, repeats=1)
    x = engine.random_starts(backend, P_M.amplitude, np.ones((1,) + shape, bool), [1])
    P_M(x)
    shells = np.rint(np.asarray(P_M.shell)).astype(int)
    b = P_M.background[0]
    for r in (3, 7, 11):
        ring = b[shells == r]
        assert ring.std() <= 1e-5 * max(ring.mean(), 1e-12)


def test_ml_step_keeps_the_background_radially_symmetric_and_the_object_fixed(backend):
    """The Poisson ML step with spipy's background: B takes the step's factor and its shell
    average, as in P_M; from the true object on noise-free data (B starting at 10 % of the
    shell-averaged amplitude) the object stays within 1 % while B stays radially symmetric."""
    shape = (32, 32)
    truth, intensity = _pattern(shape, 12)
    P_M = ModulusProjection(backend, intensity, np.ones(shape, bool), background=True, repeats=1)
    x = truth[None].astype(np.complex64).copy()
    support = (np.abs(truth) > 0)[None]
    for _ in range(50):
        ALGORITHMS["ML"](x, support, 0.9, P_M, SupportProjection(), np)
    assert np.abs(x[0] - truth).max() < 0.01 * np.abs(truth).max()
    shells = np.rint(np.asarray(P_M.shell)).astype(int)
    for r in (3, 7, 11):
        ring = P_M.background[0][shells == r]
        assert ring.std() <= 1e-5 * max(ring.mean(), 1e-12)


def test_support_projection_real_positive(backend):
    rng = np.random.default_rng(1)
    y = (rng.standard_normal((1, 16, 16)) + 1j * rng.standard_normal((1, 16, 16))).astype(np.complex64)
    support = np.zeros((1, 16, 16), bool)
    support[:, 4:12, 4:12] = True
    out = SupportProjection(positivity=True, imag_limit=0.0)(y, support, np)
    keep = support & (y.real >= 0)
    assert np.all(out[~keep] == 0)
    assert np.allclose(out[keep], y.real[keep]) and np.all(out.imag == 0)


@pytest.mark.parametrize("method", ["ER", "HIO", "RAAR", "DM", "ML"])
def test_true_object_is_a_fixed_point(backend, method):
    shape = (32, 32)
    truth, intensity = _pattern(shape, 12, max_phase=1.0)
    support = (np.abs(truth) > 0)[None]
    P_M = ModulusProjection(backend, intensity, np.ones(shape, bool))
    x = truth[None].astype(np.complex64).copy()
    ALGORITHMS[method](x, support, 0.8, P_M, SupportProjection(), np)
    assert np.abs(x - truth).max() < 1e-4 * np.abs(truth).max()


def _defaults(command="phase2d"):
    return yaml.safe_load((defaults_dir() / "cdi" / f"{command}.yaml").read_text())


def _phase(backend, truth, intensity, repeats, seeds=None, positivity=False, imag_limit=None):
    """The default schedule of settings_defaults/cdi/phase2d.yaml on a known pattern."""
    settings = _defaults()
    pp = settings["phasing_parameters"]
    sw = pp["shrink_wrap"]
    shape = intensity.shape
    steps = schedule.compile_schedule(settings["phasing"]["iters"], beta=pp["beta"])
    steps = schedule.with_periodic_shrink_wrap(steps, sw["start"], sw["every"], sw["stop"],
                                               sigma=sw["sigma"], threshold=sw["threshold"])
    initial = np.asarray(centred_radius(shape)) <= min(shape) / 4
    P_M = ModulusProjection(backend, intensity, np.ones(shape, bool), repeats=repeats)
    P_S = SupportProjection(positivity=positivity, imag_limit=imag_limit)
    last = sw["threshold"][-1] if isinstance(sw["threshold"], list) else sw["threshold"]
    shrink = ShrinkWrap(backend, shape, threshold=last, sigma=sw["sigma"][-1],
                        confine_to=initial)
    support = np.broadcast_to(initial, (repeats,) + shape).copy()
    seeds = list(range(repeats)) if seeds is None else seeds
    x = engine.random_starts(backend, P_M.amplitude, support, seeds)
    return engine.iterate(steps, x, support, P_M, P_S, shrink, np)


def test_noise_free_2d_complex_object_recovered(backend):
    """Acceptance: noise-free 2-D complex object (no positivity), the default schedule and
    repeats: error < 0.05 after removing shift, global phase and twin."""
    truth, intensity = _pattern((64, 64), 64 / 2.5, seed=3, max_phase=0.5)
    x, support, history = _phase(backend, truth, intensity, repeats=8)
    final = history.e_mod_array()[:, -1]
    chosen = merge.select(final, keep_fraction=0.5, tolerance=0.2)
    merged, _ = merge.merge_repeats(x, chosen, backend)
    assert merge.real_space_error(merged, truth, backend) < 0.05


def test_batched_repeats_equal_sequential_ones(backend):
    truth, intensity = _pattern((32, 32), 12)
    batched, _, h = _phase(backend, truth, intensity, repeats=3, seeds=[5, 6, 7])
    for i, seed in enumerate([5, 6, 7]):
        single, _, h1 = _phase(backend, truth, intensity, repeats=1, seeds=[seed])
        assert np.allclose(single[0], batched[i], atol=1e-4 * np.abs(batched[i]).max())
        assert np.allclose(h1.e_mod_array()[0], h.e_mod_array()[i], rtol=1e-3, atol=1e-6)


def test_shrink_wrap_keeps_brightest_voxels_within_initial_support(backend):
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(2, 16, 16)).astype(np.complex64)
    initial = np.zeros((16, 16), bool)
    initial[2:14, 2:14] = True
    sw = ShrinkWrap(backend, (16, 16), support_size=30, sigma=0.0, confine_to=initial)
    new = sw(x, np.ones((2, 16, 16), bool))
    assert list(new.reshape(2, -1).sum(axis=1)) == [30, 30]
    assert not np.any(new & ~initial)
    for i in range(2):
        inside = np.abs(x[i])[initial]
        assert np.abs(x[i])[new[i]].min() >= np.sort(inside)[-30]


def test_device_batch_matches_cpu(device):
    """The same chunk of repeats on the device (emulated, and cupy where present) and on numpy (ER + shrink-wrap, no chaotic feedback)."""
    from xpr.cdi.phasing import PhasingOptions, phase_chunk
    truth, intensity = _pattern((32, 32), 12)
    steps = schedule.with_periodic_shrink_wrap(schedule.parse_string("30ER"), 10, 10, sigma=1.0)
    problem = {
        "intensity_fft": intensity.astype(np.float32), "measured_fft": np.ones((32, 32), bool),
        "initial_support": np.asarray(centred_radius((32, 32))) <= 8, "init_model": None,
        "steps": steps,
        "options": PhasingOptions(background=True, positivity=True, imag_limit=0.0, sw_sigma=(2.0, 1.0)),
    }
    cpu = phase_chunk({"seeds": [1, 2]}, shared=dict(problem, backend=BackendSpec("cpu")))
    gpu = phase_chunk({"seeds": [1, 2]}, shared=dict(problem, backend=BackendSpec(device)))
    assert np.allclose(gpu["object"], cpu["object"], atol=1e-3 * np.abs(cpu["object"]).max())
    assert np.allclose(gpu["e_mod"], cpu["e_mod"], rtol=1e-3, atol=1e-6)


def test_shrink_wrap_size_floor_stops_collapse_and_keeps_the_threshold_contour():
    """size_rule floor: the relative threshold, lowered only where it keeps fewer than N pixels.
    A bright 3x3 spot on a dim 20x20 square: threshold 0.5 keeps the spot (9 px); with N = 100
    the floor keeps at least 100 px (the spot and the square, all of whose pixels tie); with N = 4
    the threshold's 9 px stay."""
    from xpr.backend import cpu
    from xpr.phasing.shrinkwrap import ShrinkWrap

    x = np.zeros((1, 64, 64), dtype=np.complex64)
    x[0, 22:42, 22:42] = 0.2
    x[0, 31:34, 31:34] = 1.0
    support = np.ones((1, 64, 64), dtype=bool)
    backend = cpu()
    plain = ShrinkWrap(backend, (64, 64), threshold=0.5, sigma=0)(x, support)
    assert plain.sum() == 9
    floor = ShrinkWrap(backend, (64, 64), threshold=0.5, sigma=0, support_size=100, size_rule="floor")
    assert floor(x, support).sum() >= 100 and floor(x, support)[0, 31:34, 31:34].all()
    small = ShrinkWrap(backend, (64, 64), threshold=0.5, sigma=0, support_size=4, size_rule="floor")
    assert small(x, support).sum() == 9


def test_shrink_wrap_threshold_factors_per_repeat():
    """Each repeat of the batch takes threshold x its factor. A bright 3x3 spot (1.0) on a dim
    20x20 plate (0.2), no blur: at 0.5 (factor 1) only the spot stays (9 px); at 0.1 (factor 0.2)
    the plate too (400 px); a call's own factors replace the constructor's; a wrong count is
    refused."""
    from xpr.backend import cpu
    from xpr.phasing.shrinkwrap import ShrinkWrap

    x = np.zeros((3, 64, 64), dtype=np.complex64)
    x[:, 22:42, 22:42] = 0.2
    x[:, 31:34, 31:34] = 1.0
    support = np.ones((3, 64, 64), dtype=bool)
    shrink = ShrinkWrap(cpu(), (64, 64), threshold=0.5, sigma=0, threshold_factors=[1.0, 0.2, 1.0])
    assert shrink(x, support).reshape(3, -1).sum(axis=1).tolist() == [9, 400, 9]
    assert shrink(x, support, threshold_factors=[0.2, 0.2, 1.0]).reshape(3, -1).sum(axis=1).tolist() == [400, 400, 9]
    with pytest.raises(ValueError, match="2 threshold factors for 3 repeats"):
        shrink(x, support, threshold_factors=[1.0, 0.2])


def _limited(pm, imag_limit):
    """pm with |Im| clipped to imag_limit |Re| (None: pm), in complex128: P_S's value inside."""
    pm = pm.astype(np.complex128)
    if imag_limit is None:
        return pm
    bound = imag_limit * np.abs(pm.real)
    return pm.real + 1j * np.clip(pm.imag, -bound, bound)


@pytest.mark.parametrize("positivity", [False, True])
@pytest.mark.parametrize("shared_support", [False, True])
@pytest.mark.parametrize("imag_limit", [None, 0.0, 0.3])
@pytest.mark.parametrize("a_b", [(0.0, 0.0), (1.0, -0.9), (0.9, 1 - 2 * 0.9)], ids=["ER", "HIO", "RAAR"])
def test_compiled_support_step_equals_its_definition(backend, positivity, shared_support, imag_limit, a_b):
    """P_S.combine through the compiled loop (CPU backend) and through the array expressions (no
    backend) both give x' = P_S pm where pm is feasible (pm, its imaginary part clipped to
    imag_limit |Re|: 0 a real object), a x + b pm elsewhere, as written out in complex128, to
    float32 rounding; on the kept pixels both are P_S pm exactly where no bound is rounded (no
    limit, or 0)."""
    a, b = a_b
    rng = np.random.default_rng(5)
    shape = (3, 24, 40)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    pm = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    support = rng.uniform(size=(1 if shared_support else 3,) + shape[1:]) < 0.4
    kept = np.broadcast_to(support & ((pm.real >= 0) if positivity else True), shape)
    inside = _limited(pm, imag_limit)
    expected = np.where(kept, inside, a * x.astype(np.complex128) + b * pm)
    compiled_P_S = SupportProjection(positivity=positivity, imag_limit=imag_limit, backend=backend)
    assert compiled_P_S.loops is not None
    for P_S in (compiled_P_S, SupportProjection(positivity=positivity, imag_limit=imag_limit)):
        out = x.copy()
        P_S.combine(out, pm, support, a, b, np)
        assert out.dtype == np.complex64
        if imag_limit in (None, 0.0):                              # no bound to round
            assert np.array_equal(out[kept], inside[kept].astype(np.complex64))
        if imag_limit == 0:
            assert not np.any(out[kept].imag)                      # a real object: exactly real
        assert np.abs(out - expected).max() < 1e-6 * np.abs(expected).max()


def test_compiled_band_projection_equals_the_array_expressions(backend, monkeypatch):
    """Between metrics the band projection runs as one compiled sweep; it gives what the numpy
    path gives (float32 rounding), for exact moduli with free and masked pixels, and a band."""
    from xpr.backend import Backend
    from xpr.phasing.likelihood import BandModulusProjection, free_pixels

    truth, intensity = _pattern((48, 48), 20, seed=2)
    rng = np.random.default_rng(1)
    measured = rng.uniform(size=intensity.shape) > 0.1
    free = free_pixels(measured, 0.05)
    x = (rng.standard_normal((2, 48, 48)) + 1j * rng.standard_normal((2, 48, 48))).astype(np.complex64)
    x *= np.float32(np.sqrt(intensity.sum() / np.sum(np.abs(x[0]) ** 2) / 48 ** 2))
    for band in (0.0, 0.5):
        results = []
        for compiled in (True, False):
            with monkeypatch.context() as patch:
                if not compiled:
                    patch.setattr(Backend, "compiled_loops", property(lambda self: None))
                P_M = BandModulusProjection(backend, intensity, measured, band=band, free=free,
                                            repeats=2, metrics_every=100)
                P_M(x.copy())                              # the first call computes eMod
                results.append(P_M(x.copy())[0])           # the second runs between metrics
        assert np.abs(results[0] - results[1]).max() < 1e-5 * np.abs(results[1]).max()
        G, a = np.fft.fftn(results[0], axes=(1, 2)), np.sqrt(intensity)
        fitted = measured & ~free
        assert np.allclose(np.abs(G)[:, fitted], np.clip(np.abs(np.fft.fftn(x, axes=(1, 2)))[:, fitted],
                                                         np.maximum(a[fitted] - band, 0), a[fitted] + band),
                           atol=1e-4 * a.max())


@pytest.mark.gpu
@pytest.mark.parametrize("positivity", [False, True])
@pytest.mark.parametrize("shared_support", [False, True])
def test_device_kernels_equal_the_definitions(positivity, shared_support):
    """On cupy the two compiled loops are CUDA elementwise kernels (xpr.phasing.device_loops).
    feedback gives x' = P_S pm where pm is feasible (pm, or its imaginary part limited), a x + b pm
    elsewhere (ER, HIO, RAAR), and
    band_modulus moves |F| into [lower, upper] keeping F's phase, as written out in complex128
    on the host, to float32 rounding; kept pixels are P_S pm exactly where no bound is rounded."""
    from xpr.backend import BackendSpec

    backend = BackendSpec("cuda").create()
    loops, xp = backend.compiled_loops, backend.xp
    assert loops is not None
    rng = np.random.default_rng(7)
    shape = (3, 24 * 40)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    pm = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    support = rng.uniform(size=(1 if shared_support else 3, shape[1])) < 0.4
    kept = np.broadcast_to(support & ((pm.real >= 0) if positivity else True), shape)
    for (a, b), imag_limit in itertools.product(((0.0, 0.0), (1.0, -0.9), (0.9, 1 - 2 * 0.9)), (None, 0.0, 0.3)):
        inside = _limited(pm, imag_limit)
        expected = np.where(kept, inside, a * x.astype(np.complex128) + b * pm)
        out = xp.asarray(x)
        limit = np.float32(-1 if imag_limit is None else imag_limit)
        loops.feedback(out, xp.asarray(pm), xp.asarray(support), np.float32(a), np.float32(b), positivity, limit)
        out = backend.asnumpy(out)
        assert out.dtype == np.complex64
        if imag_limit in (None, 0.0):
            assert np.array_equal(out[kept], inside[kept].astype(np.complex64))
        assert np.abs(out - expected).max() < 1e-6 * np.abs(expected).max()
    lower = rng.uniform(0.0, 1.0, shape[1]).astype(np.float32)
    upper = lower + rng.uniform(0.0, 0.5, shape[1]).astype(np.float32)
    upper[::7] = np.inf                                     # free pixels
    F = xp.asarray(x)
    loops.band_modulus(F, xp.asarray(lower), xp.asarray(upper), 1e-12)
    F = backend.asnumpy(F)
    moduli = np.abs(x.astype(np.complex128))
    assert np.allclose(np.abs(F), np.clip(moduli, lower, upper), rtol=1e-5, atol=1e-6)
    assert np.allclose(F / np.abs(F), x / moduli, atol=1e-5)          # the phase kept


def test_threaded_loops_split_the_pixels_and_give_the_single_thread_result():
    """ThreadedLoops (the CPU's compiled loops) run each loop on one pixel range per thread: the
    ranges cover every pixel once, on 64-pixel boundaries, and the threaded feedback and band
    projections equal the one-range run bit for bit; small arrays stay in one thread."""
    from xpr.phasing.loops import ThreadedLoops, band_modulus_range, feedback_range

    threaded = ThreadedLoops(3)
    assert threaded.ranges(1, 1000) == [(0, 1000)]                    # below 2^15 per thread
    threaded.min_pixels_per_thread = 100
    for repeats, pixels in ((2, 1000), (1, 70), (4, 4096)):
        ranges = threaded.ranges(repeats, pixels)
        covered = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
        assert np.array_equal(covered, np.arange(pixels))
        assert all(lo % 64 == 0 for lo, _ in ranges)
    assert len(threaded.ranges(4, 4096)) == 3
    rng = np.random.default_rng(3)
    shape = (4, 4096)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    pm = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    support = rng.uniform(size=(1, shape[1])) < 0.4
    one, split = x.copy(), x.copy()
    feedback_range(one, pm, support, np.float32(1), np.float32(-0.9), True, np.float32(0.3), 0, shape[1])
    threaded.feedback(split, pm, support, np.float32(1), np.float32(-0.9), True, np.float32(0.3))
    assert np.array_equal(one, split) and not np.array_equal(one, x)
    lower = rng.uniform(0.0, 1.0, shape[1]).astype(np.float32)
    upper = lower + np.float32(0.2)
    band_modulus_range(one, lower, upper, np.float32(1e-12), 0, shape[1])
    threaded.band_modulus(split, lower, upper, np.float32(1e-12))
    assert np.array_equal(one, split)
    assert np.all(np.abs(one) <= upper + 1e-5) and np.all(np.abs(one) >= lower - 1e-5)


def test_shrink_wrap_threshold_relative_to_the_rms_over_the_support():
    """reference rms (PyNX's default): the threshold is a fraction of the blurred amplitude's
    root-mean-square over the current support. The dim 20x20 plate (0.2) with a bright 3x3 spot
    (1.0), no blur, support the plate: rms = sqrt((391 x 0.04 + 9 x 1) / 400) = 0.2484, so 0.8
    (a cut at 0.199) keeps the plate and 0.9 (0.224) only the spot, as the maximum's 0.5 does;
    a support of the spot alone has rms 1.0 (one support for the batch, or one per repeat)."""
    from xpr.backend import cpu
    from xpr.phasing.shrinkwrap import ShrinkWrap

    x = np.zeros((2, 64, 64), dtype=np.complex64)
    x[:, 22:42, 22:42] = 0.2
    x[:, 31:34, 31:34] = 1.0
    plate = np.zeros((64, 64), dtype=bool)
    plate[22:42, 22:42] = True
    shrink = ShrinkWrap(cpu(), (64, 64), threshold=0.8, sigma=0, reference="rms")
    rms = np.sqrt((391 * 0.2 ** 2 + 9) / 400)
    assert 0.8 * rms < 0.2 < 0.81 * rms        # the plate sits just above the cut
    assert shrink(x, np.broadcast_to(plate, x.shape)).reshape(2, -1).sum(axis=1).tolist() == [400, 400]
    assert shrink(x, plate, threshold=0.9).reshape(2, -1).sum(axis=1).tolist() == [9, 9]
    spot = np.zeros((2, 64, 64), dtype=bool)
    spot[1, 31:34, 31:34] = True
    spot[0] = plate
    assert shrink(x * spot, spot, threshold=0.21).reshape(2, -1).sum(axis=1).tolist() == [400, 9]
    with pytest.raises(ValueError, match="threshold reference"):
        ShrinkWrap(cpu(), (64, 64), reference="mean")
