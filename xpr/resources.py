"""Where the packaged settings defaults and tutorials are (wheel or source checkout)."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"xpr installation is missing its '{name}' folder (looked in {_PACKAGE})")


def defaults_dir() -> Path:
    """settings_defaults/: <group>/<command>.yaml, the documented defaults of every command."""
    return _find("settings_defaults")


def tutorials_dir() -> Path:
    """tutorials/: <group>/<command>/*.yaml, the tutorial settings."""
    return _find("tutorials")
