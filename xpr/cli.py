"""The `xpr` command line: root options, one chained group per workflow, built from the registry.

    xpr --setup_home [PATH]
    xpr [--home PATH] [-q] <group> <command> SETTINGS_NAME [-o key.sub=value ...] [<command> ...]
    xpr settings <group> <command> SETTINGS_NAME [-o ...]

Each command resolves its settings, lets its worker check their values (an optional
`validate(settings)` in the worker module), claims a run folder, calls the worker's
`run(settings, archive)` and, on success only, points the product's latest-link at the run's main
file. A user error exits 2 with a one-screen message (a run that wrote nothing yet leaves no
folder); a failed computation exits 1 (traceback in the run's log); a full or read-only disk
exits 1 with one line naming the path; SIGTERM/SIGINT stop the worker processes, mark the run
FAILED with the signal and exit 128 + the signal number. Any of these stops the chain, and
earlier runs and the latest-links stay as they are.
"""
from __future__ import annotations

import errno
import logging
import sys

import click
import yaml

from xpr import __version__, registry, runner
from xpr import home as home_module
from xpr.errors import XprUserError
from xpr.settings import Schema, resolve, to_plain


DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


class State:
    """What the root options say, handed down to every command (click's ctx.obj)."""

    def __init__(self, home_option=None, quiet=False, verbose=False):
        self.home_option = home_option
        self.quiet = quiet
        self.verbose = verbose


def fail_user(error: XprUserError):
    click.echo(error.format(), err=True)
    raise click.exceptions.Exit(error.exit_code)


def disk_error_line(error: OSError, what: str) -> str:
    """One line for a write the disk refused: the path and the reason (no traceback)."""
    path = error.filename or "?"
    reason = error.strerror or str(error)
    return f"xpr: {what}: cannot write {path}: {reason}"


def run_command(spec: registry.CommandSpec, settings_name: str, overrides, state: State):
    """Resolve, validate, archive, run the worker, finalise (xpr.runner, shared with xpr.api).
    Returns the run folder."""
    what = f"{spec.group} {spec.name}"
    try:
        prepared = runner.prepare(spec, settings_name, overrides, state.home_option)
    except XprUserError as error:
        fail_user(error)
    except KeyError as error:
        click.echo(f"xpr: the defaults of '{what}' lack the key {error}", err=True)
        raise click.exceptions.Exit(2) from None
    try:
        outcome = runner.execute(prepared, quiet=state.quiet, verbose=state.verbose,
                                 console=not state.quiet)
    except runner.Interrupted as stop:
        click.echo(f"xpr: {what} stopped by {stop.name}\n  run:     {stop.run.path}"
                   + (" (marked FAILED)" if stop.marked else ""), err=True)
        raise click.exceptions.Exit(128 + stop.signum) from None
    except runner.RunFailed as failure:
        run, error = failure.run, failure.error
        if isinstance(error, XprUserError):
            click.echo(error.format(), err=True)
        elif isinstance(error, OSError) and error.errno in DISK_ERRNOS:
            click.echo(disk_error_line(error, what), err=True)
        else:
            click.echo(f"xpr: {what} failed: {type(error).__name__}: {error}", err=True)
        if run is not None and failure.marked:
            traceback_note = "" if isinstance(error, XprUserError) else "; traceback in run.log"
            click.echo(f"  run:     {run.path} (marked FAILED{traceback_note})", err=True)
        raise click.exceptions.Exit(error.exit_code if isinstance(error, XprUserError) else 1) from None
    run, link = outcome.run, outcome.link
    if not state.quiet:
        click.echo(f"{what}: results in {run.path}" + (f"\n  latest: {link}" if link else ""))
    return run.path


class SettingsCommand(click.Command):
    """A workflow command; its --help lists every settings key with its documented default."""

    def __init__(self, spec: registry.CommandSpec):
        self.spec = spec
        super().__init__(
            name=spec.name,
            callback=self._invoke,
            help=f"{spec.help}\n\nSETTINGS_NAME is a settings name in the home "
                 f"(settings/projects/{spec.group}/{spec.name}/NAME.yaml) or a path to a YAML file.",
            params=[
                click.Argument(["settings_name"]),
                click.Option(["-o", "--override", "overrides"], multiple=True, metavar="KEY.SUB=VALUE",
                             help="Override one setting (value read as YAML); repeatable."),
            ],
        )

    def parse_args(self, ctx, args):
        """Take SETTINGS_NAME and the `-o` options after it; the next command name ends ours.

        (click's chained groups stop a command's options at its first argument; xpr users write
        `cmd NAME -o a=1 next NAME`, so the split is made here.)
        """
        siblings = set(ctx.parent.command.commands) if ctx.parent is not None else set()
        own, i, named = [], 0, False
        while i < len(args):
            token = args[i]
            if token in ("-o", "--override"):
                own += args[i:i + 2]
                i += 2
                continue
            if named and token in siblings:
                break
            named = named or not token.startswith("-")
            own.append(token)
            i += 1
        rest = list(args[i:])
        ctx.allow_interspersed_args = True
        remaining = super().parse_args(ctx, own)
        ctx.args = list(ctx.args) + rest
        return remaining

    def _invoke(self, settings_name, overrides):
        state = click.get_current_context().find_object(State) or State()
        return run_command(self.spec, settings_name, overrides, state)

    def format_epilog(self, ctx, formatter):
        try:
            text = Schema.for_command(self.spec.group, self.spec.name).help_text()
        except XprUserError as error:
            text = f"(defaults unavailable: {error.message})"
        with formatter.section("Settings (key = default  description)"):
            for line in text.splitlines():
                formatter.write(" " * formatter.current_indent + line + "\n")


