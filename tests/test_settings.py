"""Settings: documented defaults, deep merge, overrides, safe expressions, and every error kind."""
from __future__ import annotations

import numpy as np
import pytest

from xpr.errors import SettingsError
from xpr.settings import Frozen, Schema, deep_merge, resolve, today_folder_name

DEFAULTS = """\
structure_name: demo        # name of the structure
n: 4                        # how many | range: [1, 1000]
ratio: 0.5                  # a ratio | range: [0, 1]
radius: 2.0                 # a radius | unit: Å | range: (0, null]
mode: fast                  # how | choices: [fast, exact]
path: null                  # a file | type: path|null
weights: null               # optional weights | type: list|null
size: [4, 4]                # rows, columns | type: list | length: 2
ramp: 0.5                   # a number or [first, last] | type: float|list | length: [1, 2]
phasing:                    # the phasing group
  beta: 0.8                 # feedback | range: [0, 1]
  schedule: "100RAAR 50ER"  # the schedule, with a # inside quotes
  sub:                      # nested
    sigma: 2.0              # blur width | unit: px
blocks: {a: 1}              # free-form | keys: any
"""


@pytest.fixture
def schema_dir(tmp_path, monkeypatch):
    from xpr import resources

    (tmp_path / "defaults" / "g").mkdir(parents=True)
    (tmp_path / "defaults" / "g" / "c.yaml").write_text(DEFAULTS)
    monkeypatch.setattr(resources, "defaults_dir", lambda: tmp_path / "defaults")
    return tmp_path


