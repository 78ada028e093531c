"""Settings expressions are pure arithmetic: every hostile expression exits 2, naming the file and
the key, and writes, reads or runs nothing; the legitimate ones (shipped tutorials, xFrame-style
lists, comprehensions, home paths) keep their values."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import yaml

from xpr import expressions
from xpr.settings import today_folder_name


def table(home=None, today=None):
    today = today or today_folder_name()
    return expressions.names({"home": "/h", "data": "/h/data", "settings": "/h/settings",
                              "today": today}, today)


def hostile_cases(tmp_path):
    """(id, expression, file it would write or None): the ones reported, and their relatives."""
    marker = tmp_path / "written"
    secret = tmp_path / "secret.txt"
    secret.write_text("1 2 3\n")
    np.save(tmp_path / "secret.npy", np.arange(3))
    return [
        ("ctypes", f"np.ctypeslib.load_library('libc.so.6','/lib/x86_64-linux-gnu/').system(b'touch {marker}') or 1",
         marker),
        ("save", f"np.save('{marker}', 1) or 1", marker.with_suffix(".npy")),
        ("savetxt", f"np.savetxt('{marker}', [1]) or 1", marker),
        ("load", f"np.load('{tmp_path / 'secret.npy'}')[0]", None),
        ("loadtxt", f"np.loadtxt('{secret}')[0]", None),
        ("open_memmap", f"np.lib.format.open_memmap('{marker}', mode='w+', shape=(2,))[0]", marker),
        ("open", "len(open('/etc/passwd').read())", None),
        ("open_write", f"open('{marker}', 'w').write('x')", marker),
        ("fromfile", f"np.fromfile('{secret}')[0]", None),
        ("big_power", "((10**9999)**9999)**9999", None),
        ("big_pow_builtin", "pow(10, 10**8)", None),
        ("big_shift", "1 << 10**9", None),
        ("big_product", "(10**1000) * (10**1000) * (10**1000) * (10**1000) * (10**1000)", None),
        ("object_array", "np.array([10**30]) ** 9999", None),
        ("big_array", "np.ones(10**12)", None),
        ("big_arange", "np.arange(1e13)", None),
        ("big_broadcast", "np.ones((1000, 1)) * np.ones((1, 10**5))", None),
        ("big_list", "[0] * 10**10", None),
        ("big_string", "'a' * 10**10", None),
        ("big_format", "f'{1:>1000000000}'", None),
        ("big_range", "[i for i in range(10**12)]", None),
        ("nested_loops", "sum(1 for i in range(10**6) for j in range(10**6))", None),
        ("dunder", "().__class__.__bases__[0].__subclasses__()", None),
        ("module_dict", "np.__dict__", None),
        ("import", "__import__('os').system('true')", None),
        ("lambda", "(lambda: 1)()", None),
        ("walrus", "(x := 3)", None),
        ("getattr", "getattr(np, 'save')", None),
        ("type", "type(1)", None),
        ("builtin_attr", "str.format", None),
        ("format_escape", "'{0.__class__}'.format(1)", None),
        ("percent_format", "'%*d' % (10**9, 1)", None),
        ("statement", "import os", None),
    ]


def test_hostile_expressions_exit_2_naming_file_and_key_and_do_nothing(test_group, home, run_xpr, tmp_path):
    cases = hostile_cases(tmp_path)
    for name, expression, written in cases:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"n": {"command": expression}}))
        for args in (["settings", "test", "square", path], ["test", "square", path]):
            started = time.monotonic()
            result = run_xpr(args)
            took = time.monotonic() - started
            assert result.exit_code == 2, (name, result.output)
            assert f"file:    {path}" in result.output and "key:     n" in result.output, (name, result.output)
            assert "Traceback" not in result.output
            assert took < 5, (name, took)
            if written is not None:
                assert not written.exists(), name
        # from -o too
        override = "n=" + yaml.safe_dump({"command": expression}, default_flow_style=True, width=10**6).strip()
        result = run_xpr(["settings", "test", "square", "tutorial", "-o", override])
        assert result.exit_code == 2 and "-o n" in result.output, (name, result.output)
        if written is not None:
            assert not written.exists(), name
    assert not list((home / "data").rglob("run_*"))      # no run folder was claimed


@pytest.mark.parametrize("expression", ["((10**9999)**9999)**9999", "10**10**10", "2**(2**40)",
                                        "np.full((10**6, 10**6), 1.0)", "np.eye(10**7)",
                                        "np.tile([1, 2], 10**9)", "np.outer(np.ones(10**5), np.ones(10**5))",
                                        "np.meshgrid(np.ones(10**4), np.ones(10**4))",
                                        "np.linspace(0, 1, 10**10)",
                                        "np.zeros(10**5, dtype='U100000')", "np.ones(10).astype('U1000000')",
                                        "np.array(['a' * 10**5] * 10**5)", "np.sum([np.ones(10**6)] * 10**6)",
                                        "'x'.join(['a' * 10**6] * 10**6)", "sum([[0] * 10**6] * 10**6, [])",
                                        "'a'.replace('', 'b' * 10**6)", "np.ones(3).astype('O')", "np.array([1], dtype='O')"])
def test_size_bounds_refuse_before_allocating(expression):
    started = time.monotonic()
    with pytest.raises(expressions.Refused):
        expressions.evaluate(expression, table())
    assert time.monotonic() - started < 2.0       # refused at once (the machine may be busy)


@pytest.mark.parametrize("expression", ["[sum(k for k in range(1000)) for j in range(10**5)]",
                                        "sum([np.ones(10**6)] * 10**6)"])
def test_time_bound(expression):
    started = time.monotonic()
    with pytest.raises(expressions.Refused, match="longer than|in all"):
        expressions.evaluate(expression, table(), time_limit=0.3)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("expression, expected", [
    ("np.pi/3", math.pi / 3),
    ("[[0.5,0.4,-1/250,500],[0.5,0.4,-1/250,500]]", [[0.5, 0.4, -0.004, 500]] * 2),
    ("[(0,0,0)] + [(100.0,np.pi/2,k*2*np.pi/5) for k in range(5)]",
     [(0, 0, 0)] + [(100.0, math.pi / 2, k * 2 * math.pi / 5) for k in range(5)]),
    ("['tetrahedron']*6", ["tetrahedron"] * 6),
    ("{k: i**2 for i, k in enumerate('abc')}", {"a": 0, "b": 1, "c": 4}),
    ("xpr_opt.data + '/cdi/phase2d'", "/h/data/cdi/phase2d"),
    ("f'{xpr_opt.home}/x_{today}.h5'", "/h/x_TODAY.h5"),      # TODAY: the date the test runs
    ("np.linspace(0, 1, 5).tolist()", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("np.sqrt(0.25) + np.sin(pi/2) + np.exp(0)", 2.5),
    ("np.arange(6).reshape(2, 3).sum(axis=0).tolist()", [3, 5, 7]),
    ("2**10 + 10**300 // 10**299", 1034),
    ("[x for x in range(10) if x % 3 == 0][-1]", 9),
    ("sorted({3, 1, 2})", [1, 2, 3]),
    ("round(np.linalg.norm(np.array([3.0, 4.0])), 6)", 5.0),
    ("np.deg2rad(180) == np.pi", True),
    ("'a,b'.split(',')", ["a", "b"]),
    ("max(len(s) for s in ['ab', 'abc'])", 3),
    ("1e-3 if today else 0", 1e-3),
    ("float(np.float32(0.5))", 0.5),
    ("abs(-3) * int('4')", 12),
])
def test_legitimate_expressions_keep_their_values(expression, expected):
    today = today_folder_name()         # once, at run time (collection may be the day before)
    if isinstance(expected, str):
        expected = expected.replace("TODAY", today)
    value = expressions.evaluate(expression, table(today=today))
    if isinstance(value, np.ndarray):
        value = value.tolist()
    assert value == (pytest.approx(expected) if isinstance(expected, float) else expected)


def test_every_shipped_settings_file_still_resolves(tmp_path):
    """Tutorials and defaults (with their `command:` lists of centres, sizes, flags) resolve."""
    from xpr import home as home_module, registry
    from xpr.settings import resolve

    home, _ = home_module.setup(str(tmp_path / "h"))
    resolved = 0
    for spec in registry.COMMANDS:
        for path in sorted(home.settings_dir(spec.group, spec.name).glob("*.yaml")):
            resolve(spec.group, spec.name, str(path), home)
            resolved += 1
    assert resolved >= len(registry.COMMANDS)
