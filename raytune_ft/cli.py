"""The ``raytune-ft`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from raytune_ft.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune pretrained models on Ray, measuring what they gain and what they keep.")

SET_HELP = "Override a recipe field, e.g. --set train.lr=3e-5 (repeatable; validated like the file)."


def _load(recipe: Path, overrides: list[str], workers: Optional[int] = None, output: Optional[Path] = None):
    from raytune_ft.recipe import load_recipe

    overrides = list(overrides)
    if workers is not None:
        overrides.append(f"scaling.workers={workers}")
    if output is not None:
        overrides.append(f"output.dir={output}")
    return load_recipe(recipe, overrides)


@app.command()
def validate(recipe: Path, set_: list[str] = typer.Option([], "--set", help=SET_HELP)):
    """Check a recipe (schema, registered names, columns) without running it."""
    loaded = _load(recipe, set_)
    typer.echo(f"ok: {recipe} (task {loaded.task.type}, strategy {loaded.strategy.method}, "
               f"{loaded.scaling.workers} workers, backend {loaded.train.backend})")


@app.command()
def run(
    recipe: Path,
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    workers: Optional[int] = typer.Option(None, help="Number of training workers (scaling.workers)."),
    output: Optional[Path] = typer.Option(None, help="Run directory (output.dir)."),
    resume: bool = typer.Option(False, help="Continue the run in the output directory from its last checkpoint."),
    force: bool = typer.Option(False, help="Move an existing run in the output directory aside and start anew."),
    address: Optional[str] = typer.Option(None, help="Ray address; default RAY_ADDRESS or an embedded local Ray."),
):
    """Fine-tune: run a recipe on Ray Train and write metrics, summary, plots and the model."""
    from raytune_ft.report.tables import summary_table
    from raytune_ft.train.runner import run as run_recipe

    loaded = _load(recipe, set_, workers, output)
    summary = run_recipe(loaded, resume=resume, force=force, address=address)
    typer.echo(summary_table(summary))


@app.command()
def tune(
    recipe: Path,
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, help="Experiment directory (output.dir)."),
    resume: bool = typer.Option(False, help="Continue an interrupted experiment; finished trials are not rerun."),
    force: bool = typer.Option(False, help="Move an existing experiment in the output directory aside and start anew."),
    address: Optional[str] = typer.Option(None, help="Ray address; default RAY_ADDRESS or an embedded local Ray."),
):
    """Search hyperparameters: trials of the recipe over its tune: space, each a Ray Train run."""
    from raytune_ft.tune.experiment import run_experiment

    loaded = _load(recipe, set_, output=output)
    summary = run_experiment(loaded, resume=resume, force=force, address=address)
    typer.echo((loaded.run_dir() / "summary.md").read_text())
    typer.echo(f"outputs: {loaded.run_dir()}  (results.csv, summary.md, best_recipe.yaml, plots/, trials/)")
    if summary.get("best") is None:
        raise UserError("tune", "no trial finished; see the errors in results.csv")


def main() -> None:
    """Entry point: user errors print one line and exit 2; nothing else is shown."""
    from raytune_ft.train.runner import TrainingFailed

    try:
        app(standalone_mode=False)
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except TrainingFailed as error:
        import ray

        ray.shutdown()  # flush the workers' last log lines first, so the error is the last line
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as error:
        import click

        if isinstance(error, click.exceptions.ClickException):
            error.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
