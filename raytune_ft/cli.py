"""The ``raytune-ft`` command line."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from raytune_ft import log
from raytune_ft.errors import TrainingFailed, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

SET_HELP = "Override a recipe field, e.g. --set train.lr=3e-5 (repeatable; validated like the file)."


def _load(recipe: Path, overrides: list[str], workers: Optional[int] = None, output: Optional[Path] = None):
    from raytune_ft.recipe import load_recipe

    overrides = list(overrides)
    if workers is not None:
        overrides.append(f"scaling.workers={workers}")
    if output is not None:
        overrides.append(f"output.dir={output}")
    return load_recipe(recipe, overrides)


def _print_version(wanted: bool) -> None:
    if wanted:
        from raytune_ft import __version__

        typer.echo(f"raytune-ft {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show debug messages, the workers' included."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="Show only warnings and errors (no progress lines); results still print.")):
    """Fine-tune pretrained models on Ray, measuring what they gain and what they keep.

    Example: raytune-ft -q run jobs/text_classification.yaml
    """
    if verbose and quiet:
        raise typer.BadParameter("give one of them, not both", param_hint="'-v' / '-q'")
    log.configure(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


@app.command()
def validate(recipe: Path, set_: list[str] = typer.Option([], "--set", help=SET_HELP)):
    """Check a recipe without running it: every check run makes before Ray starts (schema, files,
    columns, labels, model, lengths, strategy, add-ons, output folder). URIs are named, not read.

    Example: raytune-ft validate jobs/text_classification.yaml --set train.lr=3e-5
    """
    from raytune_ft import run_folder
    from raytune_ft.data.tabular import uris_unread
    from raytune_ft.recipe import read_paths
    from raytune_ft.report.tables import plural
    from raytune_ft.train.planning import plan_run

    loaded = _load(recipe, set_)
    run_folder.check_own_folder(loaded.run_dir(), read_paths(loaded))
    with uris_unread() as unread:
        plan_run(loaded)
    if loaded.output.storage_path and "://" in loaded.output.storage_path:
        unread.append(("output.storage_path", loaded.output.storage_path))
    typer.echo(f"ok: {recipe} (task {loaded.task.type}, strategy {loaded.strategy.method}, "
               f"{plural(loaded.scaling.workers, 'worker')}, backend {loaded.train.backend})")
    for field, uri in unread:
        typer.echo(f"not checked: {field} {uri} (a URI: the run reads it where it runs; validate does not)")


@app.command()
def run(
    recipe: Path,
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    workers: Optional[int] = typer.Option(None, help="Number of training workers (scaling.workers)."),
    output: Optional[Path] = typer.Option(None, help="Run directory (output.dir)."),
    resume: bool = typer.Option(False, help="Continue the run in the output directory (or on output.storage_path, when the "
                                            "local folder is gone) from its last checkpoint."),
    resume_or_start: bool = typer.Option(False, "--resume-or-start", help="Resume the run if one is there, else start it: "
                                                                           "for a driver that a cluster retries (RayJob)."),
    force: bool = typer.Option(False, help="Move an existing run in the output directory aside and start anew."),
    address: Optional[str] = typer.Option(None, help="Ray address; default RAY_ADDRESS or an embedded local Ray."),
):
    """Fine-tune: run a recipe on Ray Train and write metrics, summary, plots and the model. With
    retention.floor set, deliver the model with the most gain that keeps it (exit 3 when none does).

    Example: raytune-ft run jobs/text_classification.yaml --workers 2 --set train.epochs=1
    """
    from raytune_ft.report.tables import summary_table

    loaded = _load(recipe, set_, workers, output)
    if loaded.retention and loaded.retention.floor is not None:  # the best model that keeps the floor (docs/retention.md)
        from raytune_ft.search.floor import run_floor as run_recipe
    else:
        from raytune_ft.train.runner import run as run_recipe
    summary = run_recipe(loaded, resume=resume, force=force, address=address, resume_or_start=resume_or_start)
    typer.echo(summary_table(summary))


class WarmAction(str, Enum):
    start = "start"
    stop = "stop"
    status = "status"
    serve = "serve"


@app.command()
def warm(action: WarmAction = typer.Argument(..., help="start, stop or status; serve: be the warm driver in this process "
                                                        "(what start runs in the background)")):
    """Keep a warm driver on this machine (its own embedded Ray up, the libraries imported): while it is up, `run` and `tune` commands started here run in it and start
    in seconds. Commands with --address or RAY_ADDRESS run as before.

    Example: raytune-ft warm start
    """
    from raytune_ft import warm as warm_driver

    if action is WarmAction.start:
        typer.echo(warm_driver.start())
    elif action is WarmAction.stop:
        typer.echo(warm_driver.stop())
    elif action is WarmAction.serve:
        warm_driver.serve(exit_code)
    else:
        status = warm_driver.ping()
        if not status:
            typer.echo("no warm driver is up")
            return
        running = f", running: raytune-ft {status['running']}" if status["running"] else ""
        pooled, actors = status["pooled"]
        filling = " (more starting)" if status["filling"] else ""
        typer.echo(f"warm driver up (pid {status['pid']}, {status['commands']} commands run{running}); {status['ready']} processes ready "
                   f"for the next run's actors{filling}; the last command's actors started in ready processes: {pooled} of {actors}")


ADDRESS_HELP = "The head's dashboard address, e.g. http://127.0.0.1:8265; default RAY_API_SERVER_ADDRESS or RAY_ADDRESS."


class JobCommand(str, Enum):
    run = "run"
    tune = "tune"
    post = "post"
    fuse = "fuse"


@app.command(context_settings={"ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    args: list[str] = typer.Argument(..., metavar="ARGS", help="The command's own arguments and options, as for `raytune-ft COMMAND ARGS`."),
    command: JobCommand = typer.Option(JobCommand.run, help="What the job runs: run or tune a recipe (validated here first), "
                                                            "or post or fuse runs on the storage the cluster's nodes share."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    working_dir: Path = typer.Option(Path("."), help="Shipped with the job as its current directory (at most 512 MiB zipped); "
                                                     "must hold the recipe and the local data it names."),
    pip: list[str] = typer.Option([], help="A package the cluster lacks, installed for this job (repeatable)."),
    wait: bool = typer.Option(False, help="Stream the job's logs and exit with its status (0: SUCCEEDED)."),
):
    """Check a command here, then run it on a Ray cluster as a job; prints the job id.

    Example: raytune-ft submit jobs/text_classification.yaml --address http://127.0.0.1:8265 --wait

    A search: raytune-ft submit --command tune jobs/text_classification.yaml --set tune.num_samples=8 --address ...

    After it: raytune-ft submit --command post /mnt/shared/raytune-ft/text_classification --step quantize --address ...
    """
    from raytune_ft import jobs
    from raytune_ft.search import require_search

    working_dir = jobs.working_directory(working_dir)
    given = _parse(ctx, command.value, args)
    if command in (JobCommand.run, JobCommand.tune):
        recipe = _load(given["recipe"], given.get("set_", []), given.get("workers"), given.get("output"))
        if command is JobCommand.tune:
            require_search(recipe)
        given.update(recipe=jobs.recipe_in_working_dir(given["recipe"], working_dir),
                     set_=[*given.get("set_", []), *jobs.shipped_paths(recipe, working_dir)])
    else:
        jobs.check_cluster_paths(_given_paths(ctx, command.value, given), working_dir)
    address, job_id = jobs.submit(_arguments(ctx, command.value, given), address, working_dir, pip)
    typer.echo(f"submitted {job_id} to {address}")
    if wait:
        jobs.stream_logs(address, job_id)
        typer.echo(f"{job_id} {jobs.final_status(address, job_id)}")


def _subcommand(ctx: typer.Context, name: str):
    return ctx.parent.command.get_command(ctx.parent, name)


def _parse(ctx: typer.Context, name: str, args: list[str]) -> dict:
    """What ``raytune-ft NAME ARGS`` would be given, parsed by that command's own parser (so a
    usage error shows here, before anything is sent): its arguments, and the options ARGS name."""
    command = _subcommand(ctx, name)
    with command.make_context(name, list(args), parent=ctx.parent) as parsed:
        return {param.name: parsed.params[param.name] for param in command.params
                if param.param_type_name == "argument" or parsed.get_parameter_source(param.name).name == "COMMANDLINE"}


def _given_paths(ctx: typer.Context, name: str, given: dict) -> dict[str, list[Path]]:
    """The paths among ``given`` by how NAME calls them (RUN_DIR, --output)."""
    paths = {}
    for param in _subcommand(ctx, name).params:
        values = given.get(param.name)
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if values and all(isinstance(value, Path) for value in values):
            paths[param.name.upper() if param.param_type_name == "argument" else param.opts[0]] = values
    return paths


def _arguments(ctx: typer.Context, name: str, given: dict) -> list[str]:
    """``raytune-ft NAME ...`` arguments that give ``given`` back to NAME's parser."""
    arguments, options = [name], []
    for param in _subcommand(ctx, name).params:
        if param.name not in given or given[param.name] is None:
            continue
        value = given[param.name]
        values = [str(item) for item in (value if isinstance(value, (list, tuple)) else [value])]
        if param.param_type_name == "argument":
            arguments += values
        elif param.is_flag:
            options.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for item in values:
                options += [param.opts[0], item]
    return arguments + options


