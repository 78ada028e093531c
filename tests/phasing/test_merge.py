"""Merging: the ambiguities of phasing (shift, global phase, twin) are removed; PRTF."""
import numpy as np
import pytest

from xpr.cdi.objects import model_object
from xpr.backend import cpu
from xpr.phasing import merge


@pytest.fixture(scope="module")
def backend():
    return cpu()


@pytest.fixture(scope="module")
def truth():
    return model_object("shapes", (48, 48), 18, seed=4, max_phase=0.8).astype(np.complex64)


def test_subpixel_shift_phase_and_twin_are_found(backend, truth):
    shift = np.array([2.3, -1.6])
    moved = merge.translate(merge.twin(truth), shift, backend) * np.exp(1j * 1.1)
    aligned, info = merge.align(truth, moved.astype(np.complex64), backend)
    assert info["twin"] is True
    assert merge.real_space_error(aligned, truth, backend, allow_twin=False) < 0.02


def test_translate_then_correlation_peak_recovers_the_shift(backend, truth):
    shift = np.array([-3.4, 1.25])
    moved = merge.translate(truth, shift, backend)
    _, found = merge.correlation_peak(moved, truth, backend)
    assert np.allclose(found, shift, atol=0.15)


def test_real_space_error_is_zero_for_an_equivalent_object_and_one_for_nothing(backend, truth):
    equivalent = merge.translate(merge.twin(truth), [5, -7], backend) * np.complex64(2.0 * np.exp(0.4j))
    assert merge.real_space_error(equivalent, truth, backend) < 1e-3
    assert merge.real_space_error(np.zeros_like(truth) + 1e-20, truth, backend) == pytest.approx(1.0, abs=1e-3)


def test_prtf_is_one_for_agreeing_repeats_and_low_for_random_phases(backend, truth):
    measured = np.ones(truth.shape, bool)
    same = np.stack([truth] * 4)
    _, prtf_same = merge.prtf(same, measured, backend)
    assert np.allclose(prtf_same, 1.0, atol=1e-4)
    rng = np.random.default_rng(0)
    spectrum = np.abs(np.fft.fftn(truth))
    random = np.stack([np.fft.ifftn(spectrum * np.exp(2j * np.pi * rng.uniform(size=truth.shape)))
                       for _ in range(16)]).astype(np.complex64)
    _, prtf_random = merge.prtf(random, measured, backend)
    # |sum of 16 unit phasors with random phases| / 16 ~ 1/4
    assert np.mean(prtf_random[5:]) < 0.35


def test_select_drops_failed_repeats():
    errors = [0.074, 0.35, 0.0735, 0.36, 0.09, 0.34]
    assert list(merge.select(errors, keep_fraction=0.5, tolerance=0.2)) == [2, 0]
    assert list(merge.select(errors, keep_fraction=0.5)) == [2, 0, 4]
