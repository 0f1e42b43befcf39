"""Knowledge distillation on real Ray Train: a 1-layer student of the session's finished tiny text
run (the teacher), 2 DDP workers; layer truncation keeps pretrained weights; bad teachers fail in
one line before Ray starts."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import copy_run, unit_recipe, write_recipe
from raytune_ft import run
from raytune_ft.errors import UserError
from raytune_ft.post.finished import FinishedRun
from raytune_ft.recipe import validate_recipe
from raytune_ft.report.tables import summary_table
from raytune_ft.tasks import build_task


def test_num_layers_keeps_the_first_layers_with_their_pretrained_weights(tiny_recipe, tiny_bert):
    tiny_recipe["model"]["num_layers"] = 1
    recipe = validate_recipe(tiny_recipe)
    model = build_task(recipe, ["negative", "positive"]).build_model()
    pretrained = load_file(tiny_bert / "model.safetensors")
    weights = model.state_dict()

    assert model.config.num_hidden_layers == 1 and len(model.bert.encoder.layer) == 1
    kept = [key for key in pretrained if not key.startswith("encoder.layer.1.")]
    for key in kept:
        assert torch.equal(weights[f"bert.{key}"], pretrained[key]), key
    assert not any(".layer.1." in key for key in weights)
    assert set(model.raytune_ft_new_modules) == {"classifier"}  # nothing of the kept body re-initialised

    recipe.model.num_layers = 3
    with pytest.raises(UserError, match="model.num_layers: 3 is more than the 2 layers"):
        build_task(recipe, ["negative", "positive"]).skeleton()


def test_image_task_refuses_num_layers(tiny_recipe):
    tiny_recipe.update(task={"type": "image_classification"}, model={"path": "asset:efficientnet-lite0", "num_layers": 2})
    tiny_recipe["data"]["columns"] = {"image": "image", "label": "label"}
    with pytest.raises(UserError, match="model.num_layers: image_classification cannot truncate"):
        build_task(validate_recipe(tiny_recipe), ["a", "b"]).skeleton()


def noisy_labels(train_path, directory) -> str:
    """The training rows with their labels shuffled: the labels carry no signal any more."""
    table = pq.read_table(train_path)
    labels = table.column("sentiment").to_pylist()
    random.Random(0).shuffle(labels)
    path = directory / "noisy_train.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("sentiment"), "sentiment", pa.array(labels)), path)
    return str(path)


def student_recipe(tiny_recipe, finished_text_run, tmp_path, name: str) -> dict:
    """A 1-layer student on labels that are noise: with alpha 1 only the teacher can teach it."""
    recipe = json.loads(json.dumps(tiny_recipe))
    recipe["model"]["num_layers"] = 1
    recipe["data"]["train"] = noisy_labels(recipe["data"]["train"], tmp_path)
    recipe["train"]["epochs"] = 3
    recipe["output"]["dir"] = str(tmp_path / name)
    recipe["distill"] = {"teacher": str(finished_text_run / "model"), "temperature": 2.0, "alpha": 1.0}
    return recipe


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_student_learns_from_the_teacher_alone(backend, tiny_recipe, finished_text_run, tmp_path, local_ray):
    """alpha 1 ignores the labels, and they are shuffled anyway: the student can learn the task
    only through the KL term (without it, the objective would be 0 and the student at chance).
    DeepSpeed (ZeRO-2) takes the same path: the KL term is part of the loss it back-propagates."""
    tiny_recipe["train"]["backend"] = backend
    summary = run(validate_recipe(student_recipe(tiny_recipe, finished_text_run, tmp_path, "student")))

    teacher_run = FinishedRun.open(finished_text_run)
    distill = summary["distill"]
    assert distill["teacher"]["run_dir"] == str(finished_text_run)
    # The same teacher on the same test rows as its own run (2 shards here, 1 there: sums in another order).
    assert distill["teacher"]["test"] == pytest.approx(distill["teacher"]["recorded_test"], rel=1e-6)
    assert distill["teacher"]["recorded_test"] == teacher_run.summary["test"]
    assert distill["teacher"]["test"]["accuracy"] > 0.8

    assert summary["test"]["accuracy"] > 0.8, summary["test"]
    kl = [row["train/distill_kl"] for row in map(json.loads, (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()) if "train/loss" in row]
    assert len(kl) == 3 and kl[-1] < kl[0], kl

    # The student agrees with the teacher on most test rows, and it is the 1-layer model counted.
    student_run = FinishedRun.open(tmp_path / "student")
    student, teacher = student_run.load_model(), teacher_run.load_model()
    student_logits, labels = student_run.predict(student)
    teacher_logits, _ = teacher_run.predict(teacher)
    agreement = float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())
    assert agreement > 0.85, agreement
    assert student.config.num_hidden_layers == 1
    assert distill["student"]["parameters"] == sum(p.numel() for p in student.parameters())
    assert distill["teacher"]["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert distill["size_ratio"] > 1
    assert distill["delta"]["accuracy"] == pytest.approx(summary["test"]["accuracy"] - distill["teacher"]["test"]["accuracy"])
    assert "distillation (T 2.0, alpha 1.0): student" in summary_table(summary)
    assert yaml.safe_load((tmp_path / "student" / "recipe.yaml").read_text())["distill"]["teacher"] == str(finished_text_run)


BAD_TEACHERS = [
    ("missing", "distill.teacher: {path} not found"),
    ("not_a_run", "distill.teacher: {path} is not a finished run (no recipe.yaml, summary.json, model)"),
    ("other_labels", "distill.teacher: {path} has labels ['negative', 'positive']; this run has ['positive', 'negative']"),
    ("other_task", "distill.teacher: {path} is a image_classification run; this run is text_classification"),
    ("name_too_long", "distill.teacher: {short}...: File name too long"),  # the file system refuses the name itself
]


@pytest.mark.parametrize("case,expected", BAD_TEACHERS, ids=[case for case, _ in BAD_TEACHERS])
def test_bad_teacher_is_a_one_line_error(case, expected, tiny_recipe, finished_text_run, tiny_bert, tmp_path, cli_in_process):
    teacher = {"missing": tmp_path / "nowhere", "not_a_run": tiny_bert, "name_too_long": tmp_path / ("x" * 300)}.get(case, finished_text_run)
    if case == "other_labels":
        tiny_recipe["data"]["labels"] = ["positive", "negative"]
    if case == "other_task":
        teacher = copy_run(finished_text_run, tmp_path / "copies")
        recorded = yaml.safe_load((teacher / "recipe.yaml").read_text())
        recorded["task"] = {"type": "image_classification"}
        recorded["data"]["columns"] = {"image": "sentence", "label": "sentiment"}
        (teacher / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    tiny_recipe["distill"] = {"teacher": str(teacher)}
    code, err = cli_in_process("run", str(write_recipe(tiny_recipe, tmp_path / "student.yaml")))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith(f"error: {expected.format(path=teacher, short=str(teacher)[:80])}"), err
