"""Hyperparameter search on real Ray Tune: tiny BERT trials, one worker each, one or a few epochs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_in_fixture, tiny_recipe_dict, with_topic_reference, write_recipe
from tracking_checks import assert_same_as_metrics_jsonl
from raytune_ft.recipe import load_recipe, validate_recipe
from raytune_ft.report.tracking import mlflow_client
from raytune_ft.search.experiment import run_experiment
from raytune_ft.search.pareto import hypervolume, pareto_front


def with_search(recipe: dict, tmp_path, **tune) -> dict:
    recipe["train"]["epochs"] = 1
    recipe["output"]["dir"] = str(tmp_path / "experiment")
    recipe["tune"] = {"workers_per_trial": 1, "max_concurrent_trials": 2, "num_samples": 1, **tune}
    return recipe


def results(experiment_dir) -> list[dict]:
    with open(experiment_dir / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid_experiment(tiny_bert, sentiment_data, topic_data, local_ray, tmp_path_factory) -> tuple[Path, dict]:
    """A grid over two learning rates with a retention reference, a WiSE-FT sweep per trial and
    both trackers on: (experiment directory, summary). The Pareto and tracking tests read it."""
    directory = tmp_path_factory.mktemp("grid")
    recipe = with_topic_reference(tiny_recipe_dict(tiny_bert, sentiment_data, directory / "run"), topic_data)
    with_search(recipe, directory, searcher="grid", space={"train.lr": {"grid": [1e-3, 3e-3]}},
                metric=["eval/accuracy", "retention/min"], mode=["max", "max"])
    recipe["wise_ft"] = {"alphas": [0.0, 0.5, 1.0], "metric": "eval/accuracy", "min_retention": 0.0}
    recipe["output"].update(tensorboard=True, mlflow={"tracking_uri": str(directory / "store"), "experiment": "sweep"})
    summary = run_in_fixture(lambda force: run_experiment(validate_recipe(recipe), force=force))
    return directory / "experiment", summary


def test_grid_runs_exactly_the_grid_and_writes_the_pareto_front(grid_experiment):
    experiment, summary = grid_experiment
    rows = results(experiment)
    assert sorted(float(row["train.lr"]) for row in rows) == [1e-3, 3e-3]
    assert all(row["status"] == "ok" and row["epochs"] == "1" for row in rows)
    assert all(float(row["first_report_s"]) > 0 for row in rows)
    for name in ("summary.md", "plots/trial_curves.png", "plots/pareto.png"):
        assert (experiment / name).stat().st_size > 0, name
    front = summary["pareto"]["front"]
    assert front and summary["pareto"]["hypervolume"] > 0 and summary["pareto"]["reference_point"] == [0.0, 0.0]
    # Each trial's WiSE-FT sweep widens the front for free: alpha 0 is the pretrained body again.
    points = {point["trial"]: point for point in summary["pareto"]["points"]}
    assert len(points) == 3 * len(rows)
    assert all(points[f"{row['trial']}-alpha0"]["retention/min"] > 0.999 for row in rows)
    assert summary["pareto"]["hypervolume"] >= summary["pareto"]["hypervolume_trials_only"] > 0
    for member in front:  # every front member is a recipe the user can run as it is
        chosen = load_recipe(experiment / "front" / f"{member}.yaml")
        assert chosen.tune is None and chosen.train.lr in (1e-3, 3e-3)
        assert chosen.wise_ft.alphas == ([float(member.split("-alpha")[1])] if "-alpha" in member else [0.0, 0.5, 1.0])
    best = load_recipe(experiment / "best_recipe.yaml")
    assert best.train.lr == float(next(row["train.lr"] for row in rows if row["trial"] == summary["best"]["trial"]))
    assert (experiment / "trials" / summary["best"]["trial"] / "run" / "model" / "model.safetensors").is_file()
    # Each run is written once, in the experiment: no copy of it in Ray's session directory.
    from ray._private.worker import _global_node
    staged = list((Path(_global_node.get_session_dir_path()) / "artifacts").rglob("model.safetensors"))
    assert staged == []


def test_each_tune_trial_is_a_child_run_and_a_tensorboard_directory(grid_experiment):
    experiment, _ = grid_experiment
    client = mlflow_client(f"file:{experiment.parent / 'store'}")
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


def test_random_search_samples_the_declared_space_with_both_bounds(tiny_recipe, tmp_path):
    """The random searcher draws from the Tune domains that param_space builds: floats inside a
    log-uniform range, and integers from randint's low to its high, both included."""
    import random

    import numpy as np

    from raytune_ft.search.space import param_space

    with_search(tiny_recipe, tmp_path, searcher="random", space={
        "train.lr": {"loguniform": [1e-4, 1e-2]}, "train.batch_size": {"randint": [8, 12]},
    })
    space = param_space(validate_recipe(tiny_recipe).tune)
    random.seed(0)
    np.random.seed(0)
    lrs = [space["train.lr"].sample() for _ in range(500)]
    sizes = {space["train.batch_size"].sample() for _ in range(500)}
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and min(lrs) < 2e-4 and max(lrs) > 5e-3
    assert sizes == {8, 9, 10, 11, 12} and all(isinstance(size, int) for size in sizes)


