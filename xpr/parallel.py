"""Many independent tasks (phasing repeats, pattern chunks, image chunks) on the chosen engine.

    results = parallel.map(fn, tasks, settings.multi_process)
    results = parallel.map(fn, tasks, settings.multi_process, shared=pattern)   # fn(task, pattern)
    total = parallel.reduce(fn, tasks, combine, settings.multi_process)         # streamed, see below
    with parallel.Session(settings.multi_process) as session:                  # workers kept up
        for chunk in chunks: session.map(fn, tasks_of(chunk))

`fn` is a module-level function; results come back in task order. Engines (`multi_process.engine`):

  serial  one after another in this process (also used for one task or n_processes: 1)
  local   processes on this machine (default: one per physical core, or one per GPU when the
          work runs on cupy), each FFT-threaded on its share of the cores
  dask    a dask.distributed cluster: an existing scheduler (address or scheduler file), a
          LocalCluster, or batch jobs through dask-jobqueue (slurm, pbs, sge, lsf)

Threads and devices: every worker process xpr starts gets XPR_FFT_WORKERS (scipy.fft threads) and
OMP/MKL/OpenBLAS threads set to the cores it owns divided by the tasks it runs at once
(`worker_environment`), so a machine is never oversubscribed; with `gpus` (the CUDA devices of
`xpr.backend.gpu_ids()`) each worker is pinned to one of them through CUDA_VISIBLE_DEVICES.

A task that raises, or whose worker dies, is run again up to `retries` times. With
`tolerate_failures=True` a task that still fails comes back as a `TaskFailure` in its place and
`require_success` decides whether enough succeeded (`min_success`). Seeded work takes its seeds
from `task_seeds(seed, n)`, fixed per task index, so results are identical whatever the engine.
Only the calling process writes files: workers return results.

Streaming (`imap`, `reduce`): results are handed over in task order as soon as every earlier task
is done, and dropped by this module once handed over. Only tasks in a sliding window of
`in_flight` × workers task indices past the first not yet handed over are submitted, so at most
that many results are ever held (running, or finished and waiting for an earlier one), whatever
the number of tasks; `reduce` folds them in task order, so a floating-point sum is bit for bit
the same on every engine and any number of workers.
"""
from __future__ import annotations

import collections
import functools
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xpr.errors import SettingsError
from xpr.options import options, setting

IN_FLIGHT = 4   # default tasks per worker in the streaming window (multi_process.in_flight)


@dataclass
class TaskFailure:
    """Stands in a result list where a task failed after all its retries."""

    index: int
    error: str

    def __bool__(self):
        return False


@dataclass
class Reduction:
    """What `reduce` returns: the folded value of the tasks that succeeded, and those that failed."""

    value: Any
    n_tasks: int
    failures: list = field(default_factory=list)

    @property
    def n_success(self) -> int:
        return self.n_tasks - len(self.failures)


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


@options(None)
class SpreadOptions:
    """The documented `multi_process` keys every command shares (xpr.settings.COMMON_DEFAULTS):
    what a partial mapping (a test's, a script's) is completed with."""

    n_processes: int | str = setting("multi_process.n_processes")
    engine: str = setting("multi_process.engine")
    retries: int = setting("multi_process.retries", int)
    min_success: float = setting("multi_process.min_success", float)


@options(None)
class ClusterOptions:
    """`multi_process.dask.cluster`: the cluster xpr starts when no scheduler is given."""

    type: str = setting("multi_process.dask.cluster.type")
    jobs: int = setting("multi_process.dask.cluster.jobs", int)
    cores: int = setting("multi_process.dask.cluster.cores", int)
    memory: str = setting("multi_process.dask.cluster.memory")
    walltime: str = setting("multi_process.dask.cluster.walltime")
    queue: str | None = setting("multi_process.dask.cluster.queue")
    account: str | None = setting("multi_process.dask.cluster.account")
    job_extra_directives: tuple = setting("multi_process.dask.cluster.job_extra_directives", tuple)


_DOCUMENTED = SpreadOptions()


def _get(settings, key, default=None):
    """multi_process.<key>: from the settings, else the documented default (else `default`, for
    keys only some commands document)."""
    if settings is not None and key in settings:
        return settings[key]
    return getattr(_DOCUMENTED, key, default)


