"""Scale-out of cdi phasing: dask gives the local engine's result bit for bit; a killed worker's
repeats are recomputed; an array job's shares (run locally) are all found by `cdi merge`."""
from __future__ import annotations

import os
import subprocess
import threading

import h5py
import numpy as np
import pytest

from xpr.backend import cpu
from xpr.phasing import merge

distributed = pytest.importorskip("distributed")

QUICK = ["-o", "phasing.iters=150HIO 50RAAR 30ER", "-o", "phasing_parameters.shrink_wrap.start=40"]


def _latest(home, product, structure="tutorial"):
    with h5py.File(home / "data" / "cdi" / product / f"{structure}.h5") as f:
        return {"merged": f["merged/object"][()], "repeats": f["repeats/object"][()],
                "seed": f["repeats/seed"][()], "e_mod": f["repeats/e_mod"][()]}


@pytest.fixture
def simulated(home, run_xpr):
    assert run_xpr(["-q", "cdi", "simulate", "tutorial"]).exit_code == 0
    return home


@pytest.mark.slow
def test_dask_bit_identical_to_local(simulated, run_xpr):
    """Acceptance (issue 8): LocalCluster with 2 workers == local engine, 4 repeats, fixed seed."""
    common = ["-q", "cdi", "phase2d", "tutorial", "-o", "phasing.repeats=4", "-o", "phasing.seed=5",
              "-o", "multi_process.batch_size=1", *QUICK]
    assert run_xpr(common + ["-o", "multi_process.engine=local", "-o", "multi_process.n_processes=2"]).exit_code == 0
    local = _latest(simulated, "phase2d")
    result = run_xpr(common + ["-o", "multi_process.engine=dask", "-o", "multi_process.dask.cluster.jobs=2"])
    assert result.exit_code == 0, result.output
    dask = _latest(simulated, "phase2d")
    assert np.array_equal(local["repeats"], dask["repeats"])
    assert np.array_equal(local["merged"], dask["merged"])
    assert np.array_equal(local["seed"], dask["seed"]) and len(set(local["seed"].tolist())) == 4


@pytest.mark.slow
def test_killed_worker_repeats_recomputed(simulated, run_xpr):
    """Acceptance (issue 8): a worker killed mid-run -> the run completes with every repeat."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        pids = list(client.run(os.getpid).values())

        def kill_when_busy():
            for _ in range(600):
                if any(client.processing().values()):
                    threading.Event().wait(1.0)
                    os.kill(pids[0], 9)
                    return
                threading.Event().wait(0.05)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        result = run_xpr(["-q", "cdi", "phase2d", "tutorial", "-o", "phasing.repeats=4",
                          "-o", "multi_process.batch_size=1", "-o", "multi_process.engine=dask",
                          "-o", "multi_process.retries=2",
                          "-o", f"multi_process.dask.scheduler_address={cluster.scheduler_address}", *QUICK])
        killer.join()
        assert result.exit_code == 0, result.output
        client.wait_for_workers(2, timeout=60)
        assert pids[0] not in client.run(os.getpid).values()       # the worker really died
    finally:
        client.close()
        cluster.close()
    out = _latest(simulated, "phase2d")
    assert out["repeats"].shape[0] == 4 and len(set(out["seed"].tolist())) == 4


@pytest.mark.slow
def test_array_job_shares_merged(simulated, run_xpr):
    """Acceptance (issue 8): the array form runs locally (simulated indices) and its merge step
    finds every share; the merged object is as good as one run's."""
    result = run_xpr(["jobscript", "--scheduler", "slurm", "--array", 3, "--each", "phasing.seed={index}",
                      "--merge", "cdi merge tutorial", "cdi", "phase2d", "tutorial",
                      "-o", "phasing.repeats=3", "-o", "multi_process.n_processes=1"])
    assert result.exit_code == 0, result.output
    job = next((simulated / "jobs").rglob("job.slurm.sh")).parent
    env = dict(os.environ, XPR_HOME=str(simulated))
    for index in range(3):
        done = subprocess.run(["bash", str(job / "job.slurm.sh")], env=dict(env, SLURM_ARRAY_TASK_ID=str(index)),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert subprocess.run(["bash", "-n", str(job / "submit.sh")]).returncode == 0
    done = subprocess.run(["bash", str(job / "merge.slurm.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = _latest(simulated, "merge")
    share_seeds = []
    for record in sorted((job / "shares").glob("task_*.runs")):
        run_folder = record.read_text().split()[2]
        with h5py.File(os.path.join(run_folder, "phase2d.h5")) as f:
            share_seeds += f["repeats/seed"][()].tolist()
    assert len(share_seeds) == 9 and len(set(share_seeds)) == 9           # three shares, own seeds
    assert sorted(merged["seed"].tolist()) == sorted(share_seeds)        # every share merged
    with h5py.File(simulated / "data" / "cdi" / "simulate" / "tutorial.h5") as f:
        truth = f["truth/object"][()]
    assert merge.real_space_error(merged["merged"], truth, cpu()) < 0.15


def test_merge_refuses_runs_of_other_patterns(simulated, run_xpr, tmp_path):
    assert run_xpr(["-q", "cdi", "phase2d", "tutorial", "-o", "phasing.repeats=2", *QUICK]).exit_code == 0
    first = (simulated / "data/cdi/phase2d/tutorial.h5").resolve()
    assert run_xpr(["-q", "cdi", "simulate", "tutorial", "-o", "shape=48", "-o", "structure_name=other",
                    "phase2d", "tutorial", "-o", "structure_name=other", "-o", "phasing.repeats=2", *QUICK]).exit_code == 0
    other = (simulated / "data/cdi/phase2d/other.h5").resolve()
    result = run_xpr(["cdi", "merge", "tutorial", "-o", f"input.runs=[{first.parent}, {other}]"])
    assert result.exit_code == 2 and "another pattern" in result.output and str(other) in result.output
    result = run_xpr(["cdi", "merge", "tutorial"])
    assert result.exit_code == 2 and "nothing to merge" in result.output
    result = run_xpr(["cdi", "merge", "tutorial", "-o", f"input.runs=[{first.parent}, {first}]"])
    assert result.exit_code == 0, result.output
    assert _latest(simulated, "merge")["repeats"].shape[0] == 4