def test_asha_stops_the_useless_trial_at_the_first_milestone(tiny_recipe, tmp_path, local_ray):
    """One trial at a time, the useful lr first: at epoch 1 the lr-0 trial (nothing learned, the
    initial loss) is below the milestone's median and stops; the useful one runs all 3 epochs."""
    with_search(tiny_recipe, tmp_path, searcher="grid", scheduler="asha", max_concurrent_trials=1,
                metric="eval/loss", mode="min", asha={"grace_period": 1, "reduction_factor": 2},
                space={"train.lr": {"grid": [3e-3, 0.0]}})
    tiny_recipe["train"]["epochs"] = 3
    summary = run_experiment(validate_recipe(tiny_recipe))
    epochs = {float(row["train.lr"]): (row["status"], int(row["epochs"])) for row in summary["rows"]}
    assert epochs == {3e-3: ("ok", 3), 0.0: ("stopped", 1)}
    assert summary["trial_epochs"] == 4


def test_a_stopped_trials_train_run_gives_back_its_cpus_with_another_ray_on_the_host(local_ray, tmp_path):
    """A Tune scheduler stops a trial by ending its actor, and the Train controller dies with it;
    Train's placement-group cleaner must then free the workers' CPUs even when another Ray runs on
    this host (it found two instances, gave up, and PBT's restarted trials waited for ever)."""
    import ray
    from ray.util.placement_group import placement_group_table

    running = tmp_path / "running"

    def sleep_loop(config):
        running.touch()  # as a trial stopped by its scheduler, it is stopped while training
        time.sleep(600)

    @ray.remote(num_cpus=0)
    class TrialStandIn:
        def fit(self):
            from ray.train import ScalingConfig
            from ray.train.torch import TorchTrainer

            TorchTrainer(sleep_loop, scaling_config=ScalingConfig(num_workers=1)).fit()

    other = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(address='local', num_cpus=1); time.sleep(600)"])
    try:
        def wait_for(condition, seconds):
            deadline = time.time() + seconds
            while not condition() and time.time() < deadline:
                time.sleep(1)
            return condition()

        def created() -> set[str]:
            return {pg_id for pg_id, pg in placement_group_table().items() if pg["state"] == "CREATED"}

        before = created()  # an earlier test's stopped trial may still be being cleaned up
        trial = TrialStandIn.remote()
        trial.fit.remote()
        assert wait_for(running.exists, 180), "the Train run never started training"
        (ours,) = created() - before
        ray.kill(trial)
        assert wait_for(lambda: ours not in created(), 120), "the killed run's placement group was never removed"
    finally:
        other.kill()
        other.wait()


