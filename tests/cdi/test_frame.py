"""From a detector's frame to the centred pattern (xpr.cdi.frame): the centre found, the frame
cut, padded and binned exactly, frames added up; and `cdi phase2d` on an off-centre frame."""
import h5py
import numpy as np
import pytest

from xpr.backend import cpu
from xpr.cdi import frame
from xpr.phasing import merge

from nexus_files import write_nexus


def _noisy_pattern(photons=2e6, phase=0.0):
    """128^2 pattern (zero frequency at 64, 64) of a 32-px object, Poisson counts, beamstop
    r = 4 px and a dead row masked; (counts, masked, truth)."""
    from xpr.cdi.objects import far_field_intensity, model_object
    from xpr.cdi.simulate import detector_mask, record

    truth = model_object("random_smooth", (128, 128), 32, seed=4, max_phase=phase)
    counts = record(far_field_intensity(truth), photons, seed=5)
    masked = detector_mask((128, 128), 4)
    masked[90] = True
    counts[masked] = 0
    return counts, masked, truth


def _detector_frame(counts, masked):
    """The pattern as a detector off the beam axis records it: rows 4.. and columns ..123 only
    (124 x 124), the direct beam at (60, 64)."""
    return counts[4:, :124].copy(), masked[4:, :124].copy(), (60, 64)


def test_friedel_centre_of_a_real_object_is_exact():
    """A real object's pattern is centrosymmetric about zero frequency, I(c + d) = I(c - d): the
    Friedel centre of an off-centre, non-square frame with a beamstop and a dead row is the
    direct beam's pixel to 0.05 px, and the overlap there is near 1 (Poisson noise only)."""
    counts, masked, _ = _noisy_pattern()
    data, bad, beam = _detector_frame(counts, masked)
    centre, score = frame.friedel_centre(data, bad)
    assert np.abs(centre - beam).max() < 0.05
    assert 0.9 < score <= 1.0 + 1e-9
    shifted = np.roll(data, (3, -5), axis=(0, 1))        # the centre moves with the data
    centre, _ = frame.friedel_centre(shifted, np.roll(bad, (3, -5), axis=(0, 1)))
    assert np.abs(centre - (beam[0] + 3, beam[1] - 5)).max() < 0.05


def test_friedel_centre_in_3d():
    """The same in a volume: a real object's noise-free 32^3 pattern rolled by (2, -3, 1) and
    cut to 30 x 32 x 31 has its centre at (18, 13, 17) to 0.05 px."""
    from xpr.cdi.objects import far_field_intensity, model_object

    volume = far_field_intensity(model_object("shapes", (32, 32, 32), 10, seed=1))
    volume = np.roll(volume, (2, -3, 1), axis=(0, 1, 2))[:30, :, :31]
    centre, score = frame.friedel_centre(volume, np.zeros(volume.shape, bool))
    assert np.abs(centre - (18, 13, 17)).max() < 0.05 and score > 0.99


def test_padding_around_the_centre_gives_back_the_centred_pattern_exactly():
    """Padding the cut frame around its beam pixel restores the 128^2 centred pattern: every
    recorded pixel in its place (bit for bit), the lost rows and columns masked; cutting
    instead keeps the largest 2,3,5,7-smooth even box centred on the beam."""
    counts, masked, _ = _noisy_pattern()
    data, bad, beam = _detector_frame(counts, masked)
    padded, padded_mask = frame.recentre(data, bad, beam, crop="pad")
    assert padded.shape == (128, 128)
    assert np.array_equal(padded[4:, :124], np.where(bad, 0, data))
    assert np.array_equal(padded_mask[4:, :124], bad)
    assert padded_mask[:4].all() and padded_mask[:, 124:].all()
    cut, cut_mask = frame.recentre(data, bad, beam, crop="largest")
    assert cut.shape == (120, 120)          # 2 min(60, 64) = 2 min(64, 60) = 120 = 2^3 3 5
    assert np.array_equal(cut, np.where(bad, 0, data)[0:120, 4:124])
    assert cut[60, 60] == data[beam]