def n_workers(settings, n_tasks: int, gpus=None) -> int:
    """Worker processes for n_tasks: `n_processes`, or auto = one per physical core (one per GPU
    when `gpus` lists the devices the work runs on)."""
    requested = _get(settings, "n_processes")
    if requested in ("auto", None):
        workers = len(gpus) if gpus else physical_cores()
    elif isinstance(requested, int) and not isinstance(requested, bool) and requested >= 1:
        workers = requested
    else:
        raise SettingsError(f"n_processes must be 'auto' or an integer >= 1, got {requested!r}",
                            key="multi_process.n_processes")
    return max(1, min(workers, n_tasks))


# --------------------------------------------------------------------------------------------
# engines: generators (call, tasks, settings, session, window) -> (index, result | TaskFailure)
# in the order tasks finish; a task is submitted only once window.admits(index)
# --------------------------------------------------------------------------------------------

def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class _Window:
    """Task indices that may be submitted: [next, next + size), next = first not yet handed over."""

    def __init__(self, per_worker=None):
        self.per_worker = per_worker      # None: no bound (map keeps every result anyway)
        self.next = 0
        self.size = None

    def set_workers(self, workers: int):
        if self.per_worker is not None:
            self.size = max(1, int(self.per_worker) * max(1, int(workers)))

    def admits(self, index: int) -> bool:
        return self.size is None or index < self.next + self.size


def _serial(call, tasks, settings, session, window):
    retries = int(_get(settings, "retries"))
    window.set_workers(1)
    for index, task in enumerate(tasks):
        for attempt in range(retries + 1):
            try:
                result = call(task)
                break
            except Exception as error:  # a task's own failure: retried, then recorded
                result = TaskFailure(index, _describe(error))
        yield index, result
        del result


