"""Experiment tracking: a real run logs to TensorBoard and MLflow, read back through MLflow's
client and TensorBoard's own event reader (a Tune experiment's tracking: test_tune.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import write_recipe
from tracking_checks import assert_same_as_metrics_jsonl, events, logged_hparams
from raytune_ft import log
from raytune_ft.errors import UserError
from raytune_ft.recipe import validate_recipe
from raytune_ft.report.tracking import Tracker, mlflow_client, tracked


def test_a_run_logs_metrics_params_and_artifacts(finished_text_run):
    """The shared finished CLI run (tensorboard and mlflow on) logged live to both."""
    run_dir = finished_text_run
    uri = f"file:{run_dir / 'mlruns'}"  # the default: a file store inside the run directory
    client = mlflow_client(uri)
    state = json.loads((run_dir / "tracking.json").read_text())
    mlflow_run = client.get_run(state["run_id"])
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "tiny"
    assert mlflow_run.info.run_name == "tiny" and mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert float(params["train.lr"]) == 3e-3 and params["data.columns.text"] == "sentence" and params["output.tensorboard"] == "true"
    artifacts = {a.path for a in client.list_artifacts(state["run_id"])}
    assert {"model", "summary.json", "metrics.jsonl", "recipe.yaml", "plots"} <= artifacts
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(state["run_id"], "model")}
    assert_same_as_metrics_jsonl(run_dir, client, state["run_id"], run_dir / "tensorboard")

    accumulator = events(run_dir / "tensorboard")
    assert logged_hparams(accumulator)["train.lr"].number_value == pytest.approx(3e-3)
    assert "recipe/text_summary" in accumulator.Tags()["tensors"]


def test_a_resumed_run_continues_its_mlflow_run(tiny_recipe, tmp_path):
    tiny_recipe["output"]["mlflow"] = {}
    recipe = validate_recipe(tiny_recipe)
    for name in ("a", "b"):  # the runner makes the run directory first
        (tmp_path / name).mkdir()
    with pytest.raises(RuntimeError), tracked(recipe, tmp_path / "a") as first:
        raise RuntimeError("the run failed")
    client = mlflow_client(first.mlflow_uri)
    assert client.get_run(first.run_id).info.status == "FAILED"
    again = Tracker.open(recipe, tmp_path / "a")
    assert again.run_id == first.run_id and client.get_run(first.run_id).info.status == "RUNNING"
    assert Tracker.open(recipe, tmp_path / "b").run_id != first.run_id


def test_a_tracking_failure_does_not_stop_training(tiny_recipe, tmp_path, capsys):
    """A warning on stderr, as the command line shows it, and the run goes on."""
    log.configure(logging.INFO)
    tiny_recipe["output"]["mlflow"] = {}
    tracker = Tracker.open(validate_recipe(tiny_recipe), tmp_path)
    mlflow_client(tracker.mlflow_uri).delete_run(tracker.run_id)  # logging to it now fails
    tracker.after_report(None, [{"epoch": 1, "step": 5, "train/loss": 0.5}], None)
    assert "[raytune-ft] tracking: step 5 not logged: MlflowException" in capsys.readouterr().err


def test_a_deleted_experiment_is_a_clear_error(tiny_recipe, tmp_path):
    uri = f"file:{tmp_path / 'store'}"
    client = mlflow_client(uri)
    client.delete_experiment(client.create_experiment("tiny"))
    tiny_recipe["output"]["mlflow"] = {"tracking_uri": uri}
    with pytest.raises(UserError, match=r"^output.mlflow.experiment: experiment 'tiny' is deleted in file:"):
        Tracker.open(validate_recipe(tiny_recipe), tmp_path)


@pytest.mark.parametrize("setting, expected", [
    ("output.mlflow.tracking_uri=ftp://host/mlruns", "output.mlflow.tracking_uri: unsupported scheme 'ftp'; give a path or file:PATH"),
    ("output.mlflow.tracking_uri=s3://bucket/mlruns", "output.mlflow.tracking_uri: unsupported scheme 's3'"),
    ("output.mlflow.experimnt=x", "output.mlflow.experimnt: unknown field"),
    ("output.mlflow=often", "output.mlflow: Input should be a valid dictionary or instance of MlflowSection"),
    ("output.tensorboard=often", "output.tensorboard: Input should be a valid boolean"),
])
def test_bad_tracking_settings_are_one_line_errors(setting, expected, tiny_recipe, tmp_path, cli_in_process):
    path = write_recipe(tiny_recipe, tmp_path / "r.yaml")
    code, err = cli_in_process("validate", str(path), "--set", setting)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_tracking_settings_that_validate(tiny_recipe, tmp_path):
    tiny_recipe["output"]["mlflow"] = {"tracking_uri": "sqlite:///tmp/mlflow.db"}
    recipe = validate_recipe(tiny_recipe)
    assert recipe.output.mlflow.resolved_uri(tmp_path) == "sqlite:///tmp/mlflow.db"
    recipe.output.mlflow.tracking_uri = "file:relative/store"
    assert recipe.output.mlflow.resolved_uri(tmp_path) == f"file:{Path('relative/store').resolve()}"
    recipe.output.mlflow.tracking_uri = None
    assert recipe.output.mlflow.resolved_uri(tmp_path) == f"file:{tmp_path / 'mlruns'}"
