"""Measured peak memory of `cdi simulate`, `cdi phase2d/phase3d` and the fxs commands against
their estimates (xpr.memory; xpr/fxs/memory_plan.py).

Each case runs the command in a fresh subprocess under tracemalloc (numpy's array buffers are
traced) and reads its peak, and its peak resident set (ru_maxrss); the peaks of the same command
on a tiny case (the interpreter, the libraries) are subtracted, so `measured` is the working
memory the estimate predicts. Prints estimate / measured (traced, and RSS) per case.

The fxs cases (`--fxs`, or `--only-fxs`) run a tiny case of the same command first in the same
child, untraced (its imports), and compare the estimate of the largest stage -- which counts the
arrays held there, and for reconstruct/average the figures -- with the whole traced peak.

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--fxs | --only-fxs]
"""
from __future__ import annotations

import argparse
import os
import resource
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
            memory_plan.average(memory_plan.h5_bytes(data), 3, 64, 16, 50, 25, n).bytes(n), measured)


def simulate_case(home, env, dims, shape, max_phase=0.0):
    args = ["-q", "cdi", "simulate", "tutorial", "-o", f"dimensions={dims}", "-o", f"shape={shape}",
            "-o", f"structure_name=m{dims}_{shape}", "-o", f"object.max_phase={max_phase}"]
    return peak_of(args, env)


def phase_case(home, env, dims, shape, repeats, batch=None, iters="20HIO 10ER"):
    """Phase the simulated pattern m{dims}_{shape} (made first) with one batch of repeats."""
    command = "phase2d" if dims == 2 else "phase3d"
    args = ["-q", "cdi", command, "tutorial", "-o", f"structure_name=m{dims}_{shape}",
            "-o", f"phasing.repeats={repeats}", "-o", f"phasing.iters={iters}",
            "-o", "multi_process.engine=serial", "-o", f"multi_process.batch_size={batch or repeats}"]
    return peak_of(args, env)


def main():
    from xpr import memory
    from xpr import memory as estimates

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fxs", action="store_true", help="also the fxs commands")
    parser.add_argument("--only-fxs", action="store_true", help="the fxs commands alone")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        env = dict(os.environ, XPR_HOME=str(home))
        subprocess.run([sys.executable, "-m", "xpr", "--setup_home", str(home)], env=env,
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
            measured = phase_case(home, env, dims, shape, repeats, batch) - phase_base[dims]
            est = estimates.cdi_phase((shape,) * dims, repeats, 1).bytes(batch)
            row(f"phase{dims}d {shape}, {repeats} repeats in batches of {batch}", est, measured)
        print(f"estimate / traced peak: {min(ratios):.2f} .. {max(ratios):.2f} over {len(ratios)} cases")
        print(f"this machine may use: {memory.available()}")


if __name__ == "__main__":
    main()
