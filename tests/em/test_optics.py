"""Electron optics: wavelength, aberration function, probes, modes, projected potentials."""
import math

import numpy as np
import pytest

from xpr import backend
from xpr.em.ptychography import multislice, potentials
from xpr.em import optics


def test_relativistic_wavelength_matches_tabulated_values():
    # Kirkland, table 2.1 / standard values: 100 kV 0.03701 Å, 200 kV 0.02508 Å, 300 kV 0.01969 Å
    assert optics.electron_wavelength_A(100) == pytest.approx(0.03701, abs=2e-5)
    assert optics.electron_wavelength_A(200) == pytest.approx(0.02508, abs=2e-5)
    assert optics.electron_wavelength_A(300) == pytest.approx(0.01969, abs=2e-5)


def test_krivanek_list_order():
    names = [optics.krivanek_name(*t) for t in optics.krivanek_terms(14)]
    assert names == ["C10", "C12a", "C12b", "C21a", "C21b", "C23a", "C23b", "C30", "C32a",
                     "C32b", "C34a", "C34b", "C41a", "C41b"]


def test_aberration_phase_of_low_orders_is_the_textbook_polynomial():
    lam = 0.025
    k = np.linspace(0.0, 1.0, 11)
    phi = 0.7
    kx, ky = k * math.cos(phi), k * math.sin(phi)
    # defocus and spherical aberration: χ = πλk²C10 + (π/2)λ³k⁴C30
    chi = optics.aberration_phase(kx, ky, lam, [-50.0, 0, 0, 0, 0, 0, 0, 1.0e7])
    expected = math.pi * lam * k ** 2 * -50.0 + 0.5 * math.pi * lam ** 3 * k ** 4 * 1.0e7
    np.testing.assert_allclose(chi, expected, rtol=1e-12, atol=1e-12)
    # two-fold astigmatism (b component) and three-fold (a component)
    chi = optics.aberration_phase(kx, ky, lam, [0, 0, 20.0, 0, 0, 300.0])
    expected = (math.pi * lam * k ** 2 * 20.0 * math.sin(2 * phi)
                + 2 * math.pi / lam * (lam * k) ** 3 / 3 * 300.0 * math.cos(3 * phi))
    np.testing.assert_allclose(chi, expected, rtol=1e-12, atol=1e-12)


def test_probe_is_normalised_and_band_limited_by_the_aperture():
    lam, rez = optics.electron_wavelength_A(200), 0.05
    p_k = optics.probe_fourier((64, 64), rez, lam, 20.0, [-80.0])
    assert np.sum(np.abs(p_k) ** 2) == pytest.approx(1.0, rel=1e-5)
    ky, kx = optics.centred_frequencies((64, 64), rez)
    outside = np.hypot(kx, ky) > 20e-3 / lam + rez
    assert np.abs(p_k[outside]).max() == 0.0
    p_r = optics.probe_real((64, 64), rez, lam, 20.0, [-80.0])
    assert np.sum(np.abs(p_r) ** 2) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(optics.real_to_fourier(p_r), p_k, atol=1e-6)


def test_defocus_equals_fresnel_propagation_of_the_focused_probe():
    """C10 = z is the focused probe propagated by z Å (the sign convention of the package)."""
    be = backend.cpu()
    lam, rez, n, z = optics.electron_wavelength_A(300), 0.04, 64, 120.0
    focused = optics.probe_real((n, n), rez, lam, 15.0, [0.0], be)
    pixel = optics.real_space_pixel_size_A((n, n), rez)
    kernel = multislice.fresnel_propagator((n, n), pixel, lam, z, np, band_limit_fraction=10.0)
    propagated = np.fft.ifft2(np.fft.fft2(focused) * kernel)
    defocused = optics.probe_real((n, n), rez, lam, 15.0, [z], be)
    np.testing.assert_allclose(propagated, defocused, atol=2e-6)
    assert optics.with_defocus([z], 30.0)[0] == pytest.approx(z - 30.0)


def test_probe_modes_carry_unit_intensity_and_hermite_modes_are_orthogonal():
    lam, rez = optics.electron_wavelength_A(200), 1 / (64 * 0.3)
    spread = optics.defocus_spread_modes((64, 64), rez, lam, 25.0, [-100.0], 40.0, 5)
    assert np.sum(np.abs(spread) ** 2) == pytest.approx(1.0, rel=1e-5)
    main = optics.probe_real((64, 64), rez, lam, 25.0, [-100.0])
    modes = optics.hermite_modes(main, 4, 0.2)
    gram = np.einsum("ayx,byx->ab", modes.conj(), modes)
    np.testing.assert_allclose(np.diag(gram).real, [0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3], rtol=1e-4)
    assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-6


def test_projected_potential_integrates_to_the_forward_scattering_factor():
    """∫ v_z d²r = (h²/2π m₀ e) f_e(0) per atom: the q = 0 Fourier component."""
    pixel = 0.1
    v = potentials.projected_potential(["Mo", "S", "S"], [[5.0, 5.0], [3.3, 6.1], [7.2, 2.4]],
                                       (128, 128), pixel)
    f0 = sum(sum(potentials.PENG_PARAMETERS[s][0]) for s in ["Mo", "S", "S"])
    assert float(v.astype(np.float64).sum()) * pixel ** 2 == pytest.approx(
        potentials.POTENTIAL_PREFACTOR_V_A2 * f0, rel=1e-5)
    assert potentials.POTENTIAL_PREFACTOR_V_A2 == pytest.approx(2 * math.pi * 0.529177 * 14.3996,
                                                                rel=1e-4)
    # the atom sits where it was put: peak at (y, x) = (5.0, 5.0) Å
    assert np.unravel_index(np.argmax(v), v.shape) == (50, 50)
