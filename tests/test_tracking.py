"""Experiment tracking: a real run and a real Tune experiment log to TensorBoard and MLflow, read
back through MLflow's client and TensorBoard's own event reader."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import write_recipe
from raytune_ft.errors import UserError
from raytune_ft.recipe import validate_recipe
from raytune_ft.report.tracking import Tracker, mlflow_client, tracked
from raytune_ft.train.runner import run
from raytune_ft.tune.experiment import run_experiment


def metric_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def events(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def logged_hparams(accumulator: EventAccumulator) -> dict:
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


def assert_same_as_metrics_jsonl(run_dir: Path, client: MlflowClient, run_id: str, tensorboard: Path) -> None:
    """Every number of every metrics.jsonl record, at the record's step, in MLflow (exactly) and
    TensorBoard (to float32); logged while training ran, before the run wrote its summary."""
    records = metric_records(run_dir)
    finished = (run_dir / "summary.json").stat().st_mtime
    accumulator = events(tensorboard)
    names = {key for record in records for key in record if key != "step"}
    assert {"train/loss", "eval/accuracy", "test/accuracy", "epoch"} <= names
    for name in names:
        expected = [(record["step"], record[name]) for record in records if name in record]
        history = client.get_metric_history(run_id, name)
        assert [(m.step, m.value) for m in history] == expected, name
        scalars = accumulator.Scalars(name)
        assert [s.step for s in scalars] == [step for step, _ in expected], name
        assert [s.value for s in scalars] == pytest.approx([value for _, value in expected], rel=1e-6), name
        if name.startswith("eval/"):  # live: each epoch arrived while the run was still training
            assert max(m.timestamp for m in history) / 1000 < finished and max(s.wall_time for s in scalars) < finished


def test_a_run_logs_metrics_params_and_artifacts(tiny_recipe, tmp_path, local_ray):
    tiny_recipe["train"]["epochs"] = 2
    tiny_recipe["scaling"]["workers"] = 1
    tiny_recipe["output"].update(tensorboard=True, mlflow=True)
    run(validate_recipe(tiny_recipe))
    run_dir = tmp_path / "run"

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


def test_each_tune_trial_is_a_child_run_and_a_tensorboard_directory(tiny_recipe, tmp_path, local_ray):
    tiny_recipe["train"]["epochs"] = 1
    tiny_recipe["output"].update(dir=str(tmp_path / "experiment"), tensorboard=True,
                                 mlflow={"tracking_uri": str(tmp_path / "store"), "experiment": "sweep"})
    tiny_recipe["tune"] = {"workers_per_trial": 1, "max_concurrent_trials": 2, "num_samples": 1, "searcher": "grid",
                           "space": {"train.lr": {"grid": [1e-3, 3e-3]}}}
    run_experiment(validate_recipe(tiny_recipe))
    experiment = tmp_path / "experiment"

    client = mlflow_client(f"file:{tmp_path / 'store'}")
    parent = json.loads((experiment / "tracking.json").read_text())["run_id"]
    experiment_id = client.get_experiment_by_name("sweep").experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    with open(experiment / "results.csv") as f:
        rows = {row["trial"]: row for row in csv.DictReader(f)}
    assert sorted(child.info.run_name for child in children) == sorted(rows)
    assert {"results.csv", "summary.json", "best_recipe.yaml"} <= {a.path for a in client.list_artifacts(parent)}
    for child in children:
        trial = child.info.run_name
        assert child.info.status == "FINISHED"
        assert float(child.data.params["train.lr"]) == float(rows[trial]["train.lr"])
        assert_same_as_metrics_jsonl(experiment / "trials" / trial / "run", client, child.info.run_id,
                                     experiment / "tensorboard" / trial)


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
    tiny_recipe["output"]["mlflow"] = {}
    tracker = Tracker.open(validate_recipe(tiny_recipe), tmp_path)
    mlflow_client(tracker.mlflow_uri).delete_run(tracker.run_id)  # logging to it now fails
    tracker.after_report(None, [{"epoch": 1, "step": 5, "train/loss": 0.5}], None)
    assert "[raytune-ft] tracking: step 5 not logged: MlflowException" in capsys.readouterr().out


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
