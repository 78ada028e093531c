"""Settings: documented defaults + user YAML + `-o` overrides -> one frozen, validated mapping.

Resolution of `xpr <group> <command> NAME -o a.b=v`:

1. the command's defaults file `settings_defaults/<group>/<command>.yaml` is read; the comment on
   each key's line is that key's documentation (description | unit | range | choices | type | keys);
2. NAME is a path to a YAML file, or `NAME.yaml` in `HOME/settings/projects/<group>/<command>/`;
3. the user tree is deep-merged over the defaults (a key documented `keys: any` is replaced whole),
   then each `-o key.sub=value` override (value read as YAML) is applied: it sets that one key,
   inside `keys: any` mappings too (the rest of such a mapping is kept);
4. every mapping `{command: "expression"}` is evaluated as pure arithmetic by xpr.expressions
   (an allow-list: numpy's mathematical functions and constructors under `np`, `pi`, `xpr_opt`,
   `today`, comprehensions; no I/O, no modules, bounded size and time) and `{today}` in strings
   becomes the run-folder date;
5. every key is checked against the defaults: unknown keys (with a did-you-mean), types, ranges
   and choices. Any problem raises SettingsError naming the file, the key path and what was
   expected.
"""
from __future__ import annotations

import datetime
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xpr import expressions, resources
from xpr.errors import SettingsError

COMMON_DEFAULTS = """\
save_symlink: true          # point the product's latest-link at this run's main file after success | type: bool
GPU:                        # where the numerical kernels run
  use: auto                 # cupy on a CUDA device: auto (if one is present), true (required) or false | type: bool|str
  precision: single         # complex64/float32 or complex128/float64 arrays | choices: [single, double]
multi_process:              # how independent tasks (repeats, chunks) are spread
  n_processes: auto         # worker processes of the local engine: auto = one per physical core | type: int|str
  engine: local             # serial (this process), local (processes here) or dask (a dask cluster) | choices: [serial, local, dask]
  retries: 1                # times a failed task (or one whose worker died) is run again | range: [0, 100]
  min_success: 1.0          # fraction (<= 1) or number (> 1) of tasks that must succeed, else the run fails | range: [0, null]
  dask:                     # the dask engine (pip install 'xpr[dask]')
    scheduler_address: null # address of a running scheduler, e.g. tcp://node1:8786 | type: str|null
    scheduler_file: null    # scheduler file written by `dask scheduler --scheduler-file` | type: path|null
    cluster:                # a cluster xpr starts when no scheduler is given
      type: local           # local, or a batch system through dask-jobqueue | choices: [local, slurm, pbs, sge, lsf]
      jobs: 2               # local: worker processes; batch: jobs submitted | range: [1, null]
      cores: 1              # cores per worker (local: threads per worker) | range: [1, null]
      memory: 4GB           # memory per job (batch systems) | type: str
      walltime: '01:00:00'  # walltime per job (batch systems) | type: str
      queue: null           # queue / partition (batch systems) | type: str|null
      account: null         # account / project to charge (batch systems) | type: str|null
      job_extra_directives: []  # extra scheduler directives, e.g. ['--gres=gpu:1'] | type: list
"""

class Loader(yaml.SafeLoader):
    """YAML 1.1 safe loading, except that `1e-6` and `1.0e4` are floats (as in YAML 1.2 and
    Python), not strings: physicists write them that way."""