def test_binning_adds_counts_around_the_centre():
    """Binning by 3 sums 3 x 3 blocks, the beam pixel the middle of the central bin; a bin with
    a masked pixel is masked; per-axis factors work alike."""
    rng = np.random.default_rng(1)
    data = rng.poisson(5.0, (40, 50)).astype(float)
    bad = np.zeros(data.shape, bool)
    bad[17, 20] = True
    binned, binned_mask = frame.recentre(data, bad, (20, 21), crop="largest", binning=3)
    m = (binned.shape[0] // 2, binned.shape[1] // 2)
    assert binned[m] == data[19:22, 20:23].sum()                  # the beam pixel in the middle
    start = (20 - m[0] * 3 - 1, 21 - m[1] * 3 - 1)
    for i, j in ((0, 0), (2, 5), (m[0], m[1] - 1)):
        block = data[start[0] + 3 * i: start[0] + 3 * i + 3, start[1] + 3 * j: start[1] + 3 * j + 3]
        assert binned[i, j] == block.sum()
    assert binned_mask.sum() == 1 and binned_mask[(17 - start[0]) // 3, (20 - start[1]) // 3]
    assert binned[binned_mask].sum() == 0
    two, _ = frame.recentre(data, bad, (20, 21), binning=[1, 2])
    assert two.shape[1] * 2 <= 50 and two[two.shape[0] // 2, two.shape[1] // 2] == data[20, 21:23].sum()


def test_smooth_lengths():
    assert [frame.smooth_length(n) for n in (1060, 1000, 131, 2)] == [1050, 1000, 128, 2]
    assert [frame.smooth_length(n, up=True) for n in (1061, 127, 129)] == [1080, 128, 140]


def test_frames_are_added_up_with_their_masks():
    """A stack of frames becomes their sum; a pixel masked (or non-finite) in any frame is masked."""
    stack = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)
    stack[1, 0, 0] = np.nan
    masks = np.zeros(stack.shape, bool)
    masks[0, 2, 3] = True
    summed, mask = frame.sum_frames(stack, masks, 2, "sum", "f")
    assert summed[1, 1] == stack[:, 1, 1].sum()
    assert mask[0, 0] and mask[2, 3] and mask.sum() == 2
    same, none = frame.sum_frames(stack, None, 2, None, "f")
    assert same is stack and none is None


def test_object_pixel_size_from_the_geometry(tmp_path):
    """dx = lambda z / (N p b): 1.5 A, 5 m, 75 um, N = 512 gives 19.53 nm; binning by 2 halves
    it; a NeXus file's geometry is read in SI units (A, keV, mm converted), a CXI file's energy
    in J turned into a wavelength (hc / E)."""
    from xpr.cdi.geometry import object_pixel_size
    from xpr.io.h5 import recorded_geometry

    values = {"wavelength": 1.5e-10, "distance": 5.0, "pixel_size": [75e-6, 75e-6]}
    assert np.allclose(object_pixel_size(values, (512, 512), (1, 1)), 19.53125e-9)
    assert np.allclose(object_pixel_size(values, (512, 256), (2, 2)), [9.765625e-9, 19.53125e-9])
    assert object_pixel_size(dict(values, distance=None), (512, 512), (1, 1)) is None
    write_nexus(tmp_path / "a.nxs", np.ones((1, 8, 8), np.uint32), np.zeros((8, 8)), beam_centre=(3.5, 5.0))
    assert recorded_geometry(tmp_path / "a.nxs") == {"wavelength": 1.5e-10, "distance": 5.0,
                                                     "pixel_size": (75e-6, 75e-6)}
    with h5py.File(tmp_path / "b.cxi", "w") as f:
        f["cxi_version"] = 150
        f["entry_1/instrument_1/source_1/energy"] = 8000 * 1.602176634e-19         # 8 keV in J
        f["entry_1/instrument_1/detector_1/distance"] = 2.0
        f["entry_1/instrument_1/detector_1/x_pixel_size"] = 55e-6
        f["entry_1/instrument_1/detector_1/y_pixel_size"] = 55e-6
        f["entry_1/instrument_1/detector_1/distance"].attrs["units"] = "m"
    geometry = recorded_geometry(tmp_path / "b.cxi")
    assert np.isclose(geometry["wavelength"], 1.5498e-10, rtol=1e-4) and geometry["distance"] == 2.0
    with h5py.File(tmp_path / "c.nxs", "w") as f:
        f["entry/instrument/beam/incident_energy"] = 12.4
        f["entry/instrument/detector/detector_distance"] = 350.0
        f["entry/instrument/detector/detector_distance"].attrs["units"] = "mm"
    geometry = recorded_geometry(tmp_path / "c.nxs")
    assert np.isclose(geometry["wavelength"], 0.99987e-10, rtol=1e-4) and geometry["distance"] == 0.35
    assert geometry["pixel_size"] is None


def test_half_period_resolution_at_the_prtf_crossing():
    """Where the PRTF first falls below 1/e at |q| = r px, the half-period resolution is the
    field of view N dx over 2 r; a PRTF that never falls gives none."""
    from xpr.cdi.geometry import half_period_resolution

    shells = np.arange(0, 64, dtype=float)
    prtf = np.exp(-shells / 40.0)                          # 1/e at r = 40: first below at 41
    radius, resolution = half_period_resolution(shells, prtf, (128, 128), [78e-9, 78e-9])
    assert radius == 41 and np.isclose(resolution, 128 * 78e-9 / 82)
    assert half_period_resolution(shells, prtf, (128, 128), None) == (41, None)
    assert half_period_resolution(shells, np.ones(64), (128, 128), [1e-9, 1e-9]) is None


def test_recorded_beam_centre_in_pixels_or_lengths(tmp_path):
    """beam_center_x/y read as (row, column); lengths divided by the pixel sizes."""
    from xpr.io.h5 import recorded_beam_centre

    write_nexus(tmp_path / "a.nxs", np.ones((1, 8, 8), np.uint32), np.zeros((8, 8)), beam_centre=(3.5, 5.0))
    assert recorded_beam_centre(tmp_path / "a.nxs") == (3.5, 5.0)
    with h5py.File(tmp_path / "b.h5", "w") as f:
        detector = f.create_group("entry/instrument/detector")
        for axis, value, size in (("x", 2.2, 75e-6), ("y", 1.5e-3, 75e-6)):
            detector.create_dataset(f"beam_center_{axis}", data=value).attrs["units"] = \
                "mm" if axis == "x" else "m"
            detector.create_dataset(f"{axis}_pixel_size", data=size).attrs["units"] = "m"
    assert np.allclose(recorded_beam_centre(tmp_path / "b.h5"), (20.0, 2.2e-3 / 75e-6))
    assert recorded_beam_centre(tmp_path / "c.npy") is None


def _split_into_frames(counts, n, seed):
    """n frames whose sum is `counts` (binomial thinning: each a Poisson exposure of 1/n)."""
    rng = np.random.default_rng(seed)
    left, frames = counts.astype(np.int64), []
    for k in range(n, 1, -1):
        part = rng.binomial(left, 1.0 / k)
        frames.append(part)
        left = left - part
    return np.stack(frames + [left])


def test_phase2d_on_an_off_centre_frame(home, run_xpr, tmp_path):
    """Acceptance: the 128^2 noisy pattern as an off-axis detector records it (124 x 124, beam at
    (60, 64)) -- as .npy with `centre: auto` (Friedel symmetry), and as an Eiger-style NeXus
    series of 3 compressed frames with the beam centre recorded (`frames: sum`, `centre: auto`)
    -- both padded back (`crop: pad`): the phased pattern is the centred one on every recorded
    pixel, and the object is recovered to merged error < 0.15 (measured 0.055 for both; the
    whole centred pattern, same settings, 0.10)."""
    counts, masked, truth = _noisy_pattern()
    data, bad, beam = _detector_frame(counts, masked)
    np.save(tmp_path / "frame.npy", data.astype(np.float32))
    np.save(tmp_path / "frame_mask.npy", bad.astype(np.uint8))
    write_nexus(tmp_path / "series_master.nxs", _split_into_frames(data, 3, seed=2).astype(np.uint32),
                bad, name="data_000001", beam_centre=beam)
    variants = {
        "friedel": f"  data_path: {tmp_path / 'frame.npy'}\n  mask_path: {tmp_path / 'frame_mask.npy'}\n",
        "nexus": f"  data_path: {tmp_path / 'series_master.nxs'}\n  frames: sum\n",
    }
    errors = {}
    for name, lines in variants.items():
        settings = tmp_path / f"{name}.yaml"
        settings.write_text(f"structure_name: {name}\ninput:\n{lines}  centre: auto\n  crop: pad\n"
                            "phasing:\n  repeats: 4\nga:\n  generations: 1\n")
        result = run_xpr(["-q", "cdi", "phase2d", settings])
        assert result.exit_code == 0, result.output
        run = (home / "data" / "cdi" / "phase2d" / f"{name}.h5").resolve()
        with h5py.File(run) as f:
            phased, phased_mask = f["data/intensity"][()], f["data/mask"][()].astype(bool)
            merged = f["merged/object"][()]
        assert phased.shape == (128, 128)
        assert np.array_equal(phased_mask[4:, :124], bad) and phased_mask[:4].all()
        assert np.array_equal(phased[4:, :124][~bad], counts[4:, :124][~bad])
        if name == "nexus":                # lambda z / (N p) = 1.5e-10 x 5 / (128 x 75e-6) m = 78.1 nm
            with h5py.File(run) as f:
                pixel = f["merged/pixel_size_m"][()]
                assert np.array_equal(f["data/pixel_size_m"][()], pixel)
            assert np.allclose(pixel, [1.5e-10 * 5 / (128 * 75e-6)] * 2, rtol=1e-12)
            with h5py.File(run.with_suffix(".cxi")) as f:
                assert np.isclose(f["entry_1/image_1/x_pixel_size"][()], pixel[1])
                assert f["entry_1/image_1/y_pixel_size"].attrs["units"] == "m"
        log = (run.parent / "run.log").read_text()
        assert "zero frequency at [60, 64]" in log
        assert ("the file's beam centre" if name == "nexus" else "Friedel symmetry") in log
        errors[name] = merge.real_space_error(merged, truth, cpu())
    assert max(errors.values()) < 0.15, errors


@pytest.mark.parametrize("overrides, words", [
    (["input.centre=[3, 4, 5]"], ["input.centre", "list of 2"]),
    (["input.centre=middle"], ["input.centre", "auto"]),
    (["input.centre=[200, 10]"], ["input.centre", "outside"]),
    (["input.centre=[2, 60]"], ["input.crop", "pad"]),
    (["input.binning=0"], ["input.binning"]),
    (["input.wavelength=fast"], ["input.wavelength", "metres"]),
    (["input.pixel_size=[1e-6, 2e-6, 3e-6]"], ["input.pixel_size"]),
    (["input.detector_distance=-2"], ["input.detector_distance", "positive"]),
])
def test_bad_centring_settings_exit_2(home, run_xpr, tmp_path, overrides, words):
    counts, masked, _ = _noisy_pattern()
    np.save(tmp_path / "frame.npy", counts.astype(np.float32))
    args = ["-q", "cdi", "phase2d", "tutorial", "-o", f"input.data_path={tmp_path / 'frame.npy'}",
            "-o", "structure_name=bad"]
    for o in overrides:
        args += ["-o", o]
    result = run_xpr(args)
    assert result.exit_code == 2, result.output
    text = result.output
    assert all(w in text for w in words), text


def test_a_stack_without_frames_sum_is_refused_with_the_hint(home, run_xpr, tmp_path):
    counts, _, _ = _noisy_pattern()
    np.save(tmp_path / "stack.npy", np.stack([counts, counts]).astype(np.float32))
    result = run_xpr(["-q", "cdi", "phase2d", "tutorial", "-o", f"input.data_path={tmp_path / 'stack.npy'}",
                      "-o", "structure_name=stack"])
    assert result.exit_code == 2
    text = result.output
    assert "input.frames: sum" in text


def test_an_eiger_series_over_several_files_is_read_as_one_stack(tmp_path, home, run_xpr):
    """An Eiger master whose NXdata links data_000001 and data_000002 to their own files (no
    @signal): read as one stack of all 5 frames in order; `frames: sum` adds them all; a missing
    data file stops with exit 2 naming it."""
    from xpr.io.readers import read_pattern

    counts, masked, _ = _noisy_pattern()
    frames = _split_into_frames(counts, 5, seed=3)
    for i, part in enumerate((frames[:3], frames[3:]), start=1):
        with h5py.File(tmp_path / f"series_data_{i:06d}.h5", "w") as f:
            f["entry/data/data"] = part.astype(np.uint32)
    with h5py.File(tmp_path / "series_master.h5", "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        for i in (1, 2):
            data[f"data_{i:06d}"] = h5py.ExternalLink(f"series_data_{i:06d}.h5", "/entry/data/data")
        entry["instrument/detector/detectorSpecific/pixel_mask"] = masked.astype(np.uint32)
    stack, mask, where = read_pattern(tmp_path / "series_master.h5")
    assert stack.shape == (5, 128, 128) and np.array_equal(stack, frames)
    assert np.array_equal(mask, masked) and "data_000001..data_000002" in where
    result = run_xpr(["-q", "cdi", "phase2d", "tutorial", "-o", f"input.data_path={tmp_path / 'series_master.h5'}",
                      "-o", "input.frames=sum", "-o", "phasing.repeats=2", "-o", "ga.generations=1",
                      "-o", "phasing.iters=20ER", "-o", "structure_name=series"])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data" / "cdi" / "phase2d" / "series.h5") as f:
        assert np.array_equal(f["data/intensity"][()][~masked], counts[~masked])
    (tmp_path / "series_data_000002.h5").unlink()
    result = run_xpr(["-q", "cdi", "phase2d", "tutorial", "-o", f"input.data_path={tmp_path / 'series_master.h5'}",
                      "-o", "input.frames=sum", "-o", "structure_name=series"])
    assert result.exit_code == 2
    text = result.output
    assert "data_000001..data_000002" in text and "series_master.h5" in text


def test_detector_gap_values_are_masked(home, run_xpr, tmp_path):
    """Counting detectors write their type's maximum (2^32 - 1) into gaps and dead pixels: such
    pixels of unsigned integer frames are masked (here a gap column and a dead pixel in one
    frame, no mask file), their value dropped, the rest of the summed pattern kept exactly."""
    counts, _, _ = _noisy_pattern()
    frames = _split_into_frames(counts, 2, seed=4).astype(np.uint32)
    frames[:, :, 100] = np.iinfo(np.uint32).max
    frames[1, 20, 30] = np.iinfo(np.uint32).max
    np.save(tmp_path / "frames.npy", frames)
    result = run_xpr(["-q", "cdi", "phase2d", "tutorial", "-o", f"input.data_path={tmp_path / 'frames.npy'}",
                      "-o", "input.frames=sum", "-o", "phasing.repeats=2", "-o", "ga.generations=1",
                      "-o", "phasing.iters=20ER", "-o", "structure_name=gaps"])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data" / "cdi" / "phase2d" / "gaps.h5") as f:
        mask, intensity = f["data/mask"][()].astype(bool), f["data/intensity"][()]
    expected = np.zeros(counts.shape, bool)
    expected[:, 100] = expected[20, 30] = True
    assert np.array_equal(mask, expected)
    assert np.array_equal(intensity[~mask], counts[~mask]) and not intensity[mask].any()
