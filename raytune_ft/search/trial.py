"""One trial: the recipe with the sampled values set, run through the same loop as ``raytune-ft run``.

The trial function runs in a Tune trial actor and starts its own TorchTrainer (its own worker
group). The data were prepared once on the driver and arrive as shared Ray Datasets; the Train
reports reach Tune through ``EpochReportCallback``. A retried or resumed trial reuses its run
directory, so Ray Train continues from the trial's last checkpoint; under PBT, Tune restarts a
trial from a Tune checkpoint (its own or another trial's) and the run starts afresh from that.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from ray.tune.integration.ray_train import TuneReportCallback

from raytune_ft import log, run_folder
from raytune_ft.errors import TrainingFailed, UserError
from raytune_ft.recipe import recipe_with, validate_derived
from raytune_ft.search.space import decoded
from raytune_ft.report.tracking import tracked
from raytune_ft.train.faults import FAULT_ENV
from raytune_ft.train.outputs import write_outputs
from raytune_ft.train.planning import check_strategy
from raytune_ft.train.runner import fit

STARTUP_METRIC = "trial/first_report_s"


class EpochReportCallback(TuneReportCallback):
    """Forward each epoch's report to Tune, with the trial's start-up time (trial start to first
    report). The loop's last report (test metrics only) is not an epoch: schedulers count epochs.
    With a ``queue`` (PBT), (report, checkpoint path) go there instead, for the trial function to
    report with a Tune checkpoint: Tune's own forwarding carries only the path."""

    def __init__(self, trial_started: float, queue=None):
        super().__init__()
        self.trial_started = trial_started
        self.queue = queue
        self.first_report_s = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if "train/loss" not in metrics[0]:
            return
        if self.first_report_s is None:
            self.first_report_s = time.time() - self.trial_started
        report = {**metrics[0], STARTUP_METRIC: self.first_report_s}
        if self.queue is None:
            super().after_report(run_context, [report], checkpoint)
        else:
            self.queue.put((report, checkpoint.path if checkpoint else None))


def forward_to_tune(queue) -> None:
    """Drain the PBT queue into ``tune.report`` until the ``None`` that ends the run."""
    from ray import tune

    while (item := queue.get()) is not None:
        report, path = item
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(path) if path else None)


def trial_recipe(base: dict[str, Any], sampled: dict[str, Any], name: str, run_dir: Path | None):
    """The validated recipe of one trial: ``base`` with the sampled dotted-path values set (a
    problem with one names its ``tune.space`` entry)."""
    data = recipe_with(base, sampled)
    data.update(name=f"{base['name']}-{name}", tune=None)
    data["output"]["dir"] = str(run_dir) if run_dir else None
    return validate_derived(data, name, {path: f"tune.space.{path}" for path in sampled})


def run_trial(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """The Tune function trainable. ``shared``: the base recipe (its given fields), its tune
    section (whose space the config's values decode from), the prepared
    data (``PreparedData``, shared by every trial), the experiment's trials directory and the
    driver's log level."""
    from ray import tune

    started = time.time()
    log.configure(shared["log_level"])  # this trial actor's messages and its workers' follow the driver's -v / -q
    if shared["fault"]:  # a test's injected fault, set on the driver (this actor's process ends with the trial)
        os.environ[FAULT_ENV] = shared["fault"]
    context = tune.get_context()
    # Straight into the experiment's own trial directory: Tune's trial dir (get_trial_dir) is a
    # staging copy under Ray's session dir that Tune syncs to storage, which would keep it twice.
    run_dir = Path(shared["trials_dir"]) / context.get_trial_name() / "run"
    # Only PBT reports Tune checkpoints; one here means "continue from it" (another trial's epoch
    # after an exploit, or this trial's own after a retry), so this trial's own run starts afresh.
    restored = tune.get_checkpoint()
    if restored is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    try:
        recipe = trial_recipe(shared["recipe"], decoded(shared["tune"], config), context.get_trial_name(), run_dir)
        # A sampled strategy can misfit the model (more layers to freeze than it has): one clear line.
        check_strategy(recipe, shared["data"].planned.task)
        run_dir.mkdir(parents=True, exist_ok=True)
        # The run directory of a finished trial is a finished run: post steps and fuse open it.
        run_folder.write_text_atomic(run_dir / run_folder.RECIPE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        args = (recipe, run_dir, shared["data"])
        with tracked(recipe, run_dir, parent=shared["tracker"], name=context.get_trial_name()) as tracker:
            tracking = [tracker] if tracker else []
            if shared["pbt"]:
                state = fit_reporting_checkpoints(args, started, restored, tracking)
            else:
                state = fit(*args, callbacks=[EpochReportCallback(started), *tracking])
            write_outputs(run_dir, recipe, state, None, time.time() - started)
    except (UserError, TrainingFailed) as error:
        raise TrialFailed(str(error)) from None


def fit_reporting_checkpoints(args: tuple, started: float, restored, callbacks: list[Any]) -> dict[str, Any]:
    """``fit`` whose epoch reports reach Tune with their checkpoints (a thread forwards them);
    ``callbacks``: more Ray Train callbacks (tracking)."""
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})
    forwarder = threading.Thread(target=forward_to_tune, args=(queue,), daemon=True)
    forwarder.start()
    try:
        return fit(*args, callbacks=[EpochReportCallback(started, queue), *callbacks], resume_from=restored)
    finally:
        queue.put(None)
        forwarder.join()


class TrialFailed(RuntimeError):
    """A trial's one-line error, as a plain exception Ray can carry back to the driver (our
    UserError and TrainingFailed take other constructor arguments, so they do not unpickle)."""


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"
