"""Measured peak memory of `cdi simulate` and `cdi phase2d/phase3d` against xpr.memory's estimate.

Each case runs the command in a fresh subprocess under tracemalloc (numpy's array buffers are
traced) and reads its peak, and its peak resident set (ru_maxrss); the peaks of the same command
on a tiny case (the interpreter, the libraries) are subtracted, so `measured` is the working
memory the estimate predicts. Prints estimate / measured (traced, and RSS) per case.

    .venv/bin/python benchmarks/bench_memory.py [--quick]
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
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        env = dict(os.environ, XPR_HOME=str(home))
        subprocess.run([sys.executable, "-m", "xpr", "--setup_home", str(home)], env=env,
                       check=True, capture_output=True)
        base = {dims: simulate_case(home, env, dims, 16) for dims in (2, 3)}
        print(f"baseline (tiny simulate, traced / RSS): {base[3][0] / MB:.0f} / {base[3][1] / MB:.0f} MB")
        print(f"{'case':40s} {'estimate MB':>12s} {'traced MB':>10s} {'ratio':>6s} {'RSS MB':>8s} {'ratio':>6s}")

        def row(name, est, measured):
            ratios.append(est / measured[0])
            print(f"{name:40s} {est / MB:12.0f} {measured[0] / MB:10.0f} {est / measured[0]:6.2f} "
                  f"{measured[1] / MB:8.0f} {est / measured[1]:6.2f}")
        ratios = []
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