def write(tmp_path, text, name="user.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_schema_reads_comments_as_documentation():
    schema = Schema(DEFAULTS, "d.yaml")
    beta = schema.spec(("phasing", "beta"))
    assert beta.default == 0.8 and beta.description == "feedback" and beta.range == (0, 1)
    assert beta.range_open == (False, False) and schema.spec(("radius",)).range_open == (True, False)
    assert "radius = 2.0  a radius; unit: Å; range: > 0" in schema.help_text()
    assert schema.spec(("phasing", "sub", "sigma")).unit == "px"
    assert schema.spec(("phasing", "schedule")).default == "100RAAR 50ER"
    assert schema.spec(("phasing", "schedule")).description.startswith("the schedule")
    assert schema.spec(("mode",)).choices == ("fast", "exact")
    assert schema.spec(("blocks",)).keys_any
    assert schema.spec(("save_symlink",)).default is True       # the common key every command has
    assert "sigma = 2.0  blurs" not in schema.help_text() and "sigma = 2.0  blur width; unit: px" in schema.help_text()


def test_deep_merge_and_free_blocks_replace_whole():
    schema = Schema(DEFAULTS, "d.yaml")
    merged = deep_merge(schema.defaults, {"phasing": {"sub": {"sigma": 3.0}}, "blocks": {"b": 2}}, schema)
    assert merged["phasing"]["beta"] == 0.8 and merged["phasing"]["sub"]["sigma"] == 3.0
    assert merged["blocks"] == {"b": 2}


def test_resolve_merges_overrides_expressions_and_today(schema_dir):
    user = write(schema_dir, "n: 7\nphasing:\n  beta: {command: 'np.sqrt(0.25)'}\n"
                             "path: '/data/{today}/x.h5'\nblocks: {command: '{k: i**2 for i, k in enumerate(\"abc\")}'}\n")
    resolved = resolve("g", "c", user, overrides=["phasing.sub.sigma=4.5", "mode=exact"]).settings
    assert isinstance(resolved, Frozen)
    assert resolved.n == 7 and resolved.phasing.beta == pytest.approx(0.5)
    assert resolved.phasing.sub.sigma == 4.5 and resolved["mode"] == "exact"
    assert resolved.path == f"/data/{today_folder_name()}/x.h5"
    assert resolved.blocks == {"a": 0, "b": 1, "c": 4}
    with pytest.raises(TypeError):
        resolved.n = 3
    with pytest.raises(TypeError):
        resolved.phasing["beta"] = 1.0   # nested mappings are read-only too


@pytest.mark.parametrize("expression", ["__import__('os')", "().__class__", "np.__class__.__subclasses__()",
                                        "open.__globals__"])
def test_expressions_refuse_imports_and_dunders(schema_dir, expression):
    user = write(schema_dir, f'n: {{command: "{expression}"}}\n')
    with pytest.raises(SettingsError) as info:
        resolve("g", "c", user)
    assert info.value.key == "n" and user in info.value.file


def test_import_statement_refused(schema_dir):
    user = write(schema_dir, "n: {command: 'import os'}\n")
    with pytest.raises(SettingsError):
        resolve("g", "c", user)


@pytest.mark.parametrize("text, key, words", [
    ("n: 4\nphasng: {beta: 0.5}\n", "phasng", ["unknown key", "did you mean 'phasing'"]),
    ("phasing:\n  bta: 0.5\n", "phasing.bta", ["did you mean 'beta'"]),
    ("n: four\n", "n", ["expected int", "'four'"]),
    ("ratio: 1.5\n", "ratio", ["out of range [0, 1]"]),
    ("radius: 0\n", "radius", ["out of range (0, null]"]),
    ("size: []\n", "size", ["list of 2 items, got 0"]),
    ("size: [1, 2, 3]\n", "size", ["list of 2 items, got 3"]),
    ("ramp: [0.1, 0.2, 0.3]\n", "ramp", ["list of 1 to 2 items, got 3"]),
    ("radius: -1.0\n", "radius", ["out of range (0, null]"]),
    ("mode: fats\n", "mode", ["not one of fast, exact", "did you mean 'fast'"]),
    ("phasing: 3\n", "phasing", ["expected a mapping"]),
    ("n: {command: '1/0'}\n", "n", ["ZeroDivisionError"]),
    ("n: {command: 'undefined_name + 1'}\n", "n", ["NameError"]),
])
def test_bad_settings_name_file_key_and_problem(schema_dir, text, key, words):
    user = write(schema_dir, text)
    with pytest.raises(SettingsError) as info:
        resolve("g", "c", user)
    error = info.value
    assert error.key == key and error.file == user
    message = error.format()
    for word in words:
        assert word in message
    assert len(message.splitlines()) < 10


def test_yaml_syntax_error_has_line(schema_dir):
    user = write(schema_dir, "n: 4\nphasing:\n  beta: [0.5\nratio: 0.1\n")
    with pytest.raises(SettingsError) as info:
        resolve("g", "c", user)
    assert info.value.line in (3, 4) and "YAML syntax" in info.value.message


def test_override_errors_name_the_override(schema_dir):
    user = write(schema_dir, "n: 4\n")
    with pytest.raises(SettingsError) as info:
        resolve("g", "c", user, overrides=["phasing.beta=2"])
    assert info.value.file == "-o phasing.beta" and "out of range" in info.value.message
    with pytest.raises(SettingsError) as info:
        resolve("g", "c", user, overrides=["nn=3"])
    assert "did you mean 'n'" in info.value.message
    with pytest.raises(SettingsError):
        resolve("g", "c", user, overrides=["no_equals_sign"])


def test_nullable_and_float_accepts_int(schema_dir):
    user = write(schema_dir, "ratio: 1\npath: /x/y.npy\n")
    resolved = resolve("g", "c", user).settings
    assert resolved.ratio == 1 and resolved.path == "/x/y.npy"


def test_cli_exit_2_for_each_kind(test_group, home, run_xpr, tmp_path):
    cases = {
        "syntax.yaml": ("n: [1,\n", "line"),
        "unknown.yaml": ("nn: 3\n", "did you mean 'n'"),
        "type.yaml": ("n: 2.5\n", "expected int"),
        "range.yaml": ("n: 0\n", "out of range"),
        "expr.yaml": ("n: {command: \"__import__('os').getcwd()\"}\n", "failed"),
    }
    for name, (text, words) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        result = run_xpr(["test", "square", path])
        assert result.exit_code == 2, (name, result.output)
        assert str(path) in result.output and words in result.output and "Traceback" not in result.output
    result = run_xpr(["test", "square", "no_such_name"])
    assert result.exit_code == 2 and "available: " in result.output and "tutorial" in result.output
    assert not list((home / "data").rglob("run_*"))     # nothing half-made


def test_numpy_values_are_saved_plainly(schema_dir):
    user = write(schema_dir, "weights: {command: 'np.arange(3)'}\n")
    resolved = resolve("g", "c", user).settings
    assert isinstance(resolved.weights, np.ndarray) and not resolved.weights.flags.writeable
    from xpr.settings import to_plain

    assert to_plain(resolved)["weights"] == [0, 1, 2]


def test_common_keys_documented_once_and_restatable(tmp_path, monkeypatch):
    """Every command has GPU and multi_process; restating one sub-key keeps the others and types."""
    from xpr import resources

    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "c.yaml").write_text("structure_name: x   # name\nmulti_process:\n  n_processes: 2\n")
    monkeypatch.setattr(resources, "defaults_dir", lambda: tmp_path)
    user = tmp_path / "u.yaml"
    user.write_text("multi_process: {n_processes: auto}\n")
    resolved = resolve("g", "c", str(user), overrides=["multi_process.engine=dask"]).settings
    assert resolved.multi_process.n_processes == "auto" and resolved.multi_process.engine == "dask"
    assert resolved.multi_process.dask.cluster.type == "local" and resolved.GPU.use == "auto"
    user.write_text("multi_process: {engine: mpi}\n")
    with pytest.raises(SettingsError, match="not one of serial, local, dask"):
        resolve("g", "c", str(user))


def test_exponent_floats_are_floats(schema_dir):
    """`1e-6` is a float in xpr's YAML (PyYAML alone would give the string '1e-6')."""
    user = write(schema_dir, "ratio: 5e-1\nphasing:\n  sub:\n    sigma: 1.5E+1\n")
    resolved = resolve("g", "c", user, overrides=["phasing.beta=2e-1"]).settings
    assert resolved.ratio == 0.5 and resolved.phasing.sub.sigma == 15.0 and resolved.phasing.beta == 0.2