Loader.yaml_implicit_resolvers = {key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+[eE][-+]?[0-9]+$"""),
    list("-+0123456789."))


def load(text: str):
    return yaml.load(text, Loader=Loader)


TYPE_NAMES = ("int", "float", "str", "bool", "list", "dict", "path", "any", "null")


def today_folder_name(date: datetime.date | None = None) -> str:
    """The date as used in run folders and `{today}`: D_M_YYYY, zero-padded (xFrame's %d_%m_%Y)."""
    return (date or datetime.date.today()).strftime("%d_%m_%Y")


# --------------------------------------------------------------------------------------------
# documented defaults
# --------------------------------------------------------------------------------------------

@dataclass
class KeySpec:
    """Everything the defaults file says about one key."""

    path: tuple
    default: Any
    description: str = ""
    unit: str | None = None
    range: tuple | None = None
    range_open: tuple = (False, False)       # (min excluded, max excluded)
    length: tuple | None = None              # (min, max) items of a list value; max None: any
    choices: tuple | None = None
    types: tuple = ("any",)
    explicit_types: bool = False
    keys_any: bool = False
    children: dict = field(default_factory=dict)

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def is_group(self) -> bool:
        return isinstance(self.default, dict) and not self.keys_any and not _is_command(self.default)

    def describe_line(self) -> str:
        bits = [self.description] if self.description else []
        if self.unit:
            bits.append(f"unit: {self.unit}")
        if self.range:
            low, high = self.range
            lo_op, hi_op = (">" if self.range_open[0] else ">="), ("<" if self.range_open[1] else "<=")
            bits.append(f"range: {lo_op} {low}" if high is None else f"range: {hi_op} {high}"
                        if low is None else f"range: {_range_text(low, high, self.range_open)}")
        if self.choices:
            bits.append("choices: " + ", ".join(map(str, self.choices)))
        if self.length:
            bits.append(f"length: {_length_text(self.length)}")
        return "; ".join(bits)


def _is_command(value) -> bool:
    return isinstance(value, dict) and set(value) == {"command"} and isinstance(value["command"], str)


def _infer_types(default) -> tuple:
    if default is None or _is_command(default):
        return ("any",)
    if isinstance(default, bool):
        return ("bool",)
    if isinstance(default, int):
        return ("int",)
    if isinstance(default, float):
        return ("float",)
    if isinstance(default, str):
        return ("str",)
    if isinstance(default, (list, tuple)):
        return ("list",)
    if isinstance(default, dict):
        return ("dict",)
    return ("any",)


def _comment_after(lines: list[str], line: int, column: int) -> str:
    """The `# comment` on `line` after `column`, ignoring '#' inside quotes."""
    text = lines[line][column:] if line < len(lines) else ""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace() or column + i == 0):
            return text[i + 1:].strip()
    return ""


def _parse_range(text: str, file, dotted: str) -> tuple[tuple, tuple]:
    """'[min, max]' with '(' or ')' for a bound the value may not reach, null for none:
    ((min, max), (min excluded, max excluded))."""
    text = text.strip()
    opens = (text[:1] == "(", text[-1:] == ")")
    lo_hi = load("[" + text[1:-1] + "]") if text[:1] in "[(" and text[-1:] in "])" else None
    if not (isinstance(lo_hi, list) and len(lo_hi) == 2
            and all(b is None or isinstance(b, (int, float)) for b in lo_hi)):
        raise SettingsError(f"range must be [min, max] (a round bracket excludes its bound), got "
                            f"{text}", file=file, key=dotted)
    return tuple(lo_hi), opens


def _range_text(low, high, opens=(False, False)) -> str:
    low, high = ("null" if b is None else b for b in (low, high))
    return f"{'(' if opens[0] else '['}{low}, {high}{')' if opens[1] else ']'}"


def _parse_doc(comment: str, file, dotted: str) -> dict:
    parts = [p.strip() for p in comment.split(" | ")]
    doc = {"description": parts[0]}
    for part in parts[1:]:
        name, sep, value = part.partition(":")
        name = name.strip()
        if not sep or name not in ("unit", "range", "choices", "type", "keys", "length"):
            raise SettingsError(f"defaults comment field '{part}' is not one of "
                                f"unit/range/choices/type/keys/length", file=file, key=dotted)
        value = value.strip()
        if name == "unit":
            doc["unit"] = value
        elif name == "range":
            doc["range"], doc["range_open"] = _parse_range(value, file, dotted)
        elif name == "choices":
            doc["choices"] = tuple(load(value))
        elif name == "type":
            types = tuple(t.strip() for t in value.split("|"))
            unknown = [t for t in types if t not in TYPE_NAMES]
            if unknown:
                raise SettingsError(f"unknown type {unknown} (known: {', '.join(TYPE_NAMES)})",
                                    file=file, key=dotted)
            doc["types"] = types
        elif name == "keys":
            doc["keys_any"] = value == "any"
        elif name == "length":
            doc["length"] = _parse_length(value, file, dotted)
    return doc


def _parse_length(text: str, file, dotted: str) -> tuple:
    """'N' or '[min, max]' (max null: no upper bound): how many items a list value holds."""
    value = load(text)
    bounds = (value, value) if isinstance(value, int) else value
    if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and isinstance(bounds[0], int)
            and (bounds[1] is None or isinstance(bounds[1], int))):
        raise SettingsError(f"length must be N or [min, max], got {text}", file=file, key=dotted)
    return tuple(bounds)


