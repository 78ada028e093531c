"""`xpr em local_ali3d` end to end: STAR round trips, products, and bad input refused with exit 2."""
import h5py
import numpy as np
import pytest
import yaml

from xpr.em.ali3d import particles, phantom
from xpr.em.ali3d.ctf import CTFParameters
from xpr.em.ali3d.local_ali3d import parameter_errors

TINY = {"alignment": {"maxit": 1, "chunk": 0.5, "max_evaluations": 40},
        "multi_process": {"engine": "serial"}}


def write_settings(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def merged(*trees):
    out = {}
    for tree in trees:
        for key, value in tree.items():
            out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def test_star_round_trip_keeps_columns_and_converts_offsets(tmp_path):
    rng = np.random.default_rng(0)
    n, pixel = 7, 1.7
    angles = rng.uniform(-180, 180, (n, 3))
    angles[:, 1] = rng.uniform(0, 180, n)
    shifts = rng.uniform(-3, 3, (n, 2))
    ctf = CTFParameters(*(rng.uniform(1e4, 2e4, n) for _ in range(3)), np.full(n, 300.0), np.full(n, 2.7),
                        np.full(n, 0.07), np.zeros(n))
    path = particles.write_parameters(tmp_path / "p.star", None, angles, shifts, pixel, ctf)
    table = particles.read_parameters(path, n, None, need_ctf=True)
    assert table.pixel_size_A == pytest.approx(pixel)
    np.testing.assert_allclose(table.angles, angles, atol=1e-5)
    np.testing.assert_allclose(table.shifts_px, shifts, atol=1e-5)
    np.testing.assert_allclose(table.ctf.defocus_u, ctf.defocus_u, rtol=1e-6)
    # offsets written in Å: RELION's rlnOriginXAngst = pixels × pixel size
    import starfile

    block = starfile.read(path, always_dict=True)["particles"]
    np.testing.assert_allclose(block["rlnOriginXAngst"], shifts[:, 0] * pixel, atol=1e-5)
    # refined tables keep the input's other columns (rlnImageName, CTF) and replace the angles
    refined = particles.write_parameters(tmp_path / "r.star", table, angles + 1.0, shifts - 0.5, pixel)
    again = particles.read_parameters(refined, n, None, need_ctf=True)
    np.testing.assert_allclose(again.angles, angles + 1.0, atol=1e-5)
    np.testing.assert_allclose(again.shifts_px, shifts - 0.5, atol=1e-5)
    assert list(again.particles["rlnImageName"]) == list(table.particles["rlnImageName"])
    # the same table as CSV, with offsets in pixels (older RELION names)
    csv = tmp_path / "p.csv"
    csv.write_text("rlnAngleRot,rlnAngleTilt,rlnAnglePsi,rlnOriginX,rlnOriginY\n"
                   + "\n".join(",".join(f"{v:.6f}" for v in (*a, *s)) for a, s in zip(angles, shifts)))
    from_csv = particles.read_parameters(csv, n, pixel, need_ctf=False)
    np.testing.assert_allclose(from_csv.shifts_px, shifts, atol=1e-5)


def test_command_refines_simulated_data_and_writes_products(tmp_path, home, run_xpr):
    settings = write_settings(tmp_path / "sim.yaml", merged(TINY, {
        "structure_name": "tiny", "input": {"simulate": {"n_images": 60, "box": 24, "snr": 4.0, "n_blobs": 6}}}))
    result = run_xpr(["-q", "em", "local_ali3d", settings])
    assert result.exit_code == 0, result.output
    main = home / "data/em/local_ali3d/tiny.h5"
    run = main.resolve().parent
    with h5py.File(main, "r") as f:
        volume, truth = f["reference"][()], f["phantom"][()]
        rot = f["parameters/rot_deg"][()]
        before, after = f["criterion/ccc_before"][()], f["criterion/ccc_after"][()]
        res0143 = f["fsc/resolution_0143_A"][()]
    assert np.corrcoef(volume.ravel(), truth.ravel())[0, 1] > 0.85
    assert np.all(after >= before)
    assert 2.0 <= res0143 <= 24.0
    for name in ("refined_parameters.star", "refined_parameters_it01.star", "fsc/fsc_it01.txt", "fsc/fsc_it01.png",
                 "volumes/volume_it01.mrc", "volumes/reference_it01.mrc", "volumes/volumes_it01.h5",
                 "criterion.txt", "simulated/stack.mrcs", "simulated/true_parameters.star"):
        assert (run / name).is_file(), name
    table = particles.read_parameters(run / "refined_parameters.star", 60, None, need_ctf=False)
    np.testing.assert_allclose(table.angles[:, 0], rot, atol=1e-4)
    assert "0.143" in (run / "fsc/fsc_it01.txt").read_text()


def write_stack_and_table(tmp_path, images, n_rows):
    np.save(tmp_path / "stack.npy", images)
    rng = np.random.default_rng(1)
    particles.write_parameters(tmp_path / "p.star", None, rng.uniform(0, 90, (n_rows, 3)), np.zeros((n_rows, 2)), 1.0)
    return tmp_path / "stack.npy", tmp_path / "p.star"


@pytest.mark.parametrize("case, expected", [
    ("non_square", "square"),
    ("length", "rows"),
    ("symmetry", "alignment.sym"),
    ("ctf_columns", "rlnDefocusU"),
    ("function", "reference.function"),
    ("prior_without_likelihood", "alignment.sigma_angle"),
])
def test_bad_input_is_refused_with_exit_2(tmp_path, home, run_xpr, case, expected):
    # noise images: an all-zero stack is itself refused (no signal) before these checks
    noise = np.random.default_rng(0).normal(size=(10, 24, 24)).astype(np.float32)
    images = noise[:, :, :20] if case == "non_square" else noise
    stack, table = write_stack_and_table(tmp_path, images, 12 if case == "length" else 10)
    tree = merged(TINY, {"structure_name": "bad", "input": {"stack": str(stack), "parameters": str(table)}})
    if case == "symmetry":
        tree["alignment"]["sym"] = "q7"
    if case == "ctf_columns":
        tree["alignment"]["CTF"] = "wiener"
    if case == "function":
        tree["reference"] = {"function": "no_such_module:prepare"}
    if case == "prior_without_likelihood":
        tree["alignment"].update(sigma_angle=3.0, criterion="ccc")
    result = run_xpr(["em", "local_ali3d", write_settings(tmp_path / "bad.yaml", tree)])
    assert result.exit_code == 2, result.output
    assert expected in result.output


def test_stack_and_star_files_with_known_truth(tmp_path, home, run_xpr):
    """A user's stack (MRC, 2 Å pixels) and STAR table (offsets in Å): the offsets come back to within
    a fraction of a pixel of the truth — only if Å and pixels are converted the right way round."""
    rng = np.random.default_rng(2)
    data = phantom.simulate(rng, 100, 24, n_blobs=6, snr=0.0, angle_error_deg=3.0, shift_error_px=1.0)
    particles.write_mrc(tmp_path / "stack.mrcs", data.images, 2.0, stack=True)
    particles.write_parameters(tmp_path / "start.star", None, data.start_angles, data.start_shifts, 2.0)
    particles.write_parameters(tmp_path / "true.star", None, data.true_angles, data.true_shifts, 2.0)
    tree = merged(TINY, {"structure_name": "files", "alignment": {"maxit": 1, "max_evaluations": 100, "center": "average"},
                         "input": {"stack": str(tmp_path / "stack.mrcs"), "parameters": str(tmp_path / "start.star"),
                                   "true_parameters": str(tmp_path / "true.star")}})
    result = run_xpr(["-q", "em", "local_ali3d", write_settings(tmp_path / "files.yaml", tree)])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/local_ali3d/files.h5", "r") as f:
        angular = f["criterion/angular_error_deg"][()]
        shift = f["criterion/shift_error_px"][()]
        pixel = f["pixel_size_A"][()]
    assert pixel == pytest.approx(2.0)
    start_angular, start_shift = parameter_errors(data.start_angles, data.start_shifts,
                                                  (data.true_angles, data.true_shifts), np.eye(3)[None])
    assert shift[-1] < 0.3 * start_shift
    assert angular[-1] < start_angular + 0.5


def test_star_file_naming_images_in_several_stacks(tmp_path, home, run_xpr):
    """rlnImageName `12@a.mrcs`, `3@b.mrcs`: rows point into two stacks in shuffled order; the images
    are gathered row by row (exactly: each one is identified by its own values), and the refinement
    recovers the shifts as with one stack."""
    rng = np.random.default_rng(4)
    data = phantom.simulate(rng, 60, 24, n_blobs=6, snr=0.0, angle_error_deg=2.0, shift_error_px=1.0)
    order = rng.permutation(60)                       # row r of the table is image order[r]
    in_a, in_b = order[:35], order[35:]
    particles.write_mrc(tmp_path / "a.mrcs", data.images[np.sort(in_a)][::-1], 2.0, stack=True)
    (tmp_path / "sub").mkdir()
    particles.write_mrc(tmp_path / "sub" / "b.mrcs", data.images[np.sort(in_b)], 2.0, stack=True)
    names = []
    for image in order:
        if image in in_a:
            names.append(f"{len(in_a) - int(np.searchsorted(np.sort(in_a), image))}@a.mrcs")
        else:
            names.append(f"{int(np.searchsorted(np.sort(in_b), image)) + 1}@sub/b.mrcs")
    start = particles.write_parameters(tmp_path / "start.star", None, data.start_angles[order],
                                       data.start_shifts[order], 2.0)
    true = particles.write_parameters(tmp_path / "true.star", None, data.true_angles[order],
                                      data.true_shifts[order], 2.0)
    for path in (start, true):
        import starfile

        blocks = starfile.read(path, always_dict=True)
        blocks["particles"]["rlnImageName"] = names
        starfile.write(blocks, path, overwrite=True)
    stack = particles.read_named_images(names, start)
    np.testing.assert_array_equal(stack.images, data.images[order])
    assert stack.pixel_size_A == pytest.approx(2.0)
    tree = merged(TINY, {"structure_name": "multi", "alignment": {"maxit": 1, "max_evaluations": 100,
                                                                  "center": "average"},
                         "input": {"parameters": str(start), "true_parameters": str(true)}})
    result = run_xpr(["-q", "em", "local_ali3d", write_settings(tmp_path / "multi.yaml", tree)])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/local_ali3d/multi.h5", "r") as f:
        shift = f["criterion/shift_error_px"][()]
    start_shift = parameter_errors(data.start_angles, data.start_shifts, (data.true_angles, data.true_shifts),
                                   np.eye(3)[None])[1]
    assert shift[-1] < 0.5 * start_shift
    # a name beyond its stack, a missing stack: exit 2 naming the row
    for bad, expected in ((f"{len(in_a) + 1}@a.mrcs", "asks for image"), ("1@nowhere.mrcs", "not found")):
        blocks = starfile.read(start, always_dict=True)
        blocks["particles"].loc[0, "rlnImageName"] = bad
        broken = tmp_path / "broken.star"
        starfile.write(blocks, broken, overwrite=True)
        tree["input"]["parameters"] = str(broken)
        result = run_xpr(["em", "local_ali3d", write_settings(tmp_path / "broken.yaml", tree)])
        assert result.exit_code == 2, result.output
        assert expected in result.output
