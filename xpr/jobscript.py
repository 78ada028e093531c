"""Ready-to-submit batch scripts for an xpr chain: SLURM, PBS, SGE, LSF.

    xpr jobscript --scheduler slurm cdi phase3d tutorial
    xpr jobscript --scheduler slurm --array 8 --each 'seed={index}' --merge 'cdi merge tutorial' \
        cdi phase2d tutorial

The settings of every step are resolved now (bad ones stop here, exit 2) and archived in a job
folder `HOME/jobs/<D_M_YYYY>/job_<N>/` beside the scripts, so the job runs exactly what was checked.

* single job: the chain runs on the allocation with a dask cluster inside the job (scheduler and
  workers started from a scheduler file) for every parallel step; `workers.sh` starts the
  workers of one node (on every node through srun): `cores` single-threaded workers, each with
  one FFT/BLAS thread, or with `--gpus N` one worker per GPU (CUDA_VISIBLE_DEVICES, from the
  GPUs the scheduler gave the job) with cores / N FFT threads each;
* array job: each array task runs the chain on its own share (`--each KEY=VALUE` overrides, with
  `{index}` the task's index, e.g. a seed), records its run folders in `shares/`, and a merge job
  that depends on the whole array runs `--merge` over every recorded share (`submit.sh` submits
  both in order).
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from xpr import registry
from xpr.archive import claim_run_folder
from xpr.errors import SettingsError
from xpr.io import atomic_path
from xpr.settings import Schema, resolve, to_plain, today_folder_name

SCHEDULERS = ("slurm", "pbs", "sge", "lsf")

# the array index each scheduler gives a task, and whether it counts from 1
ARRAY_INDEX = {"slurm": ("SLURM_ARRAY_TASK_ID", 0), "pbs": ("PBS_ARRAY_INDEX", 0),
               "sge": ("SGE_TASK_ID", 1), "lsf": ("LSB_JOBINDEX", 1)}


@dataclass
class Resources:
    nodes: int = 1
    cores: int = 8
    memory: str = "16GB"
    walltime: str = "02:00:00"
    queue: str | None = None
    account: str | None = None
    directives: list = field(default_factory=list)
    gpus: int = 0               # GPUs per node: one dask worker each


@dataclass
class Step:
    command: str
    settings_file: Path
    overrides: list


def split_chain(group: str, tokens) -> list[tuple[str, str, list]]:
    """['phase2d', 'tutorial', '-o', 'a=1', 'phase2d', 'x'] -> [(cmd, name, overrides), ...]."""
    names = {spec.name for spec in registry.commands_of(group)}
    if not names:
        raise SettingsError(f"unknown group '{group}' (known: {', '.join(registry.groups())})")
    steps, tokens, i = [], list(tokens), 0
    while i < len(tokens):
        command = tokens[i]
        if command not in names:
            raise SettingsError(f"'{command}' is not a command of '{group}' (known: {', '.join(sorted(names))})")
        if i + 1 >= len(tokens) or tokens[i + 1].startswith("-"):
            raise SettingsError(f"'{group} {command}' needs a SETTINGS_NAME")
        name, overrides, i = tokens[i + 1], [], i + 2
        while i < len(tokens) and tokens[i] in ("-o", "--override"):
            if i + 1 >= len(tokens):
                raise SettingsError(f"'{tokens[i]}' needs a KEY=VALUE")
            overrides.append(tokens[i + 1])
            i += 2
        steps.append((command, name, overrides))
    if not steps:
        raise SettingsError("no command given: e.g. `xpr jobscript --scheduler slurm cdi phase2d tutorial`")
    return steps


def directives(scheduler: str, name: str, res: Resources, log_dir: Path, array: int = 0) -> list[str]:
    """The scheduler's header lines for a job of these resources (array: number of tasks)."""
    out = log_dir / "logs"
    if scheduler == "slurm":
        lines = [f"--job-name={name}", f"--nodes={res.nodes}", "--ntasks-per-node=1",
                 f"--cpus-per-task={res.cores}", f"--mem={res.memory}", f"--time={res.walltime}",
                 f"--output={out}/%x_%j{'_%a' if array else ''}.out"]
        lines += [f"--partition={res.queue}"] * bool(res.queue) + [f"--account={res.account}"] * bool(res.account)
        lines += [f"--array=0-{array - 1}"] * bool(array) + [f"--gres=gpu:{res.gpus}"] * bool(res.gpus)
        prefix = "#SBATCH "
    elif scheduler == "pbs":
        gpus = f":ngpus={res.gpus}" if res.gpus else ""
        lines = [f"-N {name}", f"-l select={res.nodes}:ncpus={res.cores}{gpus}:mem={res.memory.lower()}",
                 f"-l walltime={res.walltime}", "-j oe", f"-o {out}/"]
        lines += [f"-q {res.queue}"] * bool(res.queue) + [f"-A {res.account}"] * bool(res.account)
        lines += [f"-J 0-{array - 1}"] * bool(array)
        prefix = "#PBS "
    elif scheduler == "sge":
        lines = [f"-N {name}", f"-pe smp {res.cores}", f"-l h_vmem={res.memory}", f"-l h_rt={res.walltime}",
                 "-j y", f"-o {out}/", "-cwd", "-S /bin/bash"]
        lines += [f"-q {res.queue}"] * bool(res.queue) + [f"-P {res.account}"] * bool(res.account)
        lines += [f"-t 1-{array}"] * bool(array) + [f"-l gpu={res.gpus}"] * bool(res.gpus)
        prefix = "#$ "
    elif scheduler == "lsf":
        job = f"{name}[1-{array}]" if array else name
        hours, minutes = res.walltime.split(":")[:2]
        lines = [f'-J "{job}"', f"-n {res.cores}", f'-R "span[hosts=1] rusage[mem={res.memory}]"',
                 f"-W {hours}:{minutes}", f"-o {out}/%J{'_%I' if array else ''}.out"]
        lines += [f"-q {res.queue}"] * bool(res.queue) + [f"-P {res.account}"] * bool(res.account)
        lines += [f'-gpu "num={res.gpus}"'] * bool(res.gpus)
        prefix = "#BSUB "
    else:
        raise SettingsError(f"unknown scheduler '{scheduler}' (known: {', '.join(SCHEDULERS)})")
    return [prefix + line for line in lines + list(res.directives)]


