"""Measured peak memory of `cdi simulate`, `cdi phase2d/phase3d` and the fxs commands against
their estimates (xpr.memory; xpr/fxs/memory_plan.py).

Each case runs the command in a fresh subprocess under tracemalloc (numpy's array buffers are
traced) and reads its peak, and its peak resident set (ru_maxrss); the peaks of the same command
on a tiny case (the interpreter, the libraries) are subtracted, so `measured` is the working
memory the estimate predicts. Prints estimate / measured (traced, and RSS) per case.

The fxs cases (`--fxs`, or `--only-fxs`) run a tiny case of the same command first in the same
child, untraced (its imports), and compare the estimate of the largest stage -- which counts the
arrays held there, and for reconstruct/average the figures -- with the whole traced peak.

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--em]   (--em: the em commands)
    .venv/bin/python benchmarks/bench_memory.py [--quick] [--fxs | --only-fxs]   (cdi and fxs / fxs alone)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MB = 1024 ** 2


def peak_of(args, env):
    """(peak traced bytes, peak RSS bytes) of `xpr args` run in a fresh child under tracemalloc
    (numpy's array buffers are traced; the RSS also holds the interpreter and libraries)."""
    code = ("import resource, sys, tracemalloc\n"
            "from click.testing import CliRunner\n"
            "from xpr.cli import main\n"
            "tracemalloc.start()\n"
            "r = CliRunner().invoke(main, sys.argv[1:], catch_exceptions=False)\n"
            "print(tracemalloc.get_traced_memory()[1], "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, r.exit_code)\n")
    out = subprocess.run([sys.executable, "-c", code] + list(args), env=env, capture_output=True,
                         text=True, check=True)
    traced, rss, rc = out.stdout.split()[-3:]
    if rc != "0":
        raise RuntimeError(f"xpr {' '.join(args)} exited {rc}: {out.stderr[-2000:]}")
    return np.array([int(traced), int(rss)])


def warm_peak_of(warm, args, env):
    """(peak traced bytes, peak RSS bytes) of `xpr args` in a fresh child, after an untraced run
    of `xpr warm` in the same child (the command's imports, font caches)."""
    code = ("import json, resource, sys, tracemalloc\n"
            "from click.testing import CliRunner\n"
            "from xpr.cli import main\n"
            "warm, args = json.loads(sys.argv[1])\n"
            "assert CliRunner().invoke(main, warm).exit_code == 0\n"
            "tracemalloc.start()\n"
            "r = CliRunner().invoke(main, args, catch_exceptions=False)\n"
            "print(tracemalloc.get_traced_memory()[1], "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, r.exit_code)\n")
    import json

    out = subprocess.run([sys.executable, "-c", code, json.dumps([list(map(str, warm)), list(map(str, args))])],
                         env=env, capture_output=True, text=True, check=True)
    traced, rss, rc = out.stdout.split()[-3:]
    if rc != "0":
        raise RuntimeError(f"xpr {' '.join(map(str, args))} exited {rc}: {out.stderr[-2000:]}")
    return np.array([int(traced), int(rss)])


def fxs_cases(home, env, quick, row):
    """The fxs commands: estimate (memory_plan) / traced peak of its run."""
    import h5py
    import yaml

    from xpr import memory
    from xpr.fxs import memory_plan

    folder = home.parent

    def settings(name, tree):
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    def model(dims):
        return {"dimensions": dims, "shapes": {"types": ["sphere"], "centers": [[0, 0, 0][:dims]], "sizes": [50],
                                               "densities": [1], "random_orientation": [False]}}

    for dims, n in ([(2, 256)] if quick else [(2, 256), (3, 128), (3, 256)]):
        sim = settings(f"sim{dims}_{n}", {"structure_name": f"m{dims}_{n}", **model(dims), "grid": {"n_radial_points": n}})
        tiny = settings(f"tiny{dims}", {"structure_name": f"t{dims}", **model(dims), "grid": {"n_radial_points": 8}})
        band = memory_plan.intensity_band(0.3, 50.0, 24, dims)
        measured = warm_peak_of(["-q", "fxs", "simulate_ccd", tiny], ["-q", "fxs", "simulate_ccd", sim], env)
        row(f"fxs simulate_ccd {dims}-D {n} q, L 24", memory_plan.simulate_ccd(n, 24, dims, band=band).bytes(), measured)
        extract = ["-q", "fxs", "extract", "tutorial", "-o", f"dimensions={dims}", "-o"]
        measured = warm_peak_of(extract + [f"structure_name=t{dims}"], extract + [f"structure_name=m{dims}_{n}"], env)
        row(f"fxs extract {dims}-D {n} q, L 24",
            memory_plan.extract(n, 50, 24, dims, file_invariants=16 * 25 * n * n).bytes(), measured)

    rng = np.random.default_rng(0)
    side = 512
    with h5py.File(folder / "patterns.h5", "w") as f:
        f.create_dataset("data", data=rng.poisson(5.0, (4, side, side)).astype(np.float32) + 1, chunks=(1, side, side))
    (folder / "patterns.txt").write_text(f"{folder / 'patterns.h5'}\n")
    detector = {"image_dimensions": [side, side], "pixel_size": 200.0, "sample_distance": 800.0,
                "wavelength": 1.23984, "detector_origin": [(side - 1) / 2, (side - 1) / 2]}
    for n, n_phi in ([(128, 128)] if quick else [(8, 16), (128, 128), (64, 512)]):
        cor = settings(f"cor{n}_{n_phi}", {"structure_name": f"c{n}", "input": {"pattern_list": str(folder / "patterns.txt")},
                                           "detector": detector, "grid": {"max_q": 0.1, "n_radial_points": n},
                                           "n_angular_points": n_phi, "chunk_size": 2, "multi_process": {"engine": "serial"}})
        warm = ["-q", "fxs", "correlate", cor, "-o", "grid.n_radial_points=4", "-o", "n_angular_points=8"]
        measured = warm_peak_of(warm, ["-q", "fxs", "correlate", cor], env)
        row(f"fxs correlate {n} q x {n_phi} angles, {side}² frames",
            memory_plan.correlate(n, n_phi, side * side, frame_itemsize=4).bytes(), measured)

    sim = settings("sim_rec", {"structure_name": "r", **model(3), "grid": {"n_radial_points": 64}})
    subprocess.run([sys.executable, "-m", "xpr", "-q", "fxs", "simulate_ccd", sim, "extract", "tutorial",
                    "-o", "structure_name=r"], env=env, check=True, capture_output=True)
    schedule = {"sub_loops": {"order": ["main"], "main": {"iterations": 1, "order": ["HIO", "SW", "ER"], "methods": {
        "HIO": {"iterations": 3}, "SW": {"iterations": 1}, "ER": {"iterations": 2}}}}}
    rec = settings("rec", {"structure_name": "r", "particle_radius": 60.0, "n_reconstructions": 8,
                           "main_loop": schedule, "multi_process": {"engine": "serial"}})
    warm = ["-q", "fxs", "reconstruct", rec, "-o", "n_reconstructions=1", "-o", "structure_name=r"]
    for batch in ([8] if quick else [8, 2]):
        measured = warm_peak_of(warm, ["-q", "fxs", "reconstruct", rec, "-o", f"multi_process.batch_size={batch}"], env)
        row(f"fxs reconstruct 8 of 50x25x64, batches of {batch}",
            memory_plan.reconstruct(3, 64, 16, 50, 25, 8).bytes(batch), measured)
    data = home / "data" / "fxs" / "reconstructions" / "3d_r.h5"
    average = ["-q", "fxs", "average", "tutorial", "-o", "structure_name=r", "-o"]
    for n in ([8] if quick else [8, 2]):
        measured = warm_peak_of(average + ["selection.n_reconstructions=1"],
                                average + [f"selection.n_reconstructions={n}"], env)
        row(f"fxs average {n} of 50x25x64",
            memory_plan.average(memory.h5_bytes(data), 3, 64, 16, 50, 25, n).bytes(n), measured)


def simulate_case(home, env, dims, shape, max_phase=0.0):
    args = ["-q", "cdi", "simulate", "tutorial", "-o", f"dimensions={dims}", "-o", f"shape={shape}",
            "-o", f"structure_name=m{dims}_{shape}", "-o", f"object.max_phase={max_phase}"]
    return peak_of(args, env)


def phase_case(home, env, dims, shape, repeats, batch=None, iters="20HIO 10ER 5ML", generations=1):
    """Phase the simulated pattern m{dims}_{shape} (made first) in batches of `batch` repeats;
    generations > 1: the genetic algorithm (the default of the tutorial settings), 1: a plain run."""
    command = "phase2d" if dims == 2 else "phase3d"
    args = ["-q", "cdi", command, "tutorial", "-o", f"structure_name=m{dims}_{shape}",
            "-o", f"phasing.repeats={repeats}", "-o", f"phasing.iters={iters}",
            "-o", "multi_process.engine=serial", "-o", f"multi_process.batch_size={batch or repeats}",
            "-o", f"ga.generations={generations}", "-o", "ga.iters=10ER 5ML",
            # shrink-wrap early and often, so that the short schedule passes every stage a default
            # run pays for (HIO, shrink-wrap, ER, ML); tests/test_memory.py measures the same
            "-o", "phasing_parameters.shrink_wrap.start=10", "-o", "phasing_parameters.shrink_wrap.every=10"]
    return peak_of(args, env)


def main():
    from xpr import memory
    from xpr import memory as estimates

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--em", action="store_true", help="the em commands (instead of cdi)")
    parser.add_argument("--fxs", action="store_true", help="also the fxs commands")
    parser.add_argument("--only-fxs", action="store_true", help="the fxs commands alone")
    opts = parser.parse_args()
    if opts.em:
        return em_main(opts.quick)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        env = dict(os.environ, XPR_HOME=str(home))
        subprocess.run([sys.executable, "-m", "xpr", "--setup_home", str(home)],
                       env=dict(env, HOME=tmp),                       # not the user's ~/.xpr
                       check=True, capture_output=True)
        def row(name, est, measured):
            ratios.append(est / measured[0])
            print(f"{name:40s} {est / MB:12.0f} {measured[0] / MB:10.0f} {est / measured[0]:6.2f} "
                  f"{measured[1] / MB:8.0f} {est / measured[1]:6.2f}", flush=True)
        ratios = []
        header = f"{'case':40s} {'estimate MB':>12s} {'traced MB':>10s} {'ratio':>6s} {'RSS MB':>8s} {'ratio':>6s}"
        if opts.fxs or opts.only_fxs:
            print(header)
            fxs_cases(home, env, opts.quick, row)
            print(f"fxs: estimate / traced peak {min(ratios):.2f} .. {max(ratios):.2f} over {len(ratios)} cases")
            if opts.only_fxs:
                print(f"this machine may use: {memory.available()}")
                return
            ratios = []
        base = {dims: simulate_case(home, env, dims, 16) for dims in (2, 3)}
        print(f"baseline (tiny simulate, traced / RSS): {base[3][0] / MB:.0f} / {base[3][1] / MB:.0f} MB")
        print(header)
        sims = [(2, 512), (2, 1024), (3, 96), (3, 128)] if not opts.quick else [(2, 1024), (3, 96)]
        for dims, shape in sims:
            measured = simulate_case(home, env, dims, shape) - base[dims]
            row(f"simulate {dims}-D {shape}", estimates.cdi_simulate((shape,) * dims).bytes(), measured)
        phase_base = {2: phase_case(home, env, 2, 16, 1), 3: phase_case(home, env, 3, 16, 1)}
        cases = [(2, 1024, 1, 1), (2, 1024, 8, 8), (2, 512, 16, 4), (2, 512, 16, 16),
                 (3, 96, 1, 1), (3, 96, 8, 8), (3, 96, 8, 2), (3, 128, 3, 3)]
        if opts.quick:
            cases = [(2, 1024, 8, 8), (3, 96, 8, 2)]
        for dims, shape, repeats, batch in cases:
            for generations in (1, 3):          # a plain run; the genetic algorithm (the default)
                measured = phase_case(home, env, dims, shape, repeats, batch,
                                      generations=generations) - phase_base[dims]
                est = estimates.cdi_phase((shape,) * dims, repeats, 1, generations=generations).bytes(batch)
                row(f"phase{dims}d {shape}, {repeats} in batches of {batch}, {generations} gen.", est, measured)
        print(f"estimate / traced peak: {min(ratios):.2f} .. {max(ratios):.2f} over {len(ratios)} cases")
        print(f"this machine may use: {memory.available()}")



# ---------------------------------------------------------------------------------------------
# em commands (estimates beside their workers: xpr/em/ptychography/memory_estimate.py,
# xpr/em/tie/memory_estimate.py, xpr/em/ali3d/memory_estimate.py)

def write_em_scan(path, scan, detector, offset_px=3):
    """A (scan, scan, detector, detector) float32 4D-STEM scan: a bright-field disk of radius
    detector / 5 off the centre by offset_px (calibration rolls it back), tilted by a smooth
    phase gradient."""
    y, x = np.mgrid[:scan, :scan] / scan
    g_y, g_x = np.cos(2 * np.pi * x), np.sin(2 * np.pi * y)
    k = np.arange(detector, dtype=np.float32) - detector // 2
    ky, kx = np.meshgrid(k - offset_px, k - offset_px, indexing="ij")
    disk = (np.hypot(ky, kx) <= detector / 5).astype(np.float32) * 100.0
    np.save(path, (disk * (1 + 0.02 * (ky * g_y[..., None, None] + kx * g_x[..., None, None]))).astype(np.float32))
    conv_mrad = detector / 5 * 0.05 * 0.02508 * 1e3
    settings = Path(str(path).replace(".npy", ".yaml"))
    settings.write_text(f"structure_name: s{scan}_{detector}\nexperiment:\n  data_path: {path}\n"
                        "  acc_voltage: 200.0\n  rez_pixel_size_A: 0.05\n  scan_step_A: 0.5\n"
                        f"  PLRotation_deg: 0.0\n  conv_semiangle_mrad: {conv_mrad}\nGPU:\n  use: false\n")
    return str(settings)


def em_settings(command, args):
    """The resolved settings of `xpr em command args` (settings name/path then -o overrides)."""
    from xpr import registry
    from xpr.runner import prepare

    spec = registry.find("em", command)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "-o"]
    return prepare(spec, args[0], overrides).resolved.settings


