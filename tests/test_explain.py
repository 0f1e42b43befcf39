"""Saliency on real tiny models: integrated gradients for the tiny BERT's tokens and a tiny
EfficientNet's pixels, the rows chosen (most confident errors or given), the PNGs, bad rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import NEGATIVE, POSITIVE, copy_run
from raytune_ft import run as run_recipe
from raytune_ft.post import run_steps
from raytune_ft.post.explain import choose_rows
from raytune_ft.post.finished import FinishedRun
from raytune_ft.recipe import validate_recipe
from test_image import image_recipe


def assert_png(path) -> None:
    with Image.open(path) as image:
        image.verify()  # raises on a damaged file
        assert image.format == "PNG" and min(image.size) >= 32


def assert_most_confident_errors(chosen: list[int], confidence, errors: list[int]) -> None:
    """Distinct errors, most confident first, and no error left out is more confident."""
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(errors)
    assert [float(confidence[row]) for row in chosen] == sorted((float(confidence[row]) for row in chosen), reverse=True)
    assert all(confidence[row] <= confidence[chosen[-1]] for row in errors if row not in chosen)


def test_text_integrated_gradients_on_the_most_confident_errors(finished_text_run, sentiment_data, tmp_path):
    """The tiny model gets the test set right, so a third of its labels are flipped: it is then
    wrong there, and confidently."""
    table = pq.read_table(sentiment_data["test"]).to_pylist()
    for row in table[::3]:
        row["sentiment"] = "positive" if row["sentiment"] == "negative" else "negative"
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "flipped.parquet")
    run = FinishedRun.open(copy_run(finished_text_run, tmp_path), [f"data.test={tmp_path / 'flipped.parquet'}"])
    result = run_steps(run, ["explain"])["explain"]

    assert json.loads((run.run_dir / "post" / "explain.json").read_text()) == result
    logits, labels = run.predict(run.load_model())
    confidence, predicted = logits.softmax(-1).max(-1)
    chosen = [example["row"] for example in result["examples"]]
    errors = [row for row in range(len(labels)) if predicted[row] != labels[row]]
    assert len(errors) > 4 and set(errors) <= set(range(0, len(labels), 3))
    assert_most_confident_errors(chosen, confidence, errors)

    for example in result["examples"]:
        row = example["row"]
        assert example["predicted"] == run.labels[int(predicted[row])] and example["true"] == run.labels[int(labels[row])]
        assert example["probability"] == pytest.approx(float(confidence[row]), abs=1e-5)
        assert example["completeness_error"] < 0.05 * abs(example["logit_difference"])
        assert len(example["top_tokens"]) == 5 and all(token in example["text"].lower() or token.startswith("##") or token.startswith("[") for token, _ in example["top_tokens"])
        for key in ("png", "attention_png"):
            assert example[key].startswith("post/explain/")
            assert_png(run.run_dir / example[key])
    assert result["max_relative_completeness_error"] < 0.05


def test_fewer_errors_than_examples_are_filled_with_the_least_confident_right_ones():
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.5, 0.0], [0.0, 0.5]])
    labels = torch.tensor([1, 1, 1, 0, 1])  # row 0 wrong; the others right, row 4 the least sure, then 1, 3, 2
    assert choose_rows(logits, labels, 3) == [0, 4, 1]
    assert choose_rows(logits, labels, 9) == [0, 4, 1, 3, 2]


def test_rows_option_and_the_sentiment_word_carries_the_prediction(finished_text_run, sentiment_data, tmp_path):
    """Rows given are explained in that order; on a confidently right prediction the sentiment
    word (the only word that carries the label) is the token with the largest attribution."""
    run_dir = copy_run(finished_text_run, tmp_path)
    run = FinishedRun.open(run_dir)
    logits, labels = run.predict(run.load_model())
    confidence, predicted = logits.softmax(-1).max(-1)
    right = sorted((row for row in range(len(labels)) if predicted[row] == labels[row]), key=lambda row: -float(confidence[row]))[:2]
    rows = [right[1], next(row for row in range(len(labels)) if row not in right), right[0]]
    run = FinishedRun.open(run_dir, [f"post.explain.rows={rows}", "post.explain.attention=false"])
    result = run_steps(run, ["explain"])["explain"]

    texts = pq.read_table(sentiment_data["test"]).column("sentence").to_pylist()
    assert [example["row"] for example in result["examples"]] == rows
    assert [example["text"] for example in result["examples"]] == [texts[row] for row in rows]
    assert result["selection"] == "rows given"
    assert not any("attention_png" in example for example in result["examples"])
    for example in (result["examples"][0], result["examples"][2]):
        top_token, score = example["top_tokens"][0]
        assert top_token in POSITIVE + NEGATIVE and score > 0, example["top_tokens"]
    assert sorted(p.name for p in (run_dir / "post" / "explain").iterdir()) == sorted(f"row_{row}.png" for row in rows)


def test_a_row_out_of_range_is_a_one_line_error(finished_text_run, tmp_path, cli_in_process):
    run_dir = copy_run(finished_text_run, tmp_path)
    code, stderr = cli_in_process("post", str(run_dir), "--step", "explain", "--set", "post.explain.rows=[2,96]")
    assert code == 2
    assert stderr.strip() == "error: post.explain.rows: row 96 is out of range: the test split has 96 rows (0..95)"
    assert not (run_dir / "post" / "explain").exists()


def test_image_run_explains_pixels_and_writes_the_report(tiny_efficientnet, tmp_path, local_ray):  # noqa: F811
    """A real one-epoch image run with post.explain: the run itself writes the saliency PNGs and report.html."""
    recipe = image_recipe(tiny_efficientnet, tmp_path / "run", max_rows=64)
    recipe["train"]["epochs"] = 1
    recipe["scaling"]["workers"] = 1
    recipe["post"] = {"explain": {"examples": 2, "steps": 48}}
    run_recipe(validate_recipe(recipe))

    run_dir = tmp_path / "run"
    explained = json.loads((run_dir / "post" / "explain.json").read_text())
    run = FinishedRun.open(run_dir)
    logits, labels = run.predict(run.load_model())
    # The exported model reloads with its trained head: the run's test loss, reproduced.
    assert run.metrics(logits, labels)["loss"] == pytest.approx(json.loads((run_dir / "summary.json").read_text())["test"]["loss"], abs=1e-5)
    confidence, predicted = logits.softmax(-1).max(-1)
    assert_most_confident_errors([example["row"] for example in explained["examples"]], confidence,
                                 [row for row in range(len(labels)) if predicted[row] != labels[row]])
    assert len(explained["examples"]) == 2
    for example in explained["examples"]:
        # 5%, plus float32's rounding over 3072 pixel sums: a one-epoch model's logit may barely move (seen: 2e-5)
        assert example["completeness_error"] < 0.05 * abs(example["logit_difference"]) + 1e-5, example
        for key in ("png", "image"):
            assert_png(run_dir / example[key])
        with Image.open(run_dir / example["image"]) as image:
            assert image.size == (32, 32)  # the input as the model saw it (task.image_size)
    report = (run_dir / "report.html").read_text()
    assert "Post-training: explain" in report and report.count("<img src='data:image/png;base64,") >= 2 + 2
