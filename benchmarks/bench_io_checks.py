"""What the input checks and the beamline readers add to a run, as ratios measured in this run.

* check_intensities on a pattern / one FFT pair (forward + inverse, complex64) of its size;
* check_intensity_frames on a 4D-STEM stack / one batched FFT pair over all its patterns;
* reading a bitshuffle-LZ4 (hdf5plugin) pattern / reading the same pattern uncompressed, and
  the compressed file's size / the uncompressed one's;
* centring a detector frame (xpr.cdi.frame: the Friedel-symmetry centre, then the cut) / one
  FFT pair of the frame's size (1028 x 1062, Eiger 1M; 128^3).

    .venv/bin/python benchmarks/bench_io_checks.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from timing import best_of, fft_pair_seconds
from xpr.io.checks import check_intensities, check_intensity_frames
from xpr.io.readers import read_pattern


def main():
    rng = np.random.default_rng(0)
    print(f"{'case':44s} {'ratio':>8s}")
    for shape in [(1024, 1024), (128, 128, 128)]:
        pattern = rng.poisson(3.0, shape).astype(np.float32)
        mask = np.zeros(shape, bool)
        mask[(slice(0, 4),) * len(shape)] = True
        c = pattern.astype(np.complex64)
        ratio = best_of(lambda: check_intensities(pattern, mask), 5)[0] / fft_pair_seconds(c)
        print(f"{'check_intensities ' + 'x'.join(map(str, shape)):44s} {ratio:8.2f}  x one FFT pair")
    stack = rng.poisson(3.0, (32, 32, 64, 64)).astype(np.float32)
    c = stack.reshape(-1, 64, 64).astype(np.complex64)
    ratio = best_of(lambda: check_intensity_frames(stack), 5)[0] / fft_pair_seconds(c, (-2, -1))
    print(f"{'check_intensity_frames 32x32 scan, 64² det.':44s} {ratio:8.2f}  x one batched FFT pair")
    from xpr.cdi.frame import friedel_centre, recentre
    for shape in [(1028, 1062), (128, 128, 128)]:
        frame = rng.poisson(3.0, shape).astype(np.float64)
        masked = np.zeros(shape, bool)
        masked[(slice(0, 4),) * len(shape)] = True

        def centre_and_cut():
            centre, _ = friedel_centre(frame, masked)
            return recentre(frame, masked, np.round(centre).astype(int))
        ratio = best_of(centre_and_cut, 3)[0] / fft_pair_seconds(frame.astype(np.complex64))
        print(f"{'centre auto + cut ' + 'x'.join(map(str, shape)):44s} {ratio:8.2f}  x one FFT pair")
    with tempfile.TemporaryDirectory() as tmp:
        pattern = rng.poisson(0.5, (2048, 2048)).astype(np.uint32)    # sparse counts, as detectors see
        plain, packed = Path(tmp) / "plain.h5", Path(tmp) / "packed.h5"
        with h5py.File(plain, "w") as f:
            f["data"] = pattern
        with h5py.File(packed, "w") as f:
            f.create_dataset("data", data=pattern, chunks=(256, 2048), **hdf5plugin.Bitshuffle(cname="lz4"))
        t_plain = best_of(lambda: read_pattern(plain), 5)[0]
        t_packed = best_of(lambda: read_pattern(packed), 5)[0]
        print(f"{'read bitshuffle-LZ4 / plain, 2048² counts':44s} {t_packed / t_plain:8.2f}  "
              f"(file size {packed.stat().st_size / plain.stat().st_size:.2f} of plain)")


if __name__ == "__main__":
    main()
