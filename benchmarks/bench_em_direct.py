"""Direct 4D-STEM methods (dpc, wdd, tcbf): time relative to an FFT pair, and fidelity vs truth.

Data: `xpr.em.ptychography.simulate_4dstem.simulate` — MoS2 (2 slices), 200 kV, 25 mrad, 64² detector, scan
32 × 32 at 0.3 Å (the direct methods want a scan step near the Nyquist step of the aperture,
λ/(4α) ≈ 0.25 Å for WDD), 25 000 e/pattern, defocus 0 Å (dpc, wdd, ssb) and 60 Å (ssb, tcbf).

Printed, measured in this run: wall time of each method divided by the time of one batched
complex64 forward + inverse 2-D FFT over all patterns (the unit of work of one ptychography
epoch), and the correlation of each phase with the true projected phase on the same grid.
Never pass/fail on time.

    python benchmarks/bench_em_direct.py [--scan 32] [--repeat 3]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy.ndimage import map_coordinates

from xpr import backend as backends
from xpr.em.ptychography import dpc, tcbf, wdd
from xpr.em.ptychography.calibration import Experiment
from xpr.em.ptychography.simulate_4dstem import simulate


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def truth_on_scan_grid(sim, experiment, upsample=1):
    ny, nx = experiment.scan_size
    gy, gx = np.meshgrid(np.arange(ny * upsample) / upsample, np.arange(nx * upsample) / upsample,
                         indexing="ij")
    theta = math.radians(experiment.pl_rotation_deg)
    x = (math.cos(theta) * gx - math.sin(theta) * gy) * experiment.scan_step_A
    y = (math.sin(theta) * gx + math.cos(theta) * gy) * experiment.scan_step_A
    origin = experiment.scan_positions_A.min(axis=0)
    half = experiment.pattern_shape[0] // 2
    rows = (y - origin[0]) / experiment.pixel_size_A + half + sim["true_phase_corner_px"][0]
    cols = (x - origin[1]) / experiment.pixel_size_A + half + sim["true_phase_corner_px"][1]
    return map_coordinates(sim["true_phase"], [rows.ravel(), cols.ravel()], order=1).reshape(rows.shape)


def correlation(a, b):
    a = np.ravel(a) - np.mean(a)
    b = np.ravel(b) - np.mean(b)
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    backend = backends.cpu()
    scan = (args.scan, args.scan)
    common = dict(crystal="MoS2", scan_size=scan, scan_step_A=0.3, detector_size=64,
                  pixel_size_A=0.3, electrons_per_pattern=25000.0, backend=backend)
    focused = simulate(defocus=0.0, **common)
    defocused = simulate(defocus=60.0, **common)

    patterns = backend.asarray(focused["data"], dtype=np.complex64)
    fft_pair, _ = best_time(lambda: backend.ifftn(backend.fftn(patterns, axes=(-2, -1)), axes=(-2, -1)),
                            args.repeat)
    print(f"data: {scan[0]}x{scan[1]} scan, {focused['data'].shape[1]}² detector; "
          f"FFT pair over all patterns: {fft_pair * 1e3:.1f} ms")
    print(f"{'method':8s} {'time / FFT pair':>16s} {'r vs truth':>11s}  notes")
    for name, sim in (("dpc", focused), ("wdd", focused), ("ssb", focused), ("ssb", defocused),
                      ("tcbf", defocused)):
        settings = dict(sim["calibration"], data_pad=0)
        experiment = Experiment.from_settings(settings, sim["data"])
        if name == "dpc":
            seconds, out = best_time(lambda: dpc.reconstruct(experiment, backend), args.repeat)
            r, note = correlation(out["phase"], truth_on_scan_grid(sim, experiment)), ""
        elif name in ("wdd", "ssb"):
            seconds, out = best_time(lambda: wdd.reconstruct(experiment, backend, method=name),
                                     args.repeat)
            truth = truth_on_scan_grid(sim, experiment)
            r = correlation(out["phase"], truth)
            note = (f"defocus {sim['calibration']['defocus']:.0f} Å, "
                    f"rms phase {out['phase'].std():.3f} / true {truth.std():.3f} rad")
        else:
            blind = Experiment.from_settings(dict(settings, defocus=0.0), sim["data"])
            seconds, out = best_time(lambda: tcbf.reconstruct(blind, backend, upsample=2), args.repeat)
            truth = truth_on_scan_grid(sim, blind, upsample=2)
            inner = (slice(4, -4), slice(4, -4))
            r = correlation(out["phase"][inner], truth[inner])
            note = f"defocus fitted {out['defocus_A']:.1f} Å (true 60.0)"
        print(f"{name:8s} {seconds / fft_pair:16.1f} {r:11.3f}  {seconds:.3f} s {note}")


if __name__ == "__main__":
    main()