def _xpr_command(home, group: str, steps: list[Step], extra_overrides=()) -> str:
    words = [sys.executable, "-m", "xpr", "--home", str(home.root), group]
    for step in steps:
        words += [step.command, str(step.settings_file)]
        for override in list(step.overrides) + list(extra_overrides):
            words += ["-o", override]
    return " ".join(_shell_word(w) for w in words)


def _shell_word(word: str) -> str:
    """Quote for bash; words with $VARIABLES are double-quoted so the job expands them."""
    if "$" in word:
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return shlex.quote(word)


DASK_IN_JOB = """\
# a dask cluster inside this job: scheduler + workers (workers.sh on each node) from a scheduler file
SCHEDULER_FILE="$JOB_DIR/scheduler_${{JOB_TAG}}.json"
"{python}" -m distributed.cli.dask_scheduler --scheduler-file "$SCHEDULER_FILE" --no-dashboard &
DASK_PIDS=$!
{launcher}bash "$JOB_DIR/workers.sh" "$SCHEDULER_FILE" &
DASK_PIDS="$DASK_PIDS $!"
trap 'kill $DASK_PIDS 2>/dev/null || true' EXIT
for _ in $(seq 120); do [ -s "$SCHEDULER_FILE" ] && break; sleep 1; done
"""

WORKERS_CPU = """\
# {cores} workers of one thread each: one task at a time, its FFTs and BLAS on that thread
export {environment}
exec "{python}" -m distributed.cli.dask_worker --scheduler-file "$SCHEDULER_FILE" \\
    --nworkers {cores} --nthreads 1 --no-dashboard
"""

WORKERS_GPU = """\
# one worker per GPU (the job's GPUs, as the scheduler sets CUDA_VISIBLE_DEVICES), each running one
# task at a time with {threads} FFT/BLAS threads ({cores} cores / {gpus} GPUs)
IFS=, read -r -a GPUS <<< "${{CUDA_VISIBLE_DEVICES:-{default_gpus}}}"
PIDS=""
for GPU in "${{GPUS[@]:0:{gpus}}}"; do
  env CUDA_VISIBLE_DEVICES="$GPU" {environment} \\
    "{python}" -m distributed.cli.dask_worker --scheduler-file "$SCHEDULER_FILE" \\
    --nworkers 1 --nthreads 1 --no-dashboard --name "$(hostname)-gpu$GPU" &
  PIDS="$PIDS $!"
done
trap 'kill $PIDS 2>/dev/null || true' EXIT TERM
wait
"""


