"""The guard that fails the session when tests read outside the checkout (tests/outside_guard)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

GUARD = Path(__file__).resolve().parent / "outside_guard"


def test_reads_beside_the_checkout_are_recorded_in_child_processes(tmp_path):
    checkout, shared = tmp_path / "clone", tmp_path / "shared"
    (checkout / "tests").mkdir(parents=True)
    shared.mkdir()
    (shared / "data.txt").write_text("x")
    (checkout / "tests" / "own.txt").write_text("y")
    log = tmp_path / "outside.log"
    script = (f"import numpy as np, os; open({str(checkout / 'tests' / 'own.txt')!r}).read(); "
              f"os.listdir({str(checkout)!r}); open({str(shared / 'data.txt')!r}).read(); "
              f"os.listdir({str(shared)!r}); np.save({str(tmp_path / 'elsewhere.npy')!r}, 1)")
    env = dict(os.environ, PYTHONPATH=str(GUARD), XPR_TEST_CHECKOUT=str(checkout),
               XPR_TEST_OUTSIDE_LOG=str(log), XPR_TEST_FORBID_UNDER="", XPR_TEST_ALLOW_UNDER="")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=checkout)
    recorded = log.read_text().splitlines()
    assert f"open {shared / 'data.txt'}" in recorded
    assert f"os.listdir {shared}" in recorded
    assert f"open {tmp_path / 'elsewhere.npy'}" in recorded        # beside the checkout too
    assert not [line for line in recorded if str(checkout) in line]


def test_this_session_is_guarded():
    """conftest installed the hook here and hands it to child processes."""
    assert getattr(sys, "_xpr_outside_guard", False)
    assert str(GUARD) in os.environ["PYTHONPATH"].split(os.pathsep)
    assert os.environ["XPR_TEST_CHECKOUT"] == str(Path(__file__).resolve().parent.parent)
