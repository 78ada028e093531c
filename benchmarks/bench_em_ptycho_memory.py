"""`xpr em ptycho` memory: peak resident set against the calibrated data, and the estimate.

Writes a synthetic scan (default 24² scan × 96² detector, float32) as a .npy file and runs
`xpr em ptycho` on it for a few epochs in a child process, printing the child's peak resident
set (VmHWM) less the interpreter's own (xpr and its libraries imported), as a multiple of the
calibrated data's bytes, beside ptycho's own estimate (ptycho.data_memory; the data held while
reconstructing are 1.25 × the calibrated patterns: the counts in FFT order, the held-out set
as booleans; the square roots and weights are formed per batch and the experiment's calibrated
copy is released — 6 × before). Then the price of forming √D per
batch: the time of taking the square roots of all counts once, as a fraction of one loss +
gradient evaluation (same process, same data).

    python benchmarks/bench_em_ptycho_memory.py [--scan 24] [--detector 96] [--epochs 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from bench_em_stream import make_phase, write_scan

PEAK = ("print('MAXRSS', [l.split()[1] for l in open('/proc/self/status')"
        " if l.startswith('VmHWM')][0])\n")


def peak_of(code, *args) -> float:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if "MAXRSS" not in done.stdout:
        raise SystemExit(done.stdout + done.stderr)
    return int(done.stdout.rsplit("MAXRSS", 1)[1].split()[0]) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=int, default=24)
    parser.add_argument("--detector", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="xpr_ptycho_memory_"))
    try:
        data = workdir / "scan.npy"
        write_scan(data, args.scan, args.detector, make_phase(args.scan))
        home = workdir / "home"
        subprocess.run([sys.executable, "-m", "xpr", "--setup_home", str(home)], check=True,
                       capture_output=True, env=dict(os.environ, HOME=str(workdir)))   # not the user's ~/.xpr
        settings = workdir / "ptycho.yaml"
        settings.write_text("structure_name: memory\nexperiment:\n"
                            f"  data_path: {data}\n  acc_voltage: 200.0\n  rez_pixel_size_A: 0.05\n"
                            "  scan_step_A: 0.5\n  PLRotation_deg: 0.0\n  conv_semiangle_mrad: 25.08\n"
                            "GPU:\n  use: false\n")
        baseline = peak_of("import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot\n"
                           "import h5py, scipy.fft, xpr.cli, xpr.em.ptychography.ptycho\n" + PEAK)
        code = ("import sys; from xpr.cli import main\n"
                "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
                "finally:\n    " + PEAK)
        start = time.perf_counter()
        peak = peak_of(code, "--home", str(home), "em", "ptycho", str(settings),
                       "-o", f"reconstruction.epochs={args.epochs}")
        seconds = time.perf_counter() - start
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from xpr.backend import cpu
        from xpr.em.ptychography import calibration, ptycho
        from xpr.em.ptychography.losses import Measurements
        from xpr.em.ptychography.reconstruct import Options

        experiment, _ = calibration.load_experiment({
            "data_path": str(data), "acc_voltage": 200.0, "rez_pixel_size_A": 0.05,
            "scan_step_A": 0.5, "PLRotation_deg": 0.0, "conv_semiangle_mrad": 25.08})
        calibrated = experiment.patterns.nbytes
        _, resident = ptycho.data_memory(experiment.n_scan, experiment.pattern_shape, 1, 0, 0.05)
        resident.pop("calibrated patterns")            # released once the counts are made
        print(f"scan {args.scan}² × detector {args.detector}²: calibrated patterns "
              f"{calibrated / 1e6:.1f} MB; `em ptycho` {args.epochs} epochs in {seconds:.0f} s")
        be = cpu()
        options = Options()
        probe = {"modes": 1, "mode_type": "hermite", "higher_mode_power": 0.1, "focal_spread_A": 0.0}
        model, counts, mask, params, options = ptycho.prepare(experiment, options, probe, be)
        whole = ptycho.reconstruction_memory(resident, params["object"].shape[1:], 1, 1,
                                             model.window, options.batch_size, model.lanes(),
                                             options.history).bytes()
        print("| peak RSS − interpreter (MB) | / calibrated data | estimated data held / "
              "calibrated | whole estimate / calibrated |")
        print("|---|---|---|---|")
        print(f"| {(peak - baseline) / 1e6:.0f} | {(peak - baseline) / calibrated:.2f} | "
              f"{sum(resident.values()) / calibrated:.2f} | {whole / calibrated:.2f} |")

        measured = Measurements(counts, mask)
        model.loss_and_gradients(params, measured, "lsq_sqrt", {"object", "probe"},
                                 options.batch_size, mask)                    # warm-up
        start = time.perf_counter()
        model.loss_and_gradients(params, measured, "lsq_sqrt", {"object", "probe"},
                                 options.batch_size, mask)
        evaluation = time.perf_counter() - start
        start = time.perf_counter()
        for first in range(0, len(counts), options.batch_size):
            measured.amplitudes(slice(first, first + options.batch_size))
        roots = time.perf_counter() - start
        print(f"√D of all counts per evaluation: {roots * 1e3:.1f} ms = "
              f"{roots / evaluation:.3f} × one loss + gradient evaluation ({evaluation:.2f} s)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
