"""Job scripts: valid bash for every scheduler, resolved settings archived, dask inside the job."""
from __future__ import annotations

import subprocess

import pytest
import yaml


@pytest.mark.parametrize("scheduler, marker", [("slurm", "#SBATCH --cpus-per-task=4"), ("pbs", "#PBS -l select=1:ncpus=4"),
                                               ("sge", "#$ -pe smp 4"), ("lsf", "#BSUB -n 4")])
def test_single_job_script(test_group, home, run_xpr, scheduler, marker):
    result = run_xpr(["jobscript", "--scheduler", scheduler, "--cores", 4, "--queue", "short",
                      "test", "square", "tutorial", "-o", "n=9", "square", "tutorial"])
    assert result.exit_code == 0, result.output
    script = next((home / "jobs").rglob(f"job.{scheduler}.sh"))
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert marker in text and "short" in text
    # the chain with its archived, resolved settings; dask cluster inside the job
    assert " test square " in text and "-m xpr --home" in text
    first = yaml.safe_load((script.parent / "0_test_square.yaml").read_text())
    second = yaml.safe_load((script.parent / "1_test_square.yaml").read_text())
    assert first["n"] == 9 and second["n"] == 5
    assert "dask_scheduler --scheduler-file" in text and "multi_process.engine=dask" in text


def test_array_directives_and_index(test_group, home, run_xpr):
    result = run_xpr(["jobscript", "--scheduler", "sge", "--array", 4, "--each", "power.exponent={index}",
                      "test", "square", "tutorial"])
    assert result.exit_code == 0, result.output
    script = next((home / "jobs").rglob("job.sge.sh"))
    text = script.read_text()
    assert "#$ -t 1-4" in text and "INDEX=$(( ${SGE_TASK_ID:-1} - 1 ))" in text
    assert '"power.exponent=${INDEX}"' in text and "dask_scheduler" not in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_bad_chain_is_refused_before_any_script(test_group, home, run_xpr):
    result = run_xpr(["jobscript", "--scheduler", "slurm", "test", "square", "tutorial", "-o", "n=0"])
    assert result.exit_code == 2 and "out of range" in result.output
    result = run_xpr(["jobscript", "--scheduler", "slurm", "test", "sqare", "tutorial"])
    assert result.exit_code == 2 and "not a command of 'test'" in result.output
    assert not (home / "jobs").exists()      # nothing half-made