@app.command()
def status(job_id: str, address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)):
    """Show a job's status.

    Example: raytune-ft status raysubmit_XXXX --address http://127.0.0.1:8265
    """
    from raytune_ft import jobs

    typer.echo(jobs.describe(address, job_id))


@app.command()
def logs(job_id: str, address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends.")):
    """Print a job's logs.

    Example: raytune-ft logs raysubmit_XXXX --follow --address http://127.0.0.1:8265
    """
    from raytune_ft import jobs

    if follow:
        jobs.stream_logs(address, job_id)
    else:
        typer.echo(jobs.logs(address, job_id), nl=False)


@app.command()
def stop(job_id: str, address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)):
    """Stop a running job.

    Example: raytune-ft stop raysubmit_XXXX --address http://127.0.0.1:8265
    """
    from raytune_ft import jobs

    typer.echo(f"stopping {job_id}" if jobs.stop(address, job_id) else f"{job_id} had already ended")


@app.command("list")
def list_jobs(address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)):
    """List the cluster's jobs, newest first.

    Example: raytune-ft list --address http://127.0.0.1:8265
    """
    from raytune_ft import jobs

    for row in jobs.table(address):
        typer.echo("  ".join(row))


@app.command()
def tune(
    recipe: Path,
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, help="Experiment directory (output.dir)."),
    resume: bool = typer.Option(False, help="Continue an interrupted experiment; finished trials are not rerun."),
    force: bool = typer.Option(False, help="Move an existing experiment in the output directory aside and start anew."),
    address: Optional[str] = typer.Option(None, help="Ray address; default RAY_ADDRESS or an embedded local Ray."),
):
    """Search hyperparameters: trials of the recipe over its tune: space, each a Ray Train run.

    Example: raytune-ft tune jobs/text_classification.yaml --set tune.num_samples=12 --output runs/search
    """
    from raytune_ft.search.experiment import run_experiment

    loaded = _load(recipe, set_, output=output)
    summary = run_experiment(loaded, resume=resume, force=force, address=address)
    typer.echo((loaded.run_dir() / "summary.md").read_text())
    typer.echo(f"outputs: {loaded.run_dir()}  (results.csv, summary.md, best_recipe.yaml, plots/, trials/)")
    if summary.get("best") is None:
        raise UserError("tune", "no trial finished; see the errors in results.csv")


