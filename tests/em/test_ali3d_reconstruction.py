"""Central-slice projection and direct Fourier inversion against the exact blob phantom."""
import numpy as np
import pytest

from xpr.backend import cpu
from xpr.em.ali3d import ctf as ctf_model
from xpr.em.ali3d import euler, fsc, phantom, symmetry
from xpr.em.ali3d.project import prepare_projector
from xpr.em.ali3d.reconstruct import InsertionBatch, grid_to_volume, insert_batch, sample_projector


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def blobs32():
    rng = np.random.default_rng(3)
    return phantom.random_blobs(rng, 10, 32)


def exact_projections(blobs, box, n, seed, shift_range=2.0):
    rng = np.random.default_rng(seed)
    matrices = euler.random_rotations(rng, n)
    shifts = rng.uniform(-shift_range, shift_range, (n, 2))
    images = np.stack([phantom.analytic_projection(blobs, m, box, s) for m, s in zip(matrices, shifts)])
    return images, matrices, shifts


@pytest.mark.parametrize("width, tolerance", [(4, 2e-3), (6, 2e-3)])
def test_projection_matches_analytic_projection_of_blobs(width, tolerance):
    rng = np.random.default_rng(4)
    blobs = phantom.random_blobs(rng, 10, 48)
    projector = prepare_projector(phantom.render_volume(blobs, 48), cpu(), npad=2, kernel_width=width)
    for matrix in euler.random_rotations(rng, 4):
        shift = rng.uniform(-3, 3, 2)
        computed = projector.project(matrix, cpu(), shift_px=shift)
        exact = phantom.analytic_projection(blobs, matrix, 48, shift)
        assert np.linalg.norm(computed - exact) / np.linalg.norm(exact) < tolerance


@pytest.mark.parametrize("box", [32, 33])
def test_nufft_projection_is_the_analytic_projection_of_blobs(box):
    """The NUFFT projector evaluates the sampled volume's transform exactly (to epsilon 1e-5): the
    projection of Gaussian blobs (σ ≥ 2 px, so the sampling and the n/2 − 1 band limit lose < 1e-6)
    matches the analytic one to 1e-4 (measured 3e-6 and 4e-7; the W = 3 gridding kernel: 6e-3),
    for even and odd boxes (ducc0's grid centre n//2 = the volume's), shifted and rotated.  The
    batched slices of the search (refine.slices) are the same values."""
    from xpr.em.ali3d.refine import slices

    rng = np.random.default_rng(7)
    blobs = phantom.Blobs(rng.uniform(-3, 3, (3, 3)), rng.uniform(2.0, 2.5, 3), rng.uniform(0.5, 1.5, 3))  # inside the box
    projector = prepare_projector(phantom.render_volume(blobs, box), cpu(), method="nufft")
    matrices = euler.random_rotations(rng, 3)
    for matrix in matrices:
        shift = rng.uniform(-3, 3, 2)
        computed = projector.project(matrix, cpu(), shift_px=shift)
        exact = phantom.analytic_projection(blobs, matrix, box, shift)
        assert np.linalg.norm(computed - exact) / np.linalg.norm(exact) < 1e-4
    batched = slices(projector, matrices, plan=projector.nufft_plan())
    one_by_one = np.stack([projector.slice(m) for m in matrices])
    assert np.allclose(batched, one_by_one, rtol=0, atol=2e-5 * np.abs(one_by_one).max())  # two 1e-5 evaluations


def test_reconstruction_of_exact_projections_matches_phantom(blobs32):
    images, matrices, shifts = exact_projections(blobs32, 32, 300, seed=5)
    grid = insert_batch(InsertionBatch(images, matrices, shifts, np.eye(3)[None]), cpu())
    volume = grid_to_volume(grid, cpu())
    truth = phantom.render_volume(blobs32, 32)
    assert correlation(volume, truth) >= 0.99
    assert np.sum(volume * truth) / np.sum(truth * truth) == pytest.approx(1.0, abs=0.1)


def test_residual_correction_makes_the_reconstruction_consistent(blobs32):
    """One pass of residual re-insertion turns the kernel-weighted average into a volume whose
    slices reproduce the data: the error to the phantom falls at least five-fold."""
    import dataclasses

    images, matrices, shifts = exact_projections(blobs32, 32, 150, seed=12)
    truth = phantom.render_volume(blobs32, 32)
    batch = InsertionBatch(images, matrices, shifts, np.eye(3)[None])
    average = grid_to_volume(insert_batch(batch, cpu()), cpu())
    estimate = sample_projector(average, 2, 4, cpu())
    corrected = average + grid_to_volume(insert_batch(dataclasses.replace(batch, estimate=estimate), cpu()), cpu())
    error = [np.linalg.norm(v - truth) / np.linalg.norm(truth) for v in (average, corrected)]
    assert error[1] < error[0] / 5
    assert correlation(corrected, truth) >= 0.999


