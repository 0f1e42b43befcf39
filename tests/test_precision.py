"""Weights in the recipe's dtype, activation checkpointing and fp16 loss scaling: the loop's
model building (no Ray where none is needed) and one real fp16 run on two Ray Train workers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import cli, tiny_recipe_dict, unit_recipe
from raytune_ft import run
from raytune_ft.backends import BACKENDS
from raytune_ft.errors import UserError
from raytune_ft.recipe import validate_recipe
from raytune_ft.tasks import build_task
from raytune_ft.train.loop import build_model
from raytune_ft.train.planning import plan_run


def built(recipe) -> tuple[torch.nn.Module, dict]:
    return build_model(build_task(recipe, ["negative", "positive"]), recipe, BACKENDS[recipe.train.backend](recipe))


@pytest.mark.parametrize("dtype", ["bf16", "fp32", None])
def test_the_model_loads_in_the_recipes_dtype(tiny_bert, dtype):
    recipe = unit_recipe({"type": "text_classification"}, {"path": str(tiny_bert), "dtype": dtype})
    model, loading = built(recipe)
    expected = torch.bfloat16 if dtype == "bf16" else torch.float32  # None: the checkpoint's own (the tiny BERT's is fp32)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert loading["peak_rss_bytes"] >= loading["rss_before_bytes"] > 0 and not loading["partitioned"]


def test_activation_checkpointing_recomputes_the_same_gradients(tiny_bert):
    """Checkpointed layers recompute their activations in the backward pass: the same loss and
    gradients as keeping them (dropout on: the recomputation replays its random state)."""
    plain = unit_recipe({"type": "text_classification"}, tiny_bert, train={"dropout": 0.1})
    checkpointed = plain.model_copy(update={"train": plain.train.model_copy(update={"gradient_checkpointing": True})})
    grads = []
    for recipe in (plain, checkpointed):
        torch.manual_seed(0)
        model, _ = built(recipe)
        model.train()
        torch.manual_seed(1)
        loss = model(input_ids=torch.randint(0, 1000, (4, 16)), labels=torch.tensor([0, 1, 0, 1])).loss
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[1][0] == grads[0][0]
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
    assert model.is_gradient_checkpointing


def test_bf16_weights_with_checkpointing_validate_on_the_shipped_recipe(tmp_path):
    result = cli("validate", "jobs/text_classification.yaml", "--set", "model.dtype=bf16", "--set", "train.gradient_checkpointing=true")
    assert result.returncode == 0, result.stderr


def test_a_model_without_checkpointable_layers_is_refused_before_ray(tiny_efficientnet, tmp_path):
    recipe = validate_recipe({"name": "img", "task": {"type": "image_classification", "image_size": 32}, "model": {"path": str(tiny_efficientnet)},
                              "data": {"train": "asset:fashion-mnist/train", "columns": {"image": "image", "label": "label"}, "max_rows": 64},
                              "train": {"gradient_checkpointing": True}})
    with pytest.raises(UserError, match="train.gradient_checkpointing: task image_classification's model .* has no layers transformers can checkpoint"):
        plan_run(recipe)


def test_fp16_with_loss_scaling_trains_on_two_workers(tiny_bert, sentiment_data, local_ray, tmp_path):
    """fp16 autocast under DDP: the loss is scaled up for the backward and the gradients unscaled
    before clipping; the scale travels with every checkpoint."""
    recipe = tiny_recipe_dict(tiny_bert, sentiment_data, tmp_path / "run")
    recipe["train"].update(precision="fp16", epochs=3)
    summary = run(validate_recipe(recipe))
    assert summary["test"]["accuracy"] > 0.8  # chance is 0.5
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert all(torch.isfinite(torch.tensor(row["train/loss"])) for row in rows)
    checkpoint = sorted((tmp_path / "run").glob("checkpoint_epoch_*"))[-1]
    skeleton = json.loads((checkpoint / "optimizer.json").read_text())
    assert "scaler" in json.dumps(skeleton) and "growth_factor" in json.dumps(skeleton)
