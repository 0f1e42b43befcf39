"""Multitask: one shared encoder, one head per label column, on two real Ray Train workers; the
per-head label sets and their one-line errors; the Metrics contract; the export without raytune_ft."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FILLER, NEGATIVE, POSITIVE, TOPICS, unit_recipe, write_recipe, write_splits
from raytune_ft import run
from raytune_ft.errors import RecipeError, UserError
from raytune_ft.recipe import validate_recipe
from raytune_ft.train.planning import plan_run


def review_rows(count: int, seed: int) -> list[dict]:
    """Texts carrying two labels: a sentiment word and two topic words among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        sentiment, topic = rng.choice(["positive", "negative"]), rng.choice(sorted(TOPICS))
        words = rng.choices(FILLER, k=4) + [rng.choice(POSITIVE if sentiment == "positive" else NEGATIVE)] + rng.choices(TOPICS[topic], k=2)
        rng.shuffle(words)
        rows.append({"body": " ".join(words), "mood": sentiment, "subject": topic})
    return rows


@pytest.fixture(scope="module")
def review_data(tmp_path_factory) -> dict[str, Path]:
    return write_splits(tmp_path_factory.mktemp("reviews"), review_rows, (("train", 320, 11), ("test", 96, 12)))


def multitask_recipe(tiny_bert: Path, data: dict[str, Path], run_dir: Path, **task) -> dict:
    return {
        "name": "tiny_multitask",
        "task": {"type": "multitask", "max_length": 32, "heads": {"sentiment": {}, "topic": {"weight": 0.5}}, **task},
        "model": {"path": str(tiny_bert)},
        "data": {"train": str(data["train"]), "test": str(data["test"]), "validation_fraction": 0.2,
                 "columns": {"text": "body", "sentiment": "mood", "topic": "subject"},
                 # "sport" is outside the topic head's label set: its rows go to the bucket "other".
                 "labels": {"topic": ["code", "food"]}, "other_label": {"topic": "other"}},
        "train": {"lr": 3e-3, "epochs": 4, "batch_size": 8, "schedule": "constant", "dropout": 0.0, "seed": 7, "log_every": 10},
        "scaling": {"workers": 2},
        "baseline": {"enabled": False},
        "output": {"dir": str(run_dir)},
    }


def assert_scores_match(logits: torch.Tensor, labels: torch.Tensor, test: dict, head: str) -> None:
    """The reloaded export scores the test rows as the run did: the same mean cross-entropy (the
    run's ranks evaluate rank 0's exported model, batch-norm statistics included), and the same
    accuracy up to one near-tie row that another batch split may break the other way."""
    loss = float(torch.nn.functional.cross_entropy(logits.float(), labels))
    assert loss == pytest.approx(test[f"{head}_loss"], rel=1e-4), head
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    assert accuracy == pytest.approx(test[f"{head}_accuracy"], abs=1.5 / len(labels)), head


