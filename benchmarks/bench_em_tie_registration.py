"""Benchmark of `xpr em tie`'s registration on misaligned focal series (issue 19).

Each case is simulated twice with `xpr em simulate_focal` — aligned, and with the defocused images
misaligned as a stage does — and retrieved with `xpr em tie` (defaults: TIE + 50 GS–Misell sweeps)
on the aligned series, on the misaligned one unregistered, registered (correlation estimates) and
registered with the joint refinement of shifts and magnifications on the series misfit
(`registration.refine: shifts_scale`). Printed, measured in this run: the rms phase errors, the
ratios registered / aligned, and the wall time of each registered run over the unregistered one
(the registration's cost in units of one retrieval). Runs in a temporary xpr home; never
pass/fail on time.

    python benchmarks/bench_em_tie_registration.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

CASES = {
    "sphere": ("imaging: {image_size: 256, pixel_size_m: 5.0e-10, defocus_m: [-5.0e-6, 0.0, 5.0e-6]}\n"
               "specimen: {radius_m: 2.0e-8}\n", "rotation_deg: 0.4, scale: 0.004, shift_px: 3.0"),
    "particles": ("imaging: {image_size: 128, pixel_size_m: 1.0e-9, defocus_m: [-5.0e-6, 0.0, 5.0e-6]}\n"
                  "specimen: {kind: particles, radius_m: 1.2e-8, particles: {count: 5}}\nseed: 3\n",
                  "rotation_deg: 0.5, scale: 0.004, shift_px: 3.0"),
    "absorbing": ("imaging: {image_size: 128, pixel_size_m: 1.0e-9, defocus_m: [-2.0e-6, 0.0, 2.0e-6]}\n"
                  "specimen: {kind: particles, radius_m: 1.2e-8, absorption_potential_V: 3.0, "
                  "particles: {count: 5}}\nseed: 3\n", "rotation_deg: 2.0, scale: 0.01, shift_px: 3.0"),
}


def xpr(home, *arguments):
    environment = dict(os.environ, XPR_HOME=str(home))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "xpr", "-q", *map(str, arguments)], check=True, env=environment,
                   capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the two 128² cases only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "home"
        subprocess.run([sys.executable, "-m", "xpr", "--setup_home", str(home)], check=True,
                       capture_output=True, env=dict(os.environ, XPR_HOME=str(home)))
        print(f"{'case':10s} {'aligned':>8s} {'unreg.':>8s} {'registered':>10s} {'reg/aligned':>11s} "
              f"{'time reg/unreg':>14s} {'refined':>8s} {'ref/aligned':>11s} {'time ref/unreg':>14s}  kept")
        for name, (imaging, misalignment) in CASES.items():
            if args.quick and name == "sphere":
                continue
            for suffix, extra in (("aligned", ""), ("moved", f"misalignment: {{{misalignment}}}\n")):
                path = Path(folder) / f"{name}_{suffix}.yaml"
                path.write_text(f"structure_name: {name}_{suffix}\n" + imaging + extra)
                xpr(home, "em", "simulate_focal", path)
            settings = Path(folder) / "tie.yaml"
            settings.write_text("structure_name: x\n")
            errors, seconds, kept = {}, {}, []
            for label, structure, enabled, refine in (
                    ("aligned", "aligned", "false", "none"), ("unregistered", "moved", "false", "none"),
                    ("registered", "moved", "true", "none"), ("refined", "moved", "true", "shifts_scale")):
                seconds[label] = xpr(home, "em", "tie", settings, "-o", f"structure_name={name}_{structure}",
                                     "-o", f"registration.enabled={enabled}", "-o", f"registration.refine={refine}")
                with h5py.File(home / f"data/em/tie/{name}_{structure}.h5") as out:
                    errors[label] = float(out["errors/rms_refined_rad"][()])
                    if enabled == "true":
                        value = out["registration/images/kept"][()]
                        kept.append(value.decode() if isinstance(value, bytes) else str(value))
            print(f"{name:10s} {errors['aligned']:8.4f} {errors['unregistered']:8.4f} {errors['registered']:10.4f} "
                  f"{errors['registered'] / errors['aligned']:11.2f} "
                  f"{seconds['registered'] / seconds['unregistered']:14.2f} {errors['refined']:8.4f} "
                  f"{errors['refined'] / errors['aligned']:11.2f} "
                  f"{seconds['refined'] / seconds['unregistered']:14.2f}  {', '.join(kept)}")


if __name__ == "__main__":
    main()
