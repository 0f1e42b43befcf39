"""Experiment tracking: TensorBoard event files and MLflow runs, switched on in ``output``.

One interface for Train runs and Tune trials: ``with tracked(recipe, run_dir) as tracker`` opens
the run's tracker (an MLflow run with the recipe as dotted params; a TensorBoard directory) and
the tracker goes to ``fit`` as a Ray Train callback. Ray Train calls it in its controller (on the
driver's node) after every report, so each epoch is logged as it finishes, under the names of
``metrics.jsonl`` (rank 0's record, the one the run keeps), at step = the optimizer step. On
leaving, the run's outputs go to MLflow as artifacts and the run is ended (FAILED on an error).

A Tune experiment opens a parent tracker; each trial opens a child of it: its own MLflow run
nested under the experiment's, its own TensorBoard directory ``<experiment>/tensorboard/<trial>``.
A resumed run or trial continues the MLflow run recorded in its ``tracking.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ray.train import UserCallback

from raytune_ft.errors import UserError
from raytune_ft.run_folder import write_text_atomic
from raytune_ft.schema import dotted

logger = logging.getLogger(__name__)

STATE = "tracking.json"
# Whatever of these a run or an experiment wrote is logged as an MLflow artifact at the end.
ARTIFACTS = ("recipe.yaml", "summary.json", "metrics.jsonl", "model", "plots", "post", "report.html",
             "summary.md", "results.csv", "best_recipe.yaml", "pareto.json", "front")
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call


def as_text(value: Any) -> str:
    """A parameter value as MLflow keeps it: strings as they are, the rest as JSON (5e-05, true, null, [..])."""
    return value if isinstance(value, str) else json.dumps(value)


def mlflow_client(uri: str):
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked. It is the
        # store we want: no database, concurrent trials write separate files, works on shared disks.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


class Tracker(UserCallback):
    """Where one run (or trial) logs. It holds only paths and ids, so it pickles to Ray Train's
    controller; writers and clients are opened in the process that uses them."""

    def __init__(self, tensorboard_dir: Optional[str], mlflow_uri: Optional[str], experiment_id: Optional[str],
                 run_id: Optional[str], hparams: dict[str, Any], recipe_yaml: str):
        self.tensorboard_dir, self.mlflow_uri = tensorboard_dir, mlflow_uri
        self.experiment_id, self.run_id = experiment_id, run_id
        self.hparams, self.recipe_yaml = hparams, recipe_yaml
        self._writer = self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_writer": None, "_client": None}

    @classmethod
    def open(cls, recipe, run_dir: Path, parent: Optional[Tracker] = None, name: Optional[str] = None) -> Optional[Tracker]:
        """The run's tracker, None when the recipe tracks nothing. A child of ``parent`` (a Tune
        trial) logs where its experiment does, as ``name``."""
        import yaml

        output = recipe.output
        if parent is None and not output.tensorboard and output.mlflow is None:
            return None
        data = recipe.to_dict()
        params = {re.sub(r"[^\w\-. :/]", "_", key): value for key, value in dotted(data).items()}
        hparams = {key: value if isinstance(value, (int, float)) else as_text(value) for key, value in params.items()}
        name = name or (output.mlflow and output.mlflow.run_name) or recipe.name
        recipe_yaml = yaml.safe_dump(data, sort_keys=False)
        state_file = run_dir / STATE
        if state_file.is_file():  # a resumed run continues where it logged before
            tracker = cls(**json.loads(state_file.read_text()), hparams=hparams, recipe_yaml=recipe_yaml)
            if tracker.run_id:
                tracker._mlflow().update_run(tracker.run_id, status="RUNNING")
            return tracker
        if parent is not None:
            tensorboard = parent.tensorboard_dir and str(Path(parent.tensorboard_dir) / name)
            uri, experiment_id = parent.mlflow_uri, parent.experiment_id
        else:
            tensorboard = str(run_dir / "tensorboard") if output.tensorboard else None
            uri = output.mlflow.resolved_uri(run_dir) if output.mlflow else None
            experiment_id = uri and experiment_for(uri, output.mlflow.experiment or recipe.name)
        run_id = None
        if uri:
            tags = {"raytune_ft.run_dir": str(run_dir)}
            if parent is not None:
                tags["mlflow.parentRunId"] = parent.run_id
            run_id = start_mlflow_run(uri, experiment_id, name, tags, params)
        where = {"tensorboard_dir": tensorboard, "mlflow_uri": uri, "experiment_id": experiment_id, "run_id": run_id}
        write_text_atomic(state_file, json.dumps(where, indent=2))
        shown = ([f"TensorBoard {tensorboard}"] if tensorboard else []) + ([f"MLflow run {run_id} in {uri}"] if uri else [])
        logger.info("tracking %s: %s", name, ", ".join(shown))
        return cls(**where, hparams=hparams, recipe_yaml=recipe_yaml)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        """Ray Train's hook, in its controller: log rank 0's report (the record metrics.jsonl keeps).
        A tracking failure (a server away) costs the log line, not the training run."""
        try:
            self.log(metrics[0])
        except Exception as error:
            reason = (str(error).strip() or "no message").splitlines()[0]
            logger.warning("tracking: step %s not logged: %s: %s", metrics[0].get("step"), type(error).__name__, reason)
        if "train/loss" not in metrics[0] and self._writer is not None:  # the run's last report (test metrics)
            self._writer.close()
            self._writer = None

    def log(self, record: dict[str, Any]) -> None:
        """One report's numbers at step ``record['step']``."""
        step = int(record["step"])
        values = {key: float(value) for key, value in record.items()
                  if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tensorboard_dir:
            writer = self._tensorboard(values)
            for key, value in values.items():
                writer.add_scalar(key, value, step)
            writer.flush()  # visible to a watching TensorBoard now, not at close
        if self.run_id:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow().log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def close(self, run_dir: Path, error: Optional[BaseException] = None) -> None:
        """Log the outputs the run wrote as artifacts and end the MLflow run."""
        if not self.run_id:
            return
        client = self._mlflow()
        for name in ARTIFACTS:
            path = run_dir / name
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), artifact_path=name)
            elif path.is_file():
                client.log_artifact(self.run_id, str(path))
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        client.set_terminated(self.run_id, status=status)

    def _tensorboard(self, first: dict[str, float]):
        """The event writer; a new one starts with the recipe, as hyperparameters and as text."""
        if self._writer is None:
            from tensorboardX import SummaryWriter
            from tensorboardX.summary import hparams

            self._writer = SummaryWriter(self.tensorboard_dir)
            for summary in hparams(self.hparams, {key: 0.0 for key in first}):
                self._writer.file_writer.add_summary(summary)
            self._writer.add_text("recipe", "    " + self.recipe_yaml.replace("\n", "\n    "))
        return self._writer

    def _mlflow(self):
        if self._client is None:
            self._client = mlflow_client(self.mlflow_uri)
        return self._client