@app.command()
def post(
    run_dir: Path,
    step: list[str] = typer.Option([], "--step", help="A step to run (repeatable): quantize, prune, explain; default: the recipe's post: steps."),
    set_: list[str] = typer.Option([], "--set", help="Override a step option, e.g. --set post.prune.sparsity=0.7."),
):
    """Post-training steps on a finished run: compression and saliency, results under RUN_DIR/post/.

    Example: raytune-ft post runs/text_classification --step quantize --step prune
    """
    from raytune_ft.post import STEPS, configured_steps, run_steps
    from raytune_ft.post.finished import FinishedRun

    unknown = [name for name in step if name not in STEPS]
    if unknown:
        raise UserError("--step", f"unknown step {unknown[0]!r}; steps: {', '.join(STEPS)}")
    finished = FinishedRun.open(run_dir, set_)
    names = step or configured_steps(finished.recipe)
    if not names:
        raise UserError("--step", f"the run's recipe configures no post: steps; name one with --step ({', '.join(STEPS)})")
    run_steps(finished, names)
    typer.echo(f"outputs: {finished.run_dir / 'post'}")


@app.command()
def report(run_dir: Path):
    """Write RUN_DIR/report.html: one self-contained page with the run's metrics, plots and post-step results.

    Example: raytune-ft report runs/text_classification
    """
    from raytune_ft.report.html import write_report

    typer.echo(f"report: {write_report(run_dir)}")


