"""``retention.floor`` on real Ray: a tiny BERT, a probe reference, WiSE-FT first, then a Tune search."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, write_recipe
from raytune_ft import run
from raytune_ft.errors import UserError
from raytune_ft.recipe import load_recipe, validate_recipe
from raytune_ft.train.planning import plan_run
from raytune_ft.search.floor import first_points, mitigation_space, search_reason


def test_a_floor_met_by_wise_ft_alone_exports_the_chosen_alpha(retention_recipe, local_ray):
    """A learning rate that wrecks the encoder: the fine-tuned model (alpha 1) misses the floor,
    alpha 0 (the base body, the tuned head) keeps it on the references' validation rows. With no
    search in the budget, the floor is met by WiSE-FT alone; the run says so and shows the front."""
    retention_recipe["train"].update(epochs=2, lr=0.3, clip_grad_norm=None)  # as test_retention's WiSE-FT test
    retention_recipe["retention"].update(floor=0.98, budget={"trials": 0})
    retention_recipe["wise_ft"] = {"alphas": [0.0, 1.0]}
    recipe = validate_recipe(retention_recipe)
    summary = run(recipe)
    run_dir = recipe.run_dir()

    floor = summary["floor"]
    assert floor["met"] and floor["search_trials"] == 0 and floor["metric"] == "eval/accuracy"
    chosen = floor["chosen"]
    assert chosen["alpha"] == 0.0 and chosen["retention"] >= 0.98 and chosen["label"] == "fine-tuned, alpha 0"
    # Chosen on the references' validation rows, reported on their test rows.
    assert summary["retention"]["validation"]["retention"]["retention_val/min"] == pytest.approx(1.0)
    assert chosen["test"]["retention"] == summary["retention"]["retention"]["retention/min"] == pytest.approx(1.0)
    assert chosen["test"]["accuracy"] == summary["test"]["accuracy"]
    rows = {row["alpha"]: row for row in summary["wise_ft"]["rows"]}
    assert rows[1.0]["retention_val/min"] < 0.98 <= rows[0.0]["retention_val/min"]
    assert "met by fine-tuned, alpha 0" in floor["message"]

    written = json.loads((run_dir / "floor.json").read_text())
    assert [point["alpha"] for point in written["points"]] == [0.0, 1.0] and written["front"]
    assert (run_dir / "plots" / "floor.png").stat().st_size > 10_000
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert not (run_dir / "search").exists()
    report = (run_dir / "report.html").read_text()
    assert "Retention floor" in report and "met by fine-tuned, alpha 0" in report


@pytest.mark.timeout(1200)  # a baseline, the fine-tuning, its WiSE-FT sweep and a search trial, in a subprocess
def test_a_floor_out_of_reach_is_one_line_exit_3_and_no_model(retention_recipe, tmp_path, cli_on_test_ray):
    """Nothing keeps retention 1.5: WiSE-FT, then a search of one trial, then one line with the
    best retention reached and its gain over the baseline, exit code 3, and no model/ in the run folder."""
    retention_recipe["train"]["epochs"] = 1
    retention_recipe["data"]["max_rows"] = 160
    retention_recipe["retention"]["references"][0]["data"]["max_rows"] = 120
    retention_recipe["retention"].update(floor=1.5, budget={"trials": 1})
    retention_recipe["baseline"] = {"enabled": True, "epochs": 1}
    retention_recipe["wise_ft"] = {"alphas": [0.5, 1.0]}
    code, stderr = cli_on_test_ray("run", str(write_recipe(retention_recipe, tmp_path / "floor.yaml")))
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert code == 3, stderr
    assert len(lines) == 1 and lines[0].startswith("error: retention.floor: 1.5 not met within the budget (1 search trial, "), stderr
    assert "the best retention reached is" in lines[0] and "with gain" in lines[0] and "on eval/accuracy; no model exported" in lines[0]

    run_dir = tmp_path / "run"
    assert not (run_dir / "model").exists() and not (run_dir / "adapter").exists()
    written = json.loads((run_dir / "floor.json").read_text())
    assert not written["met"] and written["chosen"] is None and written["search_trials"] == 1
    # The head-only baseline is a candidate too, its references scored (its model kept only while it could be delivered).
    assert {point["setting"] for point in written["points"]} >= {"fine-tuned", "head-only baseline"} and len(written["points"]) >= 4
    baseline = next(point for point in written["points"] if point["setting"] == "head-only baseline")
    assert baseline["gain"] == 0 and 0.9 <= baseline["retention"] <= 1.1 and not (run_dir / "baseline" / "model").exists()
    assert written["closest"]["retention"] == max(point["retention"] for point in written["points"])
    assert (run_dir / "search" / "results.csv").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["floor"]["met"] is False and summary["outputs"]["model"] is None


@pytest.mark.parametrize("field,value,message", [
    ("retention.floor", 0, "retention.floor: Input should be greater than 0"),
    ("retention.floor", 1.6, "retention.floor: Input should be less than or equal to 1.5"),
    ("retention.budget.trials", -1, "retention.budget.trials: Input should be greater than or equal to 0"),
    ("retention.budget.time_s", 0, "retention.budget.time_s: Input should be greater than 0"),
    ("retention.budget.tries", 3, "retention.budget.tries: unknown field"),
    ("retention.target_metric", "eval/nope", "retention.target_metric: 'eval/nope' is not a metric task text_classification reports"),
])
def test_bad_floor_fields_are_one_line_naming_the_field(field, value, message, retention_recipe, tmp_path, cli_in_process):
    retention_recipe["retention"]["floor"] = 0.98
    path = write_recipe(retention_recipe, tmp_path / "floor.yaml")
    code, stderr = cli_in_process("validate", str(path), "--set", f"{field}={value}")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr


def test_a_budget_without_a_floor_is_refused(retention_recipe, tmp_path, cli_in_process):
    retention_recipe["retention"]["budget"] = {"trials": 2}
    code, stderr = cli_in_process("validate", str(write_recipe(retention_recipe, tmp_path / "floor.yaml")))
    assert code == 2 and "retention.budget: only with retention.floor" in stderr, stderr


def test_a_recipe_written_back_without_a_floor_validates_again(retention_recipe):
    """recipe.yaml states every default (target_metric null, the default budget): a teacher's or a
    resumed run's recipe read back must not count them as set."""
    retention_recipe["wise_ft"] = {"alphas": [0.5, 1.0]}
    recipe = validate_recipe(retention_recipe)
    assert recipe.retention.floor is None and validate_recipe(recipe.to_dict()).retention == recipe.retention


