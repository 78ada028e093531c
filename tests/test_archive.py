"""Archive contract: distinct run folders under concurrency, atomic files, links only on success."""
from __future__ import annotations

import multiprocessing
import os

from xpr.archive import claim_run_folder
from xpr.io.atomic import atomic_path, replace_symlink


def _claim(parent):
    return claim_run_folder(parent).name


def test_eight_concurrent_claims_get_eight_folders(tmp_path):
    parent = tmp_path / "archive" / "demo" / "22_11_2026"
    context = multiprocessing.get_context("spawn")
    with context.Pool(8) as pool:
        names = pool.map(_claim, [parent] * 8)
    assert sorted(names) == sorted(f"run_{i}" for i in range(8))
    assert len(set(names)) == 8
    assert claim_run_folder(parent).name == "run_8"


def test_eight_concurrent_cli_runs(home, tmp_path):
    """Eight `xpr` processes started at once on the same settings: eight distinct complete runs."""
    import subprocess
    import sys

    script = tmp_path / "run_one.py"
    script.write_text(
        "import sys\n"
        "sys.path.insert(0, %r)\n"
        "from xpr import registry\n"
        "from xpr.cli import build_group, main\n"
        "registry.COMMANDS += (registry.CommandSpec('test', 'square', 'fake_workers.square', 'square', 't'),)\n"
        "from xpr import resources\n"
        "resources.defaults_dir = lambda: __import__('pathlib').Path(%r)\n"
        "main.add_command(build_group('test'))\n"
        "main(['-q', 'test', 'square', %r, '-o', 'n=' + sys.argv[1]])\n"
        % (os.path.dirname(__file__), str(tmp_path / "defaults"), str(tmp_path / "user.yaml")))
    import shutil

    from xpr import resources

    shutil.copytree(resources.defaults_dir(), tmp_path / "defaults")
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fake_settings", "test"), tmp_path / "defaults" / "test")
    (tmp_path / "user.yaml").write_text("structure_name: many\n")
    env = dict(os.environ, XPR_HOME=str(home))
    procs = [subprocess.Popen([sys.executable, str(script), str(i + 1)], env=env) for i in range(8)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    runs = sorted((home / "data/test/square/archive/many").rglob("run_*"))
    assert len(runs) == 8
    lengths = sorted(len(__import__("xpr.io", fromlist=["load_tree"]).load_tree(r / "square.h5")["values"])
                     for r in runs)
    assert lengths == list(range(1, 9))      # every run kept its own result


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    except RuntimeError:
        pass
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_replace_symlink_is_relative_and_replaces(tmp_path):
    a, b = tmp_path / "run_0" / "x.h5", tmp_path / "run_1" / "x.h5"
    for f in (a, b):
        f.parent.mkdir()
        f.write_text(f.parent.name)
    link = tmp_path / "latest.h5"
    replace_symlink(link, a)
    replace_symlink(link, b)
    assert link.read_text() == "run_1" and not os.path.isabs(os.readlink(link))