def _length_text(length: tuple) -> str:
    low, high = length
    return str(low) if low == high else f"{low} or more" if high is None else f"{low} to {high}"


def _specs_from_node(node, lines, file, prefix=()) -> dict:
    specs = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        path = prefix + (key,)
        if isinstance(value_node, yaml.ScalarNode) or value_node.flow_style:
            comment = _comment_after(lines, value_node.end_mark.line, value_node.end_mark.column) \
                if value_node.end_mark.line == key_node.start_mark.line else \
                _comment_after(lines, key_node.end_mark.line, key_node.end_mark.column)
        else:
            comment = _comment_after(lines, key_node.end_mark.line, key_node.end_mark.column)
        doc = _parse_doc(comment, file, ".".join(path)) if comment else {}
        default = yaml.load(yaml.serialize(value_node), Loader=Loader)
        spec = KeySpec(path=path, default=default, explicit_types="types" in doc, **doc)
        if "types" not in doc:
            spec.types = _infer_types(default)
        if isinstance(value_node, yaml.MappingNode) and not spec.keys_any and not _is_command(default):
            spec.children = _specs_from_node(value_node, lines, file, path)
        specs[key] = spec
    return specs


def _specs_from_text(text: str, file) -> dict:
    parse_yaml(text, file)            # syntax errors with their line
    node = yaml.compose(text, Loader=Loader)
    return _specs_from_node(node, text.splitlines(), file) if node is not None else {}


def _merge_specs(common: dict, own: dict) -> dict:
    """A command's own documentation over the common keys (GPU, multi_process, ...), key by key.

    A command may restate a common key to change its default; what it leaves undocumented
    (description, unit, range, choices, declared type) and the sub-keys it does not restate keep
    the common definition.
    """
    merged = dict(common)
    for key, spec in own.items():
        base = common.get(key)
        if base is None:
            merged[key] = spec
            continue
        spec.description = spec.description or base.description
        spec.unit = spec.unit or base.unit
        if spec.range is None:
            spec.range, spec.range_open = base.range, base.range_open
        spec.choices = spec.choices if spec.choices is not None else base.choices
        spec.length = spec.length if spec.length is not None else base.length
        if not spec.explicit_types and base.explicit_types:
            spec.types, spec.explicit_types = base.types, True
        spec.keys_any = spec.keys_any or base.keys_any
        spec.children = _merge_specs(base.children, spec.children)
        if isinstance(base.default, dict) and isinstance(spec.default, dict):
            spec.default = deep_merge(base.default, spec.default)
        merged[key] = spec
    return merged


