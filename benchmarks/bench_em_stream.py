"""Streaming a 4D-STEM scan larger than the memory budget: `xpr em dpc` / `em wdd` peak memory.

Writes a synthetic scan (default 128² scan × 128² detector, float32: 1.07 GB) as a .npy file,
then runs `xpr em <command>` on it in a child process twice: with `<command>.max_memory_GB`
below the file size (streamed in batches) and above it (read whole), and prints each run's peak
resident set size (the child's VmHWM), wall time, the phase's correlation with the phase the
patterns were made from, and the largest difference of the streamed phase from the in-memory
one. (The patterns are made for DPC; WDD's r on them says little — its check is the equality.)

Patterns: a bright-field disk of radius 20 px whose intensity is tilted by the local phase
gradient, I(k) = D(k) (1 + c k·∇φ(r_p)), so the centre of mass follows ∇φ as DPC assumes;
φ is a sum of random Gaussian "atoms".

    python benchmarks/bench_em_stream.py [--command dpc|wdd] [--scan 128] [--detector 128]
                                         [--cap 0.5] [--workdir /tmp/x]
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


# ptycho's scan: 200 kV, 25 mrad, 60 Å defocus; Δk such that the real-space pixel is 0.25 Å and the
# 0.5 Å scan step is 2 pixels (no sub-pixel shifts to make)
PTYCHO_PIXEL_A, PTYCHO_STEP_PX, PTYCHO_DEFOCUS_A = 0.25, 2, 60.0


def write_ptycho_scan(path, scan, detector, seed=0, electrons=1.0e4):
    """Patterns |FFT(P · O)|² of a phase object O = exp(iφ) (random Gaussian atoms, 0.3 rad,
    on the 0.25 Å grid) under a defocused probe (xpr.em.optics), Poisson counts; returns φ."""
    from xpr.em import optics

    wavelength = optics.electron_wavelength_A(200.0)
    rez = 1.0 / (detector * PTYCHO_PIXEL_A)
    probe = optics.probe_real((detector, detector), rez, wavelength, 25.0, [-PTYCHO_DEFOCUS_A])
    probe = probe / np.sqrt(np.sum(np.abs(probe) ** 2))
    size = (scan - 1) * PTYCHO_STEP_PX + detector
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    phase = np.zeros((size, size), np.float32)
    for cy, cx in rng.uniform(0, size, (size * size // 60, 2)):
        near = (slice(max(int(cy) - 6, 0), int(cy) + 7), slice(max(int(cx) - 6, 0), int(cx) + 7))
        phase[near] += 0.3 * np.exp(-((y[near] - cy) ** 2 + (x[near] - cx) ** 2) / (2 * 1.8 ** 2))
    transmission = np.exp(1j * phase).astype(np.complex64)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                    shape=(scan, scan, detector, detector))
    for row in range(scan):
        top = row * PTYCHO_STEP_PX
        waves = np.stack([probe * transmission[top:top + detector,
                                               col * PTYCHO_STEP_PX:col * PTYCHO_STEP_PX + detector]
                          for col in range(scan)])
        intensity = np.fft.fftshift(np.abs(np.fft.fft2(waves)) ** 2, axes=(-2, -1))
        out[row] = rng.poisson(intensity * electrons / detector ** 2)
    out.flush()
    del out
    return phase, rez


def run_command(command, data, home, cap, rez=0.05):
    settings = home.parent / f"{command}_stream.yaml"
    if command == "ptycho":
        settings.write_text("structure_name: stream\nexperiment:\n"
                            f"  data_path: {data}\n  acc_voltage: 200.0\n  rez_pixel_size_A: {rez}\n"
                            f"  scan_step_A: {PTYCHO_STEP_PX * PTYCHO_PIXEL_A}\n  PLRotation_deg: 0.0\n"
                            f"  conv_semiangle_mrad: 25.0\n  defocus: {PTYCHO_DEFOCUS_A}\n"
                            "reconstruction:\n  epochs: 4\n")
        key = "reconstruction.max_memory_GB"
    else:
        # the disk's 20 px at 0.05 Å⁻¹ is 1 Å⁻¹: 25.08 mrad at 200 kV (λ = 0.02508 Å), for WDD
        settings.write_text("structure_name: stream\nexperiment:\n"
                            f"  data_path: {data}\n  acc_voltage: 200.0\n  rez_pixel_size_A: 0.05\n"
                            "  scan_step_A: 0.5\n  PLRotation_deg: 0.0\n  conv_semiangle_mrad: 25.08\n")
        key = f"{command}.max_memory_GB"
    # peak resident set of the child from /proc/self/status VmHWM (kB): ru_maxrss would carry
    # over the parent's high-water mark through fork + exec (the parent wrote the file)
    code = ("import sys; from xpr.cli import main\n"
            "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('MAXRSS', [l.split()[1] for l in open('/proc/self/status')"
            " if l.startswith('VmHWM')][0])\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "--home", str(home), "em", command,
                           str(settings), "-o", f"{key}={cap}"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    peak_kB = int(done.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    import h5py

    with h5py.File(home / f"data/em/{command}/stream.h5", "r") as handle:
        if command == "ptycho":             # the object's phase over the probe centres
            phase = np.angle(handle["object"][()][..., 0])
            corners = handle["positions_px"][()]
            window = handle["probe"].shape[0]
            low = np.floor(corners.min(axis=0)).astype(int) + window // 2
            extent = int(round(np.ptp(corners[:, 0]))) + 1
            phase = phase[low[0]:low[0] + extent, low[1]:low[1] + extent]
        else:
            phase = handle["phase"][()]
    log = next((home / f"data/em/{command}").rglob("run.log")).read_text()
    return peak_kB / 1e6, seconds, phase, "streamed from the file" in log


def correlation(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", choices=["dpc", "wdd", "ptycho"], default="dpc")
    parser.add_argument("--scan", type=int, default=128)
    parser.add_argument("--detector", type=int, default=128)
    parser.add_argument("--cap", type=float, default=0.5, help="max_memory_GB of the streamed run")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="xpr_stream_"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "scan.npy"
    start = time.perf_counter()
    rez = 0.05
    if args.command == "ptycho":
        phase, rez = write_ptycho_scan(data, args.scan, args.detector)
    else:
        phase = make_phase(args.scan)
        write_scan(data, args.scan, args.detector, phase)
    size_GB = data.stat().st_size / 1e9
    print(f"scan {args.scan}² × detector {args.detector}²: {size_GB:.2f} GB file "
          f"(written in {time.perf_counter() - start:.0f} s)")
    print(f"| em {args.command} max_memory_GB | mode | peak RSS (GB) | peak RSS / file | wall s | "
          "r (phase vs φ) | max |Δ phase| vs in memory (rad) |")
    print("|---|---|---|---|---|---|---|")
    phases = {}
    try:
        for cap in (args.cap, 2 * size_GB + 1):
            home = workdir / f"home_{cap:g}"
            subprocess.run([sys.executable, "-m", "xpr", "--setup_home", str(home)],
                           check=True, capture_output=True,
                           env=dict(os.environ, HOME=str(workdir)))   # not the user's ~/.xpr
            peak, seconds, recovered, streamed = run_command(args.command, data, home, cap, rez)
            mode = "streamed" if streamed else "in memory"
            phases[mode] = recovered
            difference = (f"{np.abs(phases['streamed'] - recovered).max():.2g}"
                          if mode == "in memory" and "streamed" in phases else "")
            truth = phase
            if args.command == "ptycho":    # φ's pixel 0 is the first window's corner
                half = args.detector // 2
                truth = phase[half:half + recovered.shape[0], half:half + recovered.shape[1]]
            print(f"| {cap:g} | {mode} | {peak:.2f} | {peak / size_GB:.2f} | {seconds:.0f} | "
                  f"{correlation(recovered, truth):.3f} | {difference} |", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