def test_two_heads_train_on_two_workers_and_export_reloads(tiny_bert, review_data, local_ray, tmp_path):
    recipe = validate_recipe(multitask_recipe(tiny_bert, review_data, tmp_path / "run", weighting="uncertainty"))
    summary = run(recipe)
    run_dir = recipe.run_dir()

    # Per-head label sets recorded (the bucket appended), in the summary and the recipe as run.
    assert summary["labels"] == {"sentiment": ["negative", "positive"], "topic": ["code", "food", "other"]}
    assert "other_label" in (run_dir / "recipe.yaml").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if "train/loss" in row]
    assert [row["epoch"] for row in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["eval/loss"] < epochs[0]["eval/loss"]
    test = summary["test"]
    for head in ("sentiment", "topic"):
        for metric in ("accuracy", "macro_f1", "loss", "log_variance"):
            assert f"{head}_{metric}" in test, sorted(test)
        assert f"eval/{head}_accuracy" in epochs[-1]
    assert test["count"] == 96  # sharded evaluation drops and repeats no row
    assert test["accuracy"] == pytest.approx((test["sentiment_accuracy"] + test["topic_accuracy"]) / 2)
    assert test["loss"] == pytest.approx(test["sentiment_loss"] + 0.5 * test["topic_loss"])
    assert test["sentiment_accuracy"] > 0.75 and test["topic_accuracy"] > 0.6  # chance: 0.5 and ~0.33
    for name in ("learning_curves", "confusion_matrix_sentiment", "confusion_matrix_topic"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 0

    # The export: transformers loads the encoder alone; the heads and the learned log-variances
    # are plain tensors beside it, their labels in config.json. Its predictions score the test
    # rows exactly as the run did.
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    model_dir = run_dir / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["multitask_heads"] == summary["labels"] and config["multitask_pooling"] == "mean"
    tensors = load_file(model_dir / "model.safetensors")
    log_variances = tensors["log_variances"]
    assert log_variances.shape == (2,) and float(log_variances.abs().min()) > 1e-3  # trained away from 0
    assert [round(float(v), 4) for v in log_variances] == [round(test["sentiment_log_variance"], 4), round(test["topic_log_variance"], 4)]
    encoder = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    import pyarrow.parquet as pq

    table = pq.read_table(review_data["test"]).to_pylist()
    encoded = tokenizer([row["body"] for row in table], truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    for head, column in (("sentiment", "mood"), ("topic", "subject")):
        labels = config["multitask_heads"][head]
        logits = pooled @ tensors[f"heads.{head}.weight"].T + tensors[f"heads.{head}.bias"]
        truth = torch.tensor([labels.index(row[column]) if row[column] in labels else labels.index("other") for row in table])
        assert_scores_match(logits, truth, test, head)


def test_metrics_state_sums_over_ranks():
    """Two ranks' summed state computes what one rank holding every row computes."""
    from raytune_ft.tasks.multitask import MultitaskMetrics

    torch.manual_seed(0)
    classes = {"a": 2, "b": 3}
    batches = [({"a": torch.randn(5, 2), "b": torch.randn(5, 3)}, torch.stack([torch.randint(0, 2, (5,)), torch.randint(0, 3, (5,))], 1))
               for _ in range(4)]
    log_variances = torch.tensor([0.3, -0.2])

    def fed(selection):
        metrics = MultitaskMetrics(classes, [1.0, 0.5], uncertainty=True)
        for logits, labels in selection:
            loss_sums = torch.stack([torch.nn.functional.cross_entropy(logits[h], labels[:, i], reduction="sum") for i, h in enumerate(classes)])
            metrics.update((loss_sums, logits, log_variances), {"labels": labels})
        return metrics

    whole = fed(batches)
    ranks = [fed(batches[:1]), fed(batches[1:])]
    summed = whole.compute(ranks[0].state() + ranks[1].state())
    alone = whole.compute(whole.state())
    assert summed.pop("confusion") == alone["confusion"]
    assert summed == pytest.approx({key: value for key, value in alone.items() if key != "confusion"})
    assert alone["count"] == 20 and alone["a_log_variance"] == pytest.approx(0.3) and alone["b_log_variance"] == pytest.approx(-0.2)
    assert alone["loss"] == pytest.approx(alone["a_loss"] + 0.5 * alone["b_loss"])
    assert alone["macro_f1"] == pytest.approx((alone["a_macro_f1"] + alone["b_macro_f1"]) / 2)
    assert [sum(map(sum, alone["confusion"][h])) for h in classes] == [20, 20]


def test_objective_fixed_and_uncertainty_weighted(tiny_bert, review_data, tmp_path):
    """fixed: sum_i w_i L_i; uncertainty: sum_i w_i (exp(-s_i) L_i + s_i), gradients reach s_i."""
    from raytune_ft.tasks import build_task

    labels = {"sentiment": ["negative", "positive"], "topic": ["code", "food", "sport"]}
    batch = {"input_ids": torch.randint(0, 1000, (6, 12)), "attention_mask": torch.ones(6, 12, dtype=torch.int64),
             "labels": torch.stack([torch.randint(0, 2, (6,)), torch.randint(0, 3, (6,))], 1)}
    for weighting in ("fixed", "uncertainty"):
        task = build_task(validate_recipe(multitask_recipe(tiny_bert, review_data, tmp_path, weighting=weighting)), labels)
        model = task.build_model().eval()
        if weighting == "uncertainty":
            with torch.no_grad():
                model.log_variances.copy_(torch.tensor([0.5, -1.0]))
        objective, (loss_sums, logits, log_variances) = task.forward(model, batch)
        losses = loss_sums / 6
        if weighting == "fixed":
            assert log_variances is None and objective.item() == pytest.approx(float(losses[0] + 0.5 * losses[1]), rel=1e-5)
        else:
            s = torch.tensor([0.5, -1.0])
            expected = (torch.tensor([1.0, 0.5]) * (torch.exp(-s) * losses + s)).sum()
            assert objective.item() == pytest.approx(float(expected), rel=1e-5)
            objective.backward()
            assert model.log_variances.grad is not None and bool((model.log_variances.grad != 0).all())
            # The log-variances train at task.log_variance_lr (default 1e-2), not at train.lr (3e-3 here).
            from raytune_ft.backends.optim import param_groups
            from raytune_ft.schema import TrainSection

            group = next(g for g in param_groups(model, TrainSection(lr=3e-3, weight_decay=0.01)) if any(p is model.log_variances for p in g["params"]))
            assert group["lr"] == pytest.approx(1e-2) and len(group["params"]) == 1
        assert set(logits) == {"sentiment", "topic"} and logits["topic"].shape == (6, 3)
        assert task.head_names(model) == (["heads", "log_variances"] if weighting == "uncertainty" else ["heads"])


def recipe_with(tiny_bert, review_data, tmp_path, **data) -> dict:
    recipe = multitask_recipe(tiny_bert, review_data, tmp_path / "run")
    recipe["data"].update(data)
    return recipe


RECIPE_ERRORS = [
    ({"columns": {"text": "body", "sentiment": "mood"}}, "data.columns", "missing topic (task multitask needs text, sentiment, topic)"),
    ({"columns": {"text": "body", "sentiment": "mood", "topic": "subject", "label": "mood"}}, "data.columns", "unknown role label; allowed: text, sentiment, topic"),
    ({"labels": ["a", "b"]}, "data.labels", "give one label set per role, {role: [labels]}"),
    ({"labels": {"mood": ["a", "b"]}}, "data.labels.mood", "not a label role of task multitask; label roles: sentiment, topic"),
    ({"other_label": {"text": "other"}}, "data.other_label.text", "not a label role"),
    ({"labels": {"topic": ["code", "code"]}}, "data.labels.topic", "labels must be unique"),
]


@pytest.mark.parametrize("data,field,expected", RECIPE_ERRORS, ids=[case[1] for case in RECIPE_ERRORS])
def test_bad_multitask_recipe_names_field(tiny_bert, review_data, tmp_path, data, field, expected):
    with pytest.raises(RecipeError) as error:
        validate_recipe(recipe_with(tiny_bert, review_data, tmp_path, **data), "r.yaml")
    problems = dict(error.value.problems)
    assert field in problems and expected in problems[field], error.value.problems


def test_bad_task_options_name_field(tiny_bert, review_data, tmp_path):
    recipe = multitask_recipe(tiny_bert, review_data, tmp_path, weighting="learned")
    recipe["task"]["heads"] = {"sentiment": {}, "topic": {"weight": 0}}
    with pytest.raises(RecipeError) as error:
        validate_recipe(recipe, "r.yaml")
    problems = dict(error.value.problems)
    assert "'fixed' or 'uncertainty'" in problems["task.weighting"]
    assert "greater than 0" in problems["task.heads.topic.weight"]
    recipe["task"] = {"type": "multitask", "heads": {"text": {}, "Topic": {}}}
    with pytest.raises(RecipeError, match=r"task.heads: head name 'text' must be lower-case letters"):
        validate_recipe(recipe, "r.yaml")

    recipe = multitask_recipe(tiny_bert, review_data, tmp_path)
    recipe["train"]["early_stopping"] = {"metric": "eval/mood_accuracy", "mode": "max"}
    with pytest.raises(RecipeError, match=r"train.early_stopping.metric: 'eval/mood_accuracy' is not a metric .*eval/topic_macro_f1"):
        validate_recipe(recipe, "r.yaml")
    recipe["train"]["early_stopping"]["metric"] = "eval/topic_accuracy"
    validate_recipe(recipe, "r.yaml")  # a head's metric is a metric


def test_unknown_head_column_is_a_one_line_error(tiny_bert, review_data, tmp_path):
    recipe = validate_recipe(recipe_with(tiny_bert, review_data, tmp_path, columns={"text": "body", "sentiment": "mood", "topic": "topic"}))
    with pytest.raises(UserError) as error:
        plan_run(recipe)
    assert str(error.value).startswith("data.columns.topic: column 'topic' not in "), str(error.value)


def test_label_outside_a_heads_label_set(tiny_bert, review_data, tmp_path, cli_in_process):
    """Without a bucket, a value outside a head's label set is refused, naming the field and row;
    through the CLI: exit 2, one line, before Ray starts."""
    recipe = recipe_with(tiny_bert, review_data, tmp_path, other_label={})
    first_sport = next(i for i, row in enumerate(review_rows(320, 11)) if row["subject"] == "sport")
    with pytest.raises(UserError) as error:
        plan_run(validate_recipe(recipe))
    assert str(error.value) == (f"data.train: row {first_sport}: topic 'sport' is not in the label set "
                                "data.labels.topic = ['code', 'food']")
    code, stderr = cli_in_process("run", str(write_recipe(recipe, tmp_path / "r.yaml")))
    assert code == 2 and stderr.strip() == f"error: {error.value}", stderr
    assert not (tmp_path / "run").exists()


def test_sections_assuming_one_set_of_logits_are_refused(tiny_bert, review_data, tmp_path):
    recipe = multitask_recipe(tiny_bert, review_data, tmp_path / "run")
    recipe["post"] = {"quantize": {}}
    with pytest.raises(UserError, match=r"^post.quantize: not supported by task multitask yet"):
        plan_run(validate_recipe(recipe))


def test_default_label_sets_are_sorted_train_values(tiny_bert, review_data, tmp_path):
    recipe = validate_recipe(recipe_with(tiny_bert, review_data, tmp_path, labels=None, other_label={}))
    planned = plan_run(recipe)
    labels, task = planned.labels, planned.task
    assert labels == {"sentiment": ["negative", "positive"], "topic": ["code", "food", "sport"]}
    assert recipe.data.labels == labels and task.classes() == {"sentiment": 2, "topic": 3}
    rows = task.preprocess({"text": np.array(["great soup"]), "sentiment": np.array([1]), "topic": np.array([2])})
    assert rows["labels"].tolist() == [[1, 2]]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    """Real easy-VQA images with their shape and colour: 240 train images plus one that is not an
    image, and 96 test images."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from raytune_ft.data import assets

    directory = tmp_path_factory.mktemp("shapes")
    train = pads.dataset(assets.easy_vqa_shapes("train")).head(240)
    broken = pa.table({"image": pa.array([b"GIF89a but not an image"], type=pa.binary()), "shape": ["circle"],
                       "color": ["red"], "image_id": [-1]})
    pq.write_table(pa.concat_tables([train, broken.cast(train.schema)]), directory / "train.parquet")
    pq.write_table(pads.dataset(assets.easy_vqa_shapes("test")).head(96), directory / "test.parquet")
    return {"train": directory / "train.parquet", "test": directory / "test.parquet"}


SHAPES = ["circle", "rectangle", "triangle"]
COLORS = ["black", "blue", "brown", "gray", "green", "red", "teal", "yellow"]


def image_multitask_recipe(model: Path, data: dict[str, Path], run_dir: Path) -> dict:
    return {
        "name": "tiny_image_multitask",
        "task": {"type": "multitask", "input": "image", "image_size": 32, "heads": {"shape": {}, "color": {}},
                 "weighting": "uncertainty"},
        "model": {"path": str(model)},
        "data": {"train": str(data["train"]), "test": str(data["test"]), "validation_fraction": 0.1, "on_bad_rows": "skip",
                 "columns": {"image": "image", "shape": "shape", "color": "color"}, "labels": {"shape": SHAPES, "color": COLORS}},
        "train": {"lr": 1e-2, "epochs": 4, "batch_size": 16, "schedule": "constant", "seed": 3, "log_every": 10},
        "scaling": {"workers": 2},
        "baseline": {"enabled": False},
        "output": {"dir": str(run_dir)},
    }


def test_image_heads_train_on_two_workers_and_the_export_is_the_image_tasks_layout(tiny_efficientnet, shapes_data, local_ray, tmp_path):
    """A tiny EfficientNet reads real easy-VQA images for two heads (the broken image skipped);
    the export is the image task's layout plus the heads, predicts the test rows as the run
    scored them, and is a model.path again for both the image task and multitask."""
    from safetensors.torch import load_file

    from raytune_ft.models.efficientnet_lite import EfficientNetLite
    from raytune_ft.tasks import build_task

    recipe = validate_recipe(image_multitask_recipe(tiny_efficientnet, shapes_data, tmp_path / "run"))
    summary = run(recipe)
    run_dir = recipe.run_dir()
    epochs = [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in row]
    assert [row["epoch"] for row in epochs] == [1, 2, 3, 4] and epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert sum(summary["bad_rows_skipped"].values()) == 1
    test = summary["test"]
    assert test["count"] == 96 and test["color_accuracy"] > 0.3  # chance: 1/8
    for name in ("confusion_matrix_shape", "confusion_matrix_color"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 0

    export = run_dir / "model"
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "efficientnet_lite" and "labels" not in config
    assert config["multitask_heads"] == {"shape": SHAPES, "color": COLORS} and config["multitask_pooling"] == "global_average"
    tensors = load_file(export / "model.safetensors")
    encoder = EfficientNetLite(config)  # no num_labels: the encoder alone
    encoder.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(("heads.", "log_variances"))}, strict=True)
    task = build_task(recipe, summary["labels"])
    import pyarrow.parquet as pq

    rows = pq.read_table(shapes_data["test"]).to_pydict()
    batch = task.collate(task.preprocess({"image": rows["image"], "shape": [SHAPES.index(v) for v in rows["shape"]],
                                          "color": [COLORS.index(v) for v in rows["color"]]}))
    with torch.no_grad():
        features = encoder.eval().features(batch["pixels"])
    for index, head in enumerate(("shape", "color")):
        logits = features @ tensors[f"heads.{head}.weight"].T + tensors[f"heads.{head}.bias"]
        assert_scores_match(logits, batch["labels"][:, index], test, head)

    # A model.path again: the image task takes the encoder (new classifier), multitask too (new heads).
    again = unit_recipe({"type": "image_classification", "image_size": 32}, export)
    body = build_task(again, ["a", "b"]).build_model().state_dict()
    assert all(torch.equal(body[key], value) for key, value in encoder.state_dict().items())
    again = validate_recipe(image_multitask_recipe(export, shapes_data, tmp_path / "again"))
    rebuilt = build_task(again, summary["labels"]).build_model().state_dict()
    assert all(torch.equal(rebuilt[f"encoder.{key}"], value) for key, value in encoder.state_dict().items())


def test_image_heads_train_under_deepspeed_zero3(tiny_efficientnet, shapes_data, local_ray, tmp_path):
    """ZeRO-3 shards the encoder and the heads; the export gathers every tensor whole."""
    from safetensors.torch import load_file

    recipe = image_multitask_recipe(tiny_efficientnet, shapes_data, tmp_path / "run")
    recipe["train"].update(backend="deepspeed", epochs=1)
    recipe["deepspeed"] = {"zero_stage": 3}
    summary = run(validate_recipe(recipe))
    assert summary["backend"] == "deepspeed" and summary["test"]["count"] == 96
    tensors = load_file(Path(summary["outputs"]["model"]) / "model.safetensors")
    assert tensors["heads.color.weight"].shape == (8, 32) and tensors["_conv_stem.weight"].shape == (8, 3, 3, 3)


def test_options_of_the_other_input_are_refused(tiny_bert, tiny_efficientnet, review_data, shapes_data, tmp_path):
    recipe = multitask_recipe(tiny_bert, review_data, tmp_path, image_size=64)
    with pytest.raises(RecipeError, match=r"task.image_size: applies to task.input image only \(this recipe's input is text\)"):
        validate_recipe(recipe, "r.yaml")
    recipe = image_multitask_recipe(tiny_efficientnet, shapes_data, tmp_path)
    recipe["task"]["max_length"] = 64
    with pytest.raises(RecipeError, match=r"task.max_length: applies to task.input text only"):
        validate_recipe(recipe, "r.yaml")
    recipe["task"].pop("max_length")
    recipe["data"]["columns"] = {"text": "image", "shape": "shape", "color": "color"}
    with pytest.raises(RecipeError, match=r"data.columns: missing image \(task multitask needs image, shape, color\)"):
        validate_recipe(recipe, "r.yaml")


def test_shape_and_color_come_from_what_the_questions_state():
    from raytune_ft.data.assets import shape_and_color

    questions = [
        ["what color is the circle?", "red", 0],                  # an answer, and a named shape
        ["what is the blue shape?", "triangle", 1],               # a named colour, and an answer
        ["is there not a rectangle?", "yes", 2], ["does the image contain a circle?", "no", 2],  # the shape left
        ["is there a green shape?", "yes", 2],
        ["is there a red shape?", "yes", 3],                      # colour only: not settled
        ["is no gray shape present?", "no", 4], ["what shape is present?", "circle", 4],
    ]
    assert shape_and_color(questions) == {0: {"shape": "circle", "color": "red"}, 1: {"shape": "triangle", "color": "blue"},
                                          2: {"shape": "triangle", "color": "green"}, 4: {"shape": "circle", "color": "gray"}}