THREAD_VARIABLES = ("XPR_FFT_WORKERS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker_environment(cores: int, tasks_at_once: int = 1, gpu: str | None = None) -> dict:
    """Environment of a worker process owning `cores` cores and running `tasks_at_once` tasks at
    a time: FFT (scipy.fft `workers`) and BLAS/OpenMP threads = cores / tasks_at_once (>= 1),
    and CUDA_VISIBLE_DEVICES = gpu when given."""
    threads = str(max(1, int(cores) // max(1, int(tasks_at_once))))
    environment = {name: threads for name in THREAD_VARIABLES}
    if gpu is not None:
        environment["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return environment


def _init_worker(threads: int, gpu_queue=None):
    """A local worker's start: its thread counts, and its GPU (one per worker) if any. Ctrl-C
    (SIGINT to the terminal's whole process group) is left to the parent, which stops the workers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gpu = gpu_queue.get() if gpu_queue is not None else None
    os.environ.update(worker_environment(threads, 1, gpu))
    # BLAS/OpenMP libraries read their variables when loaded, and unpickling this initializer
    # has already imported numpy (and its BLAS): set the loaded ones' pools as well
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)


def _local(call, tasks, settings, session, window):
    retries = int(_get(settings, "retries"))
    attempts = [0] * len(tasks)
    retry = collections.deque()        # indices to run again (always inside the window)
    fresh = 0                          # the next index never submitted
    running: dict = {}                 # future -> index; popped as soon as its result is handed on
    window.set_workers(session.local_workers(len(tasks)))
    try:
        while fresh < len(tasks) or retry or running:
            pool = session.local_pool(len(tasks))
            while retry:
                index = retry.popleft()
                running[pool.submit(call, tasks[index])] = index
            while fresh < len(tasks) and window.admits(fresh):
                running[pool.submit(call, tasks[fresh])] = fresh
                fresh += 1
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = any(isinstance(f.exception(), BrokenProcessPool) for f in finished)
            if broken:       # a worker died: every task still running in the pool ends now
                finished, _ = wait(running)
            batch = collections.deque(sorted(finished, key=running.get))
            del finished                             # each result is referenced once: by `batch`
            while batch:
                future = batch.popleft()
                index = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as error:   # a worker died: the pool must be replaced
                    reason = "worker process died: " + _describe(error)
                except Exception as error:           # the task's own failure
                    reason = _describe(error)
                else:
                    del future
                    yield index, result
                    del result
                    continue
                attempts[index] += 1
                if attempts[index] > retries:
                    yield index, TaskFailure(index, reason)
                else:
                    retry.append(index)
            if broken:
                session.drop_local_pool()
    finally:                                         # closed early: nothing left queued
        for future in running:
            future.cancel()


def jobqueue_options(cluster_settings) -> dict:
    """dask-jobqueue cluster options of `multi_process.dask.cluster`: one worker process per job
    with `cores` threads, each task's FFTs and BLAS single-threaded (set in the job script)."""
    cluster = ClusterOptions.from_block(cluster_settings)
    environment = worker_environment(cluster.cores, cluster.cores)
    options = dict(cores=cluster.cores, processes=1, memory=cluster.memory, walltime=cluster.walltime,
                   job_extra_directives=list(cluster.job_extra_directives),
                   job_script_prologue=[f"export {k}={v}" for k, v in environment.items()])
    if cluster.queue:
        options["queue"] = cluster.queue
    if cluster.account:
        options["account"] = cluster.account
    return options


def dask_client(settings, gpus=None):
    """A dask.distributed Client as `multi_process.dask` says (caller closes it). A cluster xpr
    starts gets per-worker thread counts (`worker_environment`); a LocalCluster with `gpus` has
    one single-threaded worker per GPU, each pinned to its own."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise SettingsError("engine 'dask' needs dask.distributed: pip install 'xpr[dask]'",
                            key="multi_process.engine") from None
    dask_settings = _get(settings, "dask") or {}
    if dask_settings.get("scheduler_address"):
        return Client(dask_settings["scheduler_address"])
    if dask_settings.get("scheduler_file"):
        return Client(scheduler_file=str(dask_settings["scheduler_file"]))
    cluster_settings = dask_settings.get("cluster") or {}
    cluster_options = ClusterOptions.from_block(cluster_settings)
    kind, jobs, cores = cluster_options.type, cluster_options.jobs, cluster_options.cores
    if kind == "local":
        if gpus:
            jobs, cores = len(gpus), 1
        environment = worker_environment(available_cpus() // max(1, jobs), cores)
        cluster = LocalCluster(n_workers=jobs, threads_per_worker=cores, processes=True,
                               dashboard_address=None, env=environment)
    else:
        try:
            import dask_jobqueue
        except ImportError:
            raise SettingsError(f"cluster type '{kind}' needs dask-jobqueue: pip install 'xpr[dask]'",
                                key="multi_process.dask.cluster.type") from None
        cluster_class = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster,
                         "sge": dask_jobqueue.SGECluster, "lsf": dask_jobqueue.LSFCluster}[kind]
        options = jobqueue_options(cluster_settings)
        cluster = cluster_class(**options)
        cluster.scale(jobs=jobs)
    client = Client(cluster)
    client.xpr_owns_cluster = cluster   # closed together with the client by Session.close
    if gpus and kind == "local":
        from xpr.dask_plugins import PinWorkerGPU

        client.register_plugin(PinWorkerGPU(gpus))
    return client


def _dask_slots(client, settings) -> int:
    """Task slots of the cluster: its threads now, or those of the jobs xpr asked for."""
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001 - a scheduler that cannot say: fall back on the settings
        threads = 0
    planned = 0
    if getattr(client, "xpr_owns_cluster", None) is not None:
        cluster = ClusterOptions.from_block((_get(settings, "dask") or {}).get("cluster"))
        planned = cluster.jobs * cluster.cores
    return max(1, threads, planned)


def _hand_over(value):
    """The shared inputs of a dask map, as the result of a task (see `_dask`)."""
    return value


def _dask(call, tasks, settings, session, window):
    from dask.distributed import as_completed

    retries = int(_get(settings, "retries"))
    client = session.dask_client()
    extra = {}
    if isinstance(call, functools.partial) and call.keywords.get("shared") is not None:
        # the shared inputs travel once, as a task of their own that every task depends on; not
        # scattered: the scheduler keeps this task's recipe, so a worker that dies holding the
        # inputs costs a recomputation, where scattered data would be lost (and a broadcast to a
        # worker being restarted by its nanny can wait for ever)
        extra["shared"] = client.submit(_hand_over, call.keywords["shared"], pure=False, retries=retries)
        call = call.func
    window.set_workers(_dask_slots(client, settings))
    index_of = {}
    fresh = 0

    def submit_admitted():
        nonlocal fresh
        batch = []
        while fresh < len(tasks) and window.admits(fresh):
            batch.append(fresh)
            fresh += 1
        if not batch:
            return []
        futures = client.map(call, [tasks[i] for i in batch], pure=False, retries=retries, **extra)
        index_of.update((future.key, i) for i, future in zip(batch, futures))
        return futures

    pending = as_completed(submit_admitted(), loop=client.loop)
    try:
        for future in pending:
            index = index_of.pop(future.key)
            try:
                result = future.result()
            except Exception as error:  # failed after dask's retries (or its worker kept dying)
                result = TaskFailure(index, _describe(error))
            del future                  # the cluster may forget it
            yield index, result
            del result
            pending.update(submit_admitted())
    finally:                            # closed early: nothing left running for us
        left = list(pending.futures)
        if left:
            client.cancel(left)


ENGINES = {"serial": _serial, "local": _local, "dask": _dask}


class Session:
    """Workers kept up across several `map` calls: a local process pool or a dask client.

        with parallel.Session(settings.multi_process) as session:
            for chunk in chunks:
                results = session.map(fn, tasks_of(chunk))

    (Starting processes costs seconds on a busy machine; a loop of small maps should pay it once.)
    client: an existing dask Client to use with engine 'dask' (the caller keeps and closes it).
    gpus: the CUDA devices the tasks run on (`xpr.backend.gpu_ids()` when the backend is cupy):
    one local worker (or LocalCluster worker) per device, each pinned to its own.
    """

    def __init__(self, settings=None, client=None, gpus=None):
        self.settings = settings
        self.gpus = list(gpus) if gpus else None
        self.engine = _get(settings, "engine")
        if self.engine not in ENGINES:
            raise SettingsError(f"unknown engine '{self.engine}' (known: {', '.join(ENGINES)})",
                                key="multi_process.engine")
        self._pool = None
        self._pool_workers = None
        self._client = client
        self._owned = None

    def local_workers(self, n_tasks: int) -> int:
        if self._pool is not None:
            return self._pool_workers
        return n_workers(self.settings, max(n_tasks, physical_cores()), self.gpus)

    def local_pool(self, n_tasks: int) -> ProcessPoolExecutor:
        if self._pool is None:
            workers = self.local_workers(n_tasks)
            threads = max(1, available_cpus() // workers)
            context = multiprocessing.get_context("spawn")
            gpu_queue = None
            if self.gpus:       # worker k takes GPU k (a replaced pool hands them out again)
                gpu_queue = context.Queue()
                for k in range(workers):
                    gpu_queue.put(self.gpus[k % len(self.gpus)])
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                             initializer=_init_worker, initargs=(threads, gpu_queue))
            self._pool_workers = workers
        return self._pool

    def drop_local_pool(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def dask_client(self):
        if self._client is None:
            self._client = self._owned = dask_client(self.settings, self.gpus)
        return self._client

    def _stream(self, fn, tasks, shared, on_result, window):
        """(index, result | TaskFailure) in the order tasks finish; on_result called for each."""
        engine = self.engine
        if engine == "local" and (n_workers(self.settings, len(tasks), self.gpus) == 1 or len(tasks) <= 1):
            engine = "serial"
        call = functools.partial(fn, shared=shared) if shared is not None else fn
        for index, result in ENGINES[engine](call, tasks, self.settings, self, window):
            if on_result is not None:
                on_result(index, result)
            yield index, result
            del result

    def map(self, fn, tasks, shared=None, on_result=None, tolerate_failures=False):
        """fn(task) (or fn(task, shared=shared)) for every task, in task order.

        on_result(index, result) is called as each task finishes (result may be a TaskFailure).
        Without tolerate_failures the first task that still fails after its retries raises
        RuntimeError; with it, failed tasks come back as TaskFailure in their place.
        Every result is kept until the end: for many large results use `imap` or `reduce`.
        """
        tasks = list(tasks)
        results = dict(self._stream(fn, tasks, shared, on_result, _Window()))
        ordered = [results[i] for i in range(len(tasks))]
        failures = [r for r in ordered if isinstance(r, TaskFailure)]
        if failures and not tolerate_failures:
            raise RuntimeError(f"{len(failures)} of {len(tasks)} tasks failed; first: task "
                               f"{failures[0].index}: {failures[0].error}")
        return ordered

    def imap(self, fn, tasks, shared=None, on_result=None, tolerate_failures=False, in_flight=None):
        """Generator of (index, result) in task order, each as soon as all earlier tasks are done.

        Results are not kept here once handed over. Tasks are submitted only within a window of
        in_flight × workers indices past the first one not yet handed over (in_flight default:
        `multi_process.in_flight`, else 4), so at most that many results are held at a time.
        on_result(index, result) is called as each task finishes (completion order), e.g. for a
        progress bar. Without tolerate_failures a task that still fails after its retries raises
        RuntimeError when it finishes; with it, it is handed over as a TaskFailure in its place.
        """
        tasks = list(tasks)
        per_worker = in_flight if in_flight is not None else _get(self.settings, "in_flight", IN_FLIGHT)
        if per_worker is None or int(per_worker) < 1:
            raise SettingsError(f"in_flight must be an integer >= 1, got {per_worker!r}",
                                key="multi_process.in_flight")
        window = _Window(int(per_worker))
        held = {}                 # finished, waiting for an earlier task
        for index, result in self._stream(fn, tasks, shared, on_result, window):
            if isinstance(result, TaskFailure) and not tolerate_failures:
                raise RuntimeError(f"task {result.index} of {len(tasks)} failed after its retries: "
                                   f"{result.error}")
            held[index] = result
            del result
            while window.next in held:
                index, ready = window.next, held.pop(window.next)
                window.next += 1
                yield index, ready
                del ready

    def reduce(self, fn, tasks, combine, initial=None, shared=None, on_result=None,
               tolerate_failures=False, in_flight=None) -> Reduction:
        """Fold the results in task order as they stream in: value = combine(value, result).

        Each result is dropped once combined (see `imap`), so memory stays bounded whatever the
        number of tasks, and the fold is the same on every engine. Failed tasks (with
        tolerate_failures) are skipped and listed in the returned Reduction's `failures`.
        """
        tasks = list(tasks)
        value, failures = initial, []
        for index, result in self.imap(fn, tasks, shared=shared, on_result=on_result,
                                       tolerate_failures=tolerate_failures, in_flight=in_flight):
            if isinstance(result, TaskFailure):
                failures.append(result)
            else:
                value = combine(value, result)
            del result
        return Reduction(value, len(tasks), failures)

    def stop(self):
        """Stop at once (interrupted): the pool's processes are ended, not waited for; an owned
        dask cluster is closed without waiting on its tasks."""
        if self._pool is not None:
            quiet_broken_pool()
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
            for process in processes:
                if process.is_alive():
                    process.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=5)
            self._pool = None
        if self._owned is not None:
            cluster = getattr(self._owned, "xpr_owns_cluster", None)
            try:
                self._owned.close(timeout=5)
                if cluster is not None:
                    cluster.close(timeout=5)
            except Exception:  # noqa: BLE001 - interrupted anyway; stop_child_processes ends the rest
                pass
            self._owned = self._client = None

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

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None and not issubclass(exc_type, (Exception, GeneratorExit)):   # a signal, Ctrl-C
            self.stop()
        else:
            self.close()


def map(fn, tasks, settings=None, shared=None, on_result=None, tolerate_failures=False,
        client=None, gpus=None):  # noqa: A001 - the natural name
    """One `Session(settings, client, gpus).map(...)`: workers started for this call and stopped after."""
    with Session(settings, client=client, gpus=gpus) as session:
        return session.map(fn, tasks, shared=shared, on_result=on_result,
                           tolerate_failures=tolerate_failures)


def imap(fn, tasks, settings=None, shared=None, on_result=None, tolerate_failures=False,
         client=None, in_flight=None):
    """One `Session(settings, client).imap(...)`; the workers stop when the generator ends."""
    with Session(settings, client=client) as session:
        yield from session.imap(fn, tasks, shared=shared, on_result=on_result,
                                tolerate_failures=tolerate_failures, in_flight=in_flight)


def reduce(fn, tasks, combine, settings=None, initial=None, shared=None, on_result=None,
           tolerate_failures=False, client=None, in_flight=None) -> Reduction:
    """One `Session(settings, client).reduce(...)`: streamed fold of the results in task order."""
    with Session(settings, client=client) as session:
        return session.reduce(fn, tasks, combine, initial=initial, shared=shared, on_result=on_result,
                              tolerate_failures=tolerate_failures, in_flight=in_flight)


def child_processes(pid: int | None = None) -> list[int]:
    """Every live descendant of `pid` (default: this process), from /proc (Linux); elsewhere the
    multiprocessing children this process knows."""
    pid = os.getpid() if pid is None else pid
    proc = Path("/proc")
    if not (proc / str(pid) / "stat").exists():
        return [p.pid for p in multiprocessing.active_children()]
    parents = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":                  # zombies are dead already (reaped below)
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def quiet_broken_pool():
    """Drop, instead of print, the InvalidStateError a stopped process pool's management thread
    raises on Python 3.11: its `terminate_broken` sets BrokenProcessPool on every pending future,
    and one cancelled a moment earlier (the interrupted run cancels what is still queued) refuses
    it. Harmless - the run is stopping - but printed as a thread traceback under the run's one-line
    message. Installed once per process, before the pool's workers are ended."""
    import threading
    from concurrent.futures import InvalidStateError

    previous_hook = threading.excepthook
    if getattr(previous_hook, "xpr_quiet_broken_pool", False):
        return

    def hook(args):
        if not isinstance(args.exc_value, InvalidStateError):
            previous_hook(args)

    hook.xpr_quiet_broken_pool = True
    threading.excepthook = hook


def stop_child_processes(grace: float = 3.0) -> list[int]:
    """End every process this one started (pool workers, dask nannies and workers): SIGTERM, then
    SIGKILL after `grace` seconds; reap them. Returns their pids.

    Two exceptions keep a stopped run's stderr to its one line:
    * multiprocessing's resource tracker is left to end by itself: it exits as soon as this process
      does (its pipe closes), releasing what the pool leaked; killed first, it would be relaunched
      by the pool's own clean-up and print KeyError tracebacks for names it never saw;
    * a process pool whose workers are stopped marks its futures broken from its management thread,
      which on Python 3.11 raises for futures already cancelled (see `quiet_broken_pool`)."""
    import signal
    import time

    quiet_broken_pool()
    import multiprocessing.resource_tracker as resource_tracker

    tracker_pid = getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)
    children = [pid for pid in child_processes() if pid != tracker_pid]
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    alive = list(children)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        multiprocessing.active_children()          # reaps multiprocessing's own children
        _reap()
        alive = [pid for pid in alive if _alive(pid)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.05)
    _reap()
    return children


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc").is_dir()
    return stat[stat.rindex(")") + 2] != "Z"


def required_successes(n_tasks: int, settings=None) -> int:
    """How many of n_tasks must succeed: `min_success` as a fraction (<= 1) or a number (> 1)."""
    minimum = float(_get(settings, "min_success"))
    return int(np.ceil(minimum * n_tasks)) if minimum <= 1 else int(minimum)


def require_success(results, settings=None):
    """The successful results; RuntimeError if fewer than `min_success` of them.

    results: a list as `map(..., tolerate_failures=True)` returns it (gives the successful
    results), or a `Reduction` (gives its value).
    """
    if isinstance(results, Reduction):
        n_tasks, failures, good = results.n_tasks, results.failures, results.value
        n_good = results.n_success
    else:
        failures = [r for r in results if isinstance(r, TaskFailure)]
        good = [r for r in results if not isinstance(r, TaskFailure)]
        n_tasks, n_good = len(results), len(good)
    if n_good < required_successes(n_tasks, settings):
        minimum = float(_get(settings, "min_success"))
        failed = [f"task {r.index}: {r.error}" for r in failures]
        raise RuntimeError(f"only {n_good} of {n_tasks} tasks succeeded (min_success "
                           f"{minimum}); failed: " + "; ".join(failed))
    return good
