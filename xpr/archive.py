"""Run archives: every run of a command gets its own dated, numbered folder, never reused.

    HOME/data/<group>/<product>/archive/<structure>/<D_M_YYYY>/run_<N>/   settings.yaml, run.log, outputs
    HOME/data/<group>/<product>/<link_name>  ->  the latest successful run's main file

* run_N is claimed by an exclusive mkdir, so concurrent jobs never share one;
* every file is written under a temporary name and renamed;
* the latest-link is replaced atomically, and only after the run succeeded;
* a failed run keeps its folder, gets a FAILED file, and its log holds the traceback.
"""
from __future__ import annotations

import logging
import re
import sys
import time
import traceback
from pathlib import Path

import yaml

from xpr.io import atomic_path, save_tree, save_vts
from xpr.io.atomic import replace_symlink
from xpr.settings import to_plain, today_folder_name

def claim_run_folder(parent: Path, prefix: str = "run") -> Path:
    """Create and return parent/<prefix>_N, N above every existing one, safe against concurrent claims."""
    parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"{prefix}_(\d+)$")
    taken = [int(m.group(1)) for p in parent.iterdir() if (m := pattern.match(p.name))]
    number = max(taken, default=-1) + 1
    while True:
        folder = parent / f"{prefix}_{number}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1
        except FileNotFoundError:      # a discarded run of another job removed the empty parent
            parent.mkdir(parents=True, exist_ok=True)


def remove_empty_parents(folder: Path, stop: Path) -> None:
    """Remove folder's ancestors below `stop` while they are empty (never `stop` itself)."""
    stop = stop.resolve()
    for parent in folder.resolve().parents:
        if parent == stop or stop not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:                # not empty (another run, or another job's claim): keep it
            return


def read_run_records(folder, group: str, commands, key: str = "input.shares_dir") -> list[Path]:
    """Main files of the runs that array tasks recorded in `folder` (task_<i>.runs, task order).

    Each line of a record is 'group command run_folder main_file' (written by the CLI when
    XPR_RUN_RECORD is set, as `xpr jobscript --array` does); only `group` runs of `commands` count.
    """
    from xpr.errors import InputError

    folder = Path(str(folder)).expanduser()
    if not folder.is_dir():
        raise InputError("shares folder not found", file=folder, key=key)
    records = sorted(folder.glob("task_*.runs"), key=lambda p: int(p.stem.split("_")[1]))
    if not records:
        raise InputError("no task_<i>.runs records in the shares folder (did the array tasks run?)",
                         file=folder, key=key)
    runs = []
    for record in records:
        for line in record.read_text().splitlines():
            words = line.split()
            if len(words) >= 4 and words[0] == group and words[1] in commands:
                runs.append(Path(words[3]))
    if not runs:
        raise InputError(f"the records name no {group} {'/'.join(commands)} run", file=folder, key=key)
    return runs


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _RunFileHandler(logging.FileHandler):
    """The run's log file; a full or read-only disk must not print logging's own tracebacks."""

    def handleError(self, record):
        self.failed = True


class LogProgress:
    """tqdm's interface for jobs without a terminal: one log line every `every` of the total
    (default 10 %) instead of a bar redrawn with carriage returns."""

    def __init__(self, log, iterable=None, total=None, desc="", every=0.1):
        self.log, self.iterable, self.desc = log, iterable, desc
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.every = total, 0, every
        self.postfix = ""
        self.started = time.monotonic()
        self._next = every

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        self.n += n
        if self.total and self.n / self.total >= self._next - 1e-12:
            fraction = min(self.n / self.total, 1.0)
            while self._next <= fraction + 1e-12:
                self._next += self.every
            self.log.info("%s: %d/%d (%d %%, %.0f s)%s", self.desc or "progress", self.n, self.total,
                          round(100 * fraction), time.monotonic() - self.started,
                          f" {self.postfix}" if self.postfix else "")

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = str(s)

    def set_description(self, desc=None, refresh=True):
        self.desc = desc or ""

    def write(self, text, *args, **kwargs):
        self.log.info("%s", text)

    def refresh(self):
        pass

    def close(self):
        pass