def test_symmetric_reconstruction_uses_every_copy():
    rng = np.random.default_rng(6)
    group = symmetry.group_matrices("d2")
    blobs = phantom.random_blobs(rng, 4, 32, group)
    images, matrices, shifts = exact_projections(blobs, 32, 75, seed=7)
    truth = phantom.render_volume(blobs, 32)
    with_symmetry = grid_to_volume(insert_batch(InsertionBatch(images, matrices, shifts, group), cpu()), cpu())
    without = grid_to_volume(insert_batch(InsertionBatch(images, matrices, shifts, np.eye(3)[None]), cpu()), cpu())
    # 75 views × 4 symmetry copies reconstruct as well as 300 views; the symmetrised volume is D2-invariant
    assert correlation(with_symmetry, truth) >= 0.99
    assert correlation(with_symmetry, truth) > correlation(without, truth)
    # two-fold about z: (x, y) -> (-x, -y) about the centre n // 2
    turned = np.roll(with_symmetry[:, ::-1, ::-1], (1, 1), axis=(1, 2))
    inside = fsc.soft_sphere(32, 12) > 0
    np.testing.assert_allclose(with_symmetry[inside], turned[inside], atol=2e-3 * truth.max())


def test_taking_out_and_putting_back_is_exact(blobs32):
    images, matrices, shifts = exact_projections(blobs32, 32, 12, seed=8)
    moved = euler.rotation_matrices(*(np.stack(euler.euler_angles(matrices), 1) + 2.0).T)
    direct = insert_batch(InsertionBatch(images, moved, shifts + 0.5, np.eye(3)[None]), cpu())
    updated = insert_batch(InsertionBatch(images, matrices, shifts, np.eye(3)[None]), cpu())
    swap = InsertionBatch(np.concatenate([images, images]), np.concatenate([matrices, moved]),
                          np.concatenate([shifts, shifts + 0.5]), np.eye(3)[None],
                          signs=np.concatenate([-np.ones(12), np.ones(12)]))
    updated.add(insert_batch(swap, cpu()))
    np.testing.assert_allclose(updated.data, direct.data, atol=1e-6 * np.abs(direct.data).max())
    np.testing.assert_allclose(updated.count, direct.count, atol=1e-9 * direct.count.max())


@pytest.mark.parametrize("ctf", [False, True])
def test_inserting_into_a_grid_adds_the_same_sums_on_one_thread_or_several(blobs32, monkeypatch, ctf):
    """A small batch (a chunk's put-back) is summed by one thread straight into the half set's grid,
    a large one by several threads into their own arrays, added in turn: both give the grid plus
    the batch's own sums, and without a CTF T equals N."""
    from xpr.em.ali3d import reconstruct

    images, matrices, shifts = exact_projections(blobs32, 32, 16, seed=9)
    parameters = None
    if ctf:
        parameters = ctf_model.CTFParameters(np.full(16, 9000.0), np.full(16, 8000.0), np.linspace(0, 90, 16),
                                             np.full(16, 300.0), np.full(16, 2.7), np.full(16, 0.1), np.zeros(16))
    batch = InsertionBatch(images, matrices, shifts, np.eye(3)[None], ctf=parameters,
                           ctf_mode="wiener" if ctf else "none", pixel_size_A=2.0)
    start = insert_batch(InsertionBatch(images[::-1], matrices, shifts, np.eye(3)[None]), cpu())
    alone = insert_batch(batch, cpu())
    results = []
    for per_point in (1e9, 0):        # one thread, then all this process's threads
        monkeypatch.setattr(reconstruct, "THREADED_PER_POINT", per_point)
        grid = insert_batch(InsertionBatch(images[::-1], matrices, shifts, np.eye(3)[None]), cpu())
        results.append(insert_batch(batch, cpu(), into=grid))
        assert results[-1] is grid
    for grid in results:
        np.testing.assert_allclose(grid.data, start.data + alone.data, rtol=0, atol=1e-12 * np.abs(alone.data).max())
        np.testing.assert_allclose(grid.count, start.count + alone.count, rtol=0, atol=1e-12 * alone.count.max())
        np.testing.assert_allclose(grid.ctf_weight, start.ctf_weight + alone.ctf_weight, rtol=0,
                                   atol=1e-12 * alone.count.max())
    if not ctf:
        assert np.array_equal(alone.ctf_weight, alone.count)
    else:
        assert np.abs(alone.ctf_weight - alone.count).max() > 0.1 * alone.count.max()


