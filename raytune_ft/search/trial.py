"""One trial: the recipe with the sampled values set, run through the same loop as ``raytune-ft run``.

A one-worker trial runs the loop in its own Tune actor (``raytune_ft.train.in_process``: none of a
Ray Train run's start-up); a trial of several workers starts its own TorchTrainer (its own worker
group), whose reports reach the trial through a queue. The data were prepared once on the driver
and arrive as shared Ray Datasets. A retried or resumed trial reuses its run directory and
continues from the trial's last checkpoint; under PBT, Tune restarts a trial from a Tune checkpoint
(its own or another trial's) and the run starts afresh from that.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from ray.train import UserCallback

from raytune_ft import log, run_folder
from raytune_ft.errors import TrainingFailed, UserError
from raytune_ft.recipe import recipe_with, validate_derived
from raytune_ft.search.space import decoded
from raytune_ft.report.tracking import tracked
from raytune_ft.train.faults import FAULT_ENV
from raytune_ft.train.outputs import write_outputs
from raytune_ft.train.planning import check_strategy
from raytune_ft.train.runner import fit, runs_in_process

STARTUP_METRIC = "trial/first_report_s"


class EpochReports(UserCallback):
    """Each epoch's report, with the trial's start-up time (trial start to first report), to
    ``send(report, checkpoint_path)``. The loop's last report (test metrics only) is not an epoch:
    schedulers count epochs."""

    def __init__(self, trial_started: float, send: Callable[[dict[str, Any], str | None], None]):
        self.trial_started = trial_started
        self.send = send
        self.first_report_s = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if "train/loss" not in metrics[0]:
            return
        if self.first_report_s is None:
            self.first_report_s = time.time() - self.trial_started
        self.send({**metrics[0], STARTUP_METRIC: self.first_report_s}, checkpoint.path if checkpoint else None)


def to_tune(pbt: bool) -> Callable[[dict[str, Any], str | None], None]:
    """``tune.report`` of an epoch's report: with its checkpoint under PBT (which continues one
    trial from another's), the metrics alone otherwise."""
    from ray import tune

    def send(report: dict[str, Any], path: str | None) -> None:
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(path) if pbt and path else None)

    return send


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
            send = to_tune(shared["pbt"])
            if runs_in_process(recipe):  # the loop reports in this thread: straight to Tune
                state = fit(*args, callbacks=[EpochReports(started, send), *tracking], resume_from=restored, in_process=True)
            else:
                state = fit_through_queue(args, started, send, restored, tracking)
            write_outputs(run_dir, recipe, state, None, time.time() - started)
    except (UserError, TrainingFailed) as error:
        raise TrialFailed(str(error)) from None


def fit_through_queue(args: tuple, started: float, send, restored, callbacks: list[Any]) -> dict[str, Any]:
    """``fit`` on Ray Train, whose reports (made in its controller, another process) reach Tune
    here: a thread takes them from a queue to ``send``. ``callbacks``: more Ray Train callbacks (tracking)."""
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})

    def forward() -> None:
        while (item := queue.get()) is not None:
            send(*item)

    forwarder = threading.Thread(target=forward, daemon=True)
    forwarder.start()
    try:
        return fit(*args, callbacks=[EpochReports(started, lambda report, path: queue.put((report, path))), *callbacks], resume_from=restored)
    finally:
        queue.put(None)
        forwarder.join()


class TrialFailed(RuntimeError):
    """A trial's one-line error, as a plain exception Ray can carry back to the driver (our
    UserError and TrainingFailed take other constructor arguments, so they do not unpickle)."""


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"
