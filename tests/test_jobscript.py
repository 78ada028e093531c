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


def _run_workers_sh(script_dir, tmp_path, environment):
    """Run the job's workers.sh with a stand-in for python that records each worker's start."""
    import os
    import sys

    record = tmp_path / "workers.txt"
    fake = tmp_path / "fake_python"
    fake.write_text('#!/bin/bash\necho "$CUDA_VISIBLE_DEVICES|$XPR_FFT_WORKERS|$OMP_NUM_THREADS|$MKL_NUM_THREADS|$*" '
                    f'>> {record}\n')
    fake.chmod(0o755)
    text = (script_dir / "workers.sh").read_text().replace(sys.executable, str(fake))
    workers = tmp_path / "workers.sh"
    workers.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(environment)
    subprocess.run(["bash", str(workers), str(tmp_path / "sched.json")], env=env, check=True, timeout=60)
    return sorted(record.read_text().splitlines())


def test_dask_workers_in_the_job_single_threaded_on_cpus(test_group, home, run_xpr, tmp_path):
    """cores × 1-thread workers, each with one FFT/BLAS thread (not cores-threaded FFTs)."""
    result = run_xpr(["jobscript", "--scheduler", "slurm", "--cores", 32, "test", "square", "tutorial"])
    assert result.exit_code == 0, result.output
    script = next((home / "jobs").rglob("job.slurm.sh"))
    assert 'bash "$JOB_DIR/workers.sh" "$SCHEDULER_FILE"' in script.read_text()
    assert subprocess.run(["bash", "-n", str(script.parent / "workers.sh")]).returncode == 0
    (line,) = _run_workers_sh(script.parent, tmp_path, {})
    devices, fft, omp, mkl, args = line.split("|")
    assert devices == "" and fft == omp == mkl == "1"
    assert "--nworkers 32 --nthreads 1" in args


@pytest.mark.parametrize("scheduler, marker", [("slurm", "#SBATCH --gres=gpu:4"), ("pbs", ":ncpus=32:ngpus=4:"),
                                               ("lsf", '#BSUB -gpu "num=4"'), ("sge", "#$ -l gpu=4")])
def test_one_dask_worker_per_gpu(test_group, home, run_xpr, tmp_path, scheduler, marker):
    """--gpus 4: the GPUs are requested, and each of the job's GPUs gets one worker pinned to it
    with cores / 4 FFT threads."""
    result = run_xpr(["jobscript", "--scheduler", scheduler, "--cores", 32, "--gpus", 4, "test", "square", "tutorial"])
    assert result.exit_code == 0, result.output
    script = next((home / "jobs").rglob(f"job.{scheduler}.sh"))
    assert marker in script.read_text()
    lines = _run_workers_sh(script.parent, tmp_path, {"CUDA_VISIBLE_DEVICES": "2,3,6,7"})
    assert [line.split("|")[0] for line in lines] == ["2", "3", "6", "7"]
    for line in lines:
        _, fft, omp, mkl, args = line.split("|")
        assert fft == omp == mkl == "8" and "--nworkers 1 --nthreads 1" in args
    (tmp_path / "workers.txt").unlink()
    # without CUDA_VISIBLE_DEVICES from the scheduler: devices 0..3
    assert [line.split("|")[0] for line in _run_workers_sh(script.parent, tmp_path, {})] == ["0", "1", "2", "3"]