def load_yaml(path: Path) -> dict:
    """A YAML mapping from a file; SettingsError with the line for syntax errors."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SettingsError(f"cannot read settings file: {err.strerror}", file=path) from None
    return parse_yaml(text, path)


def parse_yaml(text: str, file) -> dict:
    try:
        tree = load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        raise SettingsError(f"YAML syntax error: {problem}", file=file,
                            line=mark.line + 1 if mark else None) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise SettingsError(f"expected a mapping of settings at the top, found {type(tree).__name__}",
                            file=file)
    return tree


class Schema:
    """The documented defaults of one command."""

    def __init__(self, text: str, file):
        self.file = str(file)
        common = _specs_from_text(COMMON_DEFAULTS, "<xpr common defaults>")
        self.specs = _merge_specs(common, _specs_from_text(text, file))
        self.defaults = deep_merge(parse_yaml(COMMON_DEFAULTS, "<xpr common defaults>"), parse_yaml(text, file))

    @classmethod
    def for_command(cls, group: str, command: str) -> "Schema":
        path = resources.defaults_dir() / group / f"{command}.yaml"
        if not path.is_file():
            raise SettingsError(f"no defaults shipped for '{group} {command}'", file=path)
        return cls(path.read_text(), path)

    def spec(self, path: tuple) -> KeySpec | None:
        specs, spec = self.specs, None
        for key in path:
            if spec is not None and spec.keys_any:
                return spec
            spec = specs.get(key)
            if spec is None:
                return None
            specs = spec.children
        return spec

    def walk(self):
        """Every documented key, depth first, in file order."""
        def _walk(specs):
            for spec in specs.values():
                yield spec
                yield from _walk(spec.children)
        yield from _walk(self.specs)

    def help_text(self) -> str:
        lines = []
        for spec in self.walk():
            indent = "  " * (len(spec.path) - 1)
            if spec.is_group:
                lines.append(f"{indent}{spec.path[-1]}:  {spec.description}".rstrip())
            else:
                default = yaml.safe_dump(spec.default, default_flow_style=True, width=10 ** 6).strip()
                default = default.removesuffix("\n...").removesuffix("...").strip()
                lines.append(f"{indent}{spec.path[-1]} = {default}  {spec.describe_line()}".rstrip())
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# merge, overrides, expressions
# --------------------------------------------------------------------------------------------

def deep_merge(base: dict, update: dict, schema: Schema | None = None, prefix=(), merge_any=False) -> dict:
    """`update` over `base`, recursively; a `keys: any` key or a `command:` value replaces whole.

    merge_any: merge into `keys: any` mappings too (for `-o` overrides, each of which sets one key:
    `-o main_loop.sub_loops.main.iterations=3` changes that number and keeps the schedule)."""
    merged = dict(base)
    for key, value in update.items():
        path = prefix + (str(key),)
        spec = schema.spec(path) if schema else None
        replace_whole = spec is not None and ((spec.keys_any and not merge_any) or
                                              (not spec.is_group and not spec.keys_any))
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not replace_whole \
                and not _is_command(value) and not _is_command(merged[key]):
            merged[key] = deep_merge(merged[key], value, schema, path, merge_any)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[tuple, Any]:
    """'a.b.c=value' -> (('a','b','c'), YAML value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"override '{text}' is not of the form key.sub=value", file="-o")
    try:
        value = load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return tuple(k.strip() for k in key.strip().split(".")), value


def set_path(tree: dict, path: tuple, value) -> dict:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict) or _is_command(child):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value
    return tree


def make_xpr_opt(home) -> dict:
    """Names a `command:` expression may use for paths of the home (as `xpr_opt.<name>`)."""
    if home is None:
        return dict(home=None, data=None, settings=None, today=today_folder_name())
    return dict(home=str(home.root), data=str(home.data), settings=str(home.settings),
                today=today_folder_name())


def make_evaluator(home):
    """evaluate(text) -> value: pure arithmetic on the allow-listed names of xpr.expressions."""
    table = expressions.names(make_xpr_opt(home), today_folder_name())
    return lambda text: expressions.evaluate(text, table)


