"""The two kinds of error a user can cause, each carrying where it came from.

Both make the CLI print one screen and exit with code 2; anything else is a bug or a failed
computation (exit 1, traceback in the run's log).
"""
from __future__ import annotations


class XprUserError(Exception):
    """Base of errors caused by what the user gave: printed without traceback, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, file=None, key=None, line=None):
        super().__init__(message)
        self.message = message
        self.file = None if file is None else str(file)
        self.key = key
        self.line = line

    def format(self) -> str:
        head = type(self).headline
        parts = [f"xpr: {head}"]
        if self.file:
            where = self.file + (f", line {self.line}" if self.line else "")
            parts.append(f"  file:    {where}")
        if self.key:
            parts.append(f"  key:     {self.key}")
        parts.append(f"  problem: {self.message}")
        return "\n".join(parts)


class SettingsError(XprUserError):
    """A settings file, a `-o` override or a `command:` expression is wrong."""

    headline = "invalid settings"


class InputError(XprUserError):
    """Input data named by the settings is missing, unreadable or inconsistent."""

    headline = "invalid input"


class HomeError(XprUserError):
    """No usable xpr home."""

    headline = "no xpr home"
