"""The device path: the emulated device is as strict as cupy at the host boundary, and every
building block gives on the device (emulated always, cupy where present: the `device` fixture)
what it gives on numpy, as PyNX tests its operators."""
from __future__ import annotations

import math

import numpy as np
import pytest

from xpr.backend import Backend, BackendSpec, cpu, to_host
from xpr.errors import SettingsError
from xpr.settings import Frozen


def on(device, precision="single"):
    return BackendSpec(device, precision).create()


# ---------------------------------------------------------------------------------------------
# The emulation is strict: planted cupy-incompatible calls fail
# ---------------------------------------------------------------------------------------------

def _fft_through_numpy(backend, x):
    """A kernel with the mistake the emulation is for: numpy's FFT on a backend array."""
    return np.fft.fftn(backend.xp.asarray(x), axes=(-2, -1))


def _host_mask_times_device_array(backend, x):
    mask = np.ones(x.shape, bool)                      # built on the host, never moved
    return backend.xp.asarray(x) * mask


def _sum_through_asarray(backend, x):
    return float(np.asarray(backend.xp.abs(backend.xp.asarray(x))).sum())


@pytest.mark.parametrize("kernel", [_fft_through_numpy, _host_mask_times_device_array, _sum_through_asarray])
def test_planted_host_calls_pass_on_numpy_and_fail_on_the_emulated_device(kernel):
    x = np.random.default_rng(0).standard_normal((4, 8, 8)).astype(np.complex64)
    kernel(cpu(), x)                                   # numpy accepts all of these
    with pytest.raises(TypeError):
        kernel(on("emulated"), x)


@pytest.mark.parametrize("call", [
    lambda xp, a, h: np.asarray(a),                    # implicit conversion (cupy: TypeError)
    lambda xp, a, h: np.array(a, dtype=np.float32),
    lambda xp, a, h: np.exp(a),                        # a numpy ufunc on a device array
    lambda xp, a, h: np.mean(a),                       # a numpy function (NEP 18)
    lambda xp, a, h: np.fft.ifftn(a),
    lambda xp, a, h: a + h,                            # mixing with a host ndarray
    lambda xp, a, h: h * a,
    lambda xp, a, h: xp.exp(h),                        # an xp function given a host array
    lambda xp, a, h: xp.stack([a, h]),
    lambda xp, a, h: xp.add.at(a, [0], 1.0),           # no ufunc.at for complex on cupy
])
def test_emulated_device_refuses_what_cupy_refuses(call):
    backend = on("emulated")
    a = backend.asarray(np.arange(6, dtype=np.float32))
    with pytest.raises(TypeError):
        call(backend.xp, a, np.ones(6, np.float32))
    with pytest.raises(TypeError):
        backend.fftn(np.ones((4, 4), np.complex64))   # cupyx.scipy.fft takes device arrays only


def test_emulated_device_counts_synchronisations_and_copies_on_transfer():
    backend = on("emulated")
    xp = backend.xp
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    a = xp.asarray(host)
    host[0, 0] = 100.0                                  # a device copy never aliases host memory
    assert float(a[0, 0]) == 0.0
    total = xp.sum(a)                                   # a 0-d device array, as cupy returns
    assert isinstance(total, xp.ndarray) and total.shape == ()
    assert float(total) == 66.0 and int(xp.max(a)) == 11 and bool(xp.any(a > 10))
    rows = list(a)                                      # iteration gives device views, no transfer
    assert isinstance(rows[1], xp.ndarray) and [float(v) for v in rows[1]] == [4.0, 5.0, 6.0, 7.0]
    assert backend.emulator.syncs == {"float()": 6, "int()": 1, "bool()": 1}
    np.testing.assert_array_equal(backend.asnumpy(a * 2 + 1), np.arange(12).reshape(3, 4) * 2 + 1)
    assert to_host(a).tolist() == a.get().tolist()


def test_device_choice_from_settings_and_environment(monkeypatch):
    monkeypatch.setenv("XPR_DEVICE", "emulated")
    assert Backend.from_settings(Frozen({"GPU": {"use": "auto"}})).device == "emulated"
    assert Backend.from_settings(Frozen({"GPU": {"use": True, "precision": "double"}})).spec == \
        BackendSpec("emulated", "double")
    assert Backend.from_settings(Frozen({"GPU": {"use": False}})).device == "cpu"
    monkeypatch.setenv("XPR_DEVICE", "tpu")
    with pytest.raises(SettingsError, match="XPR_DEVICE"):
        BackendSpec.from_settings(Frozen({"GPU": {"use": "auto"}}))
    monkeypatch.delenv("XPR_DEVICE")
    with pytest.raises(SettingsError, match="GPU.use"):
        BackendSpec.from_settings(Frozen({"GPU": {"use": "sometimes"}}))


