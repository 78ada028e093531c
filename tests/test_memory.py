"""Memory: the limit read from cgroups / meminfo / a setting; each command's peak estimate
against the peak measured with tracemalloc (numpy's arrays are traced) within 0.7x-1.5x; too
large refused with exit 2 naming the key, the estimate and the limit; batches shrunk to fit."""
from __future__ import annotations


import h5py
import numpy as np
import pytest

from memory_helpers import limit_memory as _limit, traced_peak
from xpr import memory

GB = memory.GB


def _traced_peak(run_xpr, args):
    """The run's traced peak with a fresh process's garbage collector (memory_helpers)."""
    return traced_peak(run_xpr, args, fresh_collector=True)


def test_limit_is_the_smallest_of_cgroup_meminfo_and_setting(tmp_path, monkeypatch):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{8 * GB}\n")
    (v2 / "memory.current").write_text(f"{3 * GB}\n")
    monkeypatch.setattr(memory, "_own_cgroup_dirs", lambda root="/sys/fs/cgroup": (v2, None))
    monkeypatch.setattr(memory, "meminfo_available", lambda: 20 * GB)
    limit = memory.available()
    assert limit.bytes == 5 * GB and "memory.max" in limit.source
    assert memory.available(max_memory_GB=2, key="reconstruction.max_memory_GB").bytes == 2 * GB
    (v2 / "memory.max").write_text("max\n")                      # unlimited cgroup
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{4 * GB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 * GB}\n")
    monkeypatch.setattr(memory, "_own_cgroup_dirs", lambda root="/sys/fs/cgroup": (v2, v1))
    assert memory.available().bytes == 3 * GB
    monkeypatch.setattr(memory, "meminfo_available", lambda: 1 * GB)
    assert memory.available().source == "MemAvailable in /proc/meminfo"


def test_meminfo_is_read():
    free = memory.meminfo_available()
    assert free is None or free > 0


# estimate / traced peak, from benchmarks/bench_memory.py on this code (each case a fresh process):
# simulate 1.01-1.17, phase 0.89-1.47 (plain runs and the genetic algorithm; the sizes below keep the
# libraries' own allocations, ~45 MB, small beside the arrays; a tiny run of each command is
# subtracted as the baseline). The runs here are measured with a fresh process's garbage collector
# (memory_helpers.traced_peak), so the ratios do not depend on what the test session ran before,
# and with a schedule that passes every stage a default run pays for (HIO, shrink-wrap, ER, ML).
# The rescue (phasing.rescue) always runs here, on the same short schedule: its peak holds the
# first run's results as well.
SCHEDULE = ["-o", "phasing.iters=20HIO 10ER 5ML", "-o", "ga.iters=10ER 5ML",
            "-o", "phasing_parameters.shrink_wrap.start=10", "-o", "phasing_parameters.shrink_wrap.every=10",
            "-o", "phasing.rescue.iters=20HIO 10ER 5ML", "-o", "phasing.rescue.fit_above=1.0"]
LOW, HIGH = 0.7, 1.5


@pytest.mark.slow
def test_estimates_match_measured_peaks(home, run_xpr):
    common = ["-q", "cdi", "simulate", "tutorial"]
    base = {d: _traced_peak(run_xpr, common + ["-o", f"dimensions={d}", "-o", "shape=16",
                                               "-o", f"structure_name=s{d}"]) for d in (2, 3)}
    ratios = {}
    for d, n in [(2, 1024), (3, 96)]:
        peak = _traced_peak(run_xpr, common + ["-o", f"dimensions={d}", "-o", f"shape={n}",
                                               "-o", f"structure_name=m{d}"])
        ratios[f"simulate {d}-D {n}"] = memory.cdi_simulate((n,) * d).bytes() / (peak - base[d])
    phase = ["-q", "cdi", "phase3d", "tutorial", "-o", "multi_process.engine=serial"] + SCHEDULE
    base3 = _traced_peak(run_xpr, phase + ["-o", "structure_name=s3", "-o", "phasing.repeats=1",
                                           "-o", "ga.generations=1"])
    # the plain run, and the genetic algorithm (the default: its breeding holds every repeat)
    for repeats, batch, generations in [(8, 8, 1), (8, 2, 1), (8, 8, 3), (8, 2, 3)]:
        peak = _traced_peak(run_xpr, phase + ["-o", "structure_name=m3", "-o", f"phasing.repeats={repeats}",
                                              "-o", f"multi_process.batch_size={batch}",
                                              "-o", f"ga.generations={generations}"])
        estimate = memory.cdi_phase((96,) * 3, repeats, 1, generations=generations, rescue=True).bytes(batch)
        ratios[f"phase3d 96 {repeats} repeats in batches of {batch}, {generations} generation(s)"] = \
            estimate / (peak - base3)
    assert all(LOW <= r <= HIGH for r in ratios.values()), ratios


