"""Benchmark of `xpr em tie`'s registration on misaligned focal series (issue 19).

Each case is simulated twice with `xpr em simulate_focal` — aligned, and with the defocused images
misaligned as a stage does (rotation, magnification and shift drawn uniformly within the stated
bounds) — and retrieved with `xpr em tie` (TIE + 50 GS–Misell sweeps) on the aligned series, on
the misaligned one unregistered, registered with the correlation estimates alone
(`registration.refine: none`) and registered with the default settings (the correlation
estimates refined jointly on the series misfit). Printed, measured in this run: the rms phase
errors (rad), the ratio registered / aligned, and the time of the registration over the time of
the retrieval that follows it in the same run (`registration_seconds / retrieval_seconds` of
tie.h5; the retrieval is the TIE and 50 GS–Misell sweeps), for both registrations. `--seeds` draws other specimens (particles), noise and misalignments of the same class.
`--resampling` times instead the band-limited resampling of one image (shift, magnification and
rotation, `focal_series.undo_similarity`) over one FFT pair of its size, with the interpolation
matrix in closed form (as `tie` does) and as the explicit product of the two DFT matrices it
replaced, and prints their largest difference.
Runs in a temporary xpr home; never pass/fail on time.

    python benchmarks/bench_em_tie_registration.py [--quick] [--seeds 3 4 5] [--cases sphere ...]
    python benchmarks/bench_em_tie_registration.py --resampling
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from timing import best_of, fft_pair_seconds
from xpr.em.tie import focal_series

CASES = {   # name: (simulate_focal settings, misalignment bounds, seed of the issue-19 figures)
    "sphere": ("imaging: {image_size: 256, pixel_size_m: 5.0e-10, defocus_m: [-5.0e-6, 0.0, 5.0e-6]}\n"
               "specimen: {radius_m: 2.0e-8}\n", "rotation_deg: 0.4, scale: 0.004, shift_px: 3.0", 0),
    "particles": ("imaging: {image_size: 128, pixel_size_m: 1.0e-9, defocus_m: [-5.0e-6, 0.0, 5.0e-6]}\n"
                  "specimen: {kind: particles, radius_m: 1.2e-8, particles: {count: 5}}\n",
                  "rotation_deg: 0.5, scale: 0.004, shift_px: 3.0", 3),
    "absorbing": ("imaging: {image_size: 128, pixel_size_m: 1.0e-9, defocus_m: [-2.0e-6, 0.0, 2.0e-6]}\n"
                  "specimen: {kind: particles, radius_m: 1.2e-8, absorption_potential_V: 3.0, "
                  "particles: {count: 5}}\n", "rotation_deg: 2.0, scale: 0.01, shift_px: 3.0", 3),
}


def xpr(home, *arguments):
    environment = dict(os.environ, XPR_HOME=str(home))
    subprocess.run([sys.executable, "-m", "xpr", "-q", *map(str, arguments)], check=True, env=environment,
                   capture_output=True)


def dft_product_matrix(n, positions):
    """The interpolation matrix as the product of the two DFT matrices (the former form)."""
    frequencies = np.fft.fftfreq(n)
    matrix = np.exp(2j * np.pi * np.outer(positions, frequencies)) @ np.exp(
        -2j * np.pi * np.outer(frequencies, np.arange(n)))
    return matrix.real / n


def resampling_ratios():
    print(f"{'size':>6s} {'undo / FFT pair (closed form)':>30s} {'(DFT product)':>14s} "
          f"{'matrix only: closed / product':>30s} {'max |difference|':>17s}")
    for n in (128, 256, 512):
        image = np.random.default_rng(0).random((n, n))
        centre = (n - 1) / 2.0
        positions = 0.997 * (np.arange(n) - centre) + centre
        fft = fft_pair_seconds(image.astype(np.complex128), repeats=20)
        closed = best_of(lambda: focal_series.undo_similarity(image, 0.3, 0.997, (1.2, 0.4), fill=image),
                         20)[0]
        matrix_closed = best_of(lambda: focal_series._fourier_resample_matrix(n, positions), 20)[0]
        matrix_product = best_of(lambda: dft_product_matrix(n, positions), 20)[0]
        difference = np.abs(focal_series._fourier_resample_matrix(n, positions)
                            - dft_product_matrix(n, positions)).max()
        # the former undo: the same with two product matrices in place of two closed-form ones
        product = closed + 2 * (matrix_product - matrix_closed)
        print(f"{n:6d} {closed / fft:30.1f} {product / fft:14.1f} "
              f"{matrix_closed / matrix_product:30.3f} {difference:17.2e}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the two 128² cases only")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="seeds of the specimen, noise and misalignment (default: each case's own)")
    parser.add_argument("--resampling", action="store_true",
                        help="time the band-limited resampling of one image instead")
    args = parser.parse_args()
    if args.resampling:
        resampling_ratios()
        return
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "home"
        subprocess.run([sys.executable, "-m", "xpr", "--setup_home", str(home)], check=True,
                       capture_output=True,                 # HOME: not the user's ~/.xpr
                       env=dict(os.environ, XPR_HOME=str(home), HOME=folder))
        print(f"{'case':10s} {'seed':>4s} {'aligned':>8s} {'unreg.':>8s} {'corr. only':>10s} "
              f"{'default':>8s} {'def/aligned':>11s} {'time corr./retr.':>16s} {'default/retr.':>13s}  kept")
        for name in args.cases:
            imaging, misalignment, own_seed = CASES[name]
            if args.quick and name == "sphere":
                continue
            for seed in args.seeds if args.seeds is not None else [own_seed]:
                structure = f"{name}{seed}"
                for suffix, extra in (("aligned", ""), ("moved", f"misalignment: {{{misalignment}}}\n")):
                    path = Path(folder) / f"{structure}_{suffix}.yaml"
                    path.write_text(f"structure_name: {structure}_{suffix}\nseed: {seed}\n" + imaging + extra)
                    xpr(home, "em", "simulate_focal", path)
                settings = Path(folder) / "tie.yaml"
                settings.write_text("structure_name: x\n")
                errors, ratio, kept = {}, {}, ""
                for label, moved, overrides in (
                        ("aligned", "aligned", ["registration.enabled=false"]),
                        ("unregistered", "moved", ["registration.enabled=false"]),
                        ("correlation", "moved", ["registration.enabled=true", "registration.refine=none"]),
                        ("default", "moved", ["registration.enabled=true"])):
                    xpr(home, "em", "tie", settings, "-o", f"structure_name={structure}_{moved}",
                        *[a for o in overrides for a in ("-o", o)])
                    with h5py.File(home / f"data/em/tie/{structure}_{moved}.h5") as out:
                        errors[label] = float(out["errors/rms_refined_rad"][()])
                        if label in ("correlation", "default"):
                            ratio[label] = out.attrs["registration_seconds"] / out.attrs["retrieval_seconds"]
                        if label == "default":
                            value = out["registration/images/kept"][()]
                            kept = value.decode() if isinstance(value, bytes) else str(value)
                print(f"{name:10s} {seed:4d} {errors['aligned']:8.4f} {errors['unregistered']:8.4f} "
                      f"{errors['correlation']:10.4f} {errors['default']:8.4f} "
                      f"{errors['default'] / errors['aligned']:11.2f} {ratio['correlation']:16.1f} "
                      f"{ratio['default']:13.1f}  {kept}", flush=True)


if __name__ == "__main__":
    main()
