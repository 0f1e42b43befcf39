"""One trial: the recipe with the sampled values set, run through the same loop as ``raytune-ft run``.

The trial function runs in a Tune trial actor and starts its own TorchTrainer (its own worker
group). The data were prepared once on the driver and arrive as shared Ray Datasets; the Train
reports reach Tune through ``EpochReportCallback``. A retried or resumed trial reuses its run
directory, so Ray Train continues from the trial's last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

STARTUP_METRIC = "trial/first_report_s"


class EpochReportCallback(TuneReportCallback):
    """Forward each epoch's report to Tune, with the trial's start-up time (trial start to first
    report). The loop's last report (test metrics only) is not an epoch: schedulers count epochs."""

    def __init__(self, trial_started: float):
        super().__init__()
        self.trial_started = trial_started
        self.first_report_s = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if "train/loss" not in metrics[0]:
            return
        if self.first_report_s is None:
            self.first_report_s = time.time() - self.trial_started
        super().after_report(run_context, [{**metrics[0], STARTUP_METRIC: self.first_report_s}], checkpoint)


def trial_recipe(base: dict[str, Any], sampled: dict[str, Any], name: str, run_dir: Path | None):
    """The validated recipe of one trial: ``base`` with the sampled dotted-path values set."""
    from raytune_ft.recipe import validate_recipe
    from raytune_ft.tune.space import recipe_with

    data = recipe_with(base, sampled)
    data.update(name=f"{base['name']}-{name}", tune=None)
    data["output"]["dir"] = str(run_dir) if run_dir else None
    return validate_recipe(data, name)


def run_trial(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """The Tune function trainable. ``shared``: the base recipe, datasets, labels, references."""
    from ray import tune

    from raytune_ft.errors import UserError
    from raytune_ft.tasks import TASKS
    from raytune_ft.train.runner import TrainingFailed, check_strategy, fit, write_outputs

    started = time.time()
    context = tune.get_context()
    run_dir = Path(context.get_trial_dir()) / "run"
    try:
        recipe = trial_recipe(shared["recipe"], config, context.get_trial_name(), run_dir)
        # A sampled strategy can misfit the model (more layers to freeze than it has): one clear line.
        check_strategy(recipe, TASKS[recipe.task.type](recipe.to_dict(), shared["labels"] or []))
        run_dir.mkdir(parents=True, exist_ok=True)
        state = fit(recipe, run_dir, shared["datasets"], shared["train_rows"], shared["labels"], shared["references"],
                    callbacks=[EpochReportCallback(started)])
    except (UserError, TrainingFailed) as error:
        raise TrialFailed(str(error)) from None
    write_outputs(run_dir, recipe, state, None, time.time() - started)


class TrialFailed(RuntimeError):
    """A trial's one-line error, as a plain exception Ray can carry back to the driver (our
    UserError and TrainingFailed take other constructor arguments, so they do not unpickle)."""


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"
