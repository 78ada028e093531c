"""Many independent tasks (phasing repeats, pattern chunks, image chunks) on the chosen engine.

    results = parallel.map(fn, tasks, settings.multi_process)
    results = parallel.map(fn, tasks, settings.multi_process, shared=pattern)   # fn(task, pattern)
    with parallel.Session(settings.multi_process) as session:                  # workers kept up
        for chunk in chunks: session.map(fn, tasks_of(chunk))

`fn` is a module-level function; results come back in task order. Engines (`multi_process.engine`):

  serial  one after another in this process (also used for one task or n_processes: 1)
  local   processes on this machine (default: one per physical core), each FFT-threaded on its share
  dask    a dask.distributed cluster: an existing scheduler (address or scheduler file), a
          LocalCluster, or batch jobs through dask-jobqueue (slurm, pbs, sge, lsf)

A task that raises, or whose worker dies, is run again up to `retries` times. With
`tolerate_failures=True` a task that still fails comes back as a `TaskFailure` in its place and
`require_success` decides whether enough succeeded (`min_success`). Seeded work takes its seeds
from `task_seeds(seed, n)`, fixed per task index, so results are identical whatever the engine.
Only the calling process writes files: workers return results.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpr.errors import SettingsError


@dataclass
class TaskFailure:
    """Stands in a result list where a task failed after all its retries."""

    index: int
    error: str

    def __bool__(self):
        return False


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads not counted)."""
    cpus = available_cpus()
    cores = set()
    for cpu in range(os.cpu_count() or 1):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return cpus
    return max(1, min(cpus, len(cores)))


def task_seeds(seed, n: int) -> list[int]:
    """Independent, reproducible seeds for n tasks (numpy SeedSequence spawning)."""
    children = np.random.SeedSequence(seed).spawn(n)
    return [int(child.generate_state(1, dtype=np.uint64)[0]) for child in children]


def _get(settings, key, default):
    return default if settings is None else settings.get(key, default)


def n_workers(settings, n_tasks: int) -> int:
    requested = _get(settings, "n_processes", "auto")
    if requested in ("auto", None):
        workers = physical_cores()
    elif isinstance(requested, int) and not isinstance(requested, bool) and requested >= 1:
        workers = requested
    else:
        raise SettingsError(f"n_processes must be 'auto' or an integer >= 1, got {requested!r}",
                            key="multi_process.n_processes")
    return max(1, min(workers, n_tasks))


# --------------------------------------------------------------------------------------------
# engines: each takes (call, n_tasks, settings, on_done) and returns {index: result | TaskFailure}
# --------------------------------------------------------------------------------------------

def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _serial(call, tasks, settings, on_done):
    retries = int(_get(settings, "retries", 1))
    results = {}
    for index, task in enumerate(tasks):
        for attempt in range(retries + 1):
            try:
                results[index] = call(task)
                break
            except Exception as error:  # a task's own failure: retried, then recorded
                results[index] = TaskFailure(index, _describe(error))
        on_done(index, results[index])
    return results


def _init_worker(threads: int):
    os.environ["XPR_FFT_WORKERS"] = str(threads)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def _local(call, tasks, settings, on_done, session):
    retries = int(_get(settings, "retries", 1))
    attempts = [0] * len(tasks)
    results: dict = {}
    pending = list(range(len(tasks)))
    while pending:
        pool = session.local_pool(len(tasks))
        futures = {index: pool.submit(call, tasks[index]) for index in pending}
        pending, broken = [], False
        for index, future in futures.items():
            try:
                results[index] = future.result()
                on_done(index, results[index])
                continue
            except BrokenProcessPool as error:   # a worker died: the pool must be replaced
                broken, reason = True, "worker process died: " + _describe(error)
            except Exception as error:           # the task's own failure
                reason = _describe(error)
            attempts[index] += 1
            if attempts[index] > retries:
                results[index] = TaskFailure(index, reason)
                on_done(index, results[index])
            else:
                pending.append(index)
        if broken:
            session.drop_local_pool()
    return results


