"""Write to a temporary name beside the target, then rename: readers never see half a file."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path (same folder, same suffix) that replaces `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_symlink(link, target):
    """Point `link` at `target` (relative if possible), atomically replacing an old link."""
    link, target = Path(link), Path(target)
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        pointee = os.path.relpath(target, link.parent)
    except ValueError:
        pointee = str(target)
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(pointee, tmp)
    os.replace(tmp, link)
