"""dask worker plugins of xpr.parallel (imported only when the dask engine is used)."""
from __future__ import annotations

import os

from distributed.diagnostics.plugin import WorkerPlugin


class PinWorkerGPU(WorkerPlugin):
    """Worker i of a LocalCluster (named 0, 1, ...) uses GPU gpus[i % n]: CUDA_VISIBLE_DEVICES
    is set before the worker's first task imports cupy, and again after its nanny restarts it."""

    name = "xpr-pin-gpu"

    def __init__(self, gpus):
        self.gpus = [str(g) for g in gpus]

    def setup(self, worker):
        try:
            index = int(worker.name)
        except (TypeError, ValueError):       # not a LocalCluster worker: left as started
            return
        os.environ["CUDA_VISIBLE_DEVICES"] = self.gpus[index % len(self.gpus)]
