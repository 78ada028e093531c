"""The xpr home: settings of every command and the data archive.

    HOME/settings/projects/<group>/<command>/default_<version>.yaml   packaged defaults (reference copy)
    HOME/settings/projects/<group>/<command>/tutorial*.yaml           tutorial settings
    HOME/settings/projects/<group>/<command>/<yours>.yaml             user settings
    HOME/data/<group>/<product>/...                                    run archives (xpr.archive)

The home is found from `--home`, then `XPR_HOME`, then the path recorded by the last
`--setup_home` in `~/.xpr/config.yaml`, then `~/.xpr`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from xpr import __version__, registry
from xpr.errors import HomeError, InputError
from xpr import resources


def config_file() -> Path:
    return Path.home() / ".xpr" / "config.yaml"


class Home:
    def __init__(self, root):
        self.root = Path(root).expanduser().resolve()

    @property
    def settings(self) -> Path:
        return self.root / "settings" / "projects"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def settings_dir(self, group: str, command: str) -> Path:
        return self.settings / group / command

    def product_dir(self, group: str, product: str) -> Path:
        return self.data / group / product

    def latest(self, group: str, product: str, link_name: str) -> Path:
        """The main file of the latest successful run of a product (its latest-link).

        This is the default input of the next command in a chain.
        """
        link = self.product_dir(group, product) / link_name
        if not link.exists():
            producers = [s.name for s in registry.COMMANDS if s.group == group and s.product == product]
            raise InputError(f"no previous '{product}' result named {link_name}: run "
                             f"`xpr {group} {' or '.join(producers) or product} ...` first, "
                             "or give the input file's path in the settings", file=link)
        return link.resolve()

    def is_set_up(self) -> bool:
        return self.settings.is_dir() and self.data.is_dir()


def locate(option: str | None = None) -> Home:
    """The home to use: --home, XPR_HOME, the recorded one, ~/.xpr. Must have been set up."""
    if option:
        home, how = Home(option), "--home"
    elif os.environ.get("XPR_HOME"):
        home, how = Home(os.environ["XPR_HOME"]), "XPR_HOME"
    else:
        recorded = _recorded_home()
        home, how = (Home(recorded), str(config_file())) if recorded else (Home(Path.home() / ".xpr"), "default")
    if not home.is_set_up():
        raise HomeError(f"{home.root} (from {how}) is not an xpr home: run `xpr --setup_home "
                        f"[PATH]` first", file=home.root)
    return home


def _recorded_home() -> str | None:
    path = config_file()
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None
    return data.get("home") if isinstance(data, dict) else None


def setup(path: str | None = None) -> tuple[Home, list[Path]]:
    """Create (or complete) a home; never overwrite a user's file. Returns the home and new files."""
    if path:
        root = Path(path)
    elif os.environ.get("XPR_HOME"):
        root = Path(os.environ["XPR_HOME"])
    else:
        root = Path.home() / ".xpr"
    home = Home(root)
    created = []
    home.data.mkdir(parents=True, exist_ok=True)
    for spec in registry.COMMANDS:
        folder = home.settings_dir(spec.group, spec.name)
        folder.mkdir(parents=True, exist_ok=True)
        source = resources.defaults_dir() / spec.group / f"{spec.name}.yaml"
        copies = [(source, folder / f"default_{__version__}.yaml")] if source.is_file() else []
        tutorial_folder = resources.tutorials_dir() / spec.group / spec.name
        if tutorial_folder.is_dir():
            copies += [(t, folder / t.name) for t in sorted(tutorial_folder.glob("*.yaml"))]
        for src, dst in copies:
            if not dst.exists():
                shutil.copyfile(src, dst)
                created.append(dst)
    _record_home(home)
    return home, created


def _record_home(home: Home):
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump({"home": str(home.root)}))
    os.replace(tmp, path)