def test_a_command_under_emulation_says_so_in_its_run_log(home, run_xpr, monkeypatch):
    monkeypatch.setenv("XPR_DEVICE", "emulated")
    result = run_xpr(["-q", "cdi", "simulate", "tutorial"])
    assert result.exit_code == 0, result.output
    logs = list((home / "data" / "cdi").rglob("run.log"))
    assert len(logs) == 1 and "emulated device" in logs[0].read_text()
    monkeypatch.setenv("XPR_DEVICE", "quantum")
    result = run_xpr(["-q", "cdi", "simulate", "tutorial"])
    assert result.exit_code == 2 and "XPR_DEVICE" in result.output


# ---------------------------------------------------------------------------------------------
# Device/CPU parity per building block
# ---------------------------------------------------------------------------------------------

def test_scatter_add_accumulates_repeated_indices(device):
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 10, 200)
    values = (rng.standard_normal(200) + 1j * rng.standard_normal(200)).astype(np.complex64)
    expected = np.zeros(10, np.complex64)
    for i, v in zip(indices, values):                   # the definition, one by one
        expected[i] += v
    backend = on(device)
    target = backend.xp.zeros(10, dtype=np.complex64)
    backend.scatter_add(target, backend.asarray(indices), backend.asarray(values))
    np.testing.assert_allclose(backend.asnumpy(target), expected, rtol=1e-5, atol=1e-5)
    real = backend.xp.zeros(10, dtype=np.float32)
    backend.scatter_add(real, backend.asarray(indices), backend.asarray(values.real))
    np.testing.assert_allclose(backend.asnumpy(real), expected.real, rtol=1e-5, atol=1e-5)


def test_modulus_projection_parity(device):
    """P_M of a batch on the device = on numpy, and it is a projection: P_M(P_M x) = P_M x."""
    from xpr.phasing.projections import ModulusProjection

    rng = np.random.default_rng(2)
    shape = (32, 32)
    truth = np.zeros(shape, np.complex64)
    truth[12:20, 10:22] = rng.uniform(0.5, 1.0, (8, 12))
    intensity = np.abs(np.fft.fftn(truth)) ** 2
    measured = rng.random(shape) > 0.05
    x = (rng.standard_normal((3,) + shape) + 1j * rng.standard_normal((3,) + shape)).astype(np.complex64)
    results = {}
    for name, backend in (("cpu", cpu()), ("device", on(device))):
        P_M = ModulusProjection(backend, backend.asarray(intensity), backend.asarray(measured), repeats=3)
        projected, e_mod = P_M(backend.asarray(x))
        again, e_mod_again = P_M(projected.copy())
        results[name] = backend.asnumpy(projected), backend.asnumpy(e_mod)
        assert np.abs(backend.asnumpy(again - projected)).max() < 1e-4 * np.abs(backend.asnumpy(projected)).max()
        assert backend.asnumpy(e_mod_again).max() < 1e-5
    np.testing.assert_allclose(results["device"][0], results["cpu"][0], atol=1e-5 * np.abs(results["cpu"][0]).max())
    np.testing.assert_allclose(results["device"][1], results["cpu"][1], rtol=1e-5)


def test_fxs_transform_pair_parity(device):
    """forward, real_inverse on the device = on numpy (2-D and 3-D grids); real_inverse∘forward
    is a projection on either."""
    from xpr.fxs.grids import build_grid
    from xpr.fxs.real_space import density_guess
    from xpr.fxs.transforms import FourierTransformPair

    for dimensions in (2, 3):
        grid = build_grid(dimensions, 16, 0.5, 6)
        density = density_guess(grid, 2, grid.real_radii.max() / 3, "bump", 1.0, "random", 1e3,
                                np.random.default_rng(3), 1.0).astype(np.float32)
        out = {}
        for name, backend in (("cpu", cpu()), ("device", on(device))):
            transform = FourierTransformPair(grid, backend)
            amplitude = transform.forward(backend.asarray(density))
            projected = transform.real_inverse(amplitude)
            twice = transform.real_inverse(transform.forward(projected))
            out[name] = backend.asnumpy(amplitude), backend.asnumpy(projected)
            scale = np.abs(out[name][1]).max()
            assert np.abs(backend.asnumpy(twice) - out[name][1]).max() < 1e-4 * scale
        for ours, reference in zip(out["device"], out["cpu"]):
            np.testing.assert_allclose(ours, reference, atol=1e-5 * np.abs(reference).max())


