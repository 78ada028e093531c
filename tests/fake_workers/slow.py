"""A worker whose tasks wait (for the signal tests): each task records its process id in a file
named started_<index>_<pid> in `folder`, then sleeps `seconds`."""
import os
import time

import numpy as np

from xpr import parallel


def wait_task(task):
    index, folder, seconds = task
    with open(os.path.join(folder, f"started_{index}_{os.getpid()}"), "w"):
        pass
    time.sleep(seconds)
    return index


def run(settings, archive):
    tasks = [(i, settings.folder, settings.seconds) for i in range(settings.n)]
    archive.log.info("%d waiting tasks", len(tasks))
    done = parallel.map(wait_task, tasks, settings.multi_process)
    archive.save_h5("slow.h5", {"done": np.asarray(done)}, main=True)
    return {"done": done}
