"""`cdi phase2d` with guided repeats (ga.*): generations recover a noisy masked object; one
generation is the plain run; bad ga values exit 2."""
import h5py
import numpy as np
import pytest

from xpr.backend import cpu
from xpr.phasing import merge


@pytest.fixture
def noisy_case(tmp_path):
    """A 128^2 real object oversampled 4x, 2e6 photons (Poisson), a beamstop of radius 4 px and a
    dead column, masked: data.npy, mask.npy in tmp_path; returns (settings file, truth)."""
    from xpr.cdi.objects import far_field_intensity, model_object
    from xpr.cdi.simulate import detector_mask, record

    truth = model_object("random_smooth", (128, 128), 32, seed=7)
    counts = record(far_field_intensity(truth), 2e6, seed=8)
    masked = detector_mask((128, 128), 4)
    masked[:, 40] = True
    counts[masked] = 0
    np.save(tmp_path / "data.npy", counts.astype(np.float32))
    np.save(tmp_path / "mask.npy", masked.astype(np.uint8))
    settings = tmp_path / "case.yaml"
    settings.write_text(f"structure_name: ga\ninput:\n  data_path: {tmp_path / 'data.npy'}\n"
                        f"  mask_path: {tmp_path / 'mask.npy'}\n")
    return settings, truth


def _result(home, name="ga"):
    with h5py.File(home / "data" / "cdi" / "phase2d" / f"{name}.h5") as f:
        return {key: f[f"repeats/{key}"][()] for key in f["repeats"]} | {"merged": f["merged/object"][()]}


def test_generations_recover_a_noisy_masked_pattern(home, run_xpr, noisy_case):
    """3 generations (300 iterations, then two of 200 refining the bred starts without HIO: the
    default's 900 in all), 2 repeats culled after each, each bred (a + b)/2 with the best: merged
    error < 0.15 (measured 0.023, the plain run 0.022; ~10 s). The culled were the worst by the
    free deviance; the last generation ran ga.iters."""
    settings, truth = noisy_case
    result = run_xpr(["-q", "cdi", "phase2d", settings, "-o", "ga.generations=3", "-o", "ga.cull=2",
                      "-o", "ga.breed=avg_ab", "-o", "phasing.iters=300HIO 100RAAR 50ER 50ML",
                      "-o", "ga.iters=100RAAR 50ER 50ML"])
    assert result.exit_code == 0, result.output
    r = _result(home)
    assert r["object"].shape[0] == 4 and r["generation_scores"].shape == (3, 8)
    assert r["e_mod"].shape == (4, 200)
    scores = r["generation_scores"]
    assert np.isfinite(scores[0]).all() and np.isfinite(scores[1]).sum() == 6
    assert np.isfinite(scores[2]).sum() == 4
    # those culled after generation 0 were its two worst
    culled = ~np.isfinite(scores[1])
    assert scores[0][culled].min() >= scores[0][~culled].max()
    assert merge.real_space_error(r["merged"], truth, cpu()) < 0.15


def test_one_generation_is_the_plain_run(home, run_xpr, noisy_case):
    """ga.generations: 1 ignores every other ga option: the repeats equal the plain run's (one
    generation, no other ga option given) bit for bit."""
    settings, _ = noisy_case
    common = ["-q", "cdi", "phase2d", settings, "-o", "phasing.iters=60HIO 20RAAR 20ER",
              "-o", "phasing.repeats=3"]
    assert run_xpr(common + ["-o", "structure_name=plain", "-o", "ga.generations=1"]).exit_code == 0
    result = run_xpr(common + ["-o", "structure_name=one", "-o", "ga.generations=1", "-o", "ga.cull=1",
                               "-o", "ga.breed=avg_ab", "-o", "ga.resolution=[0.3]"])
    assert result.exit_code == 0, result.output
    plain, one = _result(home, "plain"), _result(home, "one")
    assert "generation_scores" not in one
    for key in ("object", "support", "e_mod", "free_deviance", "seed"):
        assert np.array_equal(plain[key], one[key]), key


@pytest.mark.parametrize("override, words", [
    ("ga.generations=0", "out of range"),
    ("ga.breed=pixel_switch", "is not one of"),
    ("ga.cull=-1", "out of range"),
    ("ga.resolution=[0.5, -0.2]", "low-pass widths must be numbers > 0"),
    ("ga.iters=100RAAR 50XYZ", "unknown phasing algorithm 'XYZ'"),
])
def test_bad_ga_values_exit_2(home, run_xpr, noisy_case, override, words):
    settings, _ = noisy_case
    result = run_xpr(["cdi", "phase2d", settings, "-o", override])
    assert result.exit_code == 2, result.output
    assert words in result.output and "ga." in result.output


def test_generations_do_not_depend_on_how_repeats_are_batched(home, run_xpr, noisy_case):
    """Each generation is gathered before breeding and the bred starts go back to their own
    repeats: 5 repeats in one batch equal the same 5 in batches of 2 (the serial engine)."""
    settings, _ = noisy_case
    common = ["-q", "cdi", "phase2d", settings, "-o", "phasing.iters=60HIO 20RAAR 20ER",
              "-o", "phasing.repeats=5", "-o", "ga.generations=3", "-o", "ga.cull=1",
              "-o", "ga.iters=30RAAR 10ER", "-o", "multi_process.engine=serial"]
    assert run_xpr(common + ["-o", "structure_name=one"]).exit_code == 0
    result = run_xpr(common + ["-o", "structure_name=split", "-o", "multi_process.batch_size=2"])
    assert result.exit_code == 0, result.output
    one, split = _result(home, "one"), _result(home, "split")
    assert np.array_equal(one["seed"], split["seed"]) and len(one["seed"]) == 3
    assert np.allclose(one["object"], split["object"], atol=1e-4 * np.abs(one["object"]).max())
    assert np.allclose(one["generation_scores"], split["generation_scores"], rtol=1e-4, equal_nan=True)