def workers_script(res: Resources) -> list[str]:
    """The body of workers.sh: the dask workers of one node, threads and GPUs set per worker."""
    from xpr.parallel import worker_environment

    if res.gpus:
        environment = worker_environment(res.cores // res.gpus if res.cores >= res.gpus else 1, 1)
        text = WORKERS_GPU.format(python=sys.executable, gpus=res.gpus, cores=res.cores,
                                  threads=environment["XPR_FFT_WORKERS"],
                                  default_gpus=",".join(str(i) for i in range(res.gpus)),
                                  environment=" ".join(f"{k}={v}" for k, v in environment.items()))
    else:
        environment = worker_environment(res.cores, res.cores)
        text = WORKERS_CPU.format(python=sys.executable, cores=res.cores,
                                  environment=" ".join(f"{k}={v}" for k, v in environment.items()))
    return ["set -euo pipefail", 'SCHEDULER_FILE="$1"', text]


def write(home, scheduler: str, group: str, tokens, resources: Resources, array: int = 0,
          each=(), merge: str | None = None, use_dask: bool | None = None) -> dict:
    """Resolve the chain, archive its settings and write the scripts. Returns their paths."""
    if scheduler not in SCHEDULERS:
        raise SettingsError(f"unknown scheduler '{scheduler}' (known: {', '.join(SCHEDULERS)})")
    if array < 0:
        raise SettingsError(f"--array must be a number of tasks >= 1, got {array}")
    if resources.gpus < 0 or resources.cores < 1:
        raise SettingsError(f"--gpus must be >= 0 and --cores >= 1, got {resources.gpus} and {resources.cores}")
    chain = [(command, resolve(group, command, name, home, overrides))     # fails here, not on the cluster
             for command, name, overrides in split_chain(group, tokens)]
    job_dir = claim_run_folder(home.root / "jobs" / today_folder_name(), prefix="job")
    (job_dir / "logs").mkdir()
    steps = []
    for k, (command, resolved) in enumerate(chain):
        settings_file = job_dir / f"{k}_{group}_{command}.yaml"
        with atomic_path(settings_file) as tmp:
            tmp.write_text(yaml.safe_dump(to_plain(resolved.settings), sort_keys=False))
        steps.append(Step(command, settings_file, []))    # overrides are inside the archived file
    use_dask = (not array) if use_dask is None else use_dask
    tag = {"slurm": "SLURM_JOB_ID", "pbs": "PBS_JOBID", "sge": "JOB_ID", "lsf": "LSB_JOBID"}[scheduler]
    name = f"xpr-{group}-{steps[0].command}"
    body = ["set -euo pipefail", f"JOB_DIR={shlex.quote(str(job_dir))}", f'JOB_TAG="${{{tag}:-local}}"']
    extra = []
    if array:
        variable, base = ARRAY_INDEX[scheduler]
        body += [f"INDEX=$(( ${{{variable}:-{base}}} - {base} ))", 'mkdir -p "$JOB_DIR/shares"',
                 'export XPR_RUN_RECORD="$JOB_DIR/shares/task_${INDEX}.runs"']
        for override in each:
            if "=" not in override:
                raise SettingsError(f"--each '{override}' is not KEY=VALUE")
            extra.append(override.replace("{index}", "${INDEX}"))
    if use_dask:
        launcher = f"srun --ntasks={resources.nodes} --ntasks-per-node=1 " \
            if scheduler == "slurm" and resources.nodes > 1 else ""
        body.append(DASK_IN_JOB.format(python=sys.executable, launcher=launcher))
        _write_script(job_dir / "workers.sh", [], workers_script(resources))
        extra += ["multi_process.engine=dask", "multi_process.dask.scheduler_file=$SCHEDULER_FILE"]
    command = _xpr_command(home, group, steps, extra)
    body.append(command)
    script = job_dir / f"job.{scheduler}.sh"
    _write_script(script, directives(scheduler, name, resources, job_dir, array), body)
    written = {"job_dir": job_dir, "script": script, "command": command}
    if array and merge:
        merge_tokens = shlex.split(merge)
        merge_group, merge_steps = merge_tokens[0], split_chain(merge_tokens[0], merge_tokens[1:])
        merge_files = []
        for k, (mcommand, mname, moverrides) in enumerate(merge_steps):
            moverrides = list(moverrides) + [f"input.shares_dir={job_dir / 'shares'}"]
            if Schema.for_command(merge_group, mcommand).spec(("input", "shares_dir")) is None:
                raise SettingsError(f"'{merge_group} {mcommand}' cannot merge array shares "
                                    "(it has no input.shares_dir setting)")
            resolved = resolve(merge_group, mcommand, mname, home, moverrides)
            settings_file = job_dir / f"merge_{k}_{merge_group}_{mcommand}.yaml"
            with atomic_path(settings_file) as tmp:
                tmp.write_text(yaml.safe_dump(to_plain(resolved.settings), sort_keys=False))
            merge_files.append(Step(mcommand, settings_file, []))
        merge_command = _xpr_command(home, merge_group, merge_files)
        merge_script = job_dir / f"merge.{scheduler}.sh"
        _write_script(merge_script, directives(scheduler, name + "-merge", Resources(
            cores=resources.cores, memory=resources.memory, walltime=resources.walltime,
            queue=resources.queue, account=resources.account, directives=resources.directives), job_dir),
            ["set -euo pipefail", merge_command])
        submit = job_dir / "submit.sh"
        _write_script(submit, [], ["set -euo pipefail", 'cd "$(dirname "$0")"', _submit_chain(scheduler, name)])
        written.update(merge_script=merge_script, submit=submit, merge_command=merge_command)
    return written


def _submit_chain(scheduler: str, name: str) -> str:
    if scheduler == "slurm":
        return ('array=$(sbatch --parsable job.slurm.sh)\n'
                'sbatch --dependency=afterok:"$array" merge.slurm.sh')
    if scheduler == "pbs":
        return 'array=$(qsub job.pbs.sh)\nqsub -W depend=afterokarray:"$array" merge.pbs.sh'
    if scheduler == "sge":
        return f'qsub job.sge.sh\nqsub -hold_jid {name} merge.sge.sh'
    return f'bsub < job.lsf.sh\nbsub -w \'done("{name}")\' < merge.lsf.sh'


def _write_script(path: Path, header: list[str], body: list[str]):
    text = "#!/bin/bash\n" + "".join(line + "\n" for line in header) + "\n" + "\n".join(body) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        tmp.chmod(0o755)
