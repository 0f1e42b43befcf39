"""Visual question answering: a tiny EfficientNet and a tiny BERT fused by cross-attention, on real
easy-VQA questions through the real pipeline (two Ray Train workers); the export reloads; the real
encoders fuse; yes/no metrics reduce over ranks; a bad image names its question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import strategy_of, unit_recipe
from raytune_ft import run
from raytune_ft.errors import UserError
from raytune_ft.recipe import validate_recipe

ANSWERS = ["black", "blue", "brown", "circle", "gray", "green", "no", "rectangle", "red", "teal", "triangle", "yellow", "yes"]


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> dict[str, Path]:
    """Real easy-VQA rows as parquet: 400 train questions plus one row whose image is not an
    image, and 96 test questions."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from raytune_ft.data import assets

    directory = tmp_path_factory.mktemp("vqa")
    train = pads.dataset(assets.easy_vqa("train")).head(400)
    broken = pa.table({"image": pa.array([b"\x89PNG\r\n\x1a\n but not an image"], type=pa.binary()),
                       "question": ["is there a blue shape?"], "answer": ["yes"], "image_id": [-1]})
    pq.write_table(pa.concat_tables([train, broken.cast(train.schema)]), directory / "train.parquet")
    pq.write_table(pads.dataset(assets.easy_vqa("test")).head(96), directory / "test.parquet")
    return {"train": directory / "train.parquet", "test": directory / "test.parquet"}


def vqa_recipe(text_encoder: Path, image_encoder: Path, data: dict[str, Path], run_dir: Path) -> dict:
    return {
        "name": "tiny_vqa",
        "task": {"type": "visual_question_answering", "image_encoder": str(image_encoder), "image_size": 32,
                 "fusion": "cross_attention", "hidden": 32, "attention_heads": 4, "max_length": 16},
        "model": {"path": str(text_encoder)},
        "data": {"train": str(data["train"]), "test": str(data["test"]), "validation_fraction": 0.1, "labels": ANSWERS,
                 "columns": {"image": "image", "question": "question", "label": "answer"}, "on_bad_rows": "skip"},
        "train": {"lr": 3e-3, "epochs": 3, "batch_size": 16, "schedule": "constant", "seed": 5, "log_every": 10},
        "scaling": {"workers": 2},
        "baseline": {"enabled": False},
        "output": {"dir": str(run_dir)},
    }


def test_tiny_vqa_learns_on_two_workers_and_its_export_reloads(tiny_bert, tiny_efficientnet, vqa_data, local_ray, tmp_path):
    from safetensors.torch import load_file

    from raytune_ft.models.vqa_fusion import VQAFusion
    from raytune_ft.tasks import build_task

    recipe = validate_recipe(vqa_recipe(tiny_bert, tiny_efficientnet, vqa_data, tmp_path / "run"))
    summary = run(recipe)
    run_dir = recipe.run_dir()

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if "train/loss" in row]
    assert [row["epoch"] for row in epochs] == [1, 2, 3]
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert sum(summary["bad_rows_skipped"].values()) == 1  # the broken image, in whichever split it hashed to
    test = summary["test"]
    assert test["count"] == 96  # sharded evaluation drops and repeats no row
    assert test["accuracy"] > 1 / len(ANSWERS)
    assert 0 <= test["accuracy_yes_no"] <= 1 and 0 <= test["accuracy_other"] <= 1
    assert (run_dir / "plots" / "confusion_matrix.png").stat().st_size > 0

    # The export: safetensors, a config with both encoders' configs, and the tokenizer.
    export = run_dir / "model"
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "vqa_fusion" and config["fusion"] == "cross_attention" and config["labels"] == ANSWERS
    model = VQAFusion(config)
    model.load_state_dict(load_file(export / "model.safetensors"), strict=True)
    assert (export / "tokenizer.json").is_file()

    # It is a model.path of its own: every tensor comes back, the answer classifier included.
    again = vqa_recipe(export, Path("/unused"), vqa_data, tmp_path / "again")
    rebuilt = build_task(validate_recipe(again), ANSWERS).build_model()
    for key, value in model.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key]), key