def test_estimate_scales_as_the_code_allocates():
    # the per-repeat part is linear in the batch and in the voxels; double precision doubles it
    one, eight = memory.cdi_phase((64,) * 3, 8), memory.cdi_phase((128,) * 3, 8)
    assert eight.bytes(8) == 8 * one.bytes(8)
    assert one.stage_bytes("phasing", 8) - one.stage_bytes("phasing", 4) == 4 * 46 * 64 ** 3
    assert memory.cdi_phase((64,) * 3, 8, double=True).bytes(8) > 1.9 * one.bytes(8)


def test_too_large_simulate_exits_2_naming_key_estimate_and_limit(home, run_xpr, monkeypatch):
    _limit(monkeypatch, 0.5 * GB)
    result = run_xpr(["cdi", "simulate", "tutorial", "-o", "dimensions=3", "-o", "shape=256",
                      "-o", "structure_name=big"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    estimate = memory.cdi_simulate((256,) * 3).bytes() / GB
    assert "key: shape" in text and f"{estimate:.2f} GB" in text and "0.50 GB (test limit)" in text
    assert not (home / "data" / "cdi" / "simulate" / "big.h5").exists()
    assert not (home / "data" / "cdi" / "simulate" / "archive" / "big").exists()   # refused before a run folder


def test_phase_refuses_or_shrinks_its_batches(home, run_xpr, monkeypatch):
    assert run_xpr(["-q", "cdi", "simulate", "tutorial", "-o", "shape=64"]).exit_code == 0
    phase = ["-q", "cdi", "phase2d", "tutorial", "-o", "phasing.iters=30HIO 10ER",
             "-o", f"input.data_path={home / 'data' / 'cdi' / 'simulate' / 'tutorial.h5'}",
             "-o", "phasing.repeats=8", "-o", "multi_process.engine=serial",
             "-o", "ga.generations=1"]       # batches: the plain run (breeding holds every repeat)
    assert run_xpr(phase + ["-o", "structure_name=free"]).exit_code == 0
    estimate = memory.cdi_phase((64, 64), 8, 1)
    # room for batches of 3 but not 4: 8 repeats in 3 batches, the same repeats as in one
    _limit(monkeypatch, (estimate.bytes(3) + estimate.bytes(4)) / 2 / memory.USABLE_FRACTION)
    result = run_xpr(phase + ["-o", "structure_name=shrunk"])
    assert result.exit_code == 0, result.output
    folder = (home / "data" / "cdi" / "phase2d" / "shrunk.h5").resolve().parent
    assert "phasing in 3 batches of <= 3 instead" in (folder / "run.log").read_text()
    with h5py.File(home / "data" / "cdi" / "phase2d" / "free.h5") as a, \
            h5py.File(home / "data" / "cdi" / "phase2d" / "shrunk.h5") as b:
        free, shrunk = a["repeats/object"][()], b["repeats/object"][()]
    assert np.allclose(free, shrunk, atol=1e-4 * np.abs(free).max())
    # the merge of 8 repeats does not fit, that of one would: refused naming phasing.repeats
    one = memory.cdi_phase((64, 64), 1, 1).bytes(1)
    _limit(monkeypatch, (one + estimate.stage_bytes("merging")) / 2 / memory.USABLE_FRACTION)
    result = run_xpr(phase[1:] + ["-o", "structure_name=refused"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "key: phasing.repeats" in text and memory.size(estimate.bytes(1)) in text
    assert not (home / "data" / "cdi" / "phase2d" / "refused.h5").exists()
    assert not (home / "data" / "cdi" / "phase2d" / "archive" / "refused").exists()   # before a run folder
    # with the genetic algorithm, batches that fit do not help when breeding all 8 does not
    bred = memory.cdi_phase((64, 64), 8, 1, generations=3)
    _limit(monkeypatch, (bred.stage_bytes("phasing", 1) + bred.stage_bytes("breeding (genetic algorithm)"))
           / 2 / memory.USABLE_FRACTION)
    result = run_xpr(phase[1:-2] + ["-o", "ga.generations=3", "-o", "structure_name=unbred"])
    assert result.exit_code == 2, result.output
    assert "key: phasing.repeats" in " ".join(result.output.split()) and "ga.generations: 1" in result.output


def test_phase3d_on_1024_cubed_refused_from_the_header(home, run_xpr, monkeypatch, tmp_path):
    """The issue's OOM case: a 1024³ pattern (an HDF5 dataset never written, so the file is
    small) is refused from its header alone on a 24 GB machine, before a run folder exists."""
    _limit(monkeypatch, 24 * GB)
    with h5py.File(tmp_path / "big.h5", "w") as f:
        f.create_dataset("data", shape=(1024, 1024, 1024), dtype=np.float32)
    result = run_xpr(["cdi", "phase3d", "tutorial", "-o", f"input.data_path={tmp_path / 'big.h5'}",
                      "-o", "structure_name=big"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "key: input.data_path" in text and "1024x1024x1024" in text and "24.00 GB (test limit)" in text
    assert not (home / "data" / "cdi" / "phase3d" / "archive" / "big").exists()


@pytest.mark.slow                  # ≈ 25 s here (two phasing runs of 96³, two traced merges)
def test_merge_estimate_matches_the_measured_peak_and_refuses_before_a_run_folder(home, run_xpr, monkeypatch):
    """`cdi merge` of two phase3d runs: the estimate from the files' headers against the traced
    peak (a merge of two 16³ runs subtracted as the baseline), then refused (exit 2, key
    input.runs) with no run folder when the limit is below it."""
    runs = {}
    for n in (16, 96):
        assert run_xpr(["-q", "cdi", "simulate", "tutorial", "-o", "dimensions=3", "-o", f"shape={n}",
                        "-o", f"structure_name=s{n}"]).exit_code == 0
        data = home / "data" / "cdi" / "simulate" / f"s{n}.h5"
        for share in (0, 1):
            assert run_xpr(["-q", "cdi", "phase3d", "tutorial", "-o", f"input.data_path={data}",
                            "-o", "phasing.iters=2ER", "-o", "phasing.rescue.fit_above=null",
                            "-o", "phasing.repeats=4", "-o", f"phasing.seed={share}",
                            "-o", "multi_process.engine=serial", "-o", f"structure_name=p{n}"]).exit_code == 0
        runs[n] = sorted((home / "data" / "cdi" / "phase3d" / "archive" / f"p{n}").glob("*/run_*/phase3d.h5"))
        assert len(runs[n]) == 2
    merge = ["-q", "cdi", "merge", "tutorial"]

    def listed(n):
        return ["-o", f"input.runs=[{', '.join(map(str, runs[n]))}]", "-o", f"structure_name=m{n}"]

    base = _traced_peak(run_xpr, merge + listed(16))
    peak = _traced_peak(run_xpr, merge + listed(96))
    file_bytes = sum(memory.h5_bytes(path) for path in runs[96])
    estimate = memory.cdi_merge(file_bytes, (96,) * 3, 8)
    assert LOW <= estimate.bytes() / (peak - base) <= HIGH, estimate.bytes() / (peak - base)
    _limit(monkeypatch, 0.5 * estimate.bytes() / memory.USABLE_FRACTION)
    result = run_xpr(["cdi", "merge", "tutorial"] + listed(96)[:2] + ["-o", "structure_name=refused"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "key: input.runs" in text and "merging 8 repeats of 96x96x96 from 2 runs" in text
    assert not (home / "data" / "cdi" / "merge" / "archive" / "refused").exists()
