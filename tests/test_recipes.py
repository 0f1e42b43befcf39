"""Recipes: every shipped recipe validates; each broken recipe gets its one-line error (exit 2)."""

from __future__ import annotations

import copy

import pytest

from conftest import ROOT, cli
from raytune_ft.errors import RecipeError
from raytune_ft.recipe import load_recipe, validate_recipe
from raytune_ft.schema import apply_overrides, parse_value

SHIPPED = sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.task.type


def test_chat_recipe_validates_packed_and_with_full_fine_tuning():
    for overrides in (["task.packing=true"], ["strategy={method: full}", "train.lr=1e-4"]):
        recipe = load_recipe(ROOT / "jobs" / "chat_sft.yaml", overrides)
        assert recipe.task.format == "messages" and recipe.retention.references
    assert load_recipe(ROOT / "jobs" / "chat_sft.yaml", ["task.packing=true"]).task.packing


def test_validate_command_accepts_shipped_recipe():
    result = cli("validate", "jobs/text_classification.yaml", "--set", "train.lr=3e-5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: jobs/text_classification.yaml")


BASE = {
    "name": "r", "task": {"type": "text_classification"}, "model": {"path": "m"},
    "data": {"train": "t.parquet", "columns": {"text": "a", "label": "b"}},
}


def broken(path: str, value) -> dict:
    data = copy.deepcopy(BASE)
    *parents, key = path.split(".")
    node = data
    for parent in parents:
        node = node.setdefault(parent, {})
    node[key] = value
    return data


def image(path: str, value) -> dict:
    data = broken(path, value)
    data["task"]["type"] = "image_classification"
    if path != "data.columns":
        data["data"]["columns"] = {"image": "a", "label": "b"}
    return data


BROKEN = [
    (broken("train.lrr", 1e-4), "train.lrr", "unknown field"),
    (broken("train.lr", -1.0), "train.lr", "greater than or equal to 0"),
    (broken("train.lr", "fast"), "train.lr", "valid number"),
    (broken("train.optimizer", "adam"), "train.optimizer", "'adamw' or 'sgd'"),
    (broken("train.schedule", "step"), "train.schedule", "'constant', 'linear' or 'cosine'"),
    (broken("train.precision", "fp8"), "train.precision", "'fp32', 'bf16' or 'fp16'"),
    (broken("model.dtype", "fp16"), "model.dtype", "fp16 weights need fp32 master weights to step"),
    (broken("train.batch_size", 0), "train.batch_size", "greater than or equal to 1"),
    (broken("train.epochs", None), "train.epochs", "give epochs or max_steps"),
    (broken("train.warmup", 2.5), "train.warmup", "whole number"),
    (broken("train.early_stopping", {"metric": "accuracy", "mode": "max"}), "train.early_stopping.metric", "should match pattern"),
    (broken("train.backend", "horovod"), "train.backend", "allowed: ddp"),
    (broken("scaling.workers", 0), "scaling.workers", "greater than or equal to 1"),
    (broken("strategy.method", "magic"), "strategy.method", "allowed: freeze, full, gradual, head_only, lora, lp_ft"),
    (broken("task.type", "regression"), "task.type", "allowed: causal_lm, image_classification, multitask, speech_recognition, text_classification"),
    (broken("task.max_length", 4), "task.max_length", "greater than or equal to 8"),
    (broken("task.maxlen", 64), "task.maxlen", "unknown field"),
    (broken("data.columns", {"text": "a"}), "data.columns", "missing label"),
    (broken("data.columns", {"text": "a", "label": "b", "image": "c"}), "data.columns", "unknown role image"),
    (broken("data.labels", ["a", "a"]), "data.labels", "unique"),
    (broken("data.validation_fraction", 0.9), "data.validation_fraction", "less than 0.5"),
    (broken("data.format", "xlsx"), "data.format", "'auto', 'parquet', 'jsonl', 'csv', 'tsv' or 'images'"),
    (broken("data.on_bad_rows", "ignore"), "data.on_bad_rows", "'fail' or 'skip'"),
    (broken("data.max_bad_fraction", 1.5), "data.max_bad_fraction", "less than or equal to 1"),
    (image("task.image_size", 8), "task.image_size", "greater than or equal to 16"),
    (image("task.crop_scale", 0), "task.crop_scale", "greater than 0"),
    (image("task.max_length", 64), "task.max_length", "unknown field"),
    (image("data.columns", {"text": "a", "label": "b"}), "data.columns", "unknown role text; allowed: image, label"),
    (broken("name", "bad name!"), "name", "should match pattern"),
    (broken("output.checkpoints_to_keep", 0), "output.checkpoints_to_keep", "greater than or equal to 1"),
    ({k: v for k, v in BASE.items() if k != "model"}, "model", "Field required"),
]


@pytest.mark.parametrize("data,field,expected", BROKEN, ids=[b[1] + ":" + b[2][:20] for b in BROKEN])
def test_broken_recipe_names_field(data, field, expected):
    with pytest.raises(RecipeError) as error:
        validate_recipe(data, "r.yaml")
    assert (field, ) == tuple(p for p, _ in error.value.problems if p == field)[:1], error.value.problems
    message = dict(error.value.problems)[field]
    assert expected in message, message


def test_all_problems_reported_at_once():
    data = broken("train.lr", -1.0)
    data["scaling"] = {"workers": 0}
    with pytest.raises(RecipeError) as error:
        validate_recipe(data, "r.yaml")
    assert {p for p, _ in error.value.problems} == {"train.lr", "scaling.workers"}


def test_overrides_are_parsed_and_validated():
    data = apply_overrides(BASE, ["train.lr=3e-5", "train.early_stopping.patience=3", "data.labels=[x, y]"])
    assert data["train"]["lr"] == pytest.approx(3e-5)
    assert data["train"]["early_stopping"] == {"patience": 3}
    assert data["data"]["labels"] == ["x", "y"]
    assert parse_value("null") is None and parse_value("16") == 16
    with pytest.raises(RecipeError, match="train.lr"):
        validate_recipe(apply_overrides(BASE, ["train.lr=-2"]))


CLI_CASES = [
    ("missing.yaml", None, "missing.yaml: recipe file not found"),
    ("syntax.yaml", "name: x\ntask: [unclosed\n", "YAML syntax error at line"),
    ("list.yaml", "- a\n- b\n", "must be a YAML mapping"),
    ("unknown.yaml", "name: x\ntask: {type: text_classification}\nmodel: {path: m}\n"
     "data: {train: t, columns: {text: a, label: b}}\ntrian: {lr: 1}\n", "trian: unknown field"),
]


@pytest.mark.parametrize("name,content,expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_recipe_errors_are_one_line(tmp_path, name, content, expected, cli_in_process):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code, stderr = cli_in_process("validate", str(path))
    assert code == 2
    assert expected in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_cli_set_override_error(tmp_path, cli_in_process):
    code, stderr = cli_in_process("validate", str(ROOT / "jobs" / "text_classification.yaml"), "--set", "train.batch_size=zero")
    assert code == 2
    assert "train.batch_size" in stderr and "Traceback" not in stderr