def test_wiener_reconstruction_of_ctf_modulated_projections(blobs32):
    images, matrices, shifts = exact_projections(blobs32, 32, 300, seed=9)
    n, box, pixel = len(images), 32, 2.0
    rng = np.random.default_rng(10)
    defocus = rng.uniform(1.0e4, 2.5e4, n)
    ctf = ctf_model.CTFParameters(defocus, defocus, np.zeros(n), np.full(n, 300.0), np.full(n, 2.7),
                                  np.full(n, 0.1), np.zeros(n))
    ky, kx = np.fft.fftfreq(box, 1 / box)[:, None], np.arange(box // 2 + 1)[None, :]
    modulated = np.stack([np.fft.irfft2(np.fft.rfft2(img) * ctf_model.ctf_values(ctf, i, kx, ky, pixel, box), s=(box, box))
                          for i, img in enumerate(images)]).astype(np.float32)
    truth = phantom.render_volume(blobs32, 32)
    grid = insert_batch(InsertionBatch(modulated, matrices, shifts, np.eye(3)[None], ctf=ctf, ctf_mode="wiener",
                                       pixel_size_A=pixel), cpu())
    corrected = grid_to_volume(grid, cpu(), snr=100.0)
    plain = grid_to_volume(insert_batch(InsertionBatch(modulated, matrices, shifts, np.eye(3)[None]), cpu()), cpu())
    assert correlation(corrected, truth) >= 0.97
    assert correlation(plain, truth) < 0.9
    # the Wiener term is one image's worth (1/snr), not one per sample (N/snr): even at snr 1 it
    # fades under 300 images (0.81 with N/snr, whose low frequencies, CTF ≈ Q, were all but gone)
    assert correlation(grid_to_volume(grid, cpu(), snr=1.0), truth) >= 0.97


def test_fsc_of_identical_and_independent_volumes():
    rng = np.random.default_rng(11)
    volume = rng.standard_normal((32, 32, 32)).astype(np.float32)
    frequencies, same = fsc.fourier_shell_correlation(volume, volume, cpu())
    np.testing.assert_allclose(same, 1.0, atol=1e-5)
    assert fsc.resolution_A(frequencies, same, 0.143, 1.5) == pytest.approx(3.0)
    _, independent = fsc.fourier_shell_correlation(volume, rng.standard_normal((32, 32, 32)), cpu())
    # shells beyond the first few hold hundreds of voxels: |FSC| ~ 1/sqrt(voxels)
    assert np.abs(independent[4:]).max() < 0.2


def test_ctf_matches_relions_formula():
    """RELION's form (src/ctf.h): deltaf = −[(U+V)/2 + (U−V)/2 cos 2(α − α_ast)], CTF =
    −sin(πλ·deltaf·k² + (π/2)C_sλ³k⁴ − phase − arctan(Q/√(1−Q²))), evaluated here independently,
    against xpr's at frequencies in several directions; and the worked example of the docs."""
    from xpr.em.optics import electron_wavelength_A

    u, v, angle, kv, cs_mm, q, shift = 15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1, 20.0
    params = ctf_model.CTFParameters(*(np.array([x]) for x in (u, v, angle, kv, cs_mm, q, shift)))
    box, pixel = 100, 1.3
    rng = np.random.default_rng(0)
    kx, ky = rng.integers(-40, 41, 50), rng.integers(-40, 41, 50)
    x, y = kx / (box * pixel), ky / (box * pixel)
    lam = electron_wavelength_A(kv)
    deltaf = -((u + v) / 2 + (u - v) / 2 * np.cos(2 * (np.arctan2(y, x) - np.deg2rad(angle))))
    argument = (np.pi * lam * deltaf * (x * x + y * y) + np.pi / 2 * cs_mm * 1e7 * lam ** 3 * (x * x + y * y) ** 2
                - np.deg2rad(shift) - np.arctan(q / np.sqrt(1 - q * q)))
    np.testing.assert_allclose(ctf_model.ctf_values(params, 0, kx, ky, pixel, box), -np.sin(argument), atol=1e-9)
    example = ctf_model.CTFParameters(*(np.array([x]) for x in (u, v, angle, kv, cs_mm, q, 0.0)))
    values = ctf_model.ctf_values(example, 0, np.array([0, 3, 10, 0]), np.array([0, 0, 0, 10]), 1.0, 100)
    np.testing.assert_allclose(values, [0.1, 0.7962, 0.2320, 0.5170], atol=1e-4)


@pytest.mark.parametrize("mode", ["none", "count", "ctf"])
def test_compiled_spreading_matches_the_kernel_sums_written_out(mode):
    """spreading.spread adds c_abc · value at the neighbour ((z₀+a)·side + y₀+b)·side + x₀+c of
    every sample, and N, T as documented: checked against np.add.at over the W³ weights formed
    from KaiserBessel.neighbours.  The weights of a sample sum to 1 (0.1 %), so N counts samples."""
    from xpr.em.ali3d import spreading
    from xpr.em.ali3d.gridding import KaiserBessel

    rng = np.random.default_rng(3)
    kb, side, m = KaiserBessel(3, 2.0), 21, 500
    points = rng.uniform(3, side - 4, (3, m))
    (fx, wx), (fy, wy), (fz, wz) = (kb.neighbours(u) for u in points)
    value = (rng.standard_normal(m) + 1j * rng.standard_normal(m)).astype(np.complex64)
    t2 = rng.uniform(0, 1, m).astype(np.float32)
    sign = -1.0
    weights = np.einsum("sa,sb,sc->sabc", wz, wy, wx).reshape(m, -1).astype(np.float64)
    t = np.arange(3)
    index = (((fz[:, None, None, None] + t[None, :, None, None]) * side + fy[:, None, None, None]
              + t[None, None, :, None]) * side + fx[:, None, None, None] + t[None, None, None, :]).reshape(m, -1)
    data, count, ctf_weight = np.zeros(side ** 3, np.complex128), np.zeros(side ** 3), np.zeros(side ** 3)
    flag = {"none": spreading.WEIGHTS_NONE, "count": spreading.WEIGHTS_COUNT, "ctf": spreading.WEIGHTS_CTF}[mode]
    spreading.spread(points, *spreading.table_arguments(kb), value.real * np.float32(sign),
                     value.imag * np.float32(sign), t2 * np.float32(sign), sign, side, data.view(np.float64),
                     count, ctf_weight, flag)
    expected = np.zeros(side ** 3, np.complex128)
    np.add.at(expected, index, sign * weights * value[:, None])
    np.testing.assert_allclose(data, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    if mode == "none":
        assert not count.any() and not ctf_weight.any()
        return
    expected_count = np.zeros(side ** 3)
    np.add.at(expected_count, index, sign * weights)
    np.testing.assert_allclose(count, expected_count, rtol=0, atol=1e-6)
    assert abs(count.sum() / (sign * m) - 1) < 1e-3
    expected_t = expected_count.copy() if mode == "count" else np.zeros(side ** 3)
    if mode == "ctf":
        np.add.at(expected_t, index, sign * weights * t2[:, None])
    np.testing.assert_allclose(ctf_weight, expected_t, rtol=0, atol=1e-6)


def test_compiled_slices_make_the_kernel_weights_as_neighbours_does():
    """spreading.slices forms each point's weights in KaiserBessel.neighbours' float32 steps (the
    same numbers) and returns their W³ sum over the cube, as an einsum written out does."""
    from xpr.em.ali3d import spreading
    from xpr.em.ali3d.gridding import KaiserBessel

    rng = np.random.default_rng(4)
    for width in (3, 4):
        kb, side, b, m = KaiserBessel(width, 2.0), 19, 3, 400
        coordinates = rng.uniform(3, side - 4, (b, 3, m))
        cube = (rng.standard_normal(side ** 3) + 1j * rng.standard_normal(side ** 3)).astype(np.complex64)
        out = np.empty((b, m), np.complex64)
        spreading.slices(cube, side, coordinates, *spreading.table_arguments(kb), out)
        first, weights = kb.neighbours(coordinates)                        # (b, 3, m), (b, 3, m, W)
        one = np.empty(width, np.float32)
        for u, j0, w in ((coordinates[1, 2, 7], first[1, 2, 7], weights[1, 2, 7]),
                         (coordinates[2, 0, 99], first[2, 0, 99], weights[2, 0, 99])):
            assert spreading.kernel_weights(u, *spreading.table_arguments(kb)[:3], one) == j0
            np.testing.assert_array_equal(one, w)
        t = np.arange(width)
        index = (((first[:, 2, :, None, None, None] + t[:, None, None]) * side + first[:, 1, :, None, None, None]
                  + t[None, :, None]) * side + first[:, 0, :, None, None, None] + t[None, None, :]).reshape(b, m, -1)
        c = np.einsum("bsa,bsc,bsd->bsacd", weights[:, 2], weights[:, 1], weights[:, 0]).reshape(b, m, -1)
        np.testing.assert_allclose(out, np.einsum("bsk,bsk->bs", c.astype(np.float64), cube[index]), rtol=0, atol=1e-5)