def experiment_for(uri: str, name: str) -> str:
    """The id of MLflow experiment ``name`` in ``uri``, created if new."""
    from mlflow.exceptions import MlflowException

    try:
        client = mlflow_client(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            return client.create_experiment(name)
    except MlflowException as error:
        raise UserError("output.mlflow.tracking_uri", f"{uri}: {error.message.splitlines()[0]}") from None
    if experiment.lifecycle_stage != "active":
        raise UserError("output.mlflow.experiment", f"experiment {name!r} is deleted in {uri}; restore it or give another name")
    return experiment.experiment_id


def start_mlflow_run(uri: str, experiment_id: str, name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
    from mlflow.entities import Param

    client = mlflow_client(uri)
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    items = [Param(key, as_text(value)) for key, value in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + PARAMS_PER_BATCH])
    return run_id


@contextlib.contextmanager
def tracked(recipe, run_dir: Path, parent: Optional[Tracker] = None, name: Optional[str] = None) -> Iterator[Optional[Tracker]]:
    """Track the run while the body runs (None: nothing to track); at the end log its outputs and
    end the MLflow run, as failed when the body raised."""
    tracker = Tracker.open(recipe, run_dir, parent, name)
    try:
        yield tracker
    except BaseException as error:
        if tracker:
            tracker.close(run_dir, error)
        raise
    if tracker:
        tracker.close(run_dir)