@pytest.mark.timeout(900)  # PBT stops and restarts trials; each restart starts a new worker group
def test_pbt_copies_the_good_trial_into_the_bad_one(tiny_recipe, tmp_path, local_ray):
    """Synchronous PBT over lr 0 and a useful lr: after epoch 2 the lr-0 trial continues
    from the useful trial's checkpoint with a perturbed lr, so it ends having learned, which it
    cannot do on its own; its metrics.jsonl still holds each of the 3 epochs once."""
    with_search(tiny_recipe, tmp_path, searcher="grid", scheduler="pbt", metric="eval/loss", mode="min",
                pbt={"interval": 2, "quantile": 0.5, "resample_probability": 0.0, "synchronous": True},
                space={"train.lr": {"grid": [0.0, 3e-3]}})
    tiny_recipe["train"]["epochs"] = 3
    summary = run_experiment(validate_recipe(tiny_recipe))
    assert summary["failed"] == 0 and {row["epochs"] for row in summary["rows"]} == {3}
    trials = tmp_path / "experiment" / "trials"
    exploits = [json.loads(line) for line in (trials / "pbt_global.txt").read_text().splitlines()]
    assert exploits[0][:2] == ["0_train_lr=0.0000", "1_train_lr=0.0030"]  # recipient, donor
    lr_zero = next(row for row in summary["rows"] if row["trial"].endswith("_00000"))
    assert lr_zero["eval/loss"] < 0.5, lr_zero
    history = [json.loads(line) for line in (trials / lr_zero["trial"] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in history if "train/loss" in record] == [1, 2, 3]


def test_pbt_keeps_a_bounded_number_of_checkpoints_and_still_exploits(tmp_path, local_ray):
    """The experiment's own Tuner (PBT at every epoch, synchronous) over a stand-in trial whose
    weight grows by its lr each epoch and travels in its checkpoints: each trial keeps its last
    2 x interval + 1 = 3 of the Tune checkpoints it reports, and the lr-0 trial still continues
    from the other's, ending with a weight it cannot reach alone."""
    import tempfile

    from ray import tune

    from raytune_ft.search.experiment import build_tuner

    def trial(config):
        weight, epoch = 0.0, 0
        if (restored := tune.get_checkpoint()) is not None:
            weight, epoch = json.loads((Path(restored.path) / "state.json").read_text())
        while epoch < 4:
            weight, epoch = weight + config["train.lr"], epoch + 1
            with tempfile.TemporaryDirectory() as directory:
                (Path(directory) / "state.json").write_text(json.dumps([weight, epoch]))
                tune.report({"epoch": epoch, "eval/loss": -weight}, checkpoint=tune.Checkpoint.from_directory(directory))

    recipe = validate_recipe({
        "name": "pbt", "task": {"type": "text_classification"}, "model": {"path": "unused"},
        "data": {"train": "unused", "columns": {"text": "text", "label": "label"}}, "output": {"dir": str(tmp_path)},
        "tune": {"space": {"train.lr": {"grid": [0.0, 1.0]}}, "searcher": "grid", "scheduler": "pbt", "metric": "eval/loss",
                 "mode": "min", "num_samples": 1, "pbt": {"interval": 1, "quantile": 0.5, "resample_probability": 0.0,
                                                          "synchronous": True}}})
    results = build_tuner(recipe, tmp_path, tune.with_resources(trial, {"CPU": 0.01}), resume=False).fit()
    # Every restore found its checkpoint, and the lr-0 trial went on from the other's weights.
    assert not results.errors and all(result.metrics["eval/loss"] <= -1 for result in results), results.errors
    exploits = (tmp_path / "trials" / "pbt_global.txt").read_text().splitlines()
    assert len(exploits) >= 3, exploits  # one at each epoch both trials reach
    kept = {path.name: sorted(p.name for p in path.glob("checkpoint_*")) for path in (tmp_path / "trials").glob("trial_*")}
    assert len(kept) == 2 and all(1 <= len(names) <= 3 for names in kept.values()), kept
    assert max(name for names in kept.values() for name in names) >= "checkpoint_000003", kept  # so older ones went


def test_a_crashing_trial_is_retried_and_a_broken_one_fails_alone(tiny_recipe, tmp_path, local_ray, monkeypatch):
    """Every trial raises once after epoch 1 (RAYTUNE_FT_FAULT) and is retried from its checkpoint;
    the trial that freezes more layers than the model has fails for good, the other finishes."""
    tiny_recipe["strategy"] = {"method": "freeze", "layers": 1}
    with_search(tiny_recipe, tmp_path, searcher="grid", max_failures=1, space={"strategy.layers": {"grid": [1, 9]}})
    tiny_recipe["train"]["epochs"] = 2
    monkeypatch.setenv("RAYTUNE_FT_FAULT", "raise_after_epoch:1")
    run_experiment(validate_recipe(tiny_recipe))
    rows = {int(row["strategy.layers"]): row for row in results(tmp_path / "experiment")}
    assert rows[1]["status"] == "ok" and rows[1]["epochs"] == "2"
    assert rows[9]["status"] == "error" and "TrialFailed: strategy.layers: 9 layers to freeze" in rows[9]["error"]
    run_dir = tmp_path / "experiment" / "trials" / rows[1]["trial"] / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_at"] == [{"epoch": 1, "step": summary["steps"] // 2}]
    # The run's checkpoints, as a Train run keeps them (the newest output.checkpoints_to_keep over
    # both attempts), though this one-worker trial ran its loop in its own actor.
    assert sorted(path.name for path in run_dir.iterdir() if "checkpoint" in path.name) == [
        "checkpoint_epoch_0002_restart1", "checkpoint_final_restart1"]


def finished_trials(experiment) -> list:
    """Trials that wrote their summary and that Tune's saved experiment state records as done."""
    state = "".join(path.read_text() for path in experiment.glob("trials/experiment_state-*.json"))
    return sorted(experiment.glob("trials/trial_*/run/summary.json")) if "TERMINATED" in state else []


def test_resume_of_an_optuna_search_reruns_no_finished_trial_and_stays_in_the_space(tiny_recipe, tmp_path, local_ray):
    """The driver (and the Ray it started) is killed once the first of Optuna's two trials has
    finished; --resume restores the searcher, runs only the second, and both samples lie inside
    the declared space."""
    with_search(tiny_recipe, tmp_path, searcher="optuna", num_samples=2, seed=3, max_concurrent_trials=1, space={
        "train.lr": {"loguniform": [1e-4, 1e-2]}, "train.batch_size": {"randint": [8, 12]},
    })
    path = write_recipe(tiny_recipe, tmp_path / "tune.yaml")
    experiment = tmp_path / "experiment"
    process = subprocess.Popen([sys.executable, "-m", "raytune_ft.cli", "tune", str(path)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not finished_trials(experiment) and time.time() < deadline and process.poll() is None:
        time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-experiment
    process.wait()
    first = finished_trials(experiment)
    assert len(first) == 1, "the first trial did not finish in time"
    finished_at = first[0].stat().st_mtime

    summary = run_experiment(load_recipe(path), resume=True)
    assert first[0].stat().st_mtime == finished_at  # the finished trial was not run again
    rows = results(experiment)
    assert len(rows) == 2 and summary["failed"] == 0 and all(row["status"] == "ok" for row in rows)
    for row in rows:
        assert 1e-4 <= float(row["train.lr"]) <= 1e-2
        assert 8 <= int(row["train.batch_size"]) <= 12
        assert float(row["eval/accuracy"]) >= 0
    assert len({(row["train.lr"], row["train.batch_size"]) for row in rows}) == 2  # two samples, not one run twice


BAD_SPACES = [
    ({"train.lrr": {"choice": [1e-3]}}, "tune.space.train.lrr: unknown field train.lrr"),
    ({"train.lr": {"choice": []}}, "tune.space.train.lr: empty choice"),
    ({"train.lr": {"uniform": [1e-2, 1e-4]}}, "tune.space.train.lr: uniform low 0.01 is above high 0.0001"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, "tune.space.train.lr: loguniform low must be > 0"),
    ({"train.batch_size": {"loguniform": [8, 32]}}, "tune.space.train.batch_size: loguniform samples floats; this field takes int"),
    ({"train.batch_size": {"choice": [8, 0]}}, "tune.space.train.batch_size: choice value 0 is not valid: train.batch_size"),
    ({"strategy.method": {"grid": ["full", "bogus"]}}, "tune.space.strategy.method: grid value 'bogus' is not valid"),
    ({"data.max_rows": {"choice": [10]}}, "tune.space.data.max_rows: data cannot be searched"),
    ({"train.lr": {"normal": [0, 1]}}, "tune.space.train.lr.normal: unknown field"),
]


@pytest.mark.parametrize("space,message", BAD_SPACES, ids=[message.split(":")[1].strip() + "-" + str(i) for i, (_, message) in enumerate(BAD_SPACES)])
def test_bad_search_space_is_one_line_before_any_trial(space, message, tiny_recipe, tmp_path, cli_in_process):
    with_search(tiny_recipe, tmp_path, space=space)
    code, stderr = cli_in_process("tune", str(write_recipe(tiny_recipe, tmp_path / "tune.yaml")))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not (tmp_path / "experiment").exists()


@pytest.mark.parametrize("tune,message", [
    ({"metric": "retention/min"}, "tune.metric: retention/min needs a retention: section"),
    ({"searcher": "optuna", "space": {"train.lr": {"grid": [1e-3]}}}, "tune.searcher: optuna samples every dimension"),
    ({"scheduler": "pbt", "space": {"train.batch_size": {"choice": [8, 16]}}},
     "tune.space: pbt continues one trial's run with another's hyperparameters, so it can only search train.lr"),
    ({"scheduler": "pbt", "searcher": "optuna"}, "tune.searcher: pbt proposes its own configurations"),
    ({"scheduler": "pbt", "space": {"train.lr": {"choice": [1e-3]}}}, None),
    ({"points_to_evaluate": [{"train.lr": 2e-3}]}, "tune.points_to_evaluate.0.train.lr: 0.002 is not in tune.space.train.lr"),
    ({"points_to_evaluate": [{"train.dropout": 0.1}]}, "tune.points_to_evaluate.0: give a value for every space path (train.lr)"),
    ({"metric": ["eval/accuracy", "eval/loss"], "mode": "max"}, None),
])
def test_search_settings_are_checked(tune, message, tiny_recipe, tmp_path, cli_in_process):
    with_search(tiny_recipe, tmp_path, **{"space": {"train.lr": {"choice": [1e-3]}}, **tune})
    if message is None:
        assert validate_recipe(tiny_recipe).tune.modes in (["max"], ["max", "max"])
        return
    code, stderr = cli_in_process("validate", str(write_recipe(tiny_recipe, tmp_path / "tune.yaml")))
    assert code == 2 and message in stderr, stderr


def test_points_to_evaluate_come_first_and_sections_reach_trials_whole(tiny_recipe, tmp_path):
    """Section-valued choices (whole strategies) go to Tune as indices, which its generator takes
    as given points and samples like any value; trials and rows get the sections back."""
    from ray.tune import register_trainable
    from ray.tune.search import BasicVariantGenerator

    from raytune_ft.search.experiment import searcher
    from raytune_ft.search.space import decoded, param_space

    strategies = [{"method": "full"}, {"method": "freeze", "layers": 1}, {"method": "lora", "rank": 4, "alpha": 8}]
    with_search(tiny_recipe, tmp_path, searcher="random", seed=3, num_samples=6, max_concurrent_trials=6, space={
        "strategy": {"choice": strategies}, "train.lr": {"loguniform": [1e-4, 1e-2]}},
        points_to_evaluate=[{"strategy": strategies[2], "train.lr": 1e-3}, {"strategy": strategies[1], "train.lr": 5e-3}])
    tune = validate_recipe(tiny_recipe).tune
    generator = searcher(tune)
    assert isinstance(generator, BasicVariantGenerator)
    register_trainable("points_probe", lambda config: None)
    generator.add_configurations({"trial": {"run": "points_probe", "config": param_space(tune), "num_samples": tune.num_samples}})
    configs = []
    while (trial := generator.next_trial()) is not None:
        configs.append(decoded(tune, {path: trial.config[path] for path in tune.space}))
    assert configs[:2] == [{"strategy": strategies[2], "train.lr": 1e-3}, {"strategy": strategies[1], "train.lr": 5e-3}]
    assert len(configs) == 6 and all(config["strategy"] in strategies and 1e-4 <= config["train.lr"] <= 1e-2 for config in configs)


def test_pareto_front_and_hypervolume():
    points = [(0.9, 0.5), (0.8, 0.8), (0.7, 0.7), (0.5, 0.95)]
    assert pareto_front(points, ["max", "max"]) == [0, 1, 3]
    # Rectangles from the reference (0, 0): 0.9*0.5 + 0.8*(0.8-0.5) + 0.5*(0.95-0.8)
    assert hypervolume([points[i] for i in (0, 1, 3)], ["max", "max"], (0.0, 0.0)) == pytest.approx(0.765)
    assert pareto_front([(1.0, 0.2), (2.0, 0.1)], ["min", "max"]) == [0]


def test_shipped_recipe_with_a_search_space_validates():
    recipe = yaml.safe_load((ROOT / "jobs" / "text_classification.yaml").read_text())
    recipe["tune"] = {"space": {"train.lr": {"loguniform": [1e-5, 1e-3]}, "strategy.method": {"choice": ["full", "lp_ft"]}},
                      "metric": ["eval/macro_f1", "retention/min"], "mode": ["max", "max"], "searcher": "optuna"}
    assert validate_recipe(recipe).tune.metrics == ["eval/macro_f1", "retention/min"]
