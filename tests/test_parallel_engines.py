"""Engines: identical seeded results on serial, local and dask; retries after failures and deaths."""
from __future__ import annotations

import os

import cloudpickle
import numpy as np
import pytest

from xpr import parallel
from fake_workers import tasks as fake
from xpr.settings import Frozen

distributed = pytest.importorskip("distributed")   # the 'dask' extra; make test installs it


@pytest.fixture(scope="module")
def dask_client():
    cloudpickle.register_pickle_by_value(fake)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def test_serial_local_dask_identical(dask_client):
    seeds = parallel.task_seeds(7, 6)
    serial = parallel.map(fake.seeded_sum, seeds, Frozen({"engine": "serial"}))
    local = parallel.map(fake.seeded_sum, seeds, Frozen({"engine": "local", "n_processes": 2}))
    dask = parallel.map(fake.seeded_sum, seeds, Frozen({"engine": "dask"}), client=dask_client)
    assert serial == local == dask


def test_shared_input_sent_once(dask_client):
    shared = np.linspace(0, 1, 5000)
    seeds = parallel.task_seeds(3, 4)
    expected = [fake.weighted(s, shared) for s in seeds]
    assert parallel.map(fake.weighted, seeds, Frozen({"engine": "dask"}), shared=shared, client=dask_client) == expected
    assert parallel.map(fake.weighted, seeds, Frozen({"engine": "local", "n_processes": 2}), shared=shared) == expected


@pytest.mark.slow
def test_dask_shared_input_survives_lost_workers_across_maps(tmp_path):
    """Generations of maps on one cluster with the same shared input (the CDI genetic algorithm's
    pattern): a worker killed between two maps, and in each map a task that kills its worker with
    the shared input in hand -> every map completes with the results of the serial engine
    (a broadcast scatter of the shared input hung here when a worker was lost; issue 20)."""
    cloudpickle.register_pickle_by_value(fake)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    settings = Frozen({"engine": "dask", "retries": 2})
    shared = np.linspace(0, 1, 200_000)
    try:
        for generation in range(3):
            seeds = parallel.task_seeds(generation, 4)
            tasks = [(seed, str(tmp_path), i == 1) for i, seed in enumerate(seeds)]
            expected = [fake.weighted(seed, shared) for seed in seeds]
            got = parallel.map(fake.weighted_dies_once, tasks, settings, shared=shared, client=client)
            np.testing.assert_allclose(got, expected, rtol=1e-12)     # (a dot product's threads: last bits)
            victim = list(client.run(os.getpid).values())[0]
            os.kill(victim, 9)                       # lost between this map and the next
        client.wait_for_workers(2, timeout=60)
        seeds = parallel.task_seeds(9, 4)
        np.testing.assert_allclose(parallel.map(fake.weighted, seeds, settings, shared=shared, client=client),
                                   [fake.weighted(seed, shared) for seed in seeds], rtol=1e-12)
    finally:
        client.close()
        cluster.close()


def test_dask_worker_killed_mid_run_task_retried(dask_client):
    seeds = parallel.task_seeds(11, 6)
    expected = [fake.seeded_sum(s) for s in seeds]
    pids = list(dask_client.run(os.getpid).values())
    finished = []

    def kill_after_first(index, result):
        finished.append(index)
        if len(finished) == 1:
            os.kill(pids[0], 9)     # one worker process dies while tasks are running

    results = parallel.map(fake.slow_seeded_sum, seeds, Frozen({"engine": "dask", "retries": 2}),
                           on_result=kill_after_first, client=dask_client)
    assert results == expected      # every task's result is there, lost ones recomputed
    assert len(finished) == 6
    dask_client.wait_for_workers(2, timeout=60)
    assert pids[0] not in dask_client.run(os.getpid).values()   # the worker really died


def test_local_worker_death_is_retried(tmp_path):
    tasks = [(i, str(tmp_path)) for i in range(4)]
    results = parallel.map(fake.dies_once, tasks, Frozen({"engine": "local", "n_processes": 2, "retries": 1}))
    assert results == [0, 10, 20, 30]
    assert (tmp_path / "died_1").exists()