def test_tiny_vqa_trains_under_deepspeed_zero3(tiny_bert, tiny_efficientnet, vqa_data, local_ray, tmp_path):
    """ZeRO-3 shards both encoders and the fusion head; the export gathers every tensor whole."""
    from safetensors.torch import load_file

    from raytune_ft.models.vqa_fusion import VQAFusion

    recipe = vqa_recipe(tiny_bert, tiny_efficientnet, vqa_data, tmp_path / "run")
    recipe["train"].update(backend="deepspeed", epochs=1)
    recipe["deepspeed"] = {"zero_stage": 3}
    summary = run(validate_recipe(recipe))
    assert summary["backend"] == "deepspeed" and summary["test"]["count"] == 96
    export = Path(summary["outputs"]["model"])
    model = VQAFusion(json.loads((export / "config.json").read_text()))
    model.load_state_dict(load_file(export / "model.safetensors"), strict=True)


def test_real_encoders_fuse(tmp_path):
    """MiniLM-L6 and EfficientNet-Lite0 load from their packages (weights-only), the fusion head
    is new, and head-only training leaves both encoders untouched (frozen batch norms included)."""
    import pyarrow.dataset as pads

    from raytune_ft.data import assets
    from raytune_ft.tasks import build_task

    recipe = unit_recipe({"type": "visual_question_answering", "fusion": "concat"}, assets.minilm_l6())
    task = build_task(recipe, ANSWERS)
    task.check()
    model = strategy_of({"method": "head_only"}).prepare(task.build_model(), task)
    assert model.text.config.hidden_size == 384 and model.config["image"]["head_channels"] == 1280
    rows = pads.dataset(assets.easy_vqa("test")).head(8).to_pydict()
    rows["label"] = [ANSWERS.index(answer) for answer in rows["answer"]]
    batch = task.collate(task.preprocess(rows))
    assert batch["pixels"].shape == (8, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("text.", "image."))}
    model.train()
    loss, _ = task.forward(model, batch)
    loss.backward()
    assert task.embed(model, batch).shape == (8, 256)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
    assert model.classifier.weight.grad is not None and model.text.embeddings.word_embeddings.weight.grad is None


def test_yes_no_accuracy_reduces_over_ranks():
    from raytune_ft.tasks.visual_question_answering import AnswerMetrics

    labels = ["no", "red", "yes"]
    ranks = [AnswerMetrics(labels), AnswerMetrics(labels)]
    # rank 0: "yes" right, "red" wrong (said "no"); rank 1: "no" right, "no" wrong (said "yes"), "red" right
    for metrics, truth, said in ((ranks[0], [2, 1], [2, 0]), (ranks[1], [0, 0, 1], [0, 2, 1])):
        logits = torch.nn.functional.one_hot(torch.tensor(said), 3).float()
        metrics.update((torch.tensor(0.0), logits), {"labels": torch.tensor(truth)})
    result = ranks[0].compute(ranks[0].state() + ranks[1].state())
    assert result["count"] == 5 and result["accuracy"] == pytest.approx(3 / 5)
    assert result["accuracy_yes_no"] == pytest.approx(2 / 3) and result["accuracy_other"] == pytest.approx(1 / 2)


def test_bad_image_names_its_question(tiny_bert, tiny_efficientnet, vqa_data, tmp_path):
    from raytune_ft.tasks import build_task

    recipe = vqa_recipe(tiny_bert, tiny_efficientnet, vqa_data, tmp_path / "run")
    recipe["data"]["on_bad_rows"] = "fail"
    task = build_task(validate_recipe(recipe), ANSWERS)
    batch = {"image": [b"not an image"], "question": ["what color is the shape?"], "label": [1]}
    with pytest.raises(UserError, match=r"question 'what color is the shape\?': cannot decode image"):
        task.preprocess(batch)

    recipe["task"]["attention_heads"] = 5  # does not divide the tiny BERT's width 32
    with pytest.raises(UserError, match="task.attention_heads: 5 does not divide the text encoder's width 32"):
        build_task(validate_recipe(recipe), ANSWERS).check()