def dask_client(settings):
    """A dask.distributed Client as `multi_process.dask` says (caller closes it)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise SettingsError("engine 'dask' needs dask.distributed: pip install 'xpr[dask]'",
                            key="multi_process.engine") from None
    dask_settings = _get(settings, "dask", None) or {}
    if dask_settings.get("scheduler_address"):
        return Client(dask_settings["scheduler_address"])
    if dask_settings.get("scheduler_file"):
        return Client(scheduler_file=str(dask_settings["scheduler_file"]))
    cluster_settings = dask_settings.get("cluster") or {}
    kind = cluster_settings.get("type", "local")
    jobs = int(cluster_settings.get("jobs", 2))
    cores = int(cluster_settings.get("cores", 1))
    if kind == "local":
        cluster = LocalCluster(n_workers=jobs, threads_per_worker=cores, processes=True,
                               dashboard_address=None)
    else:
        try:
            import dask_jobqueue
        except ImportError:
            raise SettingsError(f"cluster type '{kind}' needs dask-jobqueue: pip install 'xpr[dask]'",
                                key="multi_process.dask.cluster.type") from None
        cluster_class = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster,
                         "sge": dask_jobqueue.SGECluster, "lsf": dask_jobqueue.LSFCluster}[kind]
        options = dict(cores=cores, memory=cluster_settings.get("memory", "4GB"),
                       walltime=cluster_settings.get("walltime", "01:00:00"),
                       job_extra_directives=list(cluster_settings.get("job_extra_directives", [])))
        if cluster_settings.get("queue"):
            options["queue"] = cluster_settings["queue"]
        if cluster_settings.get("account"):
            options["account"] = cluster_settings["account"]
        cluster = cluster_class(**options)
        cluster.scale(jobs=jobs)
    client = Client(cluster)
    client.xpr_owns_cluster = cluster   # closed together with the client by Session.close
    return client


def _dask(call, tasks, settings, on_done, session):
    from dask.distributed import as_completed

    retries = int(_get(settings, "retries", 1))
    client = session.dask_client()
    extra = {}
    if isinstance(call, functools.partial) and call.keywords.get("shared") is not None:
        # large inputs go to every worker once; each task refers to them by future
        extra["shared"] = client.scatter(call.keywords["shared"], broadcast=True)
        call = call.func
    futures = client.map(call, tasks, pure=False, retries=retries, **extra)
    index_of = {future.key: i for i, future in enumerate(futures)}
    results = {}
    for future in as_completed(futures):
        index = index_of[future.key]
        try:
            results[index] = future.result()
        except Exception as error:  # failed after dask's retries (or its worker kept dying)
            results[index] = TaskFailure(index, _describe(error))
        on_done(index, results[index])
    return results


def _serial_engine(call, tasks, settings, on_done, session):
    return _serial(call, tasks, settings, on_done)


ENGINES = {"serial": _serial_engine, "local": _local, "dask": _dask}


class Session:
    """Workers kept up across several `map` calls: a local process pool or a dask client.

        with parallel.Session(settings.multi_process) as session:
            for chunk in chunks:
                results = session.map(fn, tasks_of(chunk))

    (Starting processes costs seconds on a busy machine; a loop of small maps should pay it once.)
    client: an existing dask Client to use with engine 'dask' (the caller keeps and closes it).
    """

    def __init__(self, settings=None, client=None):
        self.settings = settings
        self.engine = _get(settings, "engine", "local")
        if self.engine not in ENGINES:
            raise SettingsError(f"unknown engine '{self.engine}' (known: {', '.join(ENGINES)})",
                                key="multi_process.engine")
        self._pool = None
        self._client = client
        self._owned = None

    def local_pool(self, n_tasks: int) -> ProcessPoolExecutor:
        if self._pool is None:
            workers = n_workers(self.settings, max(n_tasks, physical_cores()))
            threads = max(1, available_cpus() // workers)
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(threads,))
        return self._pool

    def drop_local_pool(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def dask_client(self):
        if self._client is None:
            self._client = self._owned = dask_client(self.settings)
        return self._client

    def map(self, fn, tasks, shared=None, on_result=None, tolerate_failures=False):
        """fn(task) (or fn(task, shared=shared)) for every task, in task order.

        on_result(index, result) is called as each task finishes (result may be a TaskFailure).
        Without tolerate_failures the first task that still fails after its retries raises
        RuntimeError; with it, failed tasks come back as TaskFailure in their place.
        """
        tasks = list(tasks)
        engine = self.engine
        if engine == "local" and (n_workers(self.settings, len(tasks)) == 1 or len(tasks) <= 1):
            engine = "serial"
        call = functools.partial(fn, shared=shared) if shared is not None else fn
        done = on_result or (lambda index, result: None)
        results = ENGINES[engine](call, tasks, self.settings, done, self)
        ordered = [results[i] for i in range(len(tasks))]
        failures = [r for r in ordered if isinstance(r, TaskFailure)]
        if failures and not tolerate_failures:
            raise RuntimeError(f"{len(failures)} of {len(tasks)} tasks failed; first: task "
                               f"{failures[0].index}: {failures[0].error}")
        return ordered

    def close(self):
        self.drop_local_pool()
        if self._owned is not None:
            cluster = getattr(self._owned, "xpr_owns_cluster", None)
            self._owned.close()
            if cluster is not None:
                cluster.close()
            self._owned = self._client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def map(fn, tasks, settings=None, shared=None, on_result=None, tolerate_failures=False,
        client=None):  # noqa: A001 - the natural name
    """One `Session(settings, client).map(...)`: workers started for this call and stopped after."""
    with Session(settings, client=client) as session:
        return session.map(fn, tasks, shared=shared, on_result=on_result,
                           tolerate_failures=tolerate_failures)


def require_success(results, settings=None) -> list:
    """The successful results; RuntimeError if fewer than `min_success` of them."""
    good = [r for r in results if not isinstance(r, TaskFailure)]
    minimum = float(_get(settings, "min_success", 1.0))
    needed = int(np.ceil(minimum * len(results))) if minimum <= 1 else int(minimum)
    if len(good) < needed:
        failed = [f"task {r.index}: {r.error}" for r in results if isinstance(r, TaskFailure)]
        raise RuntimeError(f"only {len(good)} of {len(results)} tasks succeeded (min_success "
                           f"{minimum}); failed: " + "; ".join(failed))
    return good
