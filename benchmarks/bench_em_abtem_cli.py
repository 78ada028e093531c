"""`xpr em ptycho` as a user runs it, on abTEM data handed over as files (issue 17's check).

The abTEM MoS2 case of bench_em_abtem.py (200 kV, 25 mrad, C10 −100 Å, 32² scan at 0.5 Å, 64²
detector, 25 000 e⁻/pattern; cached by that script) is written two ways:

* a 4-D `.npy` (scan y, scan x, ky, kx);
* a NeXus-style HDF5 file: /entry (NXentry) /data (NXdata, @signal = "data") holding the patterns
  compressed per pattern with bitshuffle-LZ4 through hdf5plugin, as detector software writes them;
  no calibration in the file.

Each is phased by the real `xpr` executable in a fresh home with no simulate run, from a settings
file that gives only `experiment.data_path` and the calibration (voltage, convergence angle,
reciprocal pixel, scan step, C10, PL rotation); everything else is the defaults. Printed per file
and pixel size (native 0.3 Å, and 0.2 Å with `data_pad: 16`): r against abTEM's projected
potential (computed here from the saved `object` and `positions_px`, as bench_em_abtem.py does),
the command's wall time, and its CPU time (all threads of the child process). A last run leaves
the PL rotation out of the settings, so the command fits it from the data.

    .venv-bench/bin/python benchmarks/bench_em_abtem_cli.py [--workdir /tmp/xpr_bench_abtem]

Needs only xpr when the abTEM data are cached; otherwise the `bench` extra simulates them.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_em_abtem as case  # noqa: E402  (its data cache, optics and r)

from xpr.em.ptychography import calibration, ptycho  # noqa: E402


def write_nexus(path: Path, data: np.ndarray) -> None:
    """Patterns as /entry/data/data with NXdata @signal, bitshuffle-LZ4 chunks of one pattern."""
    import hdf5plugin

    with h5py.File(path, "w") as handle:
        entry = handle.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        group = entry.create_group("data")
        group.attrs["NX_class"] = "NXdata"
        group.attrs["signal"] = "data"
        group.create_dataset("data", data=data, chunks=(1, 1) + data.shape[2:],
                             **hdf5plugin.Bitshuffle(cname="lz4"))


def settings_file(path: Path, data_path: Path, sim, pad: int, rotation_given: bool = True) -> Path:
    path.write_text(
        "structure_name: abtem\n"
        "experiment:\n"
        f"  data_path: {data_path}\n"
        f"  acc_voltage: {case.KV}\n"
        f"  conv_semiangle_mrad: {case.ALPHA_MRAD}\n"
        f"  rez_pixel_size_A: {float(sim['rez'])!r}\n"
        f"  scan_step_A: {case.STEP}\n"
        f"  aberrations: [{case.C10}]\n"
        + ("  PLRotation_deg: 0\n" if rotation_given else "")
        + f"  data_pad: {pad}\n")
    return path


def child_env(home: Path) -> dict:
    """The home for xpr, and HOME beside it so that --setup_home records it there, not in the
    user's ~/.xpr/config.yaml."""
    return dict(os.environ, XPR_HOME=str(home), HOME=str(home.parent))


def run_command(home: Path, settings: Path):
    """`xpr em ptycho SETTINGS` in the home: (wall s, CPU s of the child, result file)."""
    env = child_env(home)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "xpr", "-q", "em", "ptycho", str(settings)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"xpr em ptycho exited {done.returncode}:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, home / "data/em/ptycho/abtem.h5"


def correlation_of(result: Path, sim, pad: int) -> float:
    with h5py.File(result, "r") as handle:
        object_slices = np.moveaxis(handle["object"][()], -1, 0)
        positions = handle["positions_px"][()]
        window = handle["probe"].shape[0]
    experiment = calibration.Experiment.from_settings(
        dict(acc_voltage=case.KV, conv_semiangle_mrad=case.ALPHA_MRAD,
             rez_pixel_size_A=float(sim["rez"]), scan_step_A=case.STEP, aberrations=[case.C10],
             PLRotation_deg=0.0, data_pad=pad), sim["data"][:1, :1])
    phase = np.sum(np.angle(object_slices), axis=0)
    centres = ptycho.probe_centres_px(positions, window)
    return case.correlation(phase, centres, sim, ptycho.measured_k_max(experiment))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/xpr_bench_abtem", help="abTEM data cache")
    args = parser.parse_args()
    sim, _ = case.load_or_simulate("mos2", 25000.0, Path(args.workdir))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        npy, nexus = tmp / "scan.npy", tmp / "scan_nexus.h5"
        np.save(npy, sim["data"])
        write_nexus(nexus, sim["data"])
        print(f"abTEM MoS2, {sim['data'].shape} patterns; NeXus file {nexus.stat().st_size / 1e6:.1f} MB "
              f"(raw float32 {sim['data'].nbytes / 1e6:.1f} MB)")
        print(f"{'file':<10} {'pixel':>7} {'PL rotation':>12} {'r':>7} {'wall s':>8} {'CPU s':>7}")
        runs = [("npy", npy, 0, True), ("npy", npy, 16, True), ("nexus", nexus, 0, True),
                ("nexus", nexus, 16, True), ("nexus", nexus, 16, False)]
        for n, (label, path, pad, rotation_given) in enumerate(runs):
            home = tmp / f"home_{n}"
            subprocess.run([sys.executable, "-m", "xpr", "--setup_home", str(home)],
                           check=True, capture_output=True, env=child_env(home))
            assert not (home / "data/em/simulate_4dstem").exists()
            settings = settings_file(tmp / f"abtem_{n}.yaml", path, sim, pad, rotation_given)
            wall, cpu, result = run_command(home, settings)
            r = correlation_of(result, sim, pad)
            pixel = 1.0 / (float(sim["rez"]) * (case.DETECTOR + 2 * pad))
            rotation = "0 (given)" if rotation_given else "from data"
            print(f"{label:<10} {pixel:>5.2f} Å {rotation:>12} {r:>7.3f} {wall:>8.1f} {cpu:>7.1f}")


if __name__ == "__main__":
    main()