def evaluate_expressions(tree, evaluate, origin, prefix=()):
    """Replace every {command: expr} by its value and '{today}' in strings by the date."""
    if _is_command(tree):
        expression = tree["command"]
        try:
            return evaluate(expression)
        except expressions.ExpressionError as err:
            kind = "refused: " if isinstance(err, expressions.Refused) else ""
            raise SettingsError(f"expression `{expression}` failed: {kind}{err}",
                                file=origin(prefix), key=".".join(prefix) or None) from None
    if isinstance(tree, dict):
        return {k: evaluate_expressions(v, evaluate, origin, prefix + (str(k),)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [evaluate_expressions(v, evaluate, origin, prefix + (str(i),)) for i, v in enumerate(tree)]
    if isinstance(tree, str) and "{today}" in tree:
        return tree.replace("{today}", today_folder_name())
    return tree


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def _type_ok(value, type_name: str) -> bool:
    if type_name == "any":
        return True
    if type_name == "null":
        return value is None
    if type_name == "bool":
        return isinstance(value, (bool, np.bool_))
    if type_name == "int":
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if type_name == "float":
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if type_name in ("str", "path"):
        return isinstance(value, str)
    if type_name == "list":
        return isinstance(value, (list, tuple, np.ndarray))
    if type_name == "dict":
        return isinstance(value, dict)
    return False


def _did_you_mean(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_known_keys(tree: dict, schema: Schema, origin, prefix=()):
    """Unknown keys in a user tree, with a did-you-mean among the documented siblings."""
    for key, value in tree.items():
        path = prefix + (str(key),)
        parent = schema.spec(prefix) if prefix else None
        if parent is not None and parent.keys_any:
            continue
        siblings = parent.children if parent is not None else schema.specs
        spec = siblings.get(str(key))
        if spec is None:
            raise SettingsError(f"unknown key '{key}'{_did_you_mean(str(key), siblings)}; known keys here: "
                                f"{', '.join(siblings) or '(none)'}", file=origin(path), key=".".join(path))
        if isinstance(value, dict) and spec.is_group and not _is_command(value):
            check_known_keys(value, schema, origin, path)


def check_values(tree: dict, schema: Schema, origin, specs=None):
    """Types, ranges and choices of the resolved (evaluated) tree."""
    specs = schema.specs if specs is None else specs
    for key, spec in specs.items():
        if key not in tree:
            continue
        value = tree[key]
        where = dict(file=origin(spec.path), key=spec.dotted)
        if spec.is_group:
            if not isinstance(value, dict):
                raise SettingsError(f"expected a mapping with keys {', '.join(spec.children)}, "
                                    f"got {type(value).__name__} {value!r}", **where)
            check_values(value, schema, origin, spec.children)
            continue
        if value is None and ("null" in spec.types or spec.default is None):
            continue
        if not any(_type_ok(value, t) for t in spec.types):
            raise SettingsError(f"expected {' or '.join(spec.types)}, got {type(value).__name__} {value!r}",
                                **where)
        if spec.range is not None and isinstance(value, (int, float, np.integer, np.floating)) \
                and not isinstance(value, bool):
            (low, high), (low_open, high_open) = spec.range, spec.range_open
            if (low is not None and (value <= low if low_open else value < low)) or \
                    (high is not None and (value >= high if high_open else value > high)):
                raise SettingsError(f"value {value} is out of range "
                                    f"{_range_text(low, high, spec.range_open)}", **where)
        if spec.length is not None and isinstance(value, (list, tuple)):
            low, high = spec.length
            if len(value) < low or (high is not None and len(value) > high):
                raise SettingsError(f"expected a list of {_length_text(spec.length)} items, got "
                                    f"{len(value)}: {value!r}", **where)
        if spec.choices is not None and value not in spec.choices:
            raise SettingsError(f"value {value!r} is not one of {', '.join(map(str, spec.choices))}"
                                f"{_did_you_mean(str(value), map(str, spec.choices))}", **where)


# --------------------------------------------------------------------------------------------
# the frozen result
# --------------------------------------------------------------------------------------------

class Frozen(Mapping):
    """Read-only settings mapping with attribute access: `s.phasing.repeats` == `s['phasing']['repeats']`."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping):
        object.__setattr__(self, "_data", {k: _freeze(v) for k, v in data.items()})

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __getattr__(self, key):
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(f"settings have no key '{key}' (keys: {', '.join(self._data)})") from None

    def __setattr__(self, key, value):
        raise TypeError("resolved settings are read-only")

    def __repr__(self):
        return f"Frozen({self.to_dict()!r})"

    def __reduce__(self):            # pickled as its plain contents (worker processes, dask)
        return Frozen, (self.to_dict(),)

    def get_path(self, dotted: str, default=None):
        node = self
        for key in dotted.split("."):
            if not isinstance(node, Mapping) or key not in node:
                return default
            node = node[key]
        return node

    def to_dict(self) -> dict:
        return {k: _thaw(v) for k, v in self._data.items()}


def _freeze(value):
    if isinstance(value, Mapping):
        return Frozen(value)
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        value = value.copy()
        value.setflags(write=False)
    return value


def _thaw(value):
    if isinstance(value, Frozen):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def to_plain(value):
    """Settings as YAML-safe plain Python (numpy values turned into lists and scalars)."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------
# the whole resolution
# --------------------------------------------------------------------------------------------

@dataclass
class Resolved:
    settings: Frozen
    source: str          # the user file (or "defaults")
    schema: Schema
    where: Any = None    # (key path tuple) -> the file or `-o` override the value came from

    def origin(self, dotted: str) -> str:
        """Where the value of a dotted key came from: '-o key', the user file or the defaults."""
        path = tuple(str(dotted).split("."))
        return self.where(path) if self.where is not None else self.source


def user_settings_path(home, group: str, command: str, name: str) -> Path:
    """NAME as a path to a YAML file, else NAME.yaml in the home's settings folder."""
    candidate = Path(name).expanduser()
    if candidate.suffix in (".yaml", ".yml") or "/" in name:
        if not candidate.is_file():
            raise SettingsError(f"settings file not found: {candidate}", file=candidate)
        return candidate
    if home is None:
        raise SettingsError(f"settings name '{name}' needs an xpr home; run `xpr --setup_home` "
                            "or give a path to a YAML file")
    folder = home.settings_dir(group, command)
    path = folder / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise SettingsError(f"no settings named '{name}' for '{group} {command}'"
                            f"{_did_you_mean(name, available)}; available: {', '.join(available) or '(none)'}",
                            file=path)
    return path


def resolve(group: str, command: str, name: str, home=None, overrides=()) -> Resolved:
    """The fully resolved, validated, frozen settings of `xpr <group> <command> NAME -o ...`."""
    schema = Schema.for_command(group, command)
    user_path = user_settings_path(home, group, command, name)
    user_tree = load_yaml(user_path)
    parsed_overrides = [parse_override(o) for o in overrides]
    override_paths = {p for p, _ in parsed_overrides}

    def origin(path: tuple) -> str:
        for n in range(len(path), 0, -1):
            if path[:n] in override_paths:
                return "-o " + ".".join(path[:n])
        node = user_tree
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return schema.file
            node = node[key]
        return str(user_path)

    check_known_keys(user_tree, schema, origin)
    override_tree: dict = {}
    for path, value in parsed_overrides:
        set_path(override_tree, path, value)
    check_known_keys(override_tree, schema, origin)

    merged = deep_merge(schema.defaults, user_tree, schema)
    merged = deep_merge(merged, override_tree, schema, merge_any=True)
    resolved = evaluate_expressions(merged, make_evaluator(home), origin)
    check_values(resolved, schema, origin)
    return Resolved(settings=Frozen(resolved), source=str(user_path), schema=schema, where=origin)
