"""Every loop feature under ZeRO-3, against DDP with the same seed: 2 CPU workers, a tiny BERT,
real DeepSpeed. Parameters are partitioned under ZeRO-3: evaluation and reference probes run in
lockstep, the L2-SP/EWC anchor and Fisher live as each rank's partitions and the penalty arrives
as a gradient on them, WiSE-FT and early stopping work on gathered weights.

Tolerances: ZeRO-3 and DDP differ only in the order of floating-point sums (reduce-scatter of
flat partitions against bucketed all-reduce), measured ~1e-5 relative on losses after tens of
AdamW steps (tests/test_deepspeed.py); losses are compared at rel 1e-3. Scores that count
examples (accuracy, a refitted probe's accuracy) may flip one borderline example: abs 1/96."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import run_in_fixture, tiny_recipe_dict, with_topic_reference
from raytune_ft import run
from raytune_ft.recipe import validate_recipe

ONE_EXAMPLE = 1 / 96 + 1e-9  # the test split has 96 rows
BACKENDS = {"ddp": {}, "zero3": {"train": {"backend": "deepspeed"}, "deepspeed": {"zero_stage": 3}}}


def feature_recipe(tiny_bert, sentiment_data, topic_data, run_dir: Path, backend: str, **sections) -> dict:
    recipe = with_topic_reference(tiny_recipe_dict(tiny_bert, sentiment_data, run_dir), topic_data)
    recipe["data"]["max_rows"] = 160
    recipe["train"].update(epochs=3, batch_size=8, grad_accum=2)
    recipe["retention"]["references"].append({  # the task's own metrics on a set it was not trained on
        "name": "held_out", "kind": "task", "data": {"train": str(sentiment_data["test"]), "columns": {"text": "sentence", "label": "sentiment"}}})
    for changes in (BACKENDS[backend], sections):
        for section, values in changes.items():
            recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


PAIRS = {
    # references (probe and task), L2-SP, replay, WiSE-FT and early stopping, all in one run
    "retention": lambda runs: {"regularizer": {"method": "l2sp", "strength": 10.0}, "replay": {"fraction": 0.25},
                               "wise_ft": {"alphas": [0.5, 1.0], "min_retention": 0.0},
                               "train": {"early_stopping": {"metric": "eval/accuracy", "mode": "max", "patience": 5}}},
    "ewc": lambda runs: {"regularizer": {"method": "ewc", "strength": 100.0, "fisher_samples": 32}},
    # LoRA as a student of the first pair's DDP run
    "lora_student": lambda runs: {"strategy": {"method": "lora", "rank": 4, "alpha": 8},
                                  "distill": {"teacher": runs["retention", "ddp"]["outputs"]["run_dir"], "alpha": 0.5}},
}


@pytest.fixture(scope="module")
def pairs(tiny_bert, sentiment_data, topic_data, local_ray, tmp_path_factory) -> dict:
    """(pair, backend) -> the run's summary, for every pair under DDP and ZeRO-3; and the recipe
    of each, as ("recipe", pair, backend)."""
    runs: dict = {}
    for pair, sections in PAIRS.items():
        for backend in BACKENDS:
            recipe = feature_recipe(tiny_bert, sentiment_data, topic_data, tmp_path_factory.mktemp(f"{pair}_{backend}") / "run", backend, **sections(runs))
            runs["recipe", pair, backend] = recipe
            runs[pair, backend] = run_in_fixture(lambda force, recipe=validate_recipe(recipe): run(recipe, force=force))
    return runs


def epoch_rows(summary: dict) -> list[dict]:
    rows = [json.loads(line) for line in (Path(summary["outputs"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/loss" in row]


def assert_close_runs(zero3: dict, ddp: dict, keys: tuple[str, ...]) -> None:
    assert (zero3["backend"], ddp["backend"]) == ("deepspeed", "ddp")
    for mine, theirs in zip(epoch_rows(zero3), epoch_rows(ddp), strict=True):
        for key in keys:
            tolerance = {"abs": ONE_EXAMPLE} if "accuracy" in key or "macro_f1" in key else {"rel": 1e-3, "abs": 1e-5}
            assert mine[key] == pytest.approx(theirs[key], **tolerance), (mine["epoch"], key)


@pytest.mark.timeout(1800)  # its setup trains every pair
def test_reference_probes_and_task_references_score_alike(pairs):
    zero3, ddp = pairs["retention", "zero3"], pairs["retention", "ddp"]
    keys = [key for key in epoch_rows(ddp)[0] if key.startswith(("ref/", "retention/")) and key != "ref/time_s"]
    assert {"ref/topics/accuracy", "ref/held_out/accuracy"} <= set(keys)
    assert_close_runs(zero3, ddp, tuple(keys))
    for key, before in ddp["retention"]["before"].items():
        assert zero3["retention"]["before"][key] == pytest.approx(before, abs=ONE_EXAMPLE), key


def test_l2sp_and_replay_train_alike(pairs):
    zero3, ddp = pairs["retention", "zero3"], pairs["retention", "ddp"]
    assert_close_runs(zero3, ddp, ("train/loss", "eval/loss", "train/lr"))


def test_wise_ft_and_early_stopping_choose_alike(pairs):
    zero3, ddp = pairs["retention", "zero3"], pairs["retention", "ddp"]
    assert zero3["wise_ft"]["alpha"] == ddp["wise_ft"]["alpha"]
    for mine, theirs in zip(zero3["wise_ft"]["rows"], ddp["wise_ft"]["rows"], strict=True):
        assert mine["eval/loss"] == pytest.approx(theirs["eval/loss"], rel=1e-3)
    assert zero3["best_epoch"] == ddp["best_epoch"]
    assert zero3["test"]["loss"] == pytest.approx(ddp["test"]["loss"], rel=1e-3)


def test_ewc_fisher_from_partitions_matches_the_whole_one(pairs):
    """The Fisher taken turn by turn from gradient partitions weighs the penalty as DDP's whole
    Fisher does: the trajectories agree."""
    zero3, ddp = pairs["ewc", "zero3"], pairs["ewc", "ddp"]
    assert_close_runs(zero3, ddp, ("train/loss", "eval/loss", "ref/topics/accuracy"))
    assert zero3["test"]["loss"] == pytest.approx(ddp["test"]["loss"], rel=1e-3)


def test_zero3_loads_each_workers_partitions_only(pairs):
    """Under ZeRO-3 transformers creates every parameter partitioned and loads into the partitions;
    under DDP each worker holds the whole model. Both record what loading cost a worker."""
    zero3, ddp = pairs["retention", "zero3"]["model_load"], pairs["retention", "ddp"]["model_load"]
    assert zero3["partitioned"] and not ddp["partitioned"]
    for loading in (zero3, ddp):
        assert loading["peak_rss_bytes"] >= loading["rss_before_bytes"] > 0 and loading["seconds"] > 0


def test_lora_student_of_a_teacher_trains_alike_and_exports_its_adapter(pairs):
    zero3, ddp = pairs["lora_student", "zero3"], pairs["lora_student", "ddp"]
    assert_close_runs(zero3, ddp, ("train/loss", "eval/loss", "train/distill_kl"))
    assert zero3["distill"]["student"]["test"]["loss"] == pytest.approx(ddp["distill"]["student"]["test"]["loss"], rel=1e-3)
    assert zero3["distill"]["teacher"]["test"] == pytest.approx(ddp["distill"]["teacher"]["test"], rel=1e-6)
    for summary in (zero3, ddp):  # the adapter alone, gathered from the partitions, beside the merged model
        assert (Path(summary["outputs"]["adapter"]) / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    mine, theirs = (load_file(Path(summary["outputs"]["adapter"]) / "adapter_model.safetensors") for summary in (zero3, ddp))
    assert mine.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-3, atol=1e-4, msg=key)


def test_post_steps_on_a_zero3_export_score_like_ddps(pairs):
    from raytune_ft.post import run_steps
    from raytune_ft.post.finished import FinishedRun

    results = {backend: run_steps(FinishedRun.open(pairs["ewc", backend]["outputs"]["run_dir"]), ["quantize"])["quantize"]
               for backend in BACKENDS}
    assert results["zero3"]["layers"] == results["ddp"]["layers"]
    for mine, theirs in zip(results["zero3"]["table"], results["ddp"]["table"], strict=True):
        assert mine["accuracy"] == pytest.approx(theirs["accuracy"], abs=ONE_EXAMPLE)


def test_a_tune_trial_under_zero3_trains_like_the_ddp_run(pairs, tmp_path):
    """One grid trial of the EWC pair's recipe under ZeRO-3: the trial is the DDP run, within tolerance."""
    from raytune_ft import tune

    recipe = copy.deepcopy(pairs["recipe", "ewc", "zero3"])
    recipe["output"]["dir"] = str(tmp_path / "experiment")
    recipe["tune"] = {"space": {"train.lr": {"grid": [recipe["train"]["lr"]]}}, "searcher": "grid", "num_samples": 1,
                      "workers_per_trial": 2, "max_concurrent_trials": 1, "metric": "eval/loss", "mode": "min"}
    summary = tune(validate_recipe(recipe))
    assert summary["failed"] == 0 and summary["trials"] == 1
    trial = json.loads((Path(summary["best"]["model"]).parent / "summary.json").read_text())
    assert trial["backend"] == "deepspeed"
    assert trial["test"]["loss"] == pytest.approx(pairs["ewc", "ddp"]["test"]["loss"], rel=1e-3)