class Run:
    """One run of one command: its folder, log, progress bars and atomic writers.

    Log records go to the run's run.log and propagate to the `xpr` logger and the root (so a
    notebook's handlers see them). console: print them on stderr too (True: the CLI unless -q;
    None: only if no handler above would, so nothing is printed twice). level: logging.DEBUG for
    `xpr -v`. An OSError while the folder is made (read-only home, full disk) is raised after
    the folder, if one was made, is marked FAILED where the disk allows.
    """

    def __init__(self, home, group: str, product: str, structure: str, settings, quiet: bool = False,
                 link_name: str | None = None, command: str = "", console: bool | None = None,
                 level: int = logging.INFO):
        self.home = home
        self.group = group
        self.product = product
        self.structure = structure
        self.settings = settings
        self.quiet = quiet
        self.command = command
        self.level = level
        self.link_name = link_name or f"{structure}.h5"
        self.product_dir = home.product_dir(group, product)
        self.path = claim_run_folder(self.product_dir / "archive" / structure / today_folder_name())
        self.main_file: Path | None = None
        self.log = None
        try:
            self.log = self._make_logger(console)
            with atomic_path(self.path / "settings.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(to_plain(settings), sort_keys=False))
        except OSError as error:
            self.fail(error)
            raise

    # --- logging and progress ------------------------------------------------------------
    def _make_logger(self, console) -> logging.Logger:
        logger = logging.getLogger(f"xpr.run.{self.path}")
        logger.setLevel(self.level)
        file_handler = _RunFileHandler(self.path / "run.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
        above = logging.getLogger("xpr").hasHandlers()     # a notebook's (or pytest's) handlers
        if console is None:
            console = not above
        if console and not self.quiet:
            stream = logging.StreamHandler(sys.stderr)
            stream.setFormatter(logging.Formatter(f"[{self.group} {self.command}] %(message)s"))
            logger.addHandler(stream)
        logger.propagate = True
        return logger

    @property
    def shows_bars(self) -> bool:
        """Progress bars are drawn: not quiet, and a terminal or Jupyter (worker processes that
        draw their own bars ask this of the run that started them)."""
        return not self.quiet and (_is_terminal(sys.stderr) or "ipykernel" in sys.modules)

    def progress(self, iterable=None, total=None, desc: str = "", **kwargs):
        """A tqdm bar on a terminal (a widget under Jupyter, through tqdm.auto); otherwise
        (batch jobs, pipes) a log line every 10 % (run.log always; the console unless -q)."""
        if self.shows_bars:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                        leave=False, **kwargs)
        return LogProgress(self.log, iterable, total=total, desc=desc)

    # --- writers --------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def save_h5(self, name: str, tree: dict, main: bool = False, attrs: dict | None = None) -> Path:
        path = save_tree(self.file(name), tree, attrs=attrs)
        if main:
            self.main_file = path
        self.log.info("wrote %s", path)
        return path

    def savefig(self, fig, name: str, dpi: int = 100) -> Path:
        from xpr import plot

        return plot.save(fig, self.file(name), dpi=dpi)

    def save_vts(self, name: str, values, grid: str = "cartesian", **grid_args) -> Path:
        return save_vts(self.file(name), values, grid=grid, **grid_args)

    def set_main(self, name: str):
        self.main_file = self.file(name)

    def set_link_name(self, name: str):
        self.link_name = name

    # --- end of the run ---------------------------------------------------------------------
    def succeed(self) -> Path | None:
        """Mark success; point the product's latest-link at the main file (unless turned off)."""
        link = None
        if self.main_file is not None and self.settings.get("save_symlink", True):
            link = self.product_dir / self.link_name
            replace_symlink(link, self.main_file)
            self.log.info("latest %s -> %s", link, self.main_file)
        self.close()
        return link

    def fail(self, error: BaseException, reason: str | None = None) -> Path | None:
        """Mark failure: FAILED file with the reason; traceback in run.log; the link is untouched.
        Where the disk refuses (full, read-only) nothing more is written and None is returned."""
        reason = reason or f"{type(error).__name__}: {error}"
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        for handler in (self.log.handlers if self.log is not None else []):
            if isinstance(handler, logging.FileHandler):
                handler.emit(logging.LogRecord(self.log.name, logging.ERROR, "", 0, "run failed: %s\n%s",
                                               (reason, text), None))
        marker = self.path / "FAILED"
        try:
            with atomic_path(marker) as tmp:
                tmp.write_text(reason + "\n")
        except OSError:
            try:                      # a full disk may still take a few bytes without a rename
                with open(marker, "w") as f:
                    f.write(reason + "\n")
            except OSError:
                marker = None
        self.close()
        return marker

    def started_work(self) -> bool:
        """Whether the worker wrote anything beyond settings.yaml and run.log."""
        return any(p.name not in ("settings.yaml", "run.log") for p in self.path.iterdir())

    def discard(self):
        """Remove the folder of a run that never started work (a user error found first)."""
        self.close()
        if not self.started_work():
            for name in ("settings.yaml", "run.log"):
                (self.path / name).unlink(missing_ok=True)
            self.path.rmdir()
            remove_empty_parents(self.path, self.product_dir)   # no empty archive/<name>/<date>/ left

    def close(self):
        if self.log is None:
            return
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)