def _ptycho_problem(backend, slices, modes, seed=0):
    """The random problem whose numpy gradients tests/em/test_ptycho_gradients.py checks against
    finite differences, with its arrays on `backend`."""
    from em.test_ptycho_gradients import _problem

    return _problem(slices, modes, seed, on=backend)[:4]


@pytest.mark.parametrize("slices,modes", [(1, 1), (3, 2)])
def test_ptychography_forward_model_and_gradients_parity(device, slices, modes):
    """Intensities, loss and the Wirtinger gradients (object, probe, positions) of the
    multislice model on the device = on numpy (double precision: 1e-9; the numpy gradients are
    checked against finite differences in test_ptycho_gradients)."""
    out = {}
    for name, backend in (("cpu", Backend(False, "double")), ("device", on(device, "double"))):
        model, params, counts, mask = _ptycho_problem(backend, slices, modes)
        intensity = model.intensities(params["object"], params["probe"], params["positions"])
        loss, gradients = model.loss_and_gradients(params, counts, "lsq_sqrt",
                                                   {"object", "probe", "positions"}, 4, mask)
        out[name] = (backend.asnumpy(intensity), float(loss),
                     {k: backend.asnumpy(v) for k, v in gradients.items()})
    np.testing.assert_allclose(out["device"][0], out["cpu"][0], rtol=1e-9, atol=1e-12)
    assert out["device"][1] == pytest.approx(out["cpu"][1], rel=1e-9)
    for key in ("object", "probe", "positions"):
        np.testing.assert_allclose(out["device"][2][key], out["cpu"][2][key], rtol=1e-8,
                                   atol=1e-10 * np.abs(out["cpu"][2][key]).max())


def test_tie_solver_parity(device):
    """Teague's full TIE solution recovers the phase of exact first-order data on the device as on
    numpy (error < 1e-5 rad rms in double)."""
    from xpr.em.optics import electron_wavelength_A
    from xpr.em.tie import solvers, specimens

    n, pixel = 64, 1e-9
    y, x = specimens.pixel_coordinates_m((n, n), pixel)
    r2 = x ** 2 + y ** 2
    phase = 2.0 * np.exp(-r2 / (2 * (6e-9) ** 2))
    intensity = 1.0 - 0.5 * np.exp(-r2 / (2 * (9e-9) ** 2))
    k = 2 * math.pi / (electron_wavelength_A(300.0) * 1e-10)
    out = {}
    for name, backend in (("cpu", Backend(False, "double")), ("device", on(device, "double"))):
        operators = solvers.FourierOperators(backend, (n, n), pixel, q_c=0.0)
        grad_y, grad_x = operators.gradient(backend.asarray(phase))
        I = backend.asarray(intensity)
        derivative = operators.divergence(I * grad_y, I * grad_x) / k
        out[name] = backend.asnumpy(solvers.solve_tie_full(operators, derivative, k, I, epsilon=0.0))
        assert solvers.rms_error_in_window(out[name], phase, 0.35) < 1e-5
    np.testing.assert_allclose(out["device"], out["cpu"], atol=1e-10)


def test_tie_least_squares_refinement_parity(device):
    """A few L-BFGS steps of the focal-series least-squares refinement: same loss history and
    phase on the device as on numpy."""
    from xpr.em.tie import focal_series, solvers

    rng = np.random.default_rng(5)
    n, pixel, wavelength = 32, 1e-9, 1.97e-12
    phase = np.cumsum(rng.standard_normal((n, n)) * 0.05, axis=1)
    out = {}
    for name, backend in (("cpu", Backend(False, "double")), ("device", on(device, "double"))):
        transfers = [focal_series.transfer_function(backend, (n, n), pixel, wavelength, d)
                     for d in (-200e-9, 0.0, 200e-9)]
        wave = backend.asarray(np.exp(1j * phase))
        amplitudes = [backend.xp.abs(focal_series.propagate(backend, wave, t)) for t in transfers]
        losses = []
        result = solvers.refine_least_squares(
            backend, backend.xp.zeros((n, n)), backend.xp.zeros((n, n)), transfers, amplitudes, 5,
            on_iteration=lambda k, loss: losses.append(float(loss)))
        refined = result[0] if isinstance(result, tuple) else result
        out[name] = backend.asnumpy(refined), losses
        assert losses[-1] < losses[0]
    np.testing.assert_allclose(out["device"][1], out["cpu"][1], rtol=1e-8)
    np.testing.assert_allclose(out["device"][0], out["cpu"][0], atol=1e-8)


