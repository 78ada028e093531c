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


class Run:
    """One run of one command: its folder, log, progress bars and atomic writers."""

    def __init__(self, home, group: str, product: str, structure: str, settings, quiet: bool = False,
                 link_name: str | None = None, command: str = ""):
        self.home = home
        self.group = group
        self.product = product
        self.structure = structure
        self.settings = settings
        self.quiet = quiet
        self.command = command
        self.link_name = link_name or f"{structure}.h5"
        self.product_dir = home.product_dir(group, product)
        self.path = claim_run_folder(self.product_dir / "archive" / structure / today_folder_name())
        self.main_file: Path | None = None
        self.log = self._make_logger()
        with atomic_path(self.path / "settings.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(to_plain(settings), sort_keys=False))

    # --- logging and progress ------------------------------------------------------------
    def _make_logger(self) -> logging.Logger:
        logger = logging.getLogger(f"xpr.run.{self.path}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        file_handler = logging.FileHandler(self.path / "run.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
        if not self.quiet:
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter(f"[{self.group} {self.command}] %(message)s"))
            logger.addHandler(console)
        return logger

    def progress(self, iterable=None, total=None, desc: str = "", **kwargs):
        """A tqdm progress bar on stderr; silent under -q."""
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=self.quiet, file=sys.stderr,
                    dynamic_ncols=True, leave=False, **kwargs)

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

    def fail(self, error: BaseException) -> Path:
        """Mark failure: FAILED file with the reason; traceback in run.log; the link is untouched."""
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        for handler in self.log.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.emit(logging.LogRecord(self.log.name, logging.ERROR, "", 0, "run failed:\n%s",
                                               (text,), None))
        with atomic_path(self.path / "FAILED") as tmp:
            tmp.write_text(f"{type(error).__name__}: {error}\n")
        self.close()
        return self.path / "FAILED"

    def close(self):
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)