@app.command()
def fuse(
    run_dirs: Optional[list[Path]] = typer.Argument(None, help="Finished run directories (members; the first one's data scores them all)."),
    tune: Optional[Path] = typer.Option(None, help="A tune experiment directory: its --top trials become members too."),
    top: Optional[int] = typer.Option(None, min=1, help="How many of the experiment's best trials (by its metric); default 3."),
    output: Path = typer.Option(..., help="Directory for fusion.json, fusion.md and the soups (must not exist)."),
    force: bool = typer.Option(False, help="Move an existing output directory aside."),
    soups: bool = typer.Option(True, "--soups/--no-soups", help="Also average weights (members of one architecture)."),
):
    """Ensembles (probability average, majority vote) and model soups (uniform, greedy) of finished runs.

    Example: raytune-ft fuse runs/a runs/b runs/c --output runs/fused
    """
    from raytune_ft.post.fusion import fuse as fuse_runs, tune_trials

    if top is not None and tune is None:
        raise UserError("--top", "counts the trials of a tune experiment; give the experiment with --tune")
    members = [*(run_dirs or []), *(tune_trials(tune, top or 3) if tune else [])]
    fuse_runs(members, output, force=force, with_soups=soups)
    typer.echo((output / "fusion.md").read_text())
    typer.echo(f"outputs: {output}  (fusion.json, fusion.md" + (", uniform_soup/, greedy_soup/)" if soups else ")"))


def main() -> None:
    """Entry point: usage errors print the usage line and one error line, user errors one line;
    both exit 2, with no traceback. Anything else is a bug: its traceback, and a line asking to
    report it (exit 1)."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as error:
        # Typer vendors Click (typer._click), so its usage errors derive from TyperException, not
        # click.ClickException; standalone_mode=False leaves showing them to us.
        error.show()
        sys.exit(error.exit_code)
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except TrainingFailed as error:
        import ray

        ray.shutdown()  # flush the workers' last log lines first, so the error is the last line
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Exception:  # not the user's mistake (those are UserErrors): a bug, shown whole
        import traceback

        traceback.print_exc()
        typer.echo("error: this is a bug in raytune-ft, not a problem with your input; please report it with the "
                   "command, the recipe and the traceback above", err=True)
        sys.exit(1)
    # Without standalone mode, an exit (--help, --version, Ctrl-C as 130) is returned, not raised.
    if code == 130:
        typer.echo("interrupted", err=True)
    if isinstance(code, int) and code:
        sys.exit(code)


def exit_code() -> int:
    """Run ``main`` (on sys.argv) and return its exit code; a message exit prints its message and
    is 1, as Python makes it."""
    try:
        main()
    except SystemExit as exited:
        if isinstance(exited.code, str):
            print(exited.code, file=sys.stderr)
            return 1
        return exited.code or 0
    return 0


def console() -> None:
    """The installed command: ``main``, then the exit without the interpreter's teardown. Once the
    command is done, the exit handlers run (the embedded Ray stops, trackers close); what the
    teardown then adds, unloading torch's and transformers' modules and collecting what they held,
    took 1.5 s after every run and writes nothing. A run or tune command goes to the warm driver
    when one is up (raytune_ft.warm)."""
    from raytune_ft.warm import forward

    code = forward(sys.argv[1:])
    if code is None:
        code = exit_code()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