def test_ali3d_projection_and_insertion_parity(device):
    """Central-slice projections and the direct Fourier inversion of them, with the FFTs on the
    device, = on numpy; the reconstruction matches the phantom."""
    from xpr.em.ali3d import euler, phantom
    from xpr.em.ali3d.project import prepare_projector
    from xpr.em.ali3d.reconstruct import InsertionBatch, grid_to_volume, insert_batch

    rng = np.random.default_rng(4)
    blobs = phantom.random_blobs(rng, 8, 24)
    volume = phantom.render_volume(blobs, 24)
    matrices = euler.random_rotations(rng, 120)
    shifts = rng.uniform(-1, 1, (120, 2))
    out = {}
    for name, backend in (("cpu", cpu()), ("device", on(device))):
        projector = prepare_projector(volume, backend, npad=2, kernel_width=4)
        images = np.stack([projector.project(m, backend, shift_px=s) for m, s in zip(matrices, shifts)])
        grid = insert_batch(InsertionBatch(images, matrices, shifts, np.eye(3)[None]), backend)
        out[name] = images, grid_to_volume(grid, backend)
        assert np.corrcoef(out[name][1].ravel(), volume.ravel())[0, 1] > 0.97
    for ours, reference in zip(out["device"], out["cpu"]):
        np.testing.assert_allclose(ours, reference, atol=1e-4 * np.abs(reference).max())


# ---------------------------------------------------------------------------------------------
# GPU.use on paths that are CPU-only by design
# ---------------------------------------------------------------------------------------------

def test_cpu_only_paths_say_so(monkeypatch, caplog):
    import logging

    from xpr.backend import cpu_only

    log = logging.getLogger("xpr.test.cpu_only")
    monkeypatch.setenv("XPR_DEVICE", "emulated")
    with caplog.at_level(logging.INFO, logger=log.name):
        backend = cpu_only(Frozen({"GPU": {"use": True, "precision": "double"}}), log, "thing", "why")
    assert backend.device == "cpu" and backend.complex_dtype == np.complex128
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "thing runs on the CPU by design (why)" in record.getMessage()
    assert "GPU.use: true has no effect" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=log.name):
        cpu_only(Frozen({"GPU": {"use": False}}), log, "thing", "why")
    assert not caplog.records                               # nothing to say when no device is asked for
    monkeypatch.delenv("XPR_DEVICE")
    if not Backend.from_settings(Frozen({"GPU": {"use": "auto"}})).is_gpu:
        with pytest.raises(SettingsError, match="GPU.use is true"):  # required and absent: as everywhere
            cpu_only(Frozen({"GPU": {"use": True}}), log, "thing", "why")


def test_local_ali3d_with_gpu_use_true_runs_on_the_cpu_and_says_so(tmp_path, home, run_xpr, monkeypatch):
    import yaml

    settings = tmp_path / "tiny.yaml"
    settings.write_text(yaml.safe_dump({
        "structure_name": "tiny", "GPU": {"use": True},
        "alignment": {"maxit": 1, "chunk": 0.5, "max_evaluations": 20}, "multi_process": {"engine": "serial"},
        "input": {"simulate": {"n_images": 24, "box": 16, "snr": 4.0, "n_blobs": 4}}}))
    monkeypatch.setenv("XPR_DEVICE", "emulated")
    result = run_xpr(["-q", "em", "local_ali3d", settings])
    assert result.exit_code == 0, result.output
    log = next((home / "data" / "em" / "local_ali3d").rglob("run.log")).read_text()
    assert "local_ali3d runs on the CPU by design" in log and "GPU.use: true has no effect here" in log


def test_a_planted_numpy_call_fails_a_command_only_on_the_emulated_device(home, run_xpr, monkeypatch):
    """cdi phase2d with a kernel that applies numpy's FFT to a backend array: fine on numpy, a
    failed run (exit 1, the TypeError in run.log) on the emulated device, as it would be on cupy."""
    from xpr.phasing import engine

    original = engine.random_starts

    def planted(backend, amplitude, support, seeds):
        np.fft.ifftn(amplitude)                            # the mistake
        return original(backend, amplitude, support, seeds)

    monkeypatch.setattr(engine, "random_starts", planted)
    options = ["-o", "multi_process.engine=serial", "-o", "phasing.repeats=2", "-o", "phasing.iters=20ER"]
    assert run_xpr(["-q", "cdi", "simulate", "tutorial"]).exit_code == 0
    monkeypatch.setenv("XPR_DEVICE", "emulated")
    result = run_xpr(["-q", "cdi", "phase2d", "tutorial", *options])
    assert result.exit_code == 1
    failed = next((home / "data" / "cdi" / "phase2d").rglob("FAILED")).parent / "run.log"
    assert "numpy.ifftn applied to a device array" in failed.read_text()
    monkeypatch.delenv("XPR_DEVICE")
    assert run_xpr(["-q", "cdi", "phase2d", "tutorial", *options]).exit_code == 0