@pytest.mark.parametrize("engine", ["serial", "local"])
def test_failures_recorded_and_min_success(engine):
    settings = Frozen({"engine": engine, "n_processes": 2, "retries": 1, "min_success": 0.5})
    results = parallel.map(fake.fails_for_two, range(4), settings, tolerate_failures=True)
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], parallel.TaskFailure) and "diverged" in results[2].error
    assert parallel.require_success(results, settings) == [0, 1, 3]
    with pytest.raises(RuntimeError, match="only 3 of 4"):
        parallel.require_success(results, Frozen({"min_success": 1.0}))
    with pytest.raises(RuntimeError, match="1 of 4 tasks failed"):
        parallel.map(fake.fails_for_two, range(4), settings)


def test_session_keeps_workers_across_maps():
    settings = Frozen({"engine": "local", "n_processes": 2})
    with parallel.Session(settings) as session:
        # on a loaded machine the second process may start after the first has run every task
        # of a map: map until both have served, then no later map may see a new process
        seen = set()
        for _ in range(20):
            seen |= set(session.map(fake.worker_pid, range(6)))
            if len(seen) == 2:
                break
        later = set(session.map(fake.worker_pid, range(6)))
        seeds = parallel.task_seeds(1, 4)
        assert session.map(fake.seeded_sum, seeds) == [fake.seeded_sum(s) for s in seeds]
    assert len(seen) == 2 and later <= seen and os.getpid() not in seen


def test_local_workers_share_the_cores_in_their_blas_too():
    """Two workers on the machine's cores: each one's BLAS (loaded with numpy before the worker's
    initializer ran) uses its share of the cores, not all of them (oversubscription)."""
    pytest.importorskip("threadpoolctl")
    with parallel.Session(Frozen({"engine": "local", "n_processes": 2})) as session:
        counts = session.map(fake.blas_threads, range(4))
    share = max(1, parallel.available_cpus() // 2)
    assert all(count == [share] for count in counts if count), counts


def _fold_in_order(consumed):
    def combine(total, value):
        consumed.append(value)
        return value if total is None else total + value   # float sums: the order shows in the bits
    return combine


def test_streamed_reduce_identical_and_bounded_on_every_engine(dask_client):
    """The fold of 12 results sees them in task order on every engine, so its floating-point sum is
    bit for bit the in-order sum; on dask with in_flight 1 at most 2 results (2 workers) wait."""
    seeds = parallel.task_seeds(5, 12)
    values = [fake.seeded_sum(s) for s in seeds]
    expected = values[0]
    for v in values[1:]:
        expected = expected + v
    for settings, extra in [(Frozen({"engine": "serial"}), {}),
                            (Frozen({"engine": "local", "n_processes": 2, "in_flight": 1}), {}),
                            (Frozen({"engine": "dask", "in_flight": 1}), {"client": dask_client})]:
        consumed, arrived = [], []
        held = []
        on_result = lambda i, r: (arrived.append(i), held.append(len(arrived) - len(consumed)))  # noqa: E731
        reduction = parallel.reduce(fake.seeded_sum, seeds, _fold_in_order(consumed), settings,
                                    on_result=on_result, **extra)
        assert consumed == values, settings["engine"]
        assert reduction.value == expected and reduction.n_success == 12
        assert max(held) <= (1 if settings["engine"] == "serial" else 2)


@pytest.mark.parametrize("engine", ["serial", "local"])
def test_streamed_reduce_skips_and_records_failures(engine):
    settings = Frozen({"engine": engine, "n_processes": 2, "retries": 1, "min_success": 0.75})
    consumed = []
    reduction = parallel.reduce(fake.fails_for_two, range(4), _fold_in_order(consumed), settings,
                                tolerate_failures=True)
    assert consumed == [0, 1, 3] and reduction.value == 4
    assert [f.index for f in reduction.failures] == [2] and "diverged" in reduction.failures[0].error
    assert parallel.require_success(reduction, settings) == 4
    with pytest.raises(RuntimeError, match="only 3 of 4"):
        parallel.require_success(reduction, Frozen({"min_success": 4}))
    with pytest.raises(RuntimeError, match="task 2"):       # not tolerated: raised as it finishes
        parallel.reduce(fake.fails_for_two, range(4), _fold_in_order([]), settings)
