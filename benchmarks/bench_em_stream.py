"""Streaming a 4D-STEM scan larger than the memory budget: `xpr em dpc` peak resident memory.

Writes a synthetic scan (default 128² scan × 128² detector, float32: 1.07 GB) as a .npy file,
then runs `xpr em dpc` on it in a child process twice: with `dpc.max_memory_GB` below the file
size (streamed in batches) and above it (read whole), and prints each run's peak resident set
size (the child's VmHWM), wall time and the DPC phase's correlation with the phase the
patterns were made from.

Patterns: a bright-field disk of radius 20 px whose intensity is tilted by the local phase
gradient, I(k) = D(k) (1 + c k·∇φ(r_p)), so the centre of mass follows ∇φ as DPC assumes;
φ is a sum of random Gaussian "atoms".

    python benchmarks/bench_em_stream.py [--scan 128] [--detector 128] [--cap 0.5] [--workdir /tmp/x]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_phase(scan, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:scan, :scan].astype(np.float64)
    phase = np.zeros((scan, scan))
    for cy, cx in rng.uniform(0, scan, (scan * scan // 40, 2)):
        phase += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 1.5 ** 2))
    return phase


def write_scan(path, scan, detector, phase):
    g_y, g_x = np.gradient(phase)
    k = np.arange(detector, dtype=np.float32) - detector // 2
    ky, kx = np.meshgrid(k, k, indexing="ij")
    disk = (np.hypot(ky, kx) <= 20).astype(np.float32) * 100.0
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                    shape=(scan, scan, detector, detector))
    for row in range(scan):
        tilt = 1.0 + 0.02 * (ky[None] * g_y[row, :, None, None] + kx[None] * g_x[row, :, None, None])
        out[row] = disk[None] * tilt
    out.flush()
    del out


def run_dpc(data, home, cap, scan):
    settings = home.parent / "dpc_stream.yaml"
    settings.write_text("structure_name: stream\nexperiment:\n"
                        f"  data_path: {data}\n  acc_voltage: 200.0\n  rez_pixel_size_A: 0.05\n"
                        "  scan_step_A: 0.5\n  PLRotation_deg: 0.0\n")
    # peak resident set of the child from /proc/self/status VmHWM (kB): ru_maxrss would carry
    # over the parent's high-water mark through fork + exec (the parent wrote the file)
    code = ("import sys; from xpr.cli import main\n"
            "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('MAXRSS', [l.split()[1] for l in open('/proc/self/status')"
            " if l.startswith('VmHWM')][0])\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "--home", str(home), "em", "dpc",
                           str(settings), "-o", f"dpc.max_memory_GB={cap}"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    peak_kB = int(done.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    import h5py

    with h5py.File(home / "data/em/dpc/stream.h5", "r") as handle:
        phase = handle["phase"][()]
    return peak_kB / 1e6, seconds, phase


def correlation(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=int, default=128)
    parser.add_argument("--detector", type=int, default=128)
    parser.add_argument("--cap", type=float, default=0.5, help="max_memory_GB of the streamed run")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="xpr_stream_"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "scan.npy"
    phase = make_phase(args.scan)
    start = time.perf_counter()
    write_scan(data, args.scan, args.detector, phase)
    size_GB = data.stat().st_size / 1e9
    print(f"scan {args.scan}² × detector {args.detector}²: {size_GB:.2f} GB file "
          f"(written in {time.perf_counter() - start:.0f} s)")
    print("| max_memory_GB | mode | peak RSS (GB) | wall s | r (DPC vs φ) |")
    print("|---|---|---|---|---|")
    try:
        for cap in (args.cap, 2 * size_GB + 1):
            home = workdir / f"home_{cap:g}"
            subprocess.run([sys.executable, "-m", "xpr", "--setup_home", str(home)],
                           check=True, capture_output=True)
            peak, seconds, recovered = run_dpc(data, home, cap, args.scan)
            mode = "streamed" if cap * 1e9 < size_GB * 1e9 else "in memory"
            print(f"| {cap:g} | {mode} | {peak:.2f} | {seconds:.0f} | "
                  f"{correlation(recovered, phase):.3f} |", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
