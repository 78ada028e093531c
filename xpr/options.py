"""One road from settings into the numerics: frozen options objects with the documented defaults.

A worker reads its resolved settings (`xpr.settings.Frozen`, attribute access, read-only) and
hands its numerics one frozen options object, in the units the method uses. The fields that are
settings name their key; their defaults are read from the command's commented defaults file
(`settings_defaults/<group>/<command>.yaml`, the table the docs are generated from) when the
class is made, so no default is written twice:

    @options("em", "ptycho")
    class Options:
        epochs: int = setting("reconstruction.epochs")
        refine_probe: bool = setting("reconstruction.refine.probe")
        relative_tolerance: float = 1e-6      # a constant of the method, not a setting

    Options()                           # the documented defaults
    Options(epochs=25)                  # a test's or a script's variation of them
    Options.from_settings(settings)     # what a run resolved (user file, -o overrides, expressions)
    Options.from_block({"epochs": 5})   # a partial block (keys = the last part of each setting's key)

`setting(key, convert)` may convert the settings value into the method's form (a list into a
tuple, degrees into radians, ...); the conversion applies to the default as well. Fields that are
not settings (derived from the data, or constants of the method) are ordinary dataclass fields;
`tests/test_options.py` checks that none of them shadows a documented key.

Options objects are frozen dataclasses: hashable where their values are, picklable, so they
travel unchanged into worker processes and dask tasks.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

SETTING = "xpr_setting"
CONVERT = "xpr_convert"


def setting(key: str, convert: Callable[[Any], Any] | None = None):
    """A field whose value is the setting `key` (dotted path), its default the documented one."""
    return dataclasses.field(metadata={SETTING: key, CONVERT: convert})


def lookup(tree: Mapping, key: str):
    """The value at a dotted path of a settings tree (a KeyError naming the path when absent)."""
    node = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"settings have no key '{key}'")
        node = node[part]
    return node


def _immutable(value):
    """Lists as tuples and mappings as Frozen mappings, recursively (frozen defaults)."""
    from xpr.settings import Frozen

    if isinstance(value, Mapping):
        return Frozen(value)
    if isinstance(value, (list, tuple)):
        return tuple(_immutable(v) for v in value)
    return value


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def documented_defaults(group: str | None, command: str | None) -> dict:
    """The documented defaults of `group command` (with the common keys), or of the common keys
    alone when group is None."""
    from xpr.settings import COMMON_DEFAULTS, Schema, parse_yaml

    if group is None:
        return parse_yaml(COMMON_DEFAULTS, "<xpr common defaults>")
    return Schema.for_command(group, command).defaults


def setting_fields(cls) -> dict:
    """{field name: dotted settings key} of an options class."""
    return {f.name: f.metadata[SETTING] for f in dataclasses.fields(cls) if SETTING in f.metadata}


def options(group: str | None, command: str | None = None):
    """Class decorator: a frozen dataclass whose `setting(...)` fields default to the documented
    values of `group command` (group None: the keys every command shares)."""

    def make(cls):
        defaults = documented_defaults(group, command)
        for name, value in list(vars(cls).items()):
            if not (isinstance(value, dataclasses.Field) and SETTING in value.metadata):
                continue
            key = value.metadata[SETTING]
            try:
                raw = lookup(defaults, key)
            except KeyError:
                where = f"{group} {command}" if group else "the common settings"
                raise TypeError(f"{cls.__name__}.{name}: '{key}' is not documented for {where}") from None
            if isinstance(raw, Mapping) and "command" in raw:
                raise TypeError(f"{cls.__name__}.{name}: the default of '{key}' is an expression; "
                                "evaluate it in the worker instead")
            convert = value.metadata.get(CONVERT)
            default = _immutable(convert(raw) if convert else raw)
            if _hashable(default):
                value.default = default
            else:
                value.default_factory = lambda default=default: default
        made = dataclasses.dataclass(frozen=True)(cls)
        made.from_settings = classmethod(from_settings)
        made.from_block = classmethod(from_block)
        made.xpr_command = (group, command)
        return made

    return make


def from_settings(cls, settings: Mapping, **given):
    """The options of resolved `settings` (Frozen or a plain mapping of the whole command);
    `given` sets the fields that are not settings (and may replace settings)."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in given or SETTING not in field.metadata:
            continue
        raw = lookup(settings, field.metadata[SETTING])
        convert = field.metadata.get(CONVERT)
        values[field.name] = _immutable(convert(raw) if convert else raw)
    return cls(**values, **given)


def from_block(cls, block: Mapping | None, **given):
    """The options of one settings block that may be partial (a test's or a script's mapping,
    e.g. {"cores": 16} for multi_process.dask.cluster): each setting field takes the block's
    value under the last part of its key when present, else its documented default."""
    block = dict(block or {})
    values = {}
    for field in dataclasses.fields(cls):
        leaf = field.metadata.get(SETTING, "").rsplit(".", 1)[-1]
        if field.name in given or SETTING not in field.metadata or leaf not in block:
            continue
        convert = field.metadata.get(CONVERT)
        values[field.name] = _immutable(convert(block[leaf]) if convert else block[leaf])
    return cls(**values, **given)
