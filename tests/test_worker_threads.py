"""Threads and devices per worker: FFT/BLAS threads = the cores a worker owns / the tasks it runs
at once, and one worker per GPU pinned through CUDA_VISIBLE_DEVICES (local pool, dask)."""
from __future__ import annotations

import cloudpickle
import pytest

from xpr import parallel
from fake_workers import tasks as fake
from xpr.settings import Frozen


def test_worker_environment_divides_the_cores():
    assert parallel.worker_environment(32, 32) == {name: "1" for name in parallel.THREAD_VARIABLES}
    env = parallel.worker_environment(32, 4, gpu="3")
    assert env["XPR_FFT_WORKERS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "8"
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert parallel.worker_environment(2, 8)["XPR_FFT_WORKERS"] == "1"     # never 0


def test_local_workers_one_per_gpu_with_their_share_of_the_cores():
    """With gpus, auto gives one worker per GPU; each worker has its own device and cores / 2
    FFT threads, and scipy.fft in the worker uses that many."""
    results = parallel.map(fake.worker_setup, range(6), Frozen({"engine": "local"}), gpus=["3", "5"])
    by_pid = {}
    for pid, gpu, fft, omp, scipy_workers in results:
        by_pid.setdefault(pid, set()).add(gpu)
        share = str(max(1, parallel.available_cpus() // 2))
        assert fft == omp == share and scipy_workers == int(share)
    assert len(by_pid) == 2                                   # auto: one process per GPU
    assert sorted(g for gpus in by_pid.values() for g in gpus) == ["3", "5"]   # each its own, for good


def test_dask_local_cluster_threads_and_gpus():
    pytest.importorskip("distributed")
    cloudpickle.register_pickle_by_value(fake)
    settings = Frozen({"engine": "dask", "dask": {"cluster": {"type": "local", "jobs": 2, "cores": 1}}})
    client = parallel.dask_client(settings, gpus=["0", "1"])
    try:
        environments = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(environments.values()) == ["0", "1"]
        threads = client.run(lambda: __import__("os").environ.get("XPR_FFT_WORKERS"))
        assert set(threads.values()) == {str(max(1, parallel.available_cpus() // 2))}
        assert sum(client.nthreads().values()) == 2           # one task at a time per GPU
    finally:
        client.close()
        client.xpr_owns_cluster.close()


def test_jobqueue_workers_single_threaded_ffts():
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    options = parallel.jobqueue_options({"cores": 16, "memory": "8GB"})
    with dask_jobqueue.SLURMCluster(**options, scheduler_options={"dashboard_address": None}) as cluster:
        script = cluster.job_script()
    assert "export XPR_FFT_WORKERS=1" in script and "export OMP_NUM_THREADS=1" in script
    # one worker process per job running 16 tasks at once, 1 FFT thread each
    assert "--nthreads 16" in script and "--nworkers" not in script and "--cpus-per-task=16" in script