def em_rows(quick, row):
    """Estimate / traced peak of the em commands at a few sizes (each less a tiny run of the same
    command), printed through row(name, estimate, measured)."""
    from xpr.em.ali3d import memory_estimate as ali3d
    from xpr.em.ptychography import memory_estimate as stem
    from xpr.em.tie import memory_estimate as focal

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        env = dict(os.environ, XPR_HOME=str(home))
        os.environ["XPR_HOME"] = str(home)
        subprocess.run([sys.executable, "-m", "xpr", "--setup_home", str(home)], env=env,
                       check=True, capture_output=True)

        def measured(command, tiny, big):
            return peak_of(["-q", "em", command] + big, env) - peak_of(["-q", "em", command] + tiny, env)

        sim = ["tutorial", "-o", "experiment.detector_size=64"]
        cases = [(32, 128), (32, 16), (48, 16)] if not quick else [(32, 16)]
        for scan, batch in cases:
            big = sim + ["-o", f"experiment.scan_size=[{scan},{scan}]", "-o", f"simulation.batch_size={batch}"]
            est = stem.simulate_4dstem(em_settings("simulate_4dstem", big)).bytes(batch)
            row(f"simulate_4dstem {scan}² x 64², batch {batch}", est,
                measured("simulate_4dstem", sim + ["-o", "experiment.scan_size=[2,2]"], big))
        sizes = [(32, 64), (48, 64), (24, 96)] if not quick else [(32, 64)]
        for command in ("dpc", "wdd", "tcbf"):
            for scan, detector in sizes:
                tiny = write_em_scan(Path(tmp) / f"t{detector}.npy", 4, detector)
                big = write_em_scan(Path(tmp) / f"b{scan}_{detector}.npy", scan, detector)
                settings = em_settings(command, [big])
                n = scan * scan
                batch = stem.wanted_chunk(command, n, settings, detector ** 2)
                est = stem.direct_in_memory(command, n, (detector, detector), settings).bytes(batch)
                row(f"{command} {scan}² x {detector}² read whole", est, measured(command, [tiny], [big]))
        for n, images in ([(256, 3), (512, 3), (256, 5)] if not quick else [(256, 3)]):
            defocus = "[-5e-6,0,5e-6]" if images == 3 else "[-5e-6,-2e-6,0,2e-6,5e-6]"
            common = ["tutorial", "-o", f"imaging.defocus_m={defocus}"]
            big = common + ["-o", f"imaging.image_size={n}", "-o", f"structure_name=f{n}_{images}"]
            tiny = common + ["-o", "imaging.image_size=32", "-o", f"structure_name=t{images}"]
            est = focal.simulate_focal(em_settings("simulate_focal", big)).bytes()
            row(f"simulate_focal {images} x {n}² (and flip series)", est, measured("simulate_focal", tiny, big))
            row(f"tie {images} x {n}² (and its flip series)", focal.tie(images, (n, n), flipped=True).bytes(),
                measured("tie", ["tutorial", "-o", f"structure_name=t{images}"],
                         ["tutorial", "-o", f"structure_name=f{n}_{images}"]))
        common = ["tutorial", "-o", "alignment.maxit=1", "-o", "multi_process.engine=serial"]
        tiny = common + ["-o", "input.simulate.n_images=20", "-o", "input.simulate.box=16"]
        for n, box in ([(100, 32), (100, 48)] if not quick else [(100, 32)]):
            big = common + ["-o", f"input.simulate.n_images={n}", "-o", f"input.simulate.box={box}"]
            row(f"local_ali3d {n} x {box}², serial", ali3d.local_ali3d(n, box).bytes(1),
                measured("local_ali3d", tiny, big))



def em_main(quick):
    ratios = []

    def row(name, est, measured):
        ratios.append(est / measured[0])
        rss = f"{est / measured[1]:6.2f}" if measured[1] > 0 else "     -"   # RSS rise hidden by freed pages
        print(f"{name:40s} {est / MB:12.0f} {measured[0] / MB:10.0f} {est / measured[0]:6.2f} "
              f"{measured[1] / MB:8.0f} {rss}", flush=True)
    print(f"{'case':40s} {'estimate MB':>12s} {'traced MB':>10s} {'ratio':>6s} {'RSS MB':>8s} {'ratio':>6s}")
    em_rows(quick, row)
    print(f"em: estimate / traced peak: {min(ratios):.2f} .. {max(ratios):.2f} over {len(ratios)} cases")


if __name__ == "__main__":
    main()