SHIPPED = [path for path in sorted((ROOT / "jobs").glob("*.yaml")) if "\nretention:" in path.read_text()]


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_a_floor_of_098_validates_on_every_shipped_recipe_with_references(path):
    recipe = load_recipe(path, ["retention.floor=0.98"])
    assert recipe.retention.floor == 0.98 and recipe.retention.budget.trials >= 1


def test_a_floor_plans_validation_rows_for_every_reference(retention_recipe):
    """The planning ``raytune-ft validate`` runs gives the probe reference validation rows held out
    of its train file, apart from its test file; without a test file a probe cannot have both."""
    retention_recipe["retention"]["floor"] = 0.98
    reference = plan_run(validate_recipe(retention_recipe)).addons["retention"][0]
    assert reference.split_names == ["test", "train", "validation"]
    assert (reference.splits["validation"].holdout, reference.splits["train"].holdout) == ("validation", "train")
    assert reference.splits["test"].field == "retention.references.0.data.test"
    del retention_recipe["retention"]["references"][0]["data"]["test"]
    with pytest.raises(UserError, match="retention.references.0.data.test: retention.floor chooses on this reference's validation"):
        plan_run(validate_recipe(retention_recipe))


def test_the_search_space_fits_the_model_and_the_references(retention_recipe, tiny_bert):
    """Frozen depths below the model's 2 layers, LoRA ranks, L2-SP and EWC strengths on the probe
    (pulls of 0.5, 2 and 8 over the run), replay of the probe's rows; the recipe's own settings
    first (none: no penalty, no replay)."""
    retention_recipe["retention"]["floor"] = 0.98
    recipe = validate_recipe(retention_recipe)
    recipe.data.labels = ["negative", "positive"]
    recipe.train.lr = 1e-3
    recipe.baseline.enabled, recipe.baseline.lr = True, 5e-3
    space = mitigation_space(recipe, steps=100)  # lambda = pull / (1e-3 * 100 / 2)
    assert space["strategy"][0] == {"method": "full"} and {"method": "freeze", "layers": 1} in space["strategy"]
    assert not any(s.get("layers", 0) >= 2 for s in space["strategy"])
    assert [s["rank"] for s in space["strategy"] if s["method"] == "lora"] == [4, 16]
    assert space["regularizer"][0] is None and [r["strength"] for r in space["regularizer"][1:]] == [10.0, 40.0, 160.0] * 2
    assert {"method": "ewc", "strength": 40.0, "reference": "topics"} in space["regularizer"]
    assert space["replay"] == [None, {"fraction": 0.1, "reference": "topics"}, {"fraction": 0.3, "reference": "topics"}]
    assert space["train.head_lr_scale"] == [1.0, 5.0]  # the recipe's own, and the head-only baseline's rate
    # Tried first: replay with the recipe's strategy (the head at the baseline's rate) and with LoRA r16,
    # a frozen half with EWC, LoRA with L2-SP (pull 2).
    # LoRA on the model's attention query and value, named for the search (the recipe's strategy names
    # none), at 4 x the lr set for full fine-tuning.
    lora = {"method": "lora", "rank": 16, "alpha": 32, "lr_scale": 4.0, "target_modules": ["query", "value"]}
    replay = {"fraction": 0.3, "reference": "topics"}
    assert first_points(space, 40.0) == [
        {"strategy": {"method": "full"}, "regularizer": None, "replay": replay, "train.head_lr_scale": 5.0},
        {"strategy": lora, "regularizer": None, "replay": replay, "train.head_lr_scale": 1.0},
        {"strategy": {"method": "freeze", "layers": 1}, "regularizer": {"method": "ewc", "strength": 40.0, "reference": "topics"}, "replay": None,
         "train.head_lr_scale": 1.0},
        {"strategy": lora, "regularizer": {"method": "l2sp", "strength": 40.0}, "replay": None, "train.head_lr_scale": 1.0}]
    recipe.baseline.enabled = False  # no baseline: no rate to borrow
    assert mitigation_space(recipe, steps=100)["train.head_lr_scale"] == [1.0]


def test_the_margin_is_a_guard_band_of_the_floor_only(retention_recipe):
    from raytune_ft.search.floor import choosing_at

    retention_recipe["retention"].update(floor=0.98, margin=0.02)
    assert choosing_at(validate_recipe(retention_recipe)) == pytest.approx(1.0)
    del retention_recipe["retention"]["floor"]
    with pytest.raises(UserError, match="retention.margin: only with retention.floor"):
        validate_recipe(retention_recipe)


def test_the_search_runs_when_wise_ft_gives_up_gain():
    def point(alpha, accuracy, retention):
        return {"alpha": alpha, "eval/accuracy": accuracy, "retention": retention, "exported": alpha == 0.5}

    assert search_reason([point(0.5, 0.8, 0.99), point(1.0, 0.8, 0.9)], 0.98, "eval/accuracy") is None
    assert "only WiSE-FT alpha 0.5 meets it" in search_reason([point(0.5, 0.7, 0.99), point(1.0, 0.8, 0.9)], 0.98, "eval/accuracy")
    assert "no WiSE-FT alpha" in search_reason([point(0.5, 0.7, 0.97), point(1.0, 0.8, 0.9)], 0.98, "eval/accuracy")