def build_group(name: str) -> click.Group:
    group = click.Group(name=name, chain=True, help=registry.GROUP_HELP.get(name, ""))
    for spec in registry.commands_of(name):
        group.add_command(SettingsCommand(spec))
    return group


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", "home_option", type=click.Path(file_okay=False), default=None,
              help="The xpr home to use (else XPR_HOME, else the last --setup_home, else ~/.xpr).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines on the console.")
@click.option("-v", "--verbose", is_flag=True, help="Debug output in the console and run.log.")
@click.option("--setup_home", "setup_home", is_flag=False, flag_value="", default=None, metavar="[PATH]",
              help="Create a home (default ~/.xpr or XPR_HOME) with every command's default and "
                   "tutorial settings; never overwrites existing files.")
@click.version_option(__version__, "--version", prog_name="xpr")
@click.pass_context
def main(ctx, home_option, quiet, verbose, setup_home):
    """xpr — phase retrieval from the command line: fxs, cdi and em workflows."""
    ctx.obj = State(home_option, quiet, verbose)
    logging.getLogger("xpr").setLevel(logging.DEBUG if verbose else logging.INFO)
    if setup_home is not None:
        home, created = home_module.setup(setup_home or home_option or None)
        click.echo(f"xpr home: {home.root}\n  {len(created)} settings files created, existing files kept\n"
                   f"  settings: {home.settings}\n  data:     {home.data}")
        ctx.obj.home_option = str(home.root)
        return
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


for _group in registry.groups():
    main.add_command(build_group(_group))


@main.command("settings")
@click.argument("group")
@click.argument("command")
@click.argument("settings_name")
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY.SUB=VALUE")
@click.pass_obj
def show_settings(state, group, command, settings_name, overrides):
    """Print the fully resolved settings of GROUP COMMAND SETTINGS_NAME."""
    try:
        spec = registry.find(group, command)
    except KeyError:
        known = ", ".join(f"{s.group} {s.name}" for s in registry.COMMANDS)
        click.echo(f"xpr: unknown command '{group} {command}' (known: {known})", err=True)
        raise click.exceptions.Exit(2) from None
    try:
        home = home_module.locate(state.home_option)
        resolved = resolve(spec.group, spec.name, settings_name, home, overrides)
    except XprUserError as error:
        fail_user(error)
    click.echo(f"# resolved settings of `xpr {group} {command} {settings_name}` ({resolved.source})")
    click.echo(yaml.safe_dump(to_plain(resolved.settings), sort_keys=False), nl=False)


@main.command("jobscript", context_settings={"ignore_unknown_options": True})
@click.option("--scheduler", type=click.Choice(["slurm", "pbs", "sge", "lsf"]), required=True)
@click.option("--array", "array_size", type=int, default=0, show_default=True,
              help="Run the chain as an array job of this many independent shares.")
@click.option("--each", multiple=True, metavar="KEY=VALUE",
              help="Override given to each array task; {index} is the task's index (e.g. seed={index}).")
@click.option("--merge", "merge", default=None, metavar="'GROUP COMMAND NAME'",
              help="Chain run after all array tasks, over every share (e.g. 'cdi merge tutorial').")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--cores", type=int, default=8, show_default=True, help="Cores per node (dask workers).")
@click.option("--memory", default="16GB", show_default=True)
@click.option("--walltime", default="02:00:00", show_default=True)
@click.option("--queue", default=None, help="Queue / partition.")
@click.option("--account", default=None)
@click.option("--directive", "directives", multiple=True, help="Extra scheduler directive, verbatim.")
@click.option("--gpus", type=int, default=0, show_default=True,
              help="GPUs per node: requested from the scheduler, one dask worker each.")
@click.option("--dask/--no-dask", "use_dask", default=None,
              help="Start a dask cluster inside the job for the parallel steps (default: yes, except arrays).")
@click.argument("group")
@click.argument("chain", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def jobscript_command(state, scheduler, array_size, each, merge, nodes, cores, memory, walltime, queue,
                      account, directives, gpus, use_dask, group, chain):
    """Write a batch script running GROUP CHAIN... (settings resolved and archived beside it)."""
    from xpr import jobscript

    try:
        home = home_module.locate(state.home_option)
        written = jobscript.write(
            home, scheduler, group, chain,
            jobscript.Resources(nodes=nodes, cores=cores, memory=memory, walltime=walltime, queue=queue,
                                account=account, directives=list(directives), gpus=gpus),
            array=array_size, each=each, merge=merge, use_dask=use_dask)
    except XprUserError as error:
        fail_user(error)
    click.echo(f"job folder: {written['job_dir']}\n  script:   {written['script']}")
    if "submit" in written:
        click.echo(f"  merge:    {written['merge_script']}\n  submit:   bash {written['submit']}")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
